"""Omni-SFT: Lumina-mGPT 7B from the 768 FP-SFT stage on the omni task mix (image-to-image, depth,
segmentation, editing ...). An input image plus an output image at 768 px is about 4.8k tokens, so the
sequence length is 6144 [D: the released run's value is not published]."""
from lumina_jax.config import model_preset
from lumina_jax.training.config import fpsft_config


def get_config():
    return fpsft_config("omni_sft_7b", model_preset("7b"), seq_len=6144, dropout=0.05,
                        init_from="ckpts/lumina_mgpt_7b_768")
