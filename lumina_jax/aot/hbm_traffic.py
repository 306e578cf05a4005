"""HBM traffic of a compiled TPU program, read from its optimized HLO text.

XLA's `cost_analysis()["bytes accessed"]` adds up the operands and results of every instruction wherever they
live. After memory-space assignment a TPU program moves hot buffers into on-chip memory (`S(1)` in a layout)
with async copies and slices, and the cost analysis then counts one buffer several times: the copy's source and
destination, the re-assembly of the slices, and the consumer's read from on-chip memory. For a decode step,
whose work is reading weights and cache once, that multiplies the figure by 4-9 and hides what a smaller dtype
saves. `hbm_bytes` counts only accesses to memory space 0 (HBM):

- an async copy / slice (`copy-start`, `slice-start`) moves its destination's bytes: a read when the source is
  in HBM, a write when the destination is;
- any other instruction reads its operands and writes its results that are in HBM, except that a fusion
  parameter used only by slices, dynamic slices and gathers or as the in-place target of a dynamic-update-slice is read only as
  far as those slices go, and a dynamic-update-slice result writes only its update;
- a while loop costs its body times the trip count of its condition (`counter < constant`, counter from 0);
- bookkeeping (parameters, tuples, bitcasts, `*-done`, the `ConcatBitcast` re-assembly) costs nothing.

Sizes include the padding of the tiled layout (`T(8,128)` pads the two most minor dimensions).
"""
from __future__ import annotations

import dataclasses
import math
import re

ELEMENT_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s4": 0.5, "u4": 0.5, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
                 "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all", "partition-id", "replica-id",
        "opt-barrier", "add-dependency", "iota"}
ASYNC_MOVES = {"copy-start", "slice-start"}
SLICING = {"slice", "dynamic-slice", "gather"}  # read only what their result holds (operand 0)
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\](\{[^}]*\})?")
_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = ")


@dataclasses.dataclass
class Array:
    """One array of an HLO shape: its size in bytes (tile padding included) and its memory space."""

    nbytes: float
    space: int


def element_bytes(dtype: str) -> float:
    if dtype.startswith("f8"):
        return 1
    if dtype not in ELEMENT_BYTES:
        raise ValueError(f"hbm_traffic: unknown HLO element type {dtype!r}")
    return ELEMENT_BYTES[dtype]


def parse_arrays(shape: str) -> list[Array]:
    """Every array in an HLO shape string (a tuple gives several), with its padded size and memory space."""
    out = []
    for dtype, dims, layout in _ARRAY.findall(shape):
        size = [int(d) for d in dims.split(",") if d]
        space = 0
        if layout:
            m = re.search(r"S\((\d+)\)", layout)
            space = int(m.group(1)) if m else 0
            order = re.match(r"\{([0-9,]*)", layout).group(1)
            tile = re.search(r":T\(([0-9,]+)\)", layout)
            if order and tile and size:
                minor_to_major = [int(d) for d in order.split(",")]
                t = [int(x) for x in tile.group(1).split(",")]
                physical = list(reversed(minor_to_major))  # major -> minor
                for dim, tdim in zip(physical[-len(t):], t):
                    size[dim] = math.ceil(size[dim] / tdim) * tdim
        out.append(Array(math.prod(size) * element_bytes(dtype), space))
    return out


@dataclasses.dataclass
class Instr:
    name: str
    shape: str  # the result shape text
    opcode: str
    operands: list[str]
    args: str  # the text between the opcode's brackets (a parameter's number, a constant's value)
    attrs: str  # everything after the operand list


def _split_top(text: str, start: int) -> int:
    """Index just past the bracket group opening at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        c = text[i]
        if c in "({[":
            depth += 1
        elif c in ")}]":
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError("hbm_traffic: unbalanced brackets in an HLO line")


def parse_instr(line: str) -> Instr | None:
    m = _INSTR.match(line)
    if not m:
        return None
    rest = line[m.end():]
    if rest.startswith("("):
        end = _split_top(rest, 0)
    else:
        end = rest.index(" ")
        if "{" in rest[:end]:  # a layout may hold no spaces, but be safe
            end = _split_top(rest, rest.index("{"))
    shape, rest = rest[:end], rest[end:].lstrip()
    op = re.match(r"([\w-]+)\(", rest)
    if not op:
        return None
    close = _split_top(rest, op.end() - 1)
    args = rest[op.end():close - 1]
    return Instr(m.group(1), shape, op.group(1), re.findall(r"%([\w.\-]+)", args), args, rest[close:])


def parse_module(text: str) -> tuple[dict[str, list[Instr]], str]:
    """{computation name: instructions} and the entry computation's name."""
    comps, entry, current = {}, None, None
    for line in text.splitlines():
        head = re.match(r"^(ENTRY )?%(\S+) .*\{\s*$", line)
        if head and not line.startswith(" "):
            current = head.group(2)
            comps[current] = []
            if head.group(1):
                entry = current
            continue
        if line.startswith("}"):
            current = None
            continue
        if current is not None:
            ins = parse_instr(line)
            if ins is not None:
                comps[current].append(ins)
    if entry is None:
        raise ValueError("hbm_traffic: no ENTRY computation in the HLO text")
    return comps, entry


