"""Checkpoint conversion between the published PyTorch formats and lumina-jax Orbax checkpoints.

Entry point: `python -m lumina_jax.convert <command> ...`; see `--help` of each command.
"""
