"""FP-SFT stage 2: Lumina-mGPT 7B at 768 px, continuing from the 512 stage (converted or exported)."""
from lumina_jax.config import model_preset
from lumina_jax.training.config import fpsft_config


def get_config():
    return fpsft_config("fpsft_7b_768", model_preset("7b"), seq_len=4096, dropout=0.05,
                        init_from="ckpts/lumina_mgpt_7b_512")
