"""Reads PyTorch checkpoint files (`torch.save` zip format) without torch and without running their code.

A `.pt`/`.ckpt` file is a zip archive holding `data.pkl` (a pickle of the saved object) and one raw
little-endian buffer per tensor storage under `data/<key>`. A pickle can call any importable function,
so the pickle is read with a restricted unpickler: it resolves only the few globals a checkpoint of
tensors and plain containers needs (the tensor rebuild functions, storage and dtype names,
`collections.OrderedDict`, `torch.Size`, ...) to local, inert stand-ins, and refuses every other global
by name before anything is called. Tensors come back as `LazyTensor`s that read their storage only
when asked (`.numpy()`), so optimizer state or loss networks in a Lightning file cost nothing.

`load_with_torch` is the alternative for files this reader does not understand (the pre-1.6 legacy
format): `torch.load(weights_only=True)`, which needs the optional torch dependency.
"""
from __future__ import annotations

import _compat_pickle
import collections
import dataclasses
import io
import math
import os
import pickle
import zipfile
import zlib
from typing import Any

import ml_dtypes
import numpy as np

from lumina_jax.convert.errors import ConversionError

MAX_PICKLE_BYTES = 256 * 2**20  # data.pkl holds only metadata (names, shapes); tensor bytes live beside it
# storage class name (as pickled: `torch.FloatStorage`) -> numpy dtype
STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
# torch dtype objects (pickled as `torch.float32`, e.g. in hyper-parameters) resolve to inert `TorchDtype`s
TORCH_DTYPES = {
    "float64": np.float64, "float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64, "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_,
}


@dataclasses.dataclass(frozen=True)
class StorageType:
    """Stand-in for a pickled `torch.<X>Storage` class reference."""

    name: str

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(STORAGE_DTYPES[self.name])


@dataclasses.dataclass(frozen=True)
class TorchDtype:
    """Stand-in for a pickled `torch.<dtype>` object."""

    name: str


@dataclasses.dataclass
class StorageRef:
    """One storage buffer of the archive, read on first use."""

    archive: "_Archive"
    key: str
    dtype: np.dtype
    numel: int
    _data: np.ndarray | None = None

    def array(self) -> np.ndarray:
        if self._data is None:
            nbytes = self.numel * self.dtype.itemsize
            raw = self.archive.read(f"data/{self.key}", limit=nbytes)
            if len(raw) < nbytes:
                raise ConversionError(f"{self.archive.path}: storage data/{self.key} is truncated "
                                      f"({len(raw)} bytes for {self.numel} x {self.dtype})")
            data = np.frombuffer(raw, dtype=self.dtype.newbyteorder(self.archive.byteorder), count=self.numel)
            if self.dtype == np.bool_ and np.any(np.frombuffer(raw, np.uint8, count=self.numel) > 1):
                raise ConversionError(f"{self.archive.path}: storage data/{self.key} holds bool values other "
                                      "than 0 and 1")
            self._data = data.astype(self.dtype, copy=False)
        return self._data


@dataclasses.dataclass
class LazyTensor:
    """A tensor of a checkpoint file: shape and dtype are known; `.numpy()` reads the data.

    `check` proves, from the metadata alone, that every element the (offset, shape, stride) view addresses
    lies inside the storage, before anything is read; only then is the strided view taken.
    """

    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype:
        return self.storage.dtype

    def __repr__(self) -> str:
        return f"LazyTensor(shape={self.shape}, dtype={self.dtype}, storage={self.storage.key!r})"

    def check(self, name: str) -> None:
        """Raises one ConversionError naming `name` unless the view fits its storage (Python ints: no overflow)."""
        where = f"{self.storage.archive.path}: tensor {name}"
        if len(self.shape) != len(self.stride):
            raise ConversionError(f"{where}: shape {list(self.shape)} and stride {list(self.stride)} differ in length")
        if self.offset < 0 or any(d < 0 for d in self.shape) or any(st < 0 for st in self.stride):
            raise ConversionError(f"{where}: negative offset, size or stride (offset {self.offset}, shape "
                                  f"{list(self.shape)}, stride {list(self.stride)})")
        numel = math.prod(self.shape)
        if numel == 0:
            return
        last = self.offset + sum((d - 1) * st for d, st in zip(self.shape, self.stride))
        if last >= self.storage.numel:
            raise ConversionError(f"{where}: shape {list(self.shape)}, stride {list(self.stride)} and offset "
                                  f"{self.offset} reach element {last} of storage data/{self.storage.key}, which "
                                  f"has {self.storage.numel}")
        if numel > self.storage.numel:  # only overlapping (zero-stride) views can be larger than their storage
            raise ConversionError(f"{where}: {numel} elements view a storage of {self.storage.numel} "
                                  "(an expanded view; save the tensor with .contiguous())")

    def numpy(self, name: str | None = None) -> np.ndarray:
        self.check(name or f"on storage data/{self.storage.key}")
        base = self.storage.array()
        if not self.shape:
            return base[self.offset].copy()
        if base.size != self.storage.numel:
            raise ConversionError(f"{self.storage.archive.path}: storage data/{self.storage.key} changed size")
        if 0 in self.shape:
            return np.empty(self.shape, self.dtype)
        item = base.itemsize  # the view was proven to stay inside `base` by `check`
        view = np.lib.stride_tricks.as_strided(base[self.offset:], shape=self.shape,
                                               strides=tuple(st * item for st in self.stride), writeable=False)
        return np.ascontiguousarray(view)


