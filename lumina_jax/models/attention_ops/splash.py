"""TPU attention with JAX's Pallas splash-attention kernel (`jax.experimental.pallas.ops.tpu.splash_attention`).

The kernel computes causal self-attention with packed segment ids block by block in VMEM, forward and
backward (its own custom VJP), skipping the blocks above the diagonal. It works on one example and the
heads of one device, so it is vmapped over the batch and, when a mesh is active (`jax.set_mesh`, as in
`lumina_jax.sharding.sharding_context`), wrapped in `jax.shard_map` over the mesh axes that the active
logical rules give the activations' batch and heads: each device runs the kernel on its own rows and
heads, nothing is communicated. The mesh comes from `jax.sharding.get_abstract_mesh()`, so callers pass
nothing beyond the config's `attention_impl`.

Only self-attention over slots 0..T-1 uses the kernel (its masks are static); the KV-cache case, with a
per-row `cache_index`, is handled by the caller with another implementation.
"""
from __future__ import annotations

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
from jax.sharding import PartitionSpec

Array = jax.Array
LANES = 128  # the kernel's key blocks are multiples of the TPU lane count; lengths are padded to it

# Logical names of the (B, T, N, H) activations, as the Attention module constrains q and its output.
_Q_AXES = ("activation_batch", "activation_length", "activation_heads", "activation_kv")
_KV_AXES = ("activation_batch", "activation_length", "activation_kv_heads", "activation_kv")


def _block(length: int, block: int) -> int:
    """The largest of block, 256, 128 that divides `length` (a multiple of 128)."""
    for b in (block, 256, LANES):
        if b <= length and length % b == 0:
            return b
    return LANES


def _kernel(heads: int, length: int, block: int, interpret: bool):
    """The splash kernel for `heads` local heads and `length` (padded) tokens, causal, fused backward.

    Built per trace (it holds jax arrays, which must not outlive the trace); the mask analysis behind it
    is cached by the kernel library."""
    b = _block(length, block)
    mask = sm.MultiHeadMask([sm.CausalMask((length, length)) for _ in range(heads)])
    sizes = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                          block_kv_dkv_compute=b, use_fused_bwd_kernel=True)
    return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _local_attention(q, k, v, segments, block: int, interpret: bool):
    """The kernel on local arrays: q (B, T, N, H), k and v (B, T, K, H), segments (B, T) or None."""
    B, T, N, H = q.shape
    Tp = -(-T // LANES) * LANES
    pad = [(0, 0), (0, Tp - T), (0, 0), (0, 0)]
    # Padded keys come after every real query (causal); padded queries see themselves and are dropped.
    q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
    # The kernel takes q pre-scaled; scale in float32 and round once, as the dense path rounds its scores.
    q = (q.astype(jnp.float32) * (1.0 / np.sqrt(H))).astype(k.dtype)
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # (B, heads, T, H)
    kernel = _kernel(N, Tp, block, interpret)
    if segments is None:
        out = jax.vmap(kernel)(q, k, v)
    else:
        seg = jnp.pad(segments, [(0, 0), (0, Tp - T)])
        out = jax.vmap(kernel)(q, k, v, sk.SegmentIds(q=seg, kv=seg))
    return jnp.swapaxes(out, 1, 2)[:, :T]


def _fit(spec: PartitionSpec, shape: tuple[int, ...], mesh) -> tuple:
    """`spec` without the mesh axes that do not divide their dimension (those stay whole on each device)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        out.append(axes if names and all(a in mesh.shape for a in names) and dim % size == 0 else None)
    return tuple(out)


def splash_attention(
    q: Array, k: Array, v: Array, segments: Optional[Array] = None, *, block: int = 512, interpret: bool = False,
) -> Array:
    """Causal self-attention q (B, T, N, H), k and v (B, T, K, H) -> (B, T, N, H) with the splash kernel.

    `segments` (B, T): packed segment ids (tokens attend within their segment only), or None. `block`:
    the kernel's query/key block (clipped to the padded length). `interpret`: run the kernel in the Pallas
    interpreter (any backend; for tests on CPU).
    """
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"splash attention is self-attention: query length {q.shape[1]} != key length {k.shape[1]}")
    run = functools.partial(_local_attention, block=block, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return run(q, k, v, segments)
    q_spec = _fit(nn.logical_to_mesh_axes(_Q_AXES), q.shape, mesh)
    kv_spec = _fit(nn.logical_to_mesh_axes(_KV_AXES), k.shape, mesh)
    if q_spec[2] != kv_spec[2]:  # kv heads that cannot split like the query heads: keep all heads whole
        q_spec, kv_spec = q_spec[:2] + (None, None), kv_spec[:2] + (None, None)
    q_spec, kv_spec = PartitionSpec(*q_spec[:1], None, *q_spec[2:]), PartitionSpec(*kv_spec[:1], None, *kv_spec[2:])
    seg_spec = PartitionSpec(q_spec[0], None)
    if segments is None:
        return jax.shard_map(lambda a, b, c: run(a, b, c, None), in_specs=(q_spec, kv_spec, kv_spec),
                             out_specs=q_spec, check_vma=False)(q, k, v)
    return jax.shard_map(run, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec,
                         check_vma=False)(q, k, v, segments)
