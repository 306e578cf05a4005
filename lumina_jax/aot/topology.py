"""Named TPU topologies on a CPU-only host: chip facts, the compile-only devices, and meshes over them.

`jax.experimental.topologies.get_topology_desc` (from libtpu, installed by the `aot` extra) returns device
objects for a TPU slice that does not exist here; a `Mesh` of them is enough to lower and compile a
sharded program for that slice.

Chip facts (per chip, from the Cloud TPU system-architecture pages, cloud.google.com/tpu/docs/{v4,v5e,v5p,
v6e}, checked 2026-11): HBM capacity, peak dense bf16 FLOP/s and HBM bandwidth. The compiler keeps a little
HBM for itself (on v5e it reports 15.75 GiB available of 16 GiB); its own figure is shown when a program
does not fit.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Sequence

import jax
from jax.experimental import topologies

from lumina_jax import sharding

GiB = 1024 ** 3

# Several processes may compile for topologies at once (the table script, parallel tests): libtpu otherwise
# takes a machine-wide lock file and refuses a second process.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation as this tool needs it."""

    name: str  # topology prefix: "v4", "v5e", "v5p", "v6e"
    device_kind: str  # jax Device.device_kind of its compile-only devices
    hbm_bytes: int  # HBM per chip (one JAX device per chip with the chip config below)
    peak_bf16_flops: float  # dense bf16 FLOP/s per chip, for the MFU estimate
    hbm_bandwidth: float  # bytes/s per chip, for the memory-bound decode estimate
    dims: int  # 2 (v5e, v6e: 2D torus) or 3 (v4, v5p: 3D torus)
    chip_config_name: str  # "megacore" fuses v4's two TensorCores into one device, as on real v4 hosts
    host_bounds: tuple[int, int, int]  # chips per host of multi-host slices (x, y, z)
    single_host_chips: int  # slices up to this many chips are served by one host


CHIPS: dict[str, Chip] = {
    # v4: 32 GiB HBM2, 275 TFLOP/s bf16, 1200 GB/s; 4 chips per host (2x2x1).
    "v4": Chip("v4", "TPU v4", 32 * GiB, 275e12, 1200e9, 3, "megacore", (2, 2, 1), 4),
    # v5e: 16 GiB HBM2, 197 TFLOP/s bf16, 819 GB/s; hosts of 8 chips up to v5e-8, then 4-chip hosts (2x2).
    "v5e": Chip("v5e", "TPU v5 lite", 16 * GiB, 197e12, 819e9, 2, "default", (2, 2, 1), 8),
    # v5p: 95 GiB HBM2e, 459 TFLOP/s bf16, 2765 GB/s; 4 chips per host (2x2x1), megacore by default.
    "v5p": Chip("v5p", "TPU v5", 95 * GiB, 459e12, 2765e9, 3, "default", (2, 2, 1), 4),
    # v6e (Trillium): 32 GiB HBM, 918 TFLOP/s bf16, 1640 GB/s; 8-chip single hosts, 4-chip hosts beyond.
    "v6e": Chip("v6e", "TPU v6 lite", 32 * GiB, 918e12, 1640e9, 2, "default", (2, 2, 1), 8),
}

_TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})$")


@dataclasses.dataclass(frozen=True)
class Topology:
    """A named slice ("v5p:4x4x4") times a number of slices joined over the data-centre network."""

    chip: Chip
    shape: tuple[int, ...]  # chips along each torus axis
    num_slices: int = 1

    @property
    def name(self) -> str:
        return f"{self.chip.name}:{'x'.join(map(str, self.shape))}"

    @property
    def chips_per_slice(self) -> int:
        return math.prod(self.shape)

    @property
    def num_chips(self) -> int:
        return self.chips_per_slice * self.num_slices

    def describe(self) -> str:
        s = f"{self.name} ({self.chips_per_slice} chips"
        return s + (f" x {self.num_slices} slices)" if self.num_slices > 1 else ")")

    def host_bounds(self) -> tuple[int, int, int]:
        """chips_per_host_bounds for get_topology_desc: one host for small slices, else the host shape."""
        shape3 = tuple(self.shape) + (1,) * (3 - len(self.shape))
        if self.chips_per_slice <= self.chip.single_host_chips:
            return shape3
        bounds = self.chip.host_bounds
        if any(s % b for s, b in zip(shape3, bounds)):
            raise ValueError(f"topology {self.name}: shape {self.shape} does not divide into hosts of {bounds[:self.chip.dims]} chips")
        return bounds


def parse_topology(text: str, num_slices: int = 1) -> Topology:
    """"v5p:4x4x4" -> Topology; one clear error naming the bad value otherwise."""
    m = _TOPOLOGY.match(text.strip())
    if not m:
        raise ValueError(f"--topology {text!r}: expected <generation>:<AxB[xC]> with generation in {sorted(CHIPS)}, "
                         f"e.g. v5e:2x2 or v5p:4x4x4")
    chip = CHIPS[m.group(1)]
    shape = tuple(int(x) for x in m.group(2).split("x"))
    if len(shape) != chip.dims:
        raise ValueError(f"--topology {text!r}: {chip.name} slices are {chip.dims}-dimensional (e.g. "
                         f"{chip.name}:{'x'.join(['2'] * chip.dims)})")
    if min(shape) < 1:
        raise ValueError(f"--topology {text!r}: every dimension must be >= 1")
    if num_slices < 1:
        raise ValueError(f"--slices {num_slices}: must be >= 1")
    return Topology(chip, shape, num_slices)


def topology_devices(topo: Topology) -> list[Any]:
    """The compile-only devices of the slices (needs libtpu: pip install -e .[aot])."""
    try:
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=topo.name, chip_config_name=topo.chip.chip_config_name,
            chips_per_host_bounds=topo.host_bounds(), num_slices=topo.num_slices)
    except Exception as e:
        raise RuntimeError(f"topology {topo.describe()}: libtpu could not describe it ({str(e).splitlines()[0]}); "
                           f"is the aot extra installed (pip install -e .[aot])?") from e
    devices = list(desc.devices)
    if len(devices) != topo.num_chips:
        raise RuntimeError(f"topology {topo.describe()}: libtpu returned {len(devices)} devices, expected {topo.num_chips}")
    return devices


def build_mesh(topo: Topology, devices: Sequence[Any], spec: str) -> jax.sharding.Mesh:
    """The mesh train.py builds for `parallel.mesh=spec` and `parallel.num_slices=topo.num_slices`
    (`sharding.make_mesh`), over the topology's devices; errors name the slice size."""
    try:
        return sharding.make_mesh(spec, devices, num_slices=topo.num_slices)
    except ValueError as e:
        raise ValueError(f"parallel.mesh={spec!r} on {topo.chips_per_slice} chips per slice of {topo.name}: {e}") from None
