"""Chameleon self-attention: per-head q/k LayerNorm, rotate-half RoPE, grouped-query attention, KV cache.

Axis legend used in the einsums below:
  B batch, T query length (new tokens), S key length (T without a cache, cache slots with one),
  D model dim, N query heads, K kv heads, G query heads per kv head (N = K * G), H head dim.

Differences from the reference (Hugging Face / Lumina `ChameleonAttention`):
- attention scores and the softmax are always computed in float32 (the reference eager path does not upcast);
- the q/k LayerNorm epsilon is a config field (`qk_norm_eps`) instead of a hard-coded 1e-5;
- the q/k-norm parameters keep the row count of the source file (1 row for Lumina 7B, 4 for 34B, H for
  Hugging Face checkpoints) and are expanded to heads at run time;
- a static, preallocated KV cache written at explicit slots, with causality by slot and RoPE by position.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from lumina_jax.config import ChameleonConfig
from lumina_jax.models import attention_ops
from lumina_jax.models import quantization

Array = jax.Array

# Logical axis names of one layer's KV cache buffer. Unquantised, (B, S, K, H), slots before heads: a decode
# step's write is one whole (K, H) block per row. Quantised, (B, K, S, H), heads before slots: the step's products
# over H leave the scores (B, K, S) with the long slot axis minor, the layout of the scales they are multiplied
# by (slots before heads left them heads-minor, padded to whole TPU tiles and copied every layer). Each is the
# layout measured best for its kind of cache on v5e and v5p (docs/quantization.md, "Layout of the decode step").
CACHE_AXES = ("cache_batch", "cache_length", "cache_kv_heads", "kv")
QUANTIZED_CACHE_AXES = ("cache_batch", "cache_kv_heads", "cache_length", "kv")
# and of a quantised cache's scales (B, K, S): the values' layout without H
# (a trailing size-1 axis would be padded to a whole TPU tile, as large as the values).
CACHE_SCALE_AXES = ("cache_batch", "cache_kv_heads", "cache_length")
# A quantised cache's length is rounded up to whole TPU tiles (128 lanes; 32 int8 sublanes): with a ragged slot
# axis the TPU compiler reorders the buffer's axes to avoid padding, which undoes the heads-first layout. (An
# unquantised cache is not rounded: rounded, the compiled generate program took 2.2 GiB more per chip.)
CACHE_SLOT_MULTIPLE = 128


def default_kernel_init(stddev: float = 0.02):
    """Normal(0, 0.02), the `initializer_range` of the Hugging Face Chameleon config."""
    return nn.initializers.normal(stddev)


def logical_param(module: nn.Module, name: str, init, shape, dtype, axes):
    """Declares a parameter boxed with its logical axis names (unboxed transparently at apply time)."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class Linear(nn.Module):
    """A bias-free projection: one `kernel` parameter with logical axes, applied by an einsum in `dtype`.

    Under qwix's int8 provider (`quantization.quantize_module`) the kernel arrives quantised with scales already
    in `dtype`, and qwix's einsum dequantises it; it is cast only when its dtype differs.
    """

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    equation: str  # einsum equation "inputs,kernel->outputs"
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = logical_param(self, "kernel", default_kernel_init(), self.shape, self.param_dtype, self.axes)
        if kernel.dtype != jnp.dtype(self.dtype):
            kernel = kernel.astype(self.dtype)
        return jnp.einsum(self.equation, x.astype(self.dtype), kernel)


