"""FP-SFT: Lumina-mGPT 34B at 512 px, from Chameleon_34B_mGPT with the image rows of lm_head zeroed.

Dropout 0 follows the paper's Table 1 for the 30B model. FSDP over all devices plus tensor parallelism
inside a host is a reasonable start: parallel.mesh=fsdp=-1,tensor=8."""
from lumina_jax.config import model_preset
from lumina_jax.training.config import fpsft_config


def get_config():
    return fpsft_config("fpsft_34b_512", model_preset("34b"), seq_len=4096, dropout=0.0,
                        init_from="ckpts/chameleon_34b_mgpt", zero_image_lm_head=True)
