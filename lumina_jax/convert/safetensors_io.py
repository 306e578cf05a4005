"""Streaming reader and writer for safetensors files and sharded Hugging Face model directories.

The format is small enough to handle directly: an 8-byte little-endian header length, a JSON header
mapping each tensor name to `{"dtype", "shape", "data_offsets"}` (offsets relative to the end of the
header), then the raw little-endian tensor bytes. Reading it ourselves (instead of `safetensors.safe_open`)
lets us read one tensor at a time straight into numpy (bf16 through `ml_dtypes`), keep the exact source
bytes, and report a truncated or malformed file as one line naming the file and the problem. Writing it
ourselves lets us stream tensor by tensor: the header is built from shapes alone, then each tensor is
produced, written and dropped.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Callable, Sequence

import ml_dtypes
import numpy as np

from lumina_jax.convert.errors import ConversionError
from lumina_jax.validation import parse_json

# safetensors dtype name <-> numpy dtype (bf16 and fp8 via ml_dtypes).
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES: dict[np.dtype, str] = {v: k for k, v in DTYPES.items()}

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit on the JSON header


def dtype_name(dtype) -> str:
    dt = np.dtype(dtype)
    if dt not in DTYPE_NAMES:
        raise ConversionError(f"dtype {dt} cannot be stored in safetensors")
    return DTYPE_NAMES[dt]


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape and absolute byte range."""

    name: str
    path: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    end: int  # absolute file offset one past the last byte

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    """Parses and validates the header of one safetensors file -> (metadata, {name: TensorInfo}).

    Every entry is checked before any tensor byte is read: a known dtype, non-negative integer dimensions,
    integer offsets with begin <= end, a byte count equal to the dtype size times the element count
    (computed without overflow), and byte ranges that tile the data section exactly (no overlap, no gap, no
    byte past the end of the file), as the format's reference implementation requires.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: file not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConversionError(f"{path}: truncated or not a safetensors file ({size} bytes, no header length)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER:
            raise ConversionError(f"{path}: not a safetensors file (header length {n} bytes is implausible)")
        if 8 + n > size:
            raise ConversionError(f"{path}: truncated: header needs {8 + n} bytes but the file has {size}")
        raw = f.read(n)
    try:
        header = parse_json(raw, "header")
    except ValueError as e:
        raise ConversionError(f"{path}: malformed safetensors {e}") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: malformed safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ConversionError(f"{path}: malformed safetensors header (__metadata__ must map names to strings)")
    data_start = 8 + n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _tensor_info(path, name, entry, data_start)
    end = data_start
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if info.begin != end:
            what = "overlaps the tensor before it" if info.begin < end else "leaves a gap before it"
            raise ConversionError(f"{path}: tensor {info.name!r} (bytes {info.begin - data_start}.."
                                  f"{info.end - data_start} of the data) {what}")
        end = info.end
    if end > size:
        raise ConversionError(f"{path}: truncated: tensor data ends at byte {end} but the file has {size}")
    if end < size:
        raise ConversionError(f"{path}: {size - end} bytes after the last tensor's data (not a safetensors file, "
                              "or a damaged one)")
    return metadata, tensors


def _tensor_info(path: Path, name: str, entry, data_start: int) -> TensorInfo:
    """One header entry, checked field by field (see `read_header`)."""
    def bad(why: str) -> ConversionError:
        return ConversionError(f"{path}: malformed header entry for tensor {name!r}: {why}: {entry!r:.200}")

    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise bad("expected exactly the fields dtype, shape, data_offsets")
    if not isinstance(entry["dtype"], str) or entry["dtype"] not in DTYPES:
        raise bad(f"unknown dtype (known: {', '.join(DTYPES)})")
    shape, offsets = entry["shape"], entry["data_offsets"]
    def ints(xs) -> bool:
        return isinstance(xs, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in xs)
    if not ints(shape) or any(d < 0 for d in shape):
        raise bad("shape must be a list of non-negative integers")
    if not ints(offsets) or len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1]:
        raise bad("data_offsets must be two integers 0 <= begin <= end")
    dtype = DTYPES[entry["dtype"]]
    expected = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    b, e = offsets
    if e - b != expected:
        raise ConversionError(
            f"{path}: tensor {name!r} has {e - b} data bytes but dtype {entry['dtype']} shape {list(shape)} "
            f"needs {expected}")
    return TensorInfo(name, path, dtype, tuple(shape), data_start + b, data_start + e)


def read_tensor(info: TensorInfo) -> np.ndarray:
    """Reads one tensor's bytes into a fresh numpy array (exact source bytes, source dtype)."""
    out = np.empty(info.shape, dtype=info.dtype)
    with open(info.path, "rb") as f:
        f.seek(info.begin)
        got = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
    if got != info.nbytes:
        raise ConversionError(f"{info.path}: truncated while reading tensor {info.name!r}")
    return out


