"""The decoder's state, built in one place: abstract shapes, shardings, a sharded init and a sharded restore.

Two states:
- the parameters: the unboxed "params" tree of `Chameleon` (what conversion and inference hold);
- the train state: {"step": int32, "params": fp32 master weights, "opt_state": Optax state, "rng": uint32 key
  data} (what training-run checkpoints hold).

Shardings come from the parameters' logical axis names (docs/model.md) through the rules of
`lumina_jax.sharding`; a mesh axis that does not divide a dimension is dropped for it, and
`sharding.check_replication` reports when that leaves too much of the model replicated.

    shardings = param_shardings(config, mesh, rules)
    params = init_params(config, 0, mesh, rules)                  # random, created in its shards
    params = restore_params(ckpt_dir, config, mesh, rules)         # a parameter checkpoint, into its shards
    state = init_train_state(config, tx, mesh, rules, seed)        # or params=restore_params(...)
    target = abstract_train_state(config, tx, mesh, rules)         # sharded ShapeDtypeStructs, to restore into
    nonfinite_leaves(state)                                        # names of leaves holding NaN/inf ([] = fit to save)
"""
from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from lumina_jax import param_checkpoint
from lumina_jax.config import ChameleonConfig
from lumina_jax.models import quantization
from lumina_jax.models.chameleon import decoder, unstack_layers
from lumina_jax.sharding import Rules

# ---------------------------------------------------------------------------------------------------------
# Parameters


def _init(config: ChameleonConfig, rng: jax.Array) -> Any:
    """The boxed "params" collection (leaves carry their logical axis names)."""
    with nn.logical_axis_rules(()):  # init traces a (1, 1) batch: no activation constraints
        params = decoder(config).init(rng, jnp.zeros((1, 1), jnp.int32))["params"]
    if config.weight_quant != "none":  # qwix keeps scales in the parameter dtype; they dequantise into the compute dtype
        params = quantization.cast_scales(params, jnp.dtype(config.dtype))
    return params


@functools.lru_cache(maxsize=32)
def _boxed_shapes(config: ChameleonConfig) -> Any:
    # the key is made inside eval_shape too, so describing a model initialises no backend (a conversion
    # on a machine with an accelerator leaves it alone)
    return jax.eval_shape(lambda: _init(config, jax.random.key(0)))


def param_shapes(config: ChameleonConfig) -> Any:
    """ShapeDtypeStructs of the parameter tree (no shardings); allocates nothing."""
    return nn.unbox(_boxed_shapes(config))


