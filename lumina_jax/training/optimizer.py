"""AdamW with global-norm clipping, warm-up + cosine schedule and an optional weight-decay mask.

Reference semantics (xllmx `adjust_learning_rate_epoch`, torch AdamW): at update index s (0-based)
lr(s) = lr * s / warmup for s < warmup, else min_lr + (lr - min_lr) * (1 + cos(pi * (s - warmup) /
(decay - warmup))) / 2, so the first update of a run with warm-up has lr 0.

Differences from the reference: the schedule is in optimizer steps rather than fractional epochs, and
`decay_norms_biases_embeddings=False` can exclude norms, biases and the embedding table from weight decay
(the reference decays every parameter).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from lumina_jax.training.config import OptimizerConfig


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """lr as a function of the update count (jnp int), warm-up then cosine to `min_lr`."""
    warmup = int(cfg.warmup_steps)
    decay = int(cfg.decay_steps or total_steps)
    span = max(decay - warmup, 1)

    def schedule(count):
        s = jnp.asarray(count, jnp.float32)
        warm = cfg.lr * s / max(warmup, 1)
        progress = jnp.clip((s - warmup) / span, 0.0, 1.0)
        cosine = cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
        return jnp.where(s < warmup, warm, cosine)

    return schedule


def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def is_decayed(path_names: list[str]) -> bool:
    """False for norms (scale/bias of any *norm module), biases and the token embedding."""
    joined = "/".join(path_names)
    if "norm" in joined or path_names[-1] == "bias" or "embed_tokens" in joined:
        return False
    return True


def weight_decay_mask(params):
    """Pytree of bools: True where weight decay applies (norms, biases, embeddings excluded)."""
    return jax.tree_util.tree_map_with_path(lambda p, _: is_decayed(_path_names(p)), params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW (decoupled decay, torch semantics) with the schedule."""
    mask = None if cfg.decay_norms_biases_embeddings else weight_decay_mask
    parts = []
    if cfg.clip_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_grad_norm))
    parts.append(optax.adamw(
        learning_rate=learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
        weight_decay=cfg.weight_decay, mask=mask,
    ))
    return optax.chain(*parts)
