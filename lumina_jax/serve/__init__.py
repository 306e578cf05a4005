"""The web demo and HTTP API (`python -m lumina_jax.serve`): a Gradio page and FastAPI routes in one server,
with concurrent requests batched into shared `Lumina.generate` calls (see docs/serving.md)."""
