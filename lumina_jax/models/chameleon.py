"""The Chameleon decoder (Lumina-mGPT's language model) as Flax Linen modules.

Axis legend: B batch, T length, D model dim, F MLP width, V vocabulary, L layers.

The parameter tree, the call signature and the KV cache follow docs/design.md. The canonical layout is
the scanned one (a leading "layers" axis on every per-layer leaf), used for training and checkpoints;
decoding with a KV cache runs the unscanned `layers_0`, `layers_1`, ... layout (`scan_layers=False`).
`stack_layers` / `unstack_layers` convert between the two.

Differences from the reference (Lumina's bundled `ChameleonForConditionalGeneration`):
- logits are projected with float32 accumulation and can be computed for a static slice of the
  vocabulary only (`compute_logits(..., vocab_slice=...)`), so training and sampling need not
  materialise full-vocabulary float32 logits (docs/reference.md#full-sequence-fp32-logits);
- the image-logit mask is a static `where` over an id range rather than fancy indexing with a list;
- explicit positions and segment ids: packed sequences do not attend across examples;
- see `attention.py` for the attention-level differences (float32 softmax, configurable q/k-norm eps).
"""
from __future__ import annotations

import re
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lumina_jax.config import ChameleonConfig
from lumina_jax.models import quantization
from lumina_jax.models.attention import Attention, KVCache, Linear, init_cache, logical_param

__all__ = [
    "Chameleon", "DecoderBlock", "KVCache", "REMAT_POLICIES", "compute_logits", "decoder", "init_cache",
    "lm_head_kernel", "project_logits", "stack_layers", "unstack_layers",
]

Array = jax.Array
BATCH_LENGTH_EMBED = ("activation_batch", "activation_length", "activation_embed")

# Named rematerialisation policies for each decoder block. None means no rematerialisation at all.
REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_qkv_out": jax.checkpoint_policies.save_only_these_names(
        "query_proj", "key_proj", "value_proj", "out_proj"
    ),
}