@flax.struct.dataclass
class KVCache:
    """Static, preallocated key/value cache of one layer: `k`, `v` (B, S, K, H) in the compute dtype.

    The model's cache is a tuple of these, one per layer (see `init_cache`). Storage goes through `write`
    and `read` only. A quantised cache (`ChameleonConfig.kv_cache_quant`) stores int8 or float8 values in
    `k`, `v` (B, K, S, H), heads first (`QUANTIZED_CACHE_AXES`), and one float32 scale per row, head and slot
    in `k_scale`, `v_scale` (B, K, S); an unquantised one has no scales (None).
    """

    k: Array
    v: Array
    k_scale: Optional[Array] = None
    v_scale: Optional[Array] = None

    @property
    def max_length(self) -> int:
        return self.k.shape[2 if self.quantized else 1]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[1 if self.quantized else 2]

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    def write(self, k_new: Array, v_new: Array, cache_index: Array) -> "KVCache":
        """Writes (B, T, K, H) new keys/values of row b at slots cache_index[b] + arange(T).

        The caller keeps cache_index[b] + T <= max_length: `dynamic_update_slice` clamps the start index
        instead of failing, which would write to the wrong slots. A quantised cache quantises each new head
        vector on its own (`quantization.quantize_heads`), so earlier slots are never re-scaled.
        """
        def put(buf, new, idx):  # (S, K, H) <- (T, K, H) at slot idx
            return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (idx, 0, 0))

        def put_heads_first(buf, new, idx):  # (K, S, H) <- (T, K, H) at slot idx
            return jax.lax.dynamic_update_slice(buf, jnp.swapaxes(new, 0, 1).astype(buf.dtype), (0, idx, 0))

        def store(buf, new):
            if not self.quantized:
                return nn.with_logical_constraint(jax.vmap(put)(buf, new, cache_index), CACHE_AXES)
            return nn.with_logical_constraint(jax.vmap(put_heads_first)(buf, new, cache_index), QUANTIZED_CACHE_AXES)

        def put_scale(buf, new, idx):  # (K, S) <- (K, T) at slot idx
            return jax.lax.dynamic_update_slice(buf, new, (0, idx))

        def store_scale(buf, new):  # new (B, T, K, 1) from quantize_heads
            new = jnp.swapaxes(new[..., 0], 1, 2)
            return nn.with_logical_constraint(jax.vmap(put_scale)(buf, new, cache_index), CACHE_SCALE_AXES)

        if not self.quantized:
            return KVCache(k=store(self.k, k_new), v=store(self.v, v_new))
        qk, sk = quantization.quantize_heads(k_new, self.k.dtype)
        qv, sv = quantization.quantize_heads(v_new, self.v.dtype)
        return KVCache(k=store(self.k, qk), v=store(self.v, qv), k_scale=store_scale(self.k_scale, sk),
                       v_scale=store_scale(self.v_scale, sv))

    def read(self, dtype) -> tuple[Array, Array]:
        """All slots of one layer as (B, S, K, H) keys and values in `dtype` (dequantised when quantised), the
        layout `attention_ops.attention` takes (a transposed view of the buffers)."""
        if not self.quantized:
            return self.k.astype(dtype), self.v.astype(dtype)
        return (_slot_major(quantization.dequantize_cache(self.k, self.k_scale, dtype)),
                _slot_major(quantization.dequantize_cache(self.v, self.v_scale, dtype)))

    def stored(self, k_new: Array, v_new: Array, dtype) -> tuple[Array, Array]:
        """(B, T, K, H) new keys and values as `write` stores them and `read` returns them, in `dtype`."""
        if not self.quantized:
            return k_new.astype(self.k.dtype).astype(dtype), v_new.astype(self.v.dtype).astype(dtype)
        return (quantization.dequantize_heads(*quantization.quantize_heads(k_new, self.k.dtype), dtype),
                quantization.dequantize_heads(*quantization.quantize_heads(v_new, self.v.dtype), dtype))

    def read_scaled(self, dtype) -> tuple[Array, Array, Optional[Array], Optional[Array]]:
        """(k, v, k_scale, v_scale): the stored values cast to `dtype` (exact for int8 and e4m3 in bf16/f32)
        as (B, S, K, H) keys and values, and the (B, K, S) scales (None unquantised), for attention to apply to
        its scores and probabilities instead of dequantising the whole cache (`attention_ops.attention`)."""
        if not self.quantized:
            return self.k.astype(dtype), self.v.astype(dtype), None, None
        return _slot_major(self.k.astype(dtype)), _slot_major(self.v.astype(dtype)), self.k_scale, self.v_scale