def _fit_spec(shape: tuple[int, ...], spec: PartitionSpec, mesh: jax.sharding.Mesh) -> PartitionSpec:
    """Drops mesh axes from dimensions they do not divide (those dimensions stay unsharded)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            out.append(None)
            continue
        names = (axes,) if isinstance(axes, str) else tuple(axes)
        kept = []
        for name in names:
            if dim % (math.prod(mesh.shape[n] for n in kept) * mesh.shape[name]) == 0:
                kept.append(name)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*out)


def param_shardings(config: ChameleonConfig, mesh: jax.sharding.Mesh, rules: Rules) -> Any:
    """NamedShardings matching the parameter tree, from the logical names and `rules`."""
    boxed = _boxed_shapes(config)
    is_spec = lambda x: isinstance(x, PartitionSpec)
    mesh_specs = jax.tree.map(lambda s: nn.logical_to_mesh_axes(tuple(s), rules), nn.get_partition_spec(boxed),
                              is_leaf=is_spec)
    return jax.tree.map(lambda x, s: NamedSharding(mesh, _fit_spec(x.shape, s, mesh)), nn.unbox(boxed), mesh_specs,
                        is_leaf=is_spec)


def abstract_params(config: ChameleonConfig, mesh: jax.sharding.Mesh, rules: Rules) -> Any:
    """Sharded ShapeDtypeStructs of the parameter tree: the input of `jit(...).lower` and of a sharded restore."""
    return param_checkpoint.abstract_like(param_shapes(config), param_shardings(config, mesh, rules))


@functools.lru_cache(maxsize=32)
def _jitted_init(config: ChameleonConfig, mesh: Optional[jax.sharding.Mesh], rules: Optional[Rules]):
    shardings = None if mesh is None else param_shardings(config, mesh, rules)
    return jax.jit(lambda rng: nn.unbox(_init(config, rng)), out_shardings=shardings)


def init_params(config: ChameleonConfig, rng: jax.Array | int, mesh: Optional[jax.sharding.Mesh] = None,
                rules: Optional[Rules] = None) -> Any:
    """Random parameters from `rng` (a key or an int seed), created directly in their shards on `mesh` (no host
    copy of the full model); without a mesh, on the default device. Same values on any mesh."""
    if (mesh is None) != (rules is None):
        raise ValueError("init_params: pass both mesh and rules, or neither")
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    return _jitted_init(config, mesh, rules)(rng)


def restore_params(ckpt_dir: str | os.PathLike, config: ChameleonConfig, mesh: jax.sharding.Mesh,
                   rules: Rules) -> Any:
    """Restores `ckpt_dir/params` (canonical scanned layout) straight into sharded arrays of `config.param_dtype`.

    For an unscanned model (`scan_layers=False`) the scanned tree is restored sharded and then split into
    layers_0, layers_1, ... on device. With `config.weight_quant="int8"` the checkpoint is either a quantised
    one (`save_quantized`: restored as stored, no bf16 copy is made) or a bf16/fp32 one, quantised after the
    restore (`quantize_sharded`). Raises CheckpointError naming every missing, unexpected or mis-shaped
    parameter.
    """
    path = Path(ckpt_dir).absolute() / param_checkpoint.PARAMS_SUBDIR
    if not path.exists():
        raise param_checkpoint.CheckpointError(f"{path}: no Orbax parameter tree (is {ckpt_dir} a lumina-jax checkpoint?)")
    with ocp.StandardCheckpointer() as ckptr:
        stored = ckptr.metadata(path).item_metadata.tree
    have = flat_shapes(stored)
    stored_quantized = any(k.endswith("/qvalue") for k in have)
    if stored_quantized and config.weight_quant == "none":
        raise param_checkpoint.CheckpointError(
            f"{ckpt_dir}: holds int8-quantised parameters; load it with weight_quant='int8' (quantize='int8')")
    if config.weight_quant != "none" and not stored_quantized:
        plain = restore_params(ckpt_dir, config.replace(weight_quant="none"), mesh, rules)
        return quantize_sharded(plain, config, mesh, rules)
    # a quantised checkpoint holds the unscanned inference tree (save_quantized); others the scanned one
    layout = config.replace(scan_layers=not stored_quantized)
    want = flat_shapes(param_shapes(layout))
    problems = param_checkpoint.shape_mismatches(have, want)
    if problems:
        raise param_checkpoint.CheckpointError(
            f"{ckpt_dir}: parameters do not match the model config: {'; '.join(problems)}")
    abstract = abstract_params(layout, mesh, rules)
    if not stored_quantized:  # converted checkpoints may be stored in another float dtype than the one asked for
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(config.param_dtype), sharding=x.sharding), abstract)
    params = param_checkpoint.restore_params(ckpt_dir, abstract)
    if layout.scan_layers == config.scan_layers:
        return params
    if config.scan_layers:
        raise param_checkpoint.CheckpointError(f"{ckpt_dir}: a quantised checkpoint is for decoding (scan_layers=False)")
    return jax.jit(unstack_layers, out_shardings=param_shardings(config, mesh, rules))(params)


def flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{"layers_0/mlp/up_proj/kernel": shape, ...} of a parameter tree or checkpoint metadata tree; a quantised
    kernel gives ".../kernel/array/qvalue" and ".../kernel/array/scale"."""
    def name(k):
        return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(name(k) for k in path): tuple(x.shape) for path, x in leaves}


def quantize_sharded(params: Any, config: ChameleonConfig, mesh: jax.sharding.Mesh, rules: Rules) -> Any:
    """Sharded plain parameters of `config.replace(weight_quant="none")` -> the sharded int8 tree of `config`.

    The plain arrays are donated, so they are freed as the quantised ones are made.
    """
    abstract = param_shapes(config)
    fn = functools.partial(quantization.quantize_params, abstract=abstract, scale_dtype=jnp.dtype(config.dtype))
    return jax.jit(fn, out_shardings=param_shardings(config, mesh, rules), donate_argnums=0)(params)


