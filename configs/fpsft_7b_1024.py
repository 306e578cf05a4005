"""FP-SFT stage 3: Lumina-mGPT 7B at 1024 px, continuing from the 768 stage.

A 1024x1024 image alone is 4164 tokens, so the sequence length is 5120, not the reference's 4096
(which truncates images; docs/reference.md#silent-truncation)."""
from lumina_jax.config import model_preset
from lumina_jax.training.config import fpsft_config


def get_config():
    return fpsft_config("fpsft_7b_1024", model_preset("7b"), seq_len=5120, dropout=0.05,
                        init_from="ckpts/lumina_mgpt_7b_768")
