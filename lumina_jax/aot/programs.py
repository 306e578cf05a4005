"""The two programs the tool compiles, lowered from abstract sharded inputs (nothing is allocated):

- `lower_train`: the real train step of `lumina_jax.training.train_step` (optimizer state, remat policy,
  gradient accumulation and loss chunking of the TrainConfig);
- `lower_generate`: the real prefill + decode loop of `lumina_jax.sampling.decode` with guidance rows,
  for a batch of prompts and one image of the requested size per prompt.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lumina_jax import sharding
from lumina_jax.aot.analysis import JaxprStats, analyse_jaxpr
from lumina_jax.config import ChameleonConfig
from lumina_jax.flops import matmul_params, train_flops_per_token
from lumina_jax.models.attention import init_cache
from lumina_jax.models.quantization import is_quantized, qarray
from lumina_jax.param_checkpoint import abstract_like
from lumina_jax.sampling import processors
from lumina_jax.sampling.decode import ChameleonDecodeModel, decode_jit
from lumina_jax.sampling.generate import prepare_inputs, size_table_from_crops
from lumina_jax.sampling.jacobi import JacobiSettings, jacobi_jit
from lumina_jax.state import abstract_params, abstract_train_state
from lumina_jax.tokenizer import SpecialIds, layout_vocab_size
from lumina_jax.training import train_step as ts
from lumina_jax.training.config import TrainConfig
from lumina_jax.unirep import crop_size_list, unirep_length


@dataclasses.dataclass(frozen=True)
class GenerateSpec:
    """Generation workload of `--mode generate` (set with generate.<field>=value)."""

    batch_size: int = 1  # prompts decoded together (guidance doubles the rows run through the model)
    image_size: int = 768  # generate one image_size x image_size image per prompt
    prompt_len: int = 64  # prompt tokens per row (padded up to the sampler's 64-token bucket)
    cfg_scale: float = 4.0  # classifier-free guidance; 1.0 = off (no unconditional rows)
    image_top_k: int = 2000  # image top-k (a static shape of the sampler)
    text_top_k: int = 10  # text top-k
    param_dtype: str = "bfloat16"  # weights as served (converted checkpoints are bf16)
    weight_quant: str = "none"  # "int8": int8 projections and head (Lumina.load(quantize="int8"))
    kv_cache_quant: str = "none"  # "int8" / "fp8": the KV cache stored quantised (Lumina.load(kv_cache=...))
    extra_tokens: int = 8  # tokens allowed beyond the image (end of turn, ...)
    jacobi_window: int = 0  # speculative Jacobi decoding: tokens per model step (0 = one token per step)
    jacobi_coupling: bool = True  # coupled drafts (only with jacobi_window)
    tokens_per_step: float = 1.0  # measured mean tokens per SJD step (benchmarks/jacobi.py), for the time estimate


@dataclasses.dataclass
class Program:
    """A lowered program plus what the report needs to describe it."""

    mode: str  # "train" or "generate"
    lowered: Any  # jax.stages.Lowered
    groups: dict  # per-device bytes of the inputs by kind ("parameters", "optimizer state", "batch", ...)
    jaxpr_stats: JaxprStats
    model_flops: float  # per step over all devices: 6N + attention (train), see `describe`
    workload: dict  # human-readable facts (batch, tokens, accumulation, remat, ...)
    param_shardings: Any  # NamedShardings of the parameter tree
    param_shapes: Any  # ShapeDtypeStructs of the parameter tree
    decode: Optional[dict] = None  # generate mode: per-step figures for the decode-speed estimate
    inputs: Any = None  # the abstract sharded inputs by name (for naming the largest buffers)
    step_lowered: Any = None  # generate mode: one decode step on its own (its cost analysis gives bytes per step)


def device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs carrying shardings (the largest shard)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        try:
            itemsize = np.dtype(x.dtype).itemsize
        except TypeError:  # typed PRNG keys: the key data
            itemsize = 8
        total += math.prod(shape) * itemsize
    return total


def lower_train(cfg: TrainConfig, mesh: jax.sharding.Mesh) -> Program:
    """Lowers the train step of `cfg` on `mesh` with abstract sharded state and batch."""
    model_cfg, p = cfg.model, cfg.parallel
    B, T, k = cfg.data.global_batch_size, cfg.data.seq_len, p.grad_accum_steps
    ts.check_micro_batch(cfg, mesh)
    ctx = ts.make_context(cfg, mesh)
    state = abstract_train_state(model_cfg, ctx.tx, mesh, ctx.rules)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    bsh = ts.batch_sharding(ctx)
    batch = {key: jax.ShapeDtypeStruct((B, T), jnp.float32 if key == "weights" else jnp.int32, sharding=bsh)
             for key in ts.BATCH_KEYS}
    step = ts.jit_train_step(ctx, shardings)
    with sharding.sharding_context(mesh, ctx.rules):
        lowered = step.jitted.lower(state, batch)
        stats = analyse_jaxpr(jax.make_jaxpr(ts.make_train_step(ctx))(state, batch))
    return Program(
        mode="train", lowered=lowered,
        groups={"parameters": device_bytes(state["params"]), "optimizer state": device_bytes(state["opt_state"]),
                "step, rng": device_bytes({"s": state["step"], "r": state["rng"]}), "batch": device_bytes(batch)},
        jaxpr_stats=stats, model_flops=train_flops_per_token(model_cfg, T) * B * T,
        workload={"global batch": f"{B} x {T} tokens", "per device": f"{B / mesh.size:g} sequences",
                  "grad accumulation": k, "remat": model_cfg.remat_policy, "attention": model_cfg.attention_impl,
                  "rules": p.rules,
                  "dtypes": f"params {model_cfg.param_dtype}, compute {model_cfg.dtype}",
                  "loss chunk": cfg.loss.chunk_size},
        param_shardings=shardings["params"], param_shapes=state["params"], inputs={"state": state, "batch": batch},
    )


def token_ids_for(cfg: ChameleonConfig) -> processors.TokenIds:
    """The sampler's ids for a decoder config without a tokenizer: Chameleon's layout with the config's image
    codes (Chameleon's own ids for the published models), or the compact layout when the vocabulary is too
    small for the reserved block (the tiny test models)."""
    n = cfg.image_token_end - cfg.image_token_start
    compact = cfg.vocab_size < layout_vocab_size(n)
    special = SpecialIds.from_layout(n, cfg.vocab_size, compact=compact)
    special.check_image_range(cfg.image_token_start, cfg.image_token_end, "model config")
    return processors.TokenIds.from_special_ids(special, cfg.vocab_size)


def lower_decode_step(dm: ChameleonDecodeModel, params: Any, psh: Any, kv: Any, ids: processors.TokenIds,
                      mesh: jax.sharding.Mesh, rules) -> Any:
    """One step of the decode loop's body on its own: every row feeds one token through the decoder with its
    cache (donated, updated in place) and projects onto the image ids, with the head sliced beforehand as the
    loop does. Its compiled cost analysis gives the HBM bytes of one step, which the loop's (prefill + body
    counted once) does not separate."""
    rows = kv[0].k.shape[0]
    bsh = sharding.batch_sharding(mesh, rules)
    tok = jax.ShapeDtypeStruct((rows, 1), jnp.int32, sharding=bsh)
    index = jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec(bsh.spec[0])))
    head_shape = jax.eval_shape(lambda p: dm.slice_head(p, ids.image_slice)[1], params)
    head_sharding = psh["lm_head"]["kernel"]
    if is_quantized(head_sharding):
        head_sharding = qarray(head_sharding)
    head = abstract_like(head_shape, head_sharding)

    def step(params, head, cache, tokens, index):
        hidden, cache = dm.forward(params, tokens, index[:, None], cache, index)
        return dm.slice_logits((ids.image_slice, head), hidden[:, 0]), cache

    return jax.jit(step, donate_argnums=2).lower(params, head, kv, tok, index)


def lower_generate(model_cfg: ChameleonConfig, spec: GenerateSpec, mesh: jax.sharding.Mesh, rules_name: str) -> Program:
    """Lowers prefill + the guided decode loop for `spec.batch_size` prompts of `spec.prompt_len` tokens."""
    rules = sharding.rule_set(rules_name, "parallel.rules")
    if spec.batch_size < 1 or spec.prompt_len < 1:
        raise ValueError(f"generate.batch_size={spec.batch_size} and generate.prompt_len={spec.prompt_len} must be >= 1")
    if spec.image_size % 32:
        raise ValueError(f"generate.image_size={spec.image_size} must be a multiple of 32")
    jacobi = JacobiSettings(spec.jacobi_window, spec.jacobi_coupling) if spec.jacobi_window else None
    if not 1.0 <= spec.tokens_per_step <= max(spec.jacobi_window, 1):
        raise ValueError(f"generate.tokens_per_step={spec.tokens_per_step} must be in [1, jacobi_window]")
    # unstacked layers (layers_0, ...): the layout the sampler recommends for decoding (no per-step weight copies)
    cfg = model_cfg.replace(param_dtype=spec.param_dtype, dropout=0.0, remat_policy="none", scan_layers=False,
                            weight_quant=spec.weight_quant, kv_cache_quant=spec.kv_cache_quant)
    ids = token_ids_for(cfg)
    max_new = unirep_length(spec.image_size, spec.image_size) + spec.extra_tokens
    settings = processors.SamplingSettings(cfg_scale=spec.cfg_scale, text_top_k=spec.text_top_k,
                                           image_top_k=min(spec.image_top_k, ids.num_image_ids), max_new_tokens=max_new)
    prompt = [0] + [ids.image_first + 1] * (spec.prompt_len - 1)  # text-only prompts; contents do not matter here
    host = prepare_inputs([prompt] * spec.batch_size, list(range(spec.batch_size)), ids)
    table = size_table_from_crops(crop_size_list(spec.image_size))
    replicated = NamedSharding(mesh, PartitionSpec())
    inputs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), host)
    table = jax.ShapeDtypeStruct(table.shape, jnp.bool_, sharding=replicated)
    params = abstract_params(cfg, mesh, rules)
    psh = jax.tree.map(lambda x: x.sharding, params)
    dm = ChameleonDecodeModel(cfg)  # its cache carries the logical cache axes; the rules shard it
    rows = spec.batch_size * (2 if settings.use_guidance else 1)
    width = jacobi.window if jacobi else 1  # tokens each row feeds per step
    S = host.prompt.shape[1] + max_new + (width if jacobi else 0)
    kv = abstract_like(jax.eval_shape(lambda: init_cache(cfg, rows, S)), sharding.cache_shardings(cfg, mesh, rules))
    S = kv[0].max_length  # a quantised cache rounds up to whole tiles; every step attends all slots
    if jacobi:
        loop = lambda p, i, t: jacobi_jit(dm, p, i, settings=settings, ids=ids, jacobi=jacobi, size_table=t)
    else:
        loop = lambda p, i, t: decode_jit(dm, p, i, settings=settings, ids=ids, size_table=t)
    with sharding.sharding_context(mesh, rules):
        lowered = jax.jit(loop).lower(params, inputs, table)
        closed = jax.make_jaxpr(loop)(params, inputs, table)
        step_lowered = lower_decode_step(dm, params, psh, kv, ids, mesh, rules)
    stats = analyse_jaxpr(closed)
    n_mm = matmul_params(cfg)
    per_row_step = width * (2.0 * n_mm + 4.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * S)
    prefill_tokens = rows * max(host.prompt.shape[1], host.uncond_prompt.shape[1])
    param_bytes = device_bytes(params)
    cache_bytes = device_bytes(kv)  # keys and values of every layer
    return Program(
        mode="generate", lowered=lowered,
        groups={"parameters": param_bytes, "prompts": device_bytes(inputs)},
        jaxpr_stats=stats, model_flops=per_row_step * rows,
        workload={"prompts": spec.batch_size, "rows (with guidance)": rows, "image": f"{spec.image_size}px",
                  "new tokens": max_new, "cache slots": S, "cfg": spec.cfg_scale, "attention": cfg.attention_impl,
                  "rules": rules_name,
                  "decoding": (f"SJD window {width} ({'coupled' if spec.jacobi_coupling else 'plain'}), "
                               f"{spec.tokens_per_step:g} tokens per step assumed" if jacobi else "one token per step"),
                  "dtypes": f"params {cfg.param_dtype}, compute {cfg.dtype}",
                  "quantisation": f"weights {cfg.weight_quant}, KV cache {cfg.kv_cache_quant}"},
        param_shardings=psh, param_shapes=params, inputs={"params": params, "prompts": inputs},
        step_lowered=step_lowered,
        decode={"steps": math.ceil(max_new / spec.tokens_per_step) if jacobi else max_new,
                "estimated_steps": bool(jacobi), "kv_cache_bytes": cache_bytes, "param_bytes": param_bytes,
                "prefill_flops": 2.0 * n_mm * prefill_tokens},
    )
