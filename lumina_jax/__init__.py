"""lumina-jax: Lumina-mGPT (Chameleon decoder + VQGAN image tokenizer) in JAX/Flax."""

__version__ = "0.1.0"
