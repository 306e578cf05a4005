"""Evaluation of generated images: the deterministic shapes analysis (`lumina_jax.eval.shape_analysis`)."""
