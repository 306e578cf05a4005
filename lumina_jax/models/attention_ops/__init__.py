"""Attention implementations behind one function, chosen by name (`ChameleonConfig.attention_impl`).

All take q (B, T, N, H) and k, v (B, S, K, H) after RoPE and return (B, T, N, H) in q's dtype: query i
attends to key j when key slot <= query slot and (packed sequences) both carry the same segment id, with
scores and softmax in float32. Without slots the call is self-attention over slots 0..T-1 (training,
a prompt without a cache); with slots it is the KV-cache case (queries at cache_index + t, S cache slots).

- `dense`: the full float32 score matrix (the reference; cheapest for decoding).
- `blockwise`: online softmax over key blocks with a recomputing backward in `lax` ops, any backend,
  memory linear in T + S.
- `splash`: JAX's Pallas splash-attention kernel on TPU (self-attention; the cache case falls back).
- `cudnn`: cuDNN flash attention on GPU via `jax.nn.dot_product_attention` (bf16/fp16; self-attention).
- `auto`: by backend at trace time: `AUTO_BY_PLATFORM`; where that is `blockwise` and the whole (T, S) score
  matrix fits in one block, `dense` (one tile either way, so nothing to save, and no recomputation).

The kernels have static causal masks, so in the cache case they (and `auto`) hand over to `dense` for a
few new tokens or small (T, S) scores (a decode step, a short prompt: one fused op) and to `blockwise` for
longer ones.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from lumina_jax.config import ATTENTION_IMPLS as IMPLEMENTATIONS
from lumina_jax.models.attention_ops.blockwise import blockwise_attention
from lumina_jax.models.attention_ops.cudnn import cudnn_attention
from lumina_jax.models.attention_ops.dense import attention_mask, dense_attention
from lumina_jax.models.attention_ops.splash import splash_attention
from lumina_jax.models.quantization import dequantize_heads

__all__ = ["IMPLEMENTATIONS", "AUTO_BY_PLATFORM", "attention", "attention_mask", "blockwise_attention",
           "cache_impl", "cudnn_attention", "dense_attention", "resolve_impl", "splash_attention"]

Array = jax.Array
KERNELS = ("splash", "cudnn")
# What `auto` means on each backend (CPU: see docs/model.md, "Attention implementations", for the measurement).
AUTO_BY_PLATFORM = {"tpu": "splash", "gpu": "cudnn", "cpu": "blockwise"}
# Cache case under a kernel or auto: dense for up to this many new tokens, or while the (T, S) scores per row
# and head stay this small (a short prompt written into a long cache: blockwise would copy the whole cache
# into blocks, which costs more memory than these scores), blockwise beyond.
CACHE_DENSE_MAX_NEW = 16
CACHE_DENSE_MAX_SCORES = 1 << 18


def resolve_impl(impl: str, platform: Optional[str] = None, dtype=None) -> str:
    """The concrete implementation for `impl` on `platform` (default: JAX's default backend) and compute `dtype`.

    `auto` picks `AUTO_BY_PLATFORM`; cuDNN needs a 16-bit dtype, so `auto` on GPU with float32 is blockwise.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention_impl={impl!r} is unknown; known: {IMPLEMENTATIONS}")
    if impl != "auto":
        return impl
    platform = platform or jax.default_backend()
    chosen = AUTO_BY_PLATFORM.get(platform, "blockwise")
    if chosen == "cudnn" and dtype is not None and jnp.dtype(dtype).itemsize != 2:
        return "blockwise"
    return chosen


def cache_impl(impl: str, T: int, S: int, dtype=None) -> str:
    """The implementation the KV-cache case (T new tokens against S slots) runs for `impl`: the kernels and
    `auto` hand over to `dense` for a few new tokens or small scores, to `blockwise` beyond."""
    resolved = resolve_impl(impl, dtype=dtype)
    if resolved in KERNELS or impl == "auto":
        small = T <= CACHE_DENSE_MAX_NEW or T * S <= CACHE_DENSE_MAX_SCORES
        return "dense" if small else "blockwise"
    return resolved


def attention(
    q: Array, k: Array, v: Array, *, impl: str = "dense", q_slots: Optional[Array] = None,
    k_slots: Optional[Array] = None, segment_ids: Optional[Array] = None, block: int = 512,
    k_scale: Optional[Array] = None, v_scale: Optional[Array] = None,
    extra: Optional[tuple[Array, Array, Array]] = None,
) -> Array:
    """Attention of q (B, T, N, H) over k, v (B, S, K, H) with implementation `impl` (see the module doc).

    `q_slots` (B, T) and `k_slots` (B, S): cache slots of the queries and keys, or both None for
    self-attention over slots 0..T-1 (then S == T). `segment_ids` (B, T): packed segment ids of a
    self-attention call, or None. `block`: query/key block of `blockwise` and `splash`.
    `k_scale`, `v_scale` (B, K, S): a quantised cache's per-slot, per-head scales (keys are k x k_scale, values
    v x v_scale). `dense` folds them into the scores and probabilities, so the stored values go into the
    matrix products as they are (a decode step reads the int8 cache once); `blockwise` dequantises first.
    `extra` = (k2, v2, k2_slots): more keys and values in the same softmax, for the cache case when it runs
    `dense` (`cache_impl`); see `dense_attention`.
    """
    if (k_scale is None) != (v_scale is None):
        raise ValueError("attention: give both k_scale and v_scale (a quantised cache) or neither")
    if k_scale is not None and q_slots is None:
        raise ValueError("attention: k_scale/v_scale belong to the KV-cache case (give q_slots and k_slots)")
    B, T = q.shape[:2]
    S = k.shape[1]
    if (q_slots is None) != (k_slots is None):
        raise ValueError("attention: give both q_slots and k_slots (the KV-cache case) or neither")
    if q_slots is not None and segment_ids is not None:
        raise ValueError("attention: segment_ids is for self-attention; the KV-cache case is causal by slot only")
    requested, impl = impl, resolve_impl(impl, dtype=q.dtype)
    if requested == "auto" and impl == "blockwise" and T <= block and S <= block:
        impl = "dense"  # one tile: blockwise would hold the same scores and recompute them for the gradient
    if q_slots is None:
        if S != T:
            raise ValueError(f"attention without slots is self-attention, but T={T} queries and S={S} keys")
        if impl == "splash":
            return splash_attention(q, k, v, segment_ids, block=block)
        if impl == "cudnn":
            return cudnn_attention(q, k, v, segment_ids)
        q_slots = k_slots = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    else:
        impl = cache_impl(requested, T, S, q.dtype)
    if impl == "dense":
        return dense_attention(q, k, v, q_slots, k_slots, segment_ids, segment_ids, k_scale=k_scale,
                               v_scale=v_scale, extra=extra)
    if extra is not None:
        raise ValueError(f"attention: extra keys are for the dense cache case, not {impl!r}")
    if k_scale is not None:  # (B, S, K, H) values, (B, K, S) scales
        k = dequantize_heads(k, jnp.swapaxes(k_scale, 1, 2)[..., None], k.dtype)
        v = dequantize_heads(v, jnp.swapaxes(v_scale, 1, 2)[..., None], v.dtype)
    return blockwise_attention(q, k, v, q_slots, k_slots, segment_ids, segment_ids, block_q=block, block_k=block)
