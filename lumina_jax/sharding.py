"""Device meshes, logical-axis sharding rules, the replication check and the multi-host start.

A mesh has the axes ("data", "fsdp", "tensor"): "data" replicates the model and splits the batch,
"fsdp" splits the batch and shards parameters (gathered per layer by XLA), "tensor" shards heads, MLP
width and vocabulary inside each layer. Which parameter dimension goes where is decided by rules kept as
data (`FSDP_RULES`, `TENSOR_PARALLEL_RULES`): pairs (logical axis name, mesh axis or axes), first match
wins; a logical name without a free mesh axis stays unsharded. The model's logical names are listed in
docs/model.md.

Typical use (the sharded parameters themselves come from `lumina_jax.state`):

    mesh = make_mesh("data=2,fsdp=-1,tensor=2")
    params = state.restore_params(ckpt_dir, config, mesh, FSDP_RULES)   # or state.init_params(...)
    check_replication(params)
    with sharding_context(mesh, FSDP_RULES):                             # activation constraints
        logits = jax.jit(forward)(params, tokens)
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Iterator, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import NamedSharding

from lumina_jax.config import ChameleonConfig
from lumina_jax.models.attention import CACHE_SCALE_AXES, KVCache, cache_axes

MESH_AXES = ("data", "fsdp", "tensor")
Rules = tuple[tuple[str, Any], ...]

# Activation and cache rules shared by both parameter layouts: the batch is split over data and fsdp.
_ACTIVATION_RULES: Rules = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_kv", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("cache_batch", ("data", "fsdp")),
    ("cache_length", None),
    ("cache_kv_heads", "tensor"),
)

# FSDP first: the model dimension of every matrix over fsdp, heads / MLP / vocabulary over tensor.
FSDP_RULES: Rules = (
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("kv", None),
    ("layers", None),
    ("norm", None),
    ("norm_rows", None),
) + _ACTIVATION_RULES

# Tensor parallel first: heads / MLP / vocabulary over tensor and fsdp together; the model dimension
# takes fsdp only where the other dimension could not (e.g. k/v projections with few kv heads).
TENSOR_PARALLEL_RULES: Rules = (
    ("heads", ("tensor", "fsdp")),
    ("heads", "tensor"),
    ("mlp", ("tensor", "fsdp")),
    ("mlp", "tensor"),
    ("vocab", ("tensor", "fsdp")),
    ("vocab", "tensor"),
    ("kv_heads", "tensor"),
    ("embed", "fsdp"),
    ("kv", None),
    ("layers", None),
    ("norm", None),
    ("norm_rows", None),
) + _ACTIVATION_RULES

RULE_SETS: dict[str, Rules] = {"fsdp": FSDP_RULES, "tensor": TENSOR_PARALLEL_RULES}


# ---------------------------------------------------------------------------------------------------------
# Meshes


def parse_mesh_spec(spec: str | Mapping[str, int], num_devices: Optional[int] = None) -> dict[str, int]:
    """"data=2,fsdp=2,tensor=2" -> {"data": 2, "fsdp": 2, "tensor": 2}; missing axes are 1.

    One axis may be -1: it takes the devices left over (needs `num_devices`). With `num_devices` the
    product must equal it.
    """
    if isinstance(spec, str):
        items = {}
        for field in filter(None, (f.strip() for f in spec.split(","))):
            name, sep, value = field.partition("=")
            name = name.strip()
            if not sep or name not in MESH_AXES:
                raise ValueError(f"mesh spec field {field!r}: expected <axis>=<size> with axis in {MESH_AXES}")
            if name in items:
                raise ValueError(f"mesh spec field {field!r}: axis {name!r} given twice")
            try:
                items[name] = int(value)
            except ValueError:
                raise ValueError(f"mesh spec field {field!r}: size {value.strip()!r} is not an integer") from None
    else:
        items = dict(spec)
        for name in items:
            if name not in MESH_AXES:
                raise ValueError(f"mesh spec axis {name!r} is unknown; known: {MESH_AXES}")
    sizes = {name: int(items.get(name, 1)) for name in MESH_AXES}
    for name, size in sizes.items():
        if size == 0 or size < -1:
            raise ValueError(f"mesh spec field {name}={size}: size must be positive or -1")
    fill = [n for n, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise ValueError(f"mesh spec: only one axis may be -1, got {fill}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if num_devices is None:
            raise ValueError(f"mesh spec axis {fill[0]}=-1 needs the device count to resolve")
        if num_devices % known:
            raise ValueError(f"mesh spec axis {fill[0]}=-1: {num_devices} devices do not divide by {known}")
        sizes[fill[0]] = num_devices // known
    elif num_devices is not None and known != num_devices:
        raise ValueError(f"mesh spec {sizes} uses {known} devices but {num_devices} are available")
    return sizes


def make_mesh(spec: str | Mapping[str, int] = "fsdp=-1", devices: Optional[Sequence[Any]] = None,
              num_slices: int = 1) -> jax.sharding.Mesh:
    """A mesh with axes ("data", "fsdp", "tensor") of Auto type (what Linen's logical constraints need).

    `spec` lays out the devices of one slice (over the fast in-slice network, ICI). With `num_slices` > 1
    the data axis also spans the slices (over the data-centre network, DCN): its size is num_slices times
    its in-slice size, and data index i lies in slice i // (in-slice size), so only the gradient all-reduce
    crosses slices. Devices are grouped by their `slice_index` (TPU); devices without one (CPU, GPU) are
    split in order into equal consecutive groups. train.py and the AOT tool both build their mesh here.
    """
    devices = list(jax.devices() if devices is None else devices)
    groups = _slices(devices, num_slices)
    sizes = parse_mesh_spec(spec, len(groups[0]))
    grids = [_slice_grid(tuple(sizes[a] for a in MESH_AXES), group) for group in groups]
    return jax.sharding.Mesh(np.concatenate(grids, axis=0), MESH_AXES,
                             axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def _slices(devices: list, num_slices: int) -> list[list]:
    if num_slices < 1:
        raise ValueError(f"num_slices={num_slices} must be >= 1")
    if hasattr(devices[0], "slice_index"):
        by_slice: dict[int, list] = {}
        for d in devices:
            by_slice.setdefault(d.slice_index, []).append(d)
        if len(by_slice) != num_slices:
            raise ValueError(f"num_slices={num_slices}, but the {len(devices)} devices lie in {len(by_slice)} slice(s)")
        groups = [by_slice[k] for k in sorted(by_slice)]
        if len({len(g) for g in groups}) > 1:
            raise ValueError(f"slices of unequal size: {[len(g) for g in groups]} devices")
        return groups
    if len(devices) % num_slices:
        raise ValueError(f"num_slices={num_slices} does not divide the {len(devices)} devices")
    per = len(devices) // num_slices
    return [devices[i * per:(i + 1) * per] for i in range(num_slices)]


def _slice_grid(shape: tuple[int, ...], devices: list) -> np.ndarray:
    """The devices of one slice arranged as `shape`, following the physical torus where JAX knows it."""
    try:
        return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
        return np.asarray(devices).reshape(shape)  # a layout the physical-topology mapper does not know


def rule_set(name: str, field: str = "rules") -> Rules:
    """The rules named `name` in RULE_SETS ("fsdp" or "tensor"); otherwise one ValueError naming `field` (the
    setting it came from, e.g. "parallel.rules") and the known sets."""
    if name not in RULE_SETS:
        raise ValueError(f"{field}={name!r} is unknown; known: {sorted(RULE_SETS)}")
    return RULE_SETS[name]


@contextlib.contextmanager
def sharding_context(mesh: jax.sharding.Mesh, rules: Rules) -> Iterator[None]:
    """Activates `mesh` and `rules` so the model's activation constraints apply when a function is traced."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def logical_sharding(mesh: jax.sharding.Mesh, rules: Rules, axes: Sequence[Optional[str]]) -> NamedSharding:
    """The NamedSharding of an array whose dimensions carry the logical names `axes`."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(axes), rules))


def batch_sharding(mesh: jax.sharding.Mesh, rules: Rules) -> NamedSharding:
    """Sharding of (B, T) token/position/segment arrays: the batch over the activation-batch mesh axes."""
    return logical_sharding(mesh, rules, ("activation_batch", "activation_length"))


def cache_shardings(config: ChameleonConfig, mesh: jax.sharding.Mesh, rules: Rules) -> tuple[KVCache, ...]:
    """The shardings of `init_cache(config, ...)` (one KVCache of NamedShardings per layer), e.g. for jit
    out_shardings or device_put."""
    s = logical_sharding(mesh, rules, cache_axes(config))
    # the (B, K, S) scales split over rows and heads as the values
    scale = logical_sharding(mesh, rules, CACHE_SCALE_AXES) if config.kv_cache_quant != "none" else None
    return tuple(KVCache(k=s, v=s, k_scale=scale, v_scale=scale) for _ in range(config.num_layers))


# ---------------------------------------------------------------------------------------------------------
# Checks and multi-host start


def check_replication(params_or_shardings: Any, max_replicated_fraction: float = 0.05, shapes: Any = None) -> float:
    """Raises ValueError if more than `max_replicated_fraction` of all parameter elements are fully replicated.

    Accepts a tree of jax.Arrays, of ShapeDtypeStructs carrying `.sharding`, or of shardings together with a
    matching tree of `shapes` (anything with `.shape`). Returns the replicated fraction. On a single-device
    mesh everything is trivially replicated and the check passes.
    """
    is_leaf = lambda x: isinstance(x, jax.sharding.Sharding)
    leaves = jax.tree_util.tree_flatten_with_path(params_or_shardings, is_leaf=is_leaf)[0]
    shape_leaves = None if shapes is None else jax.tree.leaves(shapes)
    total, replicated, offenders = 0, 0, []
    for i, (path, leaf) in enumerate(leaves):
        sharding = leaf if is_leaf(leaf) else getattr(leaf, "sharding", None)
        shape = shape_leaves[i].shape if shape_leaves is not None else getattr(leaf, "shape", None)
        if sharding is None or shape is None:
            raise ValueError(f"check_replication: leaf {jax.tree_util.keystr(path)} has no sharding or shape")
        if len(sharding.device_set) == 1:
            return 0.0
        size = int(np.prod(shape))
        total += size
        if sharding.is_fully_replicated:
            replicated += size
            offenders.append((size, jax.tree_util.keystr(path), tuple(shape)))
    fraction = replicated / max(total, 1)
    if fraction > max_replicated_fraction:
        offenders.sort(reverse=True)
        largest = ", ".join(f"{name} {shape}" for _, name, shape in offenders[:5])
        raise ValueError(
            f"{fraction:.1%} of parameters are fully replicated (limit {max_replicated_fraction:.1%}); "
            f"largest: {largest}"
        )
    return fraction


def initialize_distributed(
    coordinator_address: Optional[str] = None, num_processes: Optional[int] = None, process_id: Optional[int] = None
) -> None:
    """Opt-in multi-host start: `jax.distributed.initialize` with explicit values or the environment.

    Unset arguments fall back to JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, and then to
    JAX's cluster auto-detection (SLURM, Kubernetes, Cloud TPU). Call it before any other JAX call.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = _env_int("JAX_NUM_PROCESSES")
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = _env_int("JAX_PROCESS_ID")
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} is outside [0, num_processes={num_processes})")
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={os.environ[name]!r} is not an integer") from None