def save_quantized(directory: str | os.PathLike, params: Any, config: ChameleonConfig) -> None:
    """Writes an int8 parameter tree (unscanned, as `restore_params` returns it) to `directory/params`."""
    if config.weight_quant == "none" or config.scan_layers:
        raise ValueError("save_quantized: expects the parameters of an unscanned config with weight_quant set")
    param_checkpoint.save_params(directory, params)


# ---------------------------------------------------------------------------------------------------------
# Train state


def new_train_state(tx: optax.GradientTransformation, params: Any, seed: int) -> dict:
    """The train state around `params`: step 0, fresh optimizer state, the dropout key of `seed`."""
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        "rng": jax.random.key_data(jax.random.key(seed)),
    }


def train_state_shardings(config: ChameleonConfig, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                          rules: Rules) -> Any:
    """Shardings of the train state: optimizer moments as their parameters, step / counts / rng replicated."""
    params_sharding = param_shardings(config, mesh, rules)
    shapes = jax.eval_shape(lambda p: new_train_state(tx, p, 0), param_shapes(config))
    replicated = NamedSharding(mesh, PartitionSpec())
    opt = optax.tree_map_params(tx, lambda _, s: s, shapes["opt_state"], params_sharding,
                                transform_non_params=lambda _: replicated,
                                is_leaf=lambda x: isinstance(x, NamedSharding))
    return {"step": replicated, "params": params_sharding, "opt_state": opt, "rng": replicated}


def abstract_train_state(config: ChameleonConfig, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                         rules: Rules) -> Any:
    """Sharded ShapeDtypeStructs of the train state: the target of a restore and the input of `lower`."""
    shapes = jax.eval_shape(lambda p: new_train_state(tx, p, 0), param_shapes(config))
    return param_checkpoint.abstract_like(shapes, train_state_shardings(config, tx, mesh, rules))


def init_train_state(config: ChameleonConfig, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                     rules: Rules, seed: int, params: Any = None) -> dict:
    """The sharded train state: random parameters from `seed`, or the given sharded `params` (donated: their
    buffers become the state's, so the model is not held twice)."""
    shardings = train_state_shardings(config, tx, mesh, rules)
    if params is None:
        params = init_params(config, seed, mesh, rules)
    return jax.jit(lambda p: new_train_state(tx, p, seed), out_shardings=shardings, donate_argnums=0)(params)


# ---------------------------------------------------------------------------------------------------------
# Finiteness


def leaf_path_name(path) -> str:
    """"opt_state/1/0/mu/lm_head/kernel": a pytree key path as one name (dict keys, attributes, indices)."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _float_leaves_with_paths(tree: Any) -> list[tuple[str, Any]]:
    """("a/b/c", leaf) for every floating-point leaf (integer leaves such as step counts cannot be NaN)."""
    return [(leaf_path_name(path), x) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
            if jnp.issubdtype(x.dtype, jnp.inexact)]


def finite_flags(tree: Any) -> jax.Array:
    """bool (n,): whether each floating-point leaf of `tree` is free of NaN and inf, in `float_leaf_names` order.

    Traceable: inside the train step it is one small output computed with the update (no extra host sync),
    and a sharded leaf is reduced where it lies, so only n booleans cross devices.
    """
    leaves = [x for _, x in _float_leaves_with_paths(tree)]
    return jnp.stack([jnp.isfinite(x).all() for x in leaves]) if leaves else jnp.ones((0,), bool)


def float_leaf_names(tree: Any) -> list[str]:
    """Names ("params/lm_head/kernel", "opt_state/1/0/mu/...") of the leaves `finite_flags` checks, in order."""
    return [n for n, _ in _float_leaves_with_paths(tree)]


def names_where_false(names: list[str], flags: Any) -> list[str]:
    """The names whose flag (from `finite_flags`, fetched to the host) is False."""
    return [n for n, ok in zip(names, np.asarray(flags)) if not ok]


def nonfinite_leaves(tree: Any) -> list[str]:
    """Names of the floating-point leaves of `tree` (arrays, sharded or not) holding NaN or inf."""
    return names_where_false(float_leaf_names(tree), jax.device_get(jax.jit(finite_flags)(tree)))
