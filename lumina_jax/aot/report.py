"""Compile a lowered program for a topology and report its memory per device, its FLOPs and the fit.

Per device: the inputs by kind (parameters, optimizer state, batch / prompts), XLA's temporaries and
generated code, and the total `arguments + outputs - aliased + temporaries + code` (the donated train state
is aliased, so it is counted once) against the chip's HBM. A program that does not fit either fails to
compile (the TPU compiler checks its own HBM limit) or compiles with a total above the chip's HBM; both give
a `DoesNotFit` naming the topology, the need, the capacity and the largest buffers.
"""
from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any, Optional

import jax
import numpy as np

from lumina_jax import sharding
from lumina_jax.aot.analysis import format_bytes
from lumina_jax.aot.hbm_traffic import compiled_hbm_bytes
from lumina_jax.aot.programs import Program
from lumina_jax.aot.topology import Topology

_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}


class DoesNotFit(Exception):
    """The program needs more HBM per chip than the topology has; `report` holds the details."""

    def __init__(self, report: "Report"):
        self.report = report
        super().__init__(report.verdict())


@dataclasses.dataclass
class Report:
    topology: Topology
    mode: str
    mesh: dict  # mesh axis sizes
    workload: dict
    hbm_bytes: int  # the chip's HBM (topology table)
    inputs: dict  # per-device bytes of the inputs by kind
    compile_seconds: float
    fits: bool
    temp_bytes: Optional[int] = None  # XLA temporaries per device (None when compilation failed)
    code_bytes: Optional[int] = None
    argument_bytes: Optional[int] = None
    output_bytes: Optional[int] = None
    alias_bytes: Optional[int] = None
    compiler_need_bytes: Optional[int] = None  # from the compiler's out-of-memory message
    compiler_capacity_bytes: Optional[int] = None
    compiler_message: str = ""
    program_flops: float = 0.0  # all devices, per step: matrix products counted on the jaxpr
    model_flops: float = 0.0  # all devices, per step: 6N + attention (train) / 2N + attention per token (generate)
    xla_flops_per_device: Optional[float] = None  # XLA cost analysis (each loop body counted once)
    xla_bytes_accessed_per_device: Optional[float] = None  # XLA cost analysis: HBM bytes read + written (ditto)
    while_loops: int = 0
    largest: list = dataclasses.field(default_factory=list)  # strings, largest first
    replicated_fraction: Optional[float] = None
    decode: Optional[dict] = None
    mfu: float = 0.4
    compiled: Any = dataclasses.field(default=None, repr=False)  # jax.stages.Compiled (not serialised)
    param_shapes: Any = dataclasses.field(default=None, repr=False)  # sharded ShapeDtypeStructs of the parameters

    @property
    def num_devices(self) -> int:
        return math.prod(self.mesh.values())

    @property
    def total_bytes(self) -> int:
        """Peak HBM per device: the compiled figure, or the compiler's stated need when it refused."""
        if self.temp_bytes is not None:
            return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes
        # the compiler's figure already counts the arguments and outputs (checked with a bare x * 2 program)
        return self.compiler_need_bytes or sum(self.inputs.values())

    @property
    def headroom_bytes(self) -> int:
        return self.hbm_bytes - self.total_bytes

    def step_seconds(self) -> float:
        """Train: step time at `mfu` of the chip's peak. Generate: one decode step, the larger of the compute
        time at `mfu` and the time to read the weights and the KV cache from HBM once."""
        chip = self.topology.chip
        compute = self.model_flops / self.num_devices / (self.mfu * chip.peak_bf16_flops)
        if self.decode is None:
            return compute
        memory = (self.decode["param_bytes"] + self.decode["kv_cache_bytes"]) / chip.hbm_bandwidth
        return max(compute, memory)

    def cost_analysis_step_seconds(self) -> Optional[float]:
        """Generate mode: the HBM bytes of one compiled decode step (XLA's cost analysis, which counts every
        fused operation's operands and results, so more than the weights and cache read once) at the chip's
        bandwidth; None when the step was not compiled."""
        measured = (self.decode or {}).get("step_bytes_accessed")
        return measured / self.topology.chip.hbm_bandwidth if measured else None

    def hbm_step_seconds(self) -> Optional[float]:
        """Generate mode: the compiled decode step's HBM traffic (`hbm_traffic`: on-chip copies not counted) at
        the chip's bandwidth; None when the step was not compiled."""
        measured = (self.decode or {}).get("step_hbm_bytes")
        return measured / self.topology.chip.hbm_bandwidth if measured else None

    def verdict(self) -> str:
        """One line: fits with how much headroom, or does not fit with need and capacity."""
        t = self.topology.describe()
        if self.fits:
            return (f"{t}: the {self.mode} program fits: {format_bytes(self.total_bytes)} of "
                    f"{format_bytes(self.hbm_bytes)} HBM per chip, headroom {format_bytes(self.headroom_bytes)}")
        cap = self.compiler_capacity_bytes or self.hbm_bytes
        return (f"{t}: the {self.mode} program does not fit: it needs {format_bytes(self.total_bytes)}"
                f"{' or more' if self.temp_bytes is None else ''} per chip and a {self.topology.chip.name} chip has "
                f"{format_bytes(cap)} (HBM {format_bytes(self.hbm_bytes)})")

    def to_dict(self) -> dict:
        skip = ("topology", "compiled", "param_shapes")
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        d.update(topology=self.topology.name, slices=self.topology.num_slices, chips=self.topology.num_chips,
                 total_bytes=self.total_bytes, headroom_bytes=self.headroom_bytes, step_seconds=self.step_seconds(),
                 cost_analysis_step_seconds=self.cost_analysis_step_seconds() if self.decode else None,
                 verdict=self.verdict())
        return d


