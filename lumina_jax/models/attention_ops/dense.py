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
    k_scale: Optional[Array] = None, v_scale: Optional[Array] = None,
) -> Array:
    """q (B, T, N, H), k and v (B, S, K, H) -> (B, T, N, H) in q's dtype; see `attention_ops.attention`.

    With (B, K, S) `k_scale` / `v_scale` (a quantised cache) the keys are k x k_scale and the values v x v_scale:
    q.(s k) = s (q.k) scales the float32 scores, and sum p (s v) = sum (p s) v the probabilities, so the stored
    values enter the products unscaled and no dequantised copy of the cache is made.
    """
    B, T, N, H = q.shape
    K = k.shape[2]
    mask = attention_mask(q_slots, k_slots, q_segments, k_segments)
    qg = q.reshape(B, T, K, N // K, H)
    # Scores and softmax in float32 whatever the compute dtype; kv head j serves query heads j*G..j*G+G-1.
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32)
    if k_scale is not None:
        scores = scores * k_scale[:, :, None, None, :]
    scores = scores * (1.0 / jnp.sqrt(jnp.float32(H)))
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    if v_scale is not None:
        probs = probs * v_scale[:, :, None, None, :]
    return jnp.einsum("bkgts,bskh->btkgh", probs.astype(q.dtype), v).reshape(B, T, N, H)
