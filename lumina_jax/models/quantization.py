"""Inference quantisation: int8 weights through qwix, and the int8 / fp8 storage of the KV cache.

Weights (`ChameleonConfig.weight_quant="int8"`): every projection (q/k/v/o, gate/up/down) and `lm_head` is
stored as a qwix `QArray`: int8 values plus one scale per output channel (qwix's symmetric mapping: scale =
max |w| over the contracted dimensions / 127.5, codes round(w / scale) clipped to -128..127), with the scales
in the compute dtype. qwix's post-training provider intercepts the `jnp.einsum` of
those modules and dequantises the kernel into the compute dtype just before the matrix product (XLA fuses the
two), so the arithmetic stays bf16 and only the bytes read per step halve. Everything else (embedding, norms)
stays as it was.

KV cache (`ChameleonConfig.kv_cache_quant`): `KVCache.write` stores each new key/value head vector as int8
(absmax / 127) or float8 e4m3 (absmax / 448) values with one float32 scale per row, slot and head;
`KVCache.read` multiplies back in float32 and casts to the compute dtype.

Differences from the reference (Lumina-mGPT 2.0 quantises weights on GPU with its own kernels):
- symmetric per-output-channel int8 with bf16 compute (weight-only); no activation quantisation;
- inside the module the quantised head returns logits in the compute dtype (qwix's einsum); the sampler's
  head (`lm_head_kernel` / `project_logits`) dequantises itself and accumulates in float32 as without
  quantisation.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import qwix
from flax import traverse_util

Array = jax.Array

# The modules whose kernel is quantised, as qwix module-path patterns (layers_<i>/self_attn/q_proj, ...).
QUANTIZED_MODULES = r"(.*/)?(self_attn/(q_proj|k_proj|v_proj|o_proj)|mlp/(gate_proj|up_proj|down_proj))|lm_head"
WEIGHT_RULES = (qwix.QtRule(module_path=QUANTIZED_MODULES, op_names=("einsum",), weight_qtype="int8"),)

# KV cache storage: the stored dtype and the largest magnitude it represents (int8 keeps -127..127, symmetric).
KV_STORAGE = {"int8": (jnp.int8, 127.0), "fp8": (jnp.float8_e4m3fn, 448.0)}


# ---- weights ------------------------------------------------------------------------------------------------


def quantize_module(model: nn.Module) -> nn.Module:
    """`model` with qwix's post-training int8 provider: its projection einsums take `QArray` kernels."""
    return qwix.quantize_model(model, qwix.PtqProvider(list(WEIGHT_RULES)))


def is_quantized(x: Any) -> bool:
    """True for a quantised kernel: a qwix `QArray`, or qwix's parameter wrapper around one (`.array`)."""
    return isinstance(x, qwix.QArray) or isinstance(getattr(x, "array", None), qwix.QArray)


def qarray(x: Any) -> qwix.QArray:
    """The `QArray` of a quantised kernel (unwrapping qwix's parameter wrapper)."""
    return x if isinstance(x, qwix.QArray) else x.array


def dequantize(x: Any, dtype) -> Array:
    """A kernel as a plain array in `dtype`: quantised ones dequantised (values x scales), others cast."""
    if is_quantized(x):
        return qwix.dequantize(qarray(x)).astype(dtype)
    return jnp.asarray(x).astype(dtype)


def quantize_params(params: Any, abstract: Any, scale_dtype) -> Any:
    """Quantises a plain (unboxed, unscanned) parameter tree into the layout of `abstract`.

    `abstract` is the unboxed abstract parameter tree of the quantised model (`state.param_shapes` of a config
    with `weight_quant="int8"`): its qwix wrappers say which leaves to quantise and along which axes. Scales
    are computed from float32 values and stored in `scale_dtype` (the compute dtype), so the kernel
    dequantises straight into the dtype of the matrix product. Traceable (jit it with output shardings).
    """
    flat_abstract = traverse_util.flatten_dict(abstract, is_leaf=lambda _, x: is_quantized(x))
    flat = traverse_util.flatten_dict(params)
    fp32 = {k: v.astype(jnp.float32) if is_quantized(flat_abstract.get(k)) else v for k, v in flat.items()}
    return cast_scales(qwix.quantize_params(traverse_util.unflatten_dict(fp32), abstract), scale_dtype)


def cast_scales(tree: Any, dtype) -> Any:
    """Every quantised kernel's scales in `dtype` (works on boxed, abstract and concrete trees)."""
    def cast(x):
        if not is_quantized(x):
            return x
        q = qarray(x)
        q = q.replace(scale=jax.tree.map(lambda s: _astype(s, dtype), q.scale))
        return q if isinstance(x, qwix.QArray) else x.replace(array=q)

    return jax.tree.map(cast, tree, is_leaf=is_quantized)


def _astype(x, dtype):
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
    return x.astype(dtype)


# ---- KV cache -----------------------------------------------------------------------------------------------


def kv_storage_dtype(mode: str):
    """The dtype the cache stores for `kv_cache_quant` mode `mode` ("int8" or "fp8")."""
    return KV_STORAGE[mode][0]


def quantize_heads(x: Array, dtype) -> tuple[Array, Array]:
    """(B, T, K, H) keys or values -> (values in `dtype`, float32 scales (B, T, K, 1)), one scale per head vector.

    scale = max |x| over H / qmax (1 for an all-zero vector), values = x / scale rounded to `dtype` (to the
    nearest integer and clipped to +-127 for int8; the nearest e4m3 number for fp8).
    """
    qmax = {jnp.dtype(d): m for d, m in KV_STORAGE.values()}[jnp.dtype(dtype)]
    xf = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=-1, keepdims=True)
    scale = jnp.where(amax > 0, amax / qmax, 1.0)
    y = jnp.clip(xf / scale, -qmax, qmax)
    if jnp.issubdtype(dtype, jnp.integer):
        y = jnp.round(y)
    return y.astype(dtype), scale


def dequantize_heads(values: Array, scale: Array, dtype) -> Array:
    """The inverse of `quantize_heads`: values x scale in float32, cast to `dtype`."""
    return (values.astype(jnp.float32) * scale).astype(dtype)


def dequantize_cache(values: Array, scale: Array, dtype) -> Array:
    """A cache buffer's (B, K, S, H) stored values times its (B, K, S) scales, in float32, cast to `dtype`."""
    return dequantize_heads(values, scale[..., None], dtype)


def check_kv_backend(mode: str, backend: str | None = None) -> None:
    """Raises ValueError (one line) when the backend cannot compile the cache's storage conversions."""
    if mode == "none":
        return
    dtype = kv_storage_dtype(mode)
    try:
        jax.jit(lambda x: quantize_heads(x, dtype)[0].astype(jnp.float32), backend=backend).lower(
            jax.ShapeDtypeStruct((1, 1, 1, 8), jnp.float32)).compile()
    except Exception as e:  # noqa: BLE001 - the compiler's own error type differs by backend
        name = backend or jax.default_backend()
        raise ValueError(f"kv_cache_quant={mode!r}: the {name} backend cannot store {jnp.dtype(dtype).name} "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