def _parse_size(num: str, unit: str) -> int:
    return int(float(num) * _UNITS[(unit or "").strip()[:1].upper()])


def parse_oom(message: str) -> tuple[Optional[int], Optional[int]]:
    """(need, capacity) in bytes from a TPU compiler out-of-memory message, where it states them."""
    patterns = [
        r"HLO temporaries \(([\d.]+)\s*([KMGT]?)i?B?\) exceeds available HBM \(([\d.]+)\s*([KMGT]?)i?B?\)",
        r"Used ([\d.]+)\s*([KMGT]?)i?B? of ([\d.]+)\s*([KMGT]?)i?B? hbm",
        r"Requires ([\d.]+)\s*([KMGT]?)i?B?, has ([\d.]+)\s*([KMGT]?)i?B? available",
    ]
    for pat in patterns:
        m = re.search(pat, message)
        if m:
            return _parse_size(m.group(1), m.group(2)), _parse_size(m.group(3), m.group(4))
    m = re.search(r"Allocation \(size=(\d+)\) would exceed memory \(size=(\d+)\)", message)
    if m:
        return int(m.group(1)), int(m.group(2))
    return None, None


def format_seconds(t: float) -> str:
    if t >= 1:
        return f"{t:.2f} s"
    return f"{t * 1e3:.2f} ms" if t >= 1e-3 else f"{t * 1e6:.1f} us"


def _largest_inputs(tree: Any, keep: int) -> list[str]:
    rows = []
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        sh = getattr(x, "sharding", None)
        shape = sh.shard_shape(x.shape) if sh is not None else x.shape
        try:
            itemsize = np.dtype(x.dtype).itemsize
        except TypeError:
            continue
        nbytes = math.prod(shape) * itemsize
        name = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
        rows.append((nbytes, f"input {name} {x.dtype}{list(x.shape)}, "
                             f"{format_bytes(nbytes)} per device"))
    rows.sort(key=lambda r: -r[0])
    return [r[1] for r in rows[:keep]]


