"""torch.save's zip format written without torch, with whatever tensor metadata a test asks for.

    storages = {"0": np.arange(6, dtype=np.float32)}
    tensors = {"w": TensorMeta("0", offset=0, shape=(2, 3), stride=(3, 1))}
    write_torch_zip(path, tensors, storages)            # {"state_dict": {"w": tensor}}, as a Lightning file

The pickle is assembled from protocol-2 opcodes, so offsets, shapes, strides and storage sizes can be set to
values torch itself would never write (negative, overlapping, past the end): the restricted reader's
checks are tested on the exact bytes an attacker could produce. A file written with honest metadata loads
in `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import dataclasses
import os
import struct
import zipfile
from typing import Mapping

import ml_dtypes
import numpy as np

STORAGE_NAMES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float16): "HalfStorage",
                 np.dtype(ml_dtypes.bfloat16): "BFloat16Storage", np.dtype(np.int64): "LongStorage",
                 np.dtype(np.int32): "IntStorage", np.dtype(np.uint8): "ByteStorage",
                 np.dtype(np.bool_): "BoolStorage", np.dtype(np.float64): "DoubleStorage"}


@dataclasses.dataclass(frozen=True)
class TensorMeta:
    """One tensor as torch pickles it: a view (offset, shape, stride in elements) of a storage."""

    storage: str
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    numel: int | None = None  # the storage size written in the reference (default: the storage's true size)


def _text(s: str) -> bytes:
    raw = s.encode("utf-8")
    return b"X" + struct.pack("<I", len(raw)) + raw  # BINUNICODE


def _int(n: int) -> bytes:
    """The opcodes torch.save uses: BININT1, BININT, or LONG1 (any size, any sign) beyond 32 bits."""
    n = int(n)
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if -2**31 <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _tuple(items: list[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t"  # MARK ... TUPLE


def tensor_pickle(tensors: Mapping[str, TensorMeta], storages: Mapping[str, np.ndarray],
                  wrapper: str | None = "state_dict") -> bytes:
    """Protocol-2 pickle bytes of `{wrapper: {name: tensor}}` (or the bare dict when `wrapper` is None)."""
    body = b"}"  # EMPTY_DICT
    for name, t in tensors.items():
        data = storages[t.storage]
        numel = data.size if t.numel is None else t.numel
        pid = _tuple([_text("storage"), b"ctorch\n" + STORAGE_NAMES[data.dtype].encode() + b"\n", _text(t.storage),
                      _text("cpu"), _int(numel)])
        args = _tuple([pid + b"Q", _int(t.offset), _tuple([_int(d) for d in t.shape]),
                       _tuple([_int(s) for s in t.stride]), b"\x89", b"ccollections\nOrderedDict\n)R"])
        body += _text(name) + b"ctorch._utils\n_rebuild_tensor_v2\n" + args + b"R" + b"s"  # SETITEM
    if wrapper is not None:
        body = b"}" + _text(wrapper) + body + b"s"
    return b"\x80\x02" + body + b"."


def write_torch_zip(path: str | os.PathLike, tensors: Mapping[str, TensorMeta], storages: Mapping[str, np.ndarray],
                    wrapper: str | None = "state_dict", pickle_bytes: bytes | None = None) -> str:
    """Writes the archive (`archive/data.pkl`, `archive/data/<key>`, byteorder, version), stored uncompressed
    as torch does; `pickle_bytes` replaces the generated pickle."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", tensor_pickle(tensors, storages, wrapper) if pickle_bytes is None
                    else pickle_bytes)
        zf.writestr("archive/byteorder", "little")
        for key, data in storages.items():
            little = np.ascontiguousarray(data).astype(data.dtype.newbyteorder("<"))
            zf.writestr(f"archive/data/{key}", little.tobytes())
        zf.writestr("archive/version", "3\n")
    return os.fspath(path)


def expected_view(meta: TensorMeta, storage: np.ndarray) -> np.ndarray:
    """What a correct reader returns for `meta` over `storage`, by explicit index arithmetic (no strides)."""
    index = np.full(meta.shape, meta.offset, dtype=object)
    for axis, (d, st) in enumerate(zip(meta.shape, meta.stride)):
        shape = [1] * len(meta.shape)
        shape[axis] = d
        index = index + np.arange(d, dtype=object).reshape(shape) * st
    flat = [int(i) for i in index.reshape(-1)]
    if any(not 0 <= i < storage.size for i in flat):
        raise IndexError("the view leaves its storage")
    return np.array([storage[i] for i in flat], dtype=storage.dtype).reshape(meta.shape)
