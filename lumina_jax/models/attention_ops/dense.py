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
    extra: Optional[tuple[Array, Array, Array]] = None,
) -> Array:
    """q (B, T, N, H), k and v (B, S, K, H) -> (B, T, N, H) in q's dtype; see `attention_ops.attention`.

    With (B, K, S) `k_scale` / `v_scale` (a quantised cache) the keys are k x k_scale and the values v x v_scale:
    q.(s k) = s (q.k) scales the float32 scores, and sum p (s v) = sum (p s) v the probabilities, so the stored
    values enter the products unscaled and no dequantised copy of the cache is made.

    `extra` = (k2, v2, k2_slots): more keys and values (B, S2, K, H) with their slots (B, S2), attended in the
    same softmax as if concatenated after k and v (a decode step's new tokens beside the cache as it was).
    """
    B, T, N, H = q.shape
    K = k.shape[2]
    qg = q.reshape(B, T, K, N // K, H)

    def scores_of(keys, slots, scale, q_segs, k_segs):
        # Scores in float32 whatever the compute dtype; kv head j serves query heads j*G..j*G+G-1.
        s = jnp.einsum("btkgh,bskh->bkgts", qg, keys, preferred_element_type=jnp.float32)
        if scale is not None:
            s = s * scale[:, :, None, None, :]
        s = s * (1.0 / jnp.sqrt(jnp.float32(H)))
        mask = attention_mask(q_slots, slots, q_segs, k_segs)
        return jnp.where(mask[:, None, None, :, :], s, jnp.finfo(jnp.float32).min)

    scores = scores_of(k, k_slots, k_scale, q_segments, k_segments)
    if extra is None:
        probs = jax.nn.softmax(scores, axis=-1)  # float32
        if v_scale is not None:
            probs = probs * v_scale[:, :, None, None, :]
        return jnp.einsum("bkgts,bskh->btkgh", probs.astype(q.dtype), v).reshape(B, T, N, H)
    # One softmax over both key sets, without concatenating them: a (S + S2) slot axis would not fill whole
    # TPU tiles, and the compiler re-lays the float32 scores out to join them (docs/quantization.md).
    extra_scores = scores_of(extra[0], extra[2], None, None, None)
    top = jnp.maximum(jnp.max(scores, axis=-1, keepdims=True), jnp.max(extra_scores, axis=-1, keepdims=True))
    e_main, e_extra = jnp.exp(scores - top), jnp.exp(extra_scores - top)
    total = jnp.sum(e_main, axis=-1, keepdims=True) + jnp.sum(e_extra, axis=-1, keepdims=True)
    main, probs_extra = e_main / total, e_extra / total
    if v_scale is not None:
        main = main * v_scale[:, :, None, None, :]
    out = jnp.einsum("bkgts,bskh->btkgh", main.astype(q.dtype), v, preferred_element_type=jnp.float32)
    out = out + jnp.einsum("bkgts,bskh->btkgh", probs_extra.astype(q.dtype), extra[1],
                           preferred_element_type=jnp.float32)
    return out.astype(q.dtype).reshape(B, T, N, H)