def compile_and_report(program: Program, topo: Topology, mesh: jax.sharding.Mesh, mfu: float = 0.4) -> Report:
    """Compiles `program`; returns the report (check `.fits`). Compiler errors other than out-of-memory raise."""

    try:
        replicated = sharding.check_replication(program.param_shapes, max_replicated_fraction=1.0)
    except ValueError:
        replicated = None
    stats = program.jaxpr_stats
    rep = Report(topology=topo, mode=program.mode, mesh=dict(mesh.shape), workload=program.workload,
                 hbm_bytes=topo.chip.hbm_bytes, inputs=program.groups, compile_seconds=0.0, fits=False,
                 program_flops=stats.flops, model_flops=program.model_flops, while_loops=stats.while_loops,
                 replicated_fraction=replicated, decode=program.decode, mfu=mfu, param_shapes=program.param_shapes)
    t0 = time.perf_counter()
    try:
        compiled = program.lowered.compile()
    except Exception as e:  # jaxlib raises XlaRuntimeError (a RuntimeError subclass)
        text = str(e)
        if "RESOURCE_EXHAUSTED" not in text and "out of memory" not in text.lower():
            raise
        rep.compile_seconds = time.perf_counter() - t0
        rep.compiler_message = text.strip()
        rep.compiler_need_bytes, rep.compiler_capacity_bytes = parse_oom(text)
        rep.largest = _largest_buffers(rep, program)
        return rep
    rep.compile_seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    rep.temp_bytes = int(mem.temp_size_in_bytes)
    rep.code_bytes = int(mem.generated_code_size_in_bytes)
    rep.argument_bytes = int(mem.argument_size_in_bytes)
    rep.output_bytes = int(mem.output_size_in_bytes)
    rep.alias_bytes = int(mem.alias_size_in_bytes)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    rep.xla_flops_per_device = float(cost.get("flops", 0.0)) if cost else None
    rep.xla_bytes_accessed_per_device = float(cost.get("bytes accessed", 0.0)) if cost else None
    rep.fits = rep.total_bytes <= rep.hbm_bytes
    if not rep.fits:
        rep.largest = _largest_buffers(rep, program)
    rep.compiled = compiled
    if program.step_lowered is not None:  # bytes of one decode step, from its own compiled program
        step = program.step_lowered.compile()
        step_cost = step.cost_analysis()
        step_cost = step_cost[0] if isinstance(step_cost, (list, tuple)) else step_cost
        hbm, unknown_loops = compiled_hbm_bytes(step)
        rep.decode = dict(rep.decode, step_bytes_accessed=float(step_cost.get("bytes accessed", 0.0)),
                          step_hbm_bytes=hbm, step_hbm_unknown_loops=unknown_loops)
    return rep


def _largest_buffers(rep: Report, program: Program, keep: int = 5) -> list[str]:
    out = []
    m = re.search(r"Largest program allocations[^\n]*\n(.*)", rep.compiler_message, re.S)
    if m:
        out += [line.strip() for line in m.group(1).splitlines() if line.strip()][: 4 * keep]
    elif "Allocation (size=" in rep.compiler_message:
        out.append("compiler: " + rep.compiler_message.splitlines()[0][:400])
    out += _largest_inputs(program.inputs, keep)
    out += [f"intermediate {b.describe()} (global size; divided by its sharding per device)"
            for b in program.jaxpr_stats.largest[:keep]]
    return out