class ModelFiles:
    """The safetensors files of a Hugging Face model directory (single file or sharded with an index)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ConversionError(f"{self.directory}: not a directory")
        index = self.directory / INDEX_NAME
        if index.is_file():
            try:
                weight_map = parse_json(index.read_bytes(), str(index))["weight_map"]
            except ValueError as e:
                raise ConversionError(str(e)) from None
            except (KeyError, TypeError):
                raise ConversionError(f"{index}: malformed index (no 'weight_map' object)") from None
            plain = lambda f: isinstance(f, str) and f not in ("", ".", "..") and f == Path(f).name  # noqa: E731
            if not isinstance(weight_map, dict) or not all(map(plain, weight_map.values())):
                raise ConversionError(f"{index}: weight_map must map tensor names to file names in {self.directory}")
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.directory / f).is_file()]
            if missing:
                raise ConversionError(f"{index}: shard files listed in weight_map are missing: {missing}")
        elif (self.directory / SINGLE_NAME).is_file():
            weight_map, files = None, [SINGLE_NAME]
        else:
            found = sorted(p.name for p in self.directory.glob("*.safetensors"))
            if len(found) != 1:
                raise ConversionError(
                    f"{self.directory}: expected {SINGLE_NAME} or {INDEX_NAME}, found safetensors files {found}")
            weight_map, files = None, found
        self.files = files
        self.tensors: dict[str, TensorInfo] = {}
        for name in files:
            _, tensors = read_header(self.directory / name)
            for key, info in tensors.items():
                if key in self.tensors:
                    raise ConversionError(f"{self.directory}: tensor {key!r} appears in two files "
                                          f"({self.tensors[key].path.name}, {name})")
                self.tensors[key] = info
        if weight_map is not None:
            absent = sorted(k for k, f in weight_map.items() if k not in self.tensors or self.tensors[k].path.name != f)
            if absent:
                raise ConversionError(f"{index}: weight_map keys not found in the named shard: {absent[:20]}"
                                      + (f" (+{len(absent) - 20} more)" if len(absent) > 20 else ""))

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    def read(self, key: str) -> np.ndarray:
        return read_tensor(self.tensors[key])


# ------------------------------------------------------------------------------------------------ writing

@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A tensor to write: its name, dtype and shape, and a callable producing its values on demand."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def _header_bytes(specs: Sequence[TensorSpec], metadata: dict[str, str] | None) -> bytes:
    header: dict = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": dtype_name(s.dtype), "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return raw + b" " * (-len(raw) % 8)  # pad so tensor data starts 8-byte aligned, as the reference does


def write_file(path: str | os.PathLike, specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None,
               on_tensor: Callable[[TensorSpec], None] | None = None) -> None:
    """Writes one safetensors file, producing and writing one tensor at a time."""
    raw = _header_bytes(specs, metadata)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for s in specs:
            arr = np.ascontiguousarray(s.produce())
            if arr.dtype != np.dtype(s.dtype) or arr.shape != tuple(s.shape):
                raise ValueError(f"tensor {s.name}: produced {arr.dtype}{arr.shape}, declared {s.dtype}{tuple(s.shape)}")
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))
            del arr
            if on_tensor is not None:
                on_tensor(s)


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5e9, '500MiB' -> 500*2**20, '1234' -> 1234 bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = _SIZE_RE.match(str(text))
        if not m or m.group(2).upper() not in _UNITS:
            raise ConversionError(f"--max-shard-size: cannot parse {text!r} (examples: 5GB, 500MiB, 1000000)")
        value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise ConversionError(f"--max-shard-size: must be positive, got {text!r}")
    return value


def plan_shards(specs: Sequence[TensorSpec], max_shard_size: int) -> list[list[TensorSpec]]:
    """Greedy split in the given order; a tensor bigger than the limit gets a shard of its own."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def write_model(directory: str | os.PathLike, specs: Sequence[TensorSpec], max_shard_size: int,
                metadata: dict[str, str] | None = None, on_tensor=None) -> list[str]:
    """Writes `model.safetensors`, or numbered shards plus `model.safetensors.index.json`; returns file names."""
    directory = Path(directory)
    shards = plan_shards(specs, max_shard_size)
    if len(shards) == 1:
        write_file(directory / SINGLE_NAME, shards[0], metadata, on_tensor)
        return [SINGLE_NAME]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        write_file(directory / name, shard, metadata, on_tensor)
        weight_map.update({s.name: name for s in shard})
    index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": weight_map}
    with open(directory / INDEX_NAME, "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
        f.write("\n")
    return names