class _Archive:
    def __init__(self, path: str, zf: zipfile.ZipFile):
        self.path, self.zf = path, zf
        pkl = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise ConversionError(f"{path}: not a torch.save archive (expected exactly one '<name>/data.pkl')")
        self.prefix = pkl[0][: -len("data.pkl")]
        names = set(zf.namelist())
        self.byteorder = "<"
        if self.prefix + "byteorder" in names:
            order = self.read("byteorder", limit=16).decode("ascii", "replace").strip()
            if order not in ("little", "big"):
                raise ConversionError(f"{path}: unknown byteorder '{order}'")
            self.byteorder = "<" if order == "little" else ">"

    def read(self, name: str, limit: int | None = None) -> bytes:
        """Up to `limit` bytes of an entry (all of it when None); damage is one ConversionError line."""
        try:
            with self.zf.open(self.prefix + name) as f:
                return f.read(-1 if limit is None else limit)
        except KeyError:
            raise ConversionError(f"{self.path}: archive entry '{self.prefix + name}' is missing") from None
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError, NotImplementedError, ValueError) as e:
            raise ConversionError(f"{self.path}: damaged archive entry '{self.prefix + name}' ({e})") from None


# ----------------------------------------------------------------------------------------------------
# the inert stand-ins that allowed globals resolve to


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _rebuild_tensor(storage, storage_offset, size, stride, *rest):
    if not isinstance(storage, StorageRef):
        raise pickle.UnpicklingError("tensor rebuild got something other than a storage")
    if not (_is_int(storage_offset) and isinstance(size, tuple) and isinstance(stride, tuple)
            and all(map(_is_int, size)) and all(map(_is_int, stride))):
        raise pickle.UnpicklingError("tensor rebuild with an offset, size or stride that is not integers")
    return LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state):
    if not isinstance(data, LazyTensor):
        raise pickle.UnpicklingError("parameter rebuild got something other than a tensor")
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in (_rebuild_tensor, _rebuild_parameter):
        raise pickle.UnpicklingError("_rebuild_from_type_v2 with a function that is not a tensor rebuild")
    return func(*args)