def format_report(rep: Report) -> str:
    """The human-readable report (several lines)."""
    chip = rep.topology.chip
    n = rep.num_devices
    lines = [f"topology    {rep.topology.describe()}, {chip.device_kind}, {n} devices",
             f"mesh        " + ", ".join(f"{k}={v}" for k, v in rep.mesh.items())
             + ("  (data spans slices over DCN)" if rep.topology.num_slices > 1 else ""),
             f"workload    " + ", ".join(f"{k}: {v}" for k, v in rep.workload.items())]
    if rep.replicated_fraction is not None:
        lines.append(f"sharding    {rep.replicated_fraction:.2%} of parameter elements fully replicated")
    lines.append(f"compile     {rep.compile_seconds:.1f} s")
    lines.append("memory per device:")
    for k, v in rep.inputs.items():
        lines.append(f"  {k:<18} {format_bytes(v):>12}")
    if rep.decode is not None:
        lines.append(f"  {'KV cache':<18} {format_bytes(rep.decode['kv_cache_bytes']):>12}  (part of temporaries)")
    if rep.temp_bytes is not None:
        lines.append(f"  {'temporaries':<18} {format_bytes(rep.temp_bytes):>12}")
        lines.append(f"  {'generated code':<18} {format_bytes(rep.code_bytes):>12}")
    else:
        need = format_bytes(rep.compiler_need_bytes) if rep.compiler_need_bytes else "unknown"
        cap = format_bytes(rep.compiler_capacity_bytes) if rep.compiler_capacity_bytes else "unknown"
        lines.append(f"  {'compiler needs':<18} {need:>12}  (capacity as the compiler counts it: {cap})")
    lines.append(f"  {'total':<18} {format_bytes(rep.total_bytes):>12}")
    lines.append(f"  {'HBM (' + chip.name + ')':<18} {format_bytes(rep.hbm_bytes):>12}")
    lines.append(f"  {'headroom':<18} {format_bytes(rep.headroom_bytes):>12}")
    per = "step" if rep.mode == "train" else "decode step"
    lines.append(f"FLOPs per {per}:")
    lines.append(f"  program (jaxpr)    {rep.program_flops:.4g} total, {rep.program_flops / n:.4g} per device"
                 + ("  [matrix products; remat recomputation included]" if rep.mode == "train"
                    else f"  [prefill + one pass of the decode loop body]"))
    lines.append(f"  model              {rep.model_flops:.4g} total, {rep.model_flops / n:.4g} per device"
                 + ("  [6P + 12 L N H T per token]" if rep.mode == "train" else "  [2P + 4 L N H S per row]"))
    if rep.xla_flops_per_device is not None:
        lines.append(f"  XLA cost analysis  {rep.xla_flops_per_device:.4g} per device  [counts each loop body once]")
    if rep.xla_bytes_accessed_per_device is not None:
        lines.append(f"bytes accessed      {format_bytes(rep.xla_bytes_accessed_per_device)} per device  "
                     "[XLA cost analysis; counts each loop body once]")
    if rep.mode == "train":
        lines.append(f"step time   {format_seconds(rep.step_seconds())} at {rep.mfu:.0%} MFU "
                     f"({chip.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16 per chip, model FLOPs)")
    else:
        d = rep.decode
        if rep.cost_analysis_step_seconds() is not None:
            lines.append(f"bytes/step  {format_bytes(d['step_bytes_accessed'])} per device  [cost analysis of one "
                         f"compiled decode step: {format_seconds(rep.cost_analysis_step_seconds())} at "
                         f"{chip.hbm_bandwidth / 1e9:.0f} GB/s]")
        if d.get("step_hbm_bytes"):
            lines.append(f"HBM/step    {format_bytes(d['step_hbm_bytes'])} per device  [the same step's HBM reads and "
                         f"writes (lumina_jax.aot.hbm_traffic): {format_seconds(rep.hbm_step_seconds())} at "
                         f"{chip.hbm_bandwidth / 1e9:.0f} GB/s]")
        lines.append(f"decode      {format_seconds(rep.step_seconds())} per step (max of compute at {rep.mfu:.0%} MFU and "
                     f"reading weights + KV cache at {chip.hbm_bandwidth / 1e9:.0f} GB/s); "
                     f"{d['steps']} steps -> {format_seconds(rep.step_seconds() * d['steps'])} per image batch"
                     + (" (an estimate: steps from the assumed tokens per SJD step)" if d.get("estimated_steps") else ""))
    lines.append(rep.verdict())
    if not rep.fits:
        if rep.compiler_message:
            lines.append("compiler: " + rep.compiler_message.splitlines()[0][:500])
        lines.append("largest buffers:")
        lines += [f"  {s}" for s in rep.largest]
    return "\n".join(lines)