def _slot_major(x: Array) -> Array:
    """A heads-first (B, K, S, H) buffer as the (B, S, K, H) keys or values attention takes: a transpose the
    compiler folds into the products that read it (they contract H or S either way)."""
    return jnp.swapaxes(x, 1, 2)


def cache_axes(config: ChameleonConfig) -> tuple[str, ...]:
    """The logical axes of `config`'s cache buffers: `QUANTIZED_CACHE_AXES` or `CACHE_AXES`."""
    return QUANTIZED_CACHE_AXES if config.kv_cache_quant != "none" else CACHE_AXES


def init_cache(config: ChameleonConfig, batch: int, max_len: int, dtype=None) -> tuple[KVCache, ...]:
    """A zero KV cache for `batch` rows of `max_len` slots in `dtype` (default: the compute dtype).

    One `KVCache` per layer rather than one stacked (L, B, S, K, H) array: inside a decode loop each layer's
    buffer is then updated in place, where a stacked cache is rebuilt every step (benchmarks/generate.py).
    With `config.kv_cache_quant` set the values are stored int8 / float8, heads first (B, K, S, H), with float32
    (B, K, S) scales (`dtype` is then ignored), and `max_len` is rounded up to a multiple of
    `CACHE_SLOT_MULTIPLE` slots. Under `sharding.sharding_context` the buffers take the shardings of
    `cache_axes(config)` (scales: `CACHE_SCALE_AXES`).
    """
    quantized = config.kv_cache_quant != "none"
    K, H = config.num_kv_heads, config.head_dim
    if quantized:
        max_len = -(-max_len // CACHE_SLOT_MULTIPLE) * CACHE_SLOT_MULTIPLE
        dtype = quantization.kv_storage_dtype(config.kv_cache_quant)
    shape = (batch, K, max_len, H) if quantized else (batch, max_len, K, H)
    dtype = jnp.dtype(dtype or config.dtype)

    def zeros(shape, dtype):
        return nn.with_logical_constraint(jnp.zeros(shape, dtype), cache_axes(config))

    def layer():
        if not quantized:
            return KVCache(k=zeros(shape, dtype), v=zeros(shape, dtype))
        scale = nn.with_logical_constraint(jnp.zeros((batch, K, max_len), jnp.float32),
                                           CACHE_SCALE_AXES)
        return KVCache(k=zeros(shape, dtype), v=zeros(shape, dtype), k_scale=scale, v_scale=scale)

    return tuple(layer() for _ in range(config.num_layers))


def rope_cos_sin(positions: Array, head_dim: int, theta: float, dtype) -> tuple[Array, Array]:
    """cos/sin tables (B, T, H) for rotate-half RoPE: computed in float32, then cast to `dtype` (as HF)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, T, H/2)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x (B, T, N, H) rotated with the Hugging Face rotate-half layout (dim i pairs with dim i + H/2)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


class HeadLayerNorm(nn.Module):
    """LayerNorm over the head dim with per-head affine parameters stored as `rows` shared rows.

    Row i serves heads i*N/rows .. (i+1)*N/rows - 1. Normalisation runs in float32 (mean, biased variance),
    the result is cast to the compute dtype and then scaled and shifted, as `F.layer_norm` + affine in torch.
    """

    num_heads: int
    rows: int
    eps: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: Array) -> Array:  # x (B, T, N, H)
        head_dim = x.shape[-1]
        axes = ("norm_rows", "kv")
        scale = logical_param(self, "scale", nn.initializers.ones, (self.rows, head_dim), self.param_dtype, axes)
        bias = logical_param(self, "bias", nn.initializers.zeros, (self.rows, head_dim), self.param_dtype, axes)
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = ((xf - mean) * jax.lax.rsqrt(var + self.eps)).astype(self.dtype)
        repeat = self.num_heads // self.rows
        scale = jnp.repeat(scale.astype(self.dtype), repeat, axis=0)
        bias = jnp.repeat(bias.astype(self.dtype), repeat, axis=0)
        return y * scale + bias


class Attention(nn.Module):
    """Multi-head / grouped-query self-attention of a Chameleon block (no biases)."""

    config: ChameleonConfig

    @nn.compact
    def __call__(
        self,
        x: Array,
        positions: Array,
        segment_ids: Optional[Array],
        cache: Optional[KVCache],
        cache_index: Optional[Array],
    ) -> tuple[Array, Optional[KVCache]]:
        cfg = self.config
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q = Linear((D, N, H), ("embed", "heads", "kv"), "btd,dnh->btnh", dtype, pdtype, name="q_proj")(x)
        k = Linear((D, K, H), ("embed", "kv_heads", "kv"), "btd,dkh->btkh", dtype, pdtype, name="k_proj")(x)
        v = Linear((D, K, H), ("embed", "kv_heads", "kv"), "btd,dkh->btkh", dtype, pdtype, name="v_proj")(x)
        q = nn.with_logical_constraint(q, ("activation_batch", "activation_length", "activation_heads", "activation_kv"))
        k = nn.with_logical_constraint(k, ("activation_batch", "activation_length", "activation_kv_heads", "activation_kv"))
        v = nn.with_logical_constraint(v, ("activation_batch", "activation_length", "activation_kv_heads", "activation_kv"))
        q = checkpoint_name(q, "query_proj")
        k = checkpoint_name(k, "key_proj")
        v = checkpoint_name(v, "value_proj")

        # Per-head LayerNorm before RoPE, in the Hugging Face row order (the converted q/k kernels keep it;
        # docs/reference.md#rope-layout-and-the-qk-permutation).
        q = HeadLayerNorm(N, cfg.q_norm_rows, cfg.qk_norm_eps, dtype, pdtype, name="q_norm")(q)
        k = HeadLayerNorm(K, cfg.k_norm_rows, cfg.qk_norm_eps, dtype, pdtype, name="k_norm")(k)
        cos, sin = rope_cos_sin(positions, H, cfg.rope_theta, dtype)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)

        T = x.shape[1]
        attend = functools.partial(attention_ops.attention, q, impl=cfg.attention_impl, block=cfg.attention_block)
        if cache is None:  # self-attention over slots 0..T-1
            new_cache = None
            out = attend(k, v, segment_ids=segment_ids)
        else:
            q_slots = cache_index[:, None] + jnp.arange(T, dtype=jnp.int32)
            slots = jnp.broadcast_to(jnp.arange(cache.max_length, dtype=jnp.int32), (x.shape[0], cache.max_length))
            step = T <= attention_ops.CACHE_DENSE_MAX_NEW
            if step and attention_ops.cache_impl(cfg.attention_impl, T, cache.max_length, dtype) == "dense":
                # A decode step: the new tokens beside the cache as it was (slots before cache_index), as the
                # cache stores them. The same attention as over the written cache, but the update is only
                # written, so the compiler need not stage the whole cache through on-chip memory and write it
                # all back every step. (For a prompt the written-cache path needs less memory.)
                ck, cv, k_scale, v_scale = cache.read_scaled(dtype)
                old = jnp.where(slots < cache_index[:, None], slots, jnp.iinfo(jnp.int32).max)
                out = attend(ck, cv, q_slots=q_slots, k_slots=old, k_scale=k_scale, v_scale=v_scale,
                             extra=(*cache.stored(k, v, dtype), q_slots))
                new_cache = cache.write(k, v, cache_index)
            else:
                new_cache = cache.write(k, v, cache_index)
                ck, cv, k_scale, v_scale = new_cache.read_scaled(dtype)
                out = attend(ck, cv, q_slots=q_slots, k_slots=slots, k_scale=k_scale, v_scale=v_scale)

        out = nn.with_logical_constraint(out, ("activation_batch", "activation_length", "activation_heads", "activation_kv"))
        out = Linear((N, H, D), ("heads", "kv", "embed"), "btnh,nhd->btd", dtype, pdtype, name="o_proj")(out)
        out = checkpoint_name(out, "out_proj")
        return out, new_cache