def _codecs_encode(text, encoding="latin1"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is only allowed for latin1 byte strings")
    return text.encode("latin1")


def _size(dims=()):
    if not isinstance(dims, (tuple, list)) or not all(map(_is_int, dims)):
        raise pickle.UnpicklingError("torch.Size of something other than integers")
    return tuple(dims)


def _bytearray(data=b""):
    if not isinstance(data, (bytes, bytearray, str)):  # bytearray(n) would allocate n bytes
        raise pickle.UnpicklingError("bytearray is only allowed from bytes")
    return bytearray(data, "latin1") if isinstance(data, str) else bytearray(data)


def _device(*args):
    return ":".join(str(a) for a in args)


ALLOWED_GLOBALS: dict[str, Any] = {
    "collections.OrderedDict": collections.OrderedDict,
    "collections.Counter": collections.Counter,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.bytearray": _bytearray,
    "builtins.complex": complex,
    "_codecs.encode": _codecs_encode,
    "torch.Size": _size,
    "torch.device": _device,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "torch.Tensor": "torch.Tensor",  # a type marker for _rebuild_from_type_v2; a string cannot be called
    "torch.nn.parameter.Parameter": "torch.nn.parameter.Parameter",
    **{f"torch.{name}": StorageType(name) for name in STORAGE_DTYPES},
    **{f"torch.{name}": TorchDtype(name) for name in TORCH_DTYPES},
}


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only `ALLOWED_GLOBALS` (to inert stand-ins); any other global raises before it is imported."""

    def __init__(self, file, archive: _Archive):
        super().__init__(file)
        self._archive = archive
        self._storages: dict[str, StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        # protocol-2 pickles (torch.save's default) spell Python 3 names the Python 2 way (`__builtin__.set`)
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        qualified = f"{module}.{name}"
        if qualified not in ALLOWED_GLOBALS:
            raise ConversionError(f"{self._archive.path}: refusing to load: the pickle references '{qualified}', "
                                  "which is not a tensor or a plain container (the file may run code when loaded)")
        return ALLOWED_GLOBALS[qualified]

    def persistent_load(self, pid: Any) -> StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], StorageType)):
            raise ConversionError(f"{self._archive.path}: refusing to load: unexpected persistent id {pid!r:.80}")
        _, stype, key, _location, numel = pid
        if not isinstance(key, str) or not key or not _is_int(numel) or numel < 0:
            raise ConversionError(f"{self._archive.path}: refusing to load: malformed storage reference {pid!r:.80}")
        if key not in self._storages:
            self._storages[key] = StorageRef(self._archive, key, stype.dtype, numel)
        elif (self._storages[key].dtype, self._storages[key].numel) != (stype.dtype, numel):
            raise ConversionError(f"{self._archive.path}: storage data/{key} is declared twice with different "
                                  "dtypes or sizes")
        return self._storages[key]


def load_checkpoint(path: str | os.PathLike) -> Any:
    """Unpickles a torch.save zip file with the restricted unpickler; tensors are `LazyTensor`s.

    The returned object keeps the zip file open until it is garbage collected.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise ConversionError(f"{path}: not a zip-format torch checkpoint (legacy torch<1.6 format?); "
                              "retry with --torch-load to read it with torch.load(weights_only=True)")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise ConversionError(f"{path}: damaged zip archive ({e})") from None
    archive = _Archive(path, zf)
    data = archive.read("data.pkl", limit=MAX_PICKLE_BYTES + 1)
    if len(data) > MAX_PICKLE_BYTES:
        raise ConversionError(f"{path}: data.pkl is larger than {MAX_PICKLE_BYTES} bytes (not a checkpoint of tensors)")
    try:
        return RestrictedUnpickler(io.BytesIO(data), archive).load()
    except ConversionError:
        raise
    except Exception as e:  # noqa: BLE001 - only inert stand-ins run: any failure is the file's
        raise ConversionError(f"{path}: cannot read data.pkl: {type(e).__name__}: {' '.join(str(e).split())[:200]}") \
            from None


def load_with_torch(path: str | os.PathLike) -> Any:
    """`torch.load(path, weights_only=True)` with tensors turned into numpy arrays (needs torch)."""
    try:
        import torch
    except ImportError:
        raise ConversionError("--torch-load needs PyTorch (pip install 'lumina-jax[torch]')") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError/RuntimeError with long messages
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(f"{path}: torch.load(weights_only=True) refused or failed: {first}") from None

    def to_numpy(x):
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu()
            if x.dtype == torch.bfloat16:
                return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            return x.numpy()
        if isinstance(x, dict):
            return type(x)((k, to_numpy(v)) for k, v in x.items()) if isinstance(x, collections.OrderedDict) \
                else {k: to_numpy(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(to_numpy(v) for v in x)
        return x

    return to_numpy(obj)


def as_numpy(x: Any, name: str | None = None) -> np.ndarray:
    """A `LazyTensor` (checked against its storage; errors name `name`) or array as a numpy array."""
    return x.numpy(name) if isinstance(x, LazyTensor) else np.asarray(x)


def is_tensor(x: Any) -> bool:
    return isinstance(x, (LazyTensor, np.ndarray))
