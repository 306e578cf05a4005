"""Shared pieces of the training tests (imported by test_train*.py; holds no tests itself)."""
import jax
import numpy as np
from jax.sharding import AxisType

AXES = ("data", "fsdp", "tensor")
RULES = (("activation_batch", ("data", "fsdp")), ("activation_length", None), ("activation_embed", None),
         ("activation_heads", "tensor"), ("activation_kv_heads", "tensor"), ("activation_kv", None),
         ("activation_mlp", "tensor"), ("activation_vocab", "tensor"),
         ("vocab", "tensor"), ("embed", "fsdp"), ("heads", "tensor"), ("kv_heads", "tensor"), ("kv", None),
         ("mlp", "tensor"), ("layers", None), ("norm", None))


def make_mesh(spec: str):
    sizes = dict.fromkeys(AXES, 1)
    for part in spec.split(","):
        k, v = part.split("=")
        sizes[k] = int(v)
    shape = tuple(sizes[a] for a in AXES)
    n = int(np.prod(shape))
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3, devices=jax.devices()[:n])
