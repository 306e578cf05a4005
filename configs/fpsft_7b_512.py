"""FP-SFT stage 1: Lumina-mGPT 7B at 512 px, from Chameleon_7B_mGPT with the image rows of lm_head zeroed
(the reference's `starting_point`). Set checkpoint.init_from to the converted Chameleon_7B_mGPT."""
from lumina_jax.config import model_preset
from lumina_jax.training.config import fpsft_config


def get_config():
    return fpsft_config("fpsft_7b_512", model_preset("7b"), seq_len=4096, dropout=0.05,
                        init_from="ckpts/chameleon_7b_mgpt", zero_image_lm_head=True)
