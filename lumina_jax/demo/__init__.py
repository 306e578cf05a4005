"""The shipped demo model's pieces: the synthetic captioned shapes set (`lumina_jax.demo.shapes`)."""
