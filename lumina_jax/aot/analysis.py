"""What a traced program does, counted on its jaxpr: FLOPs of every matrix product (with scan trip counts
and rematerialised recomputation included) and the largest intermediate arrays.

XLA's own `cost_analysis()` counts the body of each loop once (HloCostAnalysis has no trip counts), so for
a scanned decoder it under-counts by about the number of layers; the jaxpr still knows every scan length.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from jax.interpreters import partial_eval as pe  # public re-export of JAX's dead-code elimination


@dataclasses.dataclass(frozen=True)
class Buffer:
    """One intermediate array of the traced program (global, unsharded shape)."""

    nbytes: int
    shape: tuple[int, ...]
    dtype: str
    where: str  # name stack of the operation that produced it (module path in the model)

    def describe(self) -> str:
        return f"{self.dtype}{list(self.shape)} {format_bytes(self.nbytes)} ({self.where})"


@dataclasses.dataclass
class JaxprStats:
    flops: float = 0.0  # 2 * M * N * K over all dot_generals, times loop trip counts (global, all devices)
    while_loops: int = 0  # while loops met (their bodies are counted once: trip counts are data-dependent)
    largest: list = dataclasses.field(default_factory=list)  # Buffer, largest first


def format_bytes(n: float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def _dot_flops(eqn) -> float:
    (lc, _rc), _batch = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    out = eqn.outvars[0].aval.shape
    k = math.prod(lhs[d] for d in lc)
    return 2.0 * math.prod(out) * k


def _sub_jaxprs(value):
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jax.extend.core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def _live_jaxpr(jaxpr):
    """`jaxpr` without the equations no output depends on (inside loops too), as XLA drops them.

    The fused loss, for one, takes a vjp only for its pullback and leaves the forward product unused.
    """
    live, _ = pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars), instantiate=True)
    return live


def analyse_jaxpr(closed: Any, keep: int = 8) -> JaxprStats:
    """FLOPs and the `keep` largest distinct intermediates of a ClosedJaxpr (from jax.make_jaxpr)."""
    stats = JaxprStats()
    seen: dict[tuple, Buffer] = {}

    def visit(jaxpr, mult: float):
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name == "dot_general":
                stats.flops += mult * _dot_flops(eqn)
            for v in eqn.outvars:
                aval = v.aval
                shape = getattr(aval, "shape", None)
                if shape is None or not hasattr(aval, "dtype"):
                    continue
                try:
                    itemsize = np.dtype(aval.dtype).itemsize
                except TypeError:  # PRNG key and other extended dtypes
                    continue
                nbytes = math.prod(shape) * itemsize
                where = str(eqn.source_info.name_stack) or name
                key = (tuple(shape), str(aval.dtype), where)
                if key not in seen:
                    seen[key] = Buffer(nbytes, tuple(shape), str(aval.dtype), f"{where}:{name}")
            if name == "cond":
                branch_stats = []
                for br in eqn.params["branches"]:
                    before = stats.flops
                    visit(br.jaxpr, mult)
                    branch_stats.append(stats.flops - before)
                    stats.flops = before
                stats.flops += max(branch_stats, default=0.0)  # the most expensive branch
                continue
            inner = mult * eqn.params["length"] if name == "scan" else mult
            if name == "while":
                stats.while_loops += 1
            for key, value in eqn.params.items():
                if name == "while" and key == "cond_jaxpr":
                    continue
                for sub in _sub_jaxprs(value):
                    visit(sub, inner)

    visit(_live_jaxpr(closed.jaxpr), 1.0)
    stats.largest = sorted(seen.values(), key=lambda b: -b.nbytes)[:keep]
    return stats