class Counter:
    def __init__(self, text: str):
        self.comps, self.entry = parse_module(text)
        self.unknown_trip_counts = 0

    def hbm(self, shape: str) -> float:
        return sum(a.nbytes for a in parse_arrays(shape) if a.space == 0)

    def computation(self, name: str) -> float:
        shapes = {i.name: i.shape for i in self.comps[name]}
        return sum(self.instruction(i, shapes) for i in self.comps[name])

    def instruction(self, ins: Instr, shapes: dict[str, str]) -> float:
        op = ins.opcode
        if op in FREE or op.endswith("-done") or 'custom_call_target="ConcatBitcast"' in ins.attrs:
            return 0.0
        if op in ASYNC_MOVES:
            parts = parse_arrays(ins.shape)
            dest = parts[0] if op == "copy-start" else parts[-2]  # copy: (dest, src, ctx); slice: ((src), dest, ctx)
            src_space = min((a.space for a in parse_arrays(shapes.get(ins.operands[0], ""))), default=0)
            return dest.nbytes * ((src_space == 0) + (dest.space == 0))
        if op == "while":
            body = re.search(r"body=%([\w.\-]+)", ins.attrs).group(1)
            cond = re.search(r"condition=%([\w.\-]+)", ins.attrs).group(1)
            return self.trip_count(cond) * self.computation(body)
        if op in ("call", "conditional"):
            called = re.findall(r"(?:to_apply|branch_computations|calls)=\{?%([\w.\-]+)", ins.attrs)
            return max((self.computation(c) for c in called), default=0.0)
        reads = [self.hbm(shapes.get(o, "")) for o in ins.operands]
        write = self.hbm(ins.shape)
        if op == "fusion":
            called = re.search(r"calls=%([\w.\-]+)", ins.attrs).group(1)
            reads, write = self.fusion_refine(called, reads, write)
        elif op in SLICING:
            reads[0] = min(reads[0], write)
        elif op == "dynamic-update-slice":
            reads[0] = 0.0
            write = min(write, reads[1]) if len(reads) > 1 else write
        return sum(reads) + write

    def fusion_refine(self, comp: str, reads: list[float], write: float) -> tuple[list[float], float]:
        """Reads of parameters used only through slices or as an in-place update target, and the write of a
        dynamic-update-slice root, limited to the bytes those slices and updates touch."""
        body = self.comps.get(comp, [])
        by_name = {i.name: i for i in body}
        params = {i.name: int(i.args) for i in body if i.opcode == "parameter"}
        users: dict[str, list[tuple[Instr, int]]] = {p: [] for p in params}
        for i in body:
            for pos, o in enumerate(i.operands):
                if o in users:
                    users[o].append((i, pos))
        reads = list(reads)
        for pname, idx in params.items():
            if idx >= len(reads) or not reads[idx] or not users[pname]:
                continue
            touched = 0.0
            for user, pos in users[pname]:
                if user.opcode in SLICING and pos == 0:
                    touched += sum(a.nbytes for a in parse_arrays(user.shape))
                elif user.opcode == "dynamic-update-slice" and pos == 0:
                    continue  # updated in place: the untouched part is neither read nor written
                else:
                    touched = None
                    break
            if touched is not None:
                reads[idx] = min(reads[idx], touched)
        root = body[-1] if body else None
        roots = [by_name.get(o) for o in root.operands] if root is not None and root.opcode == "tuple" else [root]
        if write and roots and all(r is not None and r.opcode == "dynamic-update-slice" for r in roots):
            update = sum(sum(a.nbytes for a in parse_arrays(by_name[r.operands[1]].shape))
                         for r in roots if r.operands[1] in by_name)
            write = min(write, update)
        return reads, write

    def trip_count(self, cond: str) -> int:
        body = self.comps.get(cond, [])
        consts = {i.name: i for i in body if i.opcode == "constant"}
        for i in body:
            if i.opcode == "compare" and "direction=LT" in i.attrs and len(i.operands) == 2 and i.operands[1] in consts:
                value = consts[i.operands[1]].args.strip()
                if re.fullmatch(r"\d+", value):
                    return int(value)
        self.unknown_trip_counts += 1
        return 1


def hbm_bytes(hlo_text: str) -> tuple[float, int]:
    """(HBM bytes read and written by one execution of the entry computation, while loops whose trip count was
    not recognised and were counted once)."""
    c = Counter(hlo_text)
    return c.computation(c.entry), c.unknown_trip_counts


def compiled_hbm_bytes(compiled) -> tuple[float, int]:
    """`hbm_bytes` of a `jax.stages.Compiled`."""
    return hbm_bytes(compiled.as_text())