class RMSNorm(nn.Module):
    """Llama-style RMSNorm: normalise in float32, cast back to the input dtype, then scale by `scale`."""

    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = logical_param(self, "scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype, ("norm",))
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        return y.astype(x.dtype) * scale.astype(x.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: down_proj(silu(gate_proj(x)) * up_proj(x)), no biases."""

    config: ChameleonConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        D, F = cfg.hidden_size, cfg.intermediate_size
        g = Linear((D, F), ("embed", "mlp"), "btd,df->btf", dtype, pdtype, name="gate_proj")(x)
        u = Linear((D, F), ("embed", "mlp"), "btd,df->btf", dtype, pdtype, name="up_proj")(x)
        h = nn.silu(g) * u
        h = nn.with_logical_constraint(h, ("activation_batch", "activation_length", "activation_mlp"))
        return Linear((F, D), ("mlp", "embed"), "btf,fd->btd", dtype, pdtype, name="down_proj")(h)


class DecoderBlock(nn.Module):
    """One decoder layer: pre-norm (7B) or swin-norm (34B), with Lumina's residual dropout.

    pre-norm:  h = x + drop(attn(norm_in(x)));  out = h + drop(mlp(norm_post(h)))
    swin-norm: h = x + drop(norm_in(attn(x)));  out = h + drop(norm_post(mlp(h)))
    """

    config: ChameleonConfig
    deterministic: bool = True

    @nn.compact
    def __call__(
        self,
        x: Array,
        cache: Optional[KVCache],
        positions: Array,
        segment_ids: Optional[Array],
        cache_index: Optional[Array],
    ) -> tuple[Array, Optional[KVCache]]:
        cfg = self.config
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        norm_in = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, name="input_layernorm")
        norm_post = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, name="post_attention_layernorm")
        attn = Attention(cfg, name="self_attn")
        mlp = MLP(cfg, name="mlp")
        drop = nn.Dropout(rate=cfg.dropout)

        x = nn.with_logical_constraint(x, BATCH_LENGTH_EMBED)
        if cfg.swin_norm:
            a, cache = attn(x, positions, segment_ids, cache, cache_index)
            h = x + drop(norm_in(a), deterministic=self.deterministic)
            out = h + drop(norm_post(mlp(h)), deterministic=self.deterministic)
        else:
            a, cache = attn(norm_in(x), positions, segment_ids, cache, cache_index)
            h = x + drop(a, deterministic=self.deterministic)
            out = h + drop(mlp(norm_post(h)), deterministic=self.deterministic)
        return nn.with_logical_constraint(out, BATCH_LENGTH_EMBED), cache


class Embedding(nn.Module):
    """Token embedding table (V, D); no padding row (the converted configs have pad_token_id None)."""

    config: ChameleonConfig

    @nn.compact
    def __call__(self, tokens: Array) -> Array:
        cfg = self.config
        table = logical_param(
            self, "embedding", nn.initializers.normal(0.02), (cfg.vocab_size, cfg.hidden_size),
            jnp.dtype(cfg.param_dtype), ("vocab", "embed"),
        )
        return jnp.take(table, tokens, axis=0).astype(cfg.dtype)


def lm_head_kernel(params: Any, config: ChameleonConfig, vocab_slice=None) -> Array:
    """The `lm_head` columns of a static (start, stop) `vocab_slice` (all when None), in the compute dtype.

    A decode loop takes this once, outside the loop: slicing inside the loop body copies the columns every step.
    """
    start, stop = _vocab_range(config, vocab_slice)
    kernel = nn.unbox(params["lm_head"]["kernel"])
    if quantization.is_quantized(kernel):  # stays int8 (with its column scales); `project_logits` dequantises
        kernel = quantization.qarray(kernel)
        return kernel if (start, stop) == (0, config.vocab_size) else kernel[:, start:stop]
    if (start, stop) != (0, config.vocab_size):
        kernel = kernel[:, start:stop]
    return kernel.astype(config.dtype)


def _vocab_range(config: ChameleonConfig, vocab_slice) -> tuple[int, int]:
    start, stop = (0, config.vocab_size) if vocab_slice is None else (int(vocab_slice[0]), int(vocab_slice[1]))
    if not 0 <= start < stop <= config.vocab_size:
        raise ValueError(f"vocab_slice={vocab_slice!r} is not a (start, stop) range inside [0, {config.vocab_size}]")
    return start, stop


def project_logits(kernel: Array, hidden: Array, config: ChameleonConfig, vocab_slice=None) -> Array:
    """hidden (B, T, D) @ kernel (D, stop - start), the `lm_head` columns of `vocab_slice`, to masked logits.

    A quantised kernel (`weight_quant="int8"`) is dequantised into the compute dtype first. Float32 accumulation, cast to `logits_dtype`; with `mask_image_logits` the part of the image-id range
    inside the slice is set to the dtype's minimum.
    """
    start, stop = _vocab_range(config, vocab_slice)
    if kernel.shape[-1] != stop - start:
        raise ValueError(f"lm_head kernel has {kernel.shape[-1]} columns; vocab_slice {vocab_slice!r} "
                         f"needs {stop - start}")
    dtype = jnp.dtype(config.dtype)
    w = quantization.dequantize(kernel, dtype)
    logits = jnp.einsum("btd,dv->btv", hidden.astype(dtype), w, preferred_element_type=jnp.float32)
    logits = logits.astype(config.logits_dtype)
    if config.mask_image_logits:
        lo, hi = max(config.image_token_start, start), min(config.image_token_end, stop)
        if lo < hi:
            ids = jnp.arange(start, stop)
            is_image = (ids >= lo) & (ids < hi)
            logits = jnp.where(is_image, jnp.finfo(logits.dtype).min, logits)
    return nn.with_logical_constraint(logits, ("activation_batch", "activation_length", "activation_vocab"))


def compute_logits(params: Any, hidden: Array, config: ChameleonConfig, vocab_slice=None) -> Array:
    """Logits (B, T, stop - start) for final-normed `hidden` (B, T, D) from the model's `lm_head`.

    `params` is the model's parameter tree (the "params" collection). `vocab_slice` is a static
    (start, stop) pair: only those vocabulary columns are projected (e.g. the image ids for the sampler,
    or a chunk for the loss); the image-logit mask is applied to the part of its range inside the slice.
    """
    return project_logits(lm_head_kernel(params, config, vocab_slice), hidden, config, vocab_slice)


class LMHead(nn.Module):
    """Untied output projection (D, V), no bias."""

    config: ChameleonConfig

    @nn.compact
    def __call__(self, hidden: Array) -> Array:
        cfg = self.config
        kernel = logical_param(
            self, "kernel", nn.initializers.normal(0.02), (cfg.hidden_size, cfg.vocab_size),
            jnp.dtype(cfg.param_dtype), ("embed", "vocab"),
        )
        return project_logits(kernel, hidden, cfg)


def _block_class(config: ChameleonConfig):
    """DecoderBlock, wrapped in nn.remat according to config.remat_policy."""
    if config.remat_policy not in REMAT_POLICIES:
        raise ValueError(f"remat_policy={config.remat_policy!r} is unknown; known: {sorted(REMAT_POLICIES)}")
    if config.remat_policy == "none":
        return DecoderBlock
    return nn.remat(DecoderBlock, policy=REMAT_POLICIES[config.remat_policy], prevent_cse=not config.scan_layers)


class Chameleon(nn.Module):
    """The Chameleon / Lumina-mGPT decoder. See docs/design.md ("Decoder call") for the contract.

    One forward for training (scanned or unscanned layers, no cache), prefill and decoding (unscanned
    layers with a per-layer cache from `init_cache`).
    """

    config: ChameleonConfig

    @nn.compact
    def __call__(
        self,
        tokens: Array,
        positions: Optional[Array] = None,
        segment_ids: Optional[Array] = None,
        cache: Optional[Sequence[KVCache]] = None,
        cache_index: Optional[Array] = None,
        deterministic: bool = True,
        return_hidden: bool = False,
    ):
        cfg = self.config
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be (batch, length) int, got shape {tokens.shape}")
        B, T = tokens.shape
        if cache is None:
            if cache_index is not None:
                raise ValueError("cache_index was given without a cache")
            if positions is None:
                positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        else:
            _check_cache(cfg, cache, B)
            if segment_ids is not None:
                raise ValueError("segment_ids is not supported with a KV cache (the cache is causal by slot)")
            cache_index = (jnp.zeros((B,), jnp.int32) if cache_index is None
                           else jnp.broadcast_to(jnp.asarray(cache_index, jnp.int32), (B,)))
            if positions is None:
                positions = cache_index[:, None] + jnp.arange(T, dtype=jnp.int32)
        positions = jnp.asarray(positions, jnp.int32)

        x = Embedding(cfg, name="embed_tokens")(tokens)
        x = nn.with_logical_constraint(x, BATCH_LENGTH_EMBED)
        block = _block_class(cfg)
        new_cache = None
        if cfg.scan_layers:
            layers = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, deterministic=deterministic, name="layers")
            x, _ = layers(x, None, positions, segment_ids, None)
        else:
            caches = []
            for i in range(cfg.num_layers):
                x, layer_cache = block(cfg, deterministic=deterministic, name=f"layers_{i}")(
                    x, None if cache is None else cache[i], positions, segment_ids, cache_index
                )
                caches.append(layer_cache)
            if cache is not None:
                new_cache = tuple(caches)

        hidden = RMSNorm(cfg.rms_norm_eps, jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype), name="norm")(x)
        if return_hidden:
            out = hidden
        else:
            out = LMHead(cfg, name="lm_head")(hidden)
        return out if cache is None else (out, new_cache)


def decoder(config: ChameleonConfig) -> nn.Module:
    """The module to init / apply for `config`: `Chameleon`, under qwix's int8 provider when
    `config.weight_quant == "int8"` (its parameter tree then holds quantised kernels, see `quantization`)."""
    model = Chameleon(config)
    return quantization.quantize_module(model) if config.weight_quant == "int8" else model


def _check_cache(cfg: ChameleonConfig, cache: Sequence[KVCache], batch: int) -> None:
    """Refuses a cache the unscanned forward cannot use, naming what to change."""
    if cfg.scan_layers:
        # nn.scan would need one stacked (L, B, S, K, H) cache, rebuilt at every decode step (slower, see
        # docs/design.md "KV cache"); decoding runs unscanned layers on per-layer buffers instead.
        raise ValueError("a KV cache needs unscanned layers: use config.replace(scan_layers=False) with "
                         "unstack_layers(params) (or load with scan_layers=False)")
    if not isinstance(cache, (tuple, list)) or len(cache) != cfg.num_layers:
        got = f"{len(cache)} entries" if isinstance(cache, (tuple, list)) else type(cache).__name__
        raise ValueError(f"cache must be a tuple of {cfg.num_layers} per-layer KVCaches (init_cache), got {got}")
    c = cache[0]
    k = c.k
    if k.ndim != 4 or k.shape[0] != batch or (c.num_kv_heads, k.shape[3]) != (cfg.num_kv_heads, cfg.head_dim):
        raise ValueError(f"cache buffers of shape {k.shape} do not match batch={batch}, "
                         f"num_kv_heads={cfg.num_kv_heads}, head_dim={cfg.head_dim}")


_LAYER_KEY = re.compile(r"^layers_(\d+)$")


def stack_layers(params: dict) -> dict:
    """Unscanned tree (layers_0, layers_1, ...) -> scanned tree (one `layers` subtree, leading axis L)."""
    idx = sorted(int(m.group(1)) for k in params if (m := _LAYER_KEY.match(k)))
    if not idx:
        raise ValueError("stack_layers: no layers_<i> keys in the parameter tree")
    if idx != list(range(len(idx))):
        raise ValueError(f"stack_layers: layer keys are not consecutive from 0: {idx}")
    out = {k: v for k, v in params.items() if not _LAYER_KEY.match(k)}
    stack = np.stack if all(isinstance(x, np.ndarray) for x in jax.tree.leaves(params["layers_0"])) else jnp.stack
    out["layers"] = jax.tree.map(lambda *xs: stack(xs), *[params[f"layers_{i}"] for i in idx])
    return out


def unstack_layers(params: dict) -> dict:
    """Scanned tree (`layers` with leading axis L) -> unscanned tree (layers_0, layers_1, ...)."""
    if "layers" not in params:
        raise ValueError("unstack_layers: no `layers` key in the parameter tree")
    leaves = jax.tree.leaves(params["layers"])
    n = leaves[0].shape[0]
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(n):
        out[f"layers_{i}"] = jax.tree.map(lambda x: x[i], params["layers"])
    return out
