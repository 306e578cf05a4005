"""The reference attention: the full (T, S) score matrix in float32, softmax, weighted sum of values.

Simple and exact, and cheap for decoding (T = 1), but at training lengths the float32 scores dominate the
memory of a step: (B, N, T, S) x 4 bytes per layer, several copies kept for the backward pass.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array


def attention_mask(
    q_slots: Array, k_slots: Array, q_segments: Optional[Array], k_segments: Optional[Array]
) -> Array:
    """Boolean (B, T, S) mask: key slot <= query slot, and equal segment ids when given."""
    mask = k_slots[:, None, :] <= q_slots[:, :, None]
    if q_segments is not None:
        mask &= q_segments[:, :, None] == k_segments[:, None, :]
    return mask


def dense_attention(
    q: Array, k: Array, v: Array, q_slots: Array, k_slots: Array,
    q_segments: Optional[Array] = None, k_segments: Optional[Array] = None,
) -> Array:
    """q (B, T, N, H), k and v (B, S, K, H) -> (B, T, N, H) in q's dtype; see `attention_ops.attention`."""
    B, T, N, H = q.shape
    K = k.shape[2]
    mask = attention_mask(q_slots, k_slots, q_segments, k_segments)
    qg = q.reshape(B, T, K, N // K, H)
    # Scores and softmax in float32 whatever the compute dtype; kv head j serves query heads j*G..j*G+G-1.
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / jnp.sqrt(jnp.float32(H)))
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(B, T, N, H)
