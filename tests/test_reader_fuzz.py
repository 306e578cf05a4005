"""Fuzzing the two binary readers (the restricted torch-checkpoint reader and the safetensors reader).

Small valid files are mutated at random with a fixed seed (bytes flipped, files cut, header fields and tensor
offsets, sizes, strides and storage sizes replaced by hostile values), and every case is read in a child
process, so a segfault, a hang (timeout) or an allocation failure fails the test instead of the whole pytest run.
Each case must either fail with one ConversionError line naming the file, or load data that an independent
computation predicts: for torch files the view its (possibly mutated) metadata describes, computed by explicit
index arithmetic over the original storage bytes; for safetensors files what the `safetensors` library reads.
A load can therefore never hand back bytes from outside the file's storages.
"""
import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import ml_dtypes  # noqa: F401 - registers bfloat16 for np.dtype
import numpy as np
import pytest

from lumina_jax.convert import safetensors_io as sio
from lumina_jax.testing.torch_zip import TensorMeta, expected_view, write_torch_zip

REPO = Path(__file__).resolve().parents[1]
SEED = 20240815
CASES_PER_KIND = 40
HOSTILE_INTS = [-2**63, -2**31, -2, -1, 0, 1, 2, 3, 5, 6, 7, 23, 24, 25, 2**31 - 1, 2**31, 2**32, 2**62, 2**63,
                2**64 + 1]

CHILD = r"""
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))  # a runaway allocation fails here, not the machine
import numpy as np
from lumina_jax.convert import safetensors_io as sio, torch_pickle
from lumina_jax.convert.errors import ConversionError
from lumina_jax.convert.vqgan import read_state_dict

for case in json.load(open(sys.argv[1])):
    print(json.dumps({"id": case["id"], "started": True}), flush=True)
    out = {"id": case["id"]}
    try:
        if case["kind"] == "torch":
            loaded = {}
            for key, t in read_state_dict(case["path"]).items():
                a = torch_pickle.as_numpy(t, key)
                s = t.storage
                loaded[key] = {"dtype": str(a.dtype), "shape": list(a.shape), "hex": a.tobytes().hex(),
                               "meta": [s.key, str(s.dtype), s.numel, t.offset, list(t.shape), list(t.stride)]}
        else:
            _, infos = sio.read_header(case["path"])
            loaded = {}
            for key, info in infos.items():
                a = sio.read_tensor(info)
                loaded[key] = {"dtype": str(a.dtype), "shape": list(a.shape), "hex": a.tobytes().hex()}
        out["ok"] = loaded
    except ConversionError as e:
        out["error"] = str(e)
    except BaseException as e:  # anything else is a defect of the reader
        out["defect"] = f"{type(e).__name__}: {e}"[:500]
    print(json.dumps(out), flush=True)
"""


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]  # exact Python ints (numpy would round 2**64 to a float)


def _storages():
    rng = np.random.default_rng(0)
    return {"0": (np.arange(24, dtype=np.float32) * 1.5 - 7), "1": np.arange(6, dtype=np.int64) * 1000 - 2,
            "2": rng.standard_normal(8).astype(np.float16), "3": np.array([0, 1, 1, 0], np.bool_)}


def _tensors():
    return {"a": TensorMeta("0", 0, (4, 6), (6, 1)), "b": TensorMeta("0", 0, (6, 4), (1, 6)),
            "c": TensorMeta("0", 5, (3,), (2,)), "d": TensorMeta("1", 0, (6,), (1,)),
            "e": TensorMeta("2", 3, (), ()), "f": TensorMeta("2", 0, (2, 4), (4, 1)),
            "g": TensorMeta("3", 1, (2,), (1,))}


def _mutate_meta(rng, tensors):
    tensors = dict(tensors)
    name = rng.choice(sorted(tensors))
    t = tensors[name]
    value = _pick(rng, HOSTILE_INTS) if rng.random() < 0.8 else int(rng.integers(-50, 50))
    field = rng.choice(["offset", "shape", "stride", "numel", "ndim", "storage"])
    if field == "offset":
        t = TensorMeta(t.storage, value, t.shape, t.stride)
    elif field in ("shape", "stride") and t.shape:
        i = int(rng.integers(len(t.shape)))
        dims = list(getattr(t, field))
        dims[i] = value
        t = TensorMeta(t.storage, t.offset, *((tuple(dims), t.stride) if field == "shape" else (t.shape, tuple(dims))))
    elif field == "numel":
        t = TensorMeta(t.storage, t.offset, t.shape, t.stride, numel=value)
    elif field == "ndim":
        t = TensorMeta(t.storage, t.offset, t.shape + (abs(value) % 5 + 1,), t.stride)  # stride one shorter
    else:
        t = TensorMeta(str(rng.choice(["0", "1", "2", "3"])), t.offset, t.shape, t.stride)
    tensors[name] = t
    return tensors


def _flip(rng, data: bytes, lo: int = 0) -> bytes:
    b = bytearray(data)
    for _ in range(int(rng.integers(1, 5))):
        i = int(rng.integers(lo, len(b)))
        b[i] ^= int(rng.integers(1, 256))
    return bytes(b)


def _torch_cases(d: Path, rng) -> list[dict]:
    storages, tensors = _storages(), _tensors()
    base = Path(write_torch_zip(d / "base.ckpt", tensors, storages))
    raw = base.read_bytes()
    pkl = zipfile.ZipFile(base).read("archive/data.pkl")
    cases = [{"kind": "torch", "path": str(base), "what": "unchanged"}]
    for i in range(CASES_PER_KIND):
        path = d / f"meta{i}.ckpt"
        write_torch_zip(path, _mutate_meta(rng, tensors), storages)
        cases.append({"kind": "torch", "path": str(path), "what": "metadata"})
    for i in range(CASES_PER_KIND):
        path = d / f"flip{i}.ckpt"
        path.write_bytes(_flip(rng, raw))
        cases.append({"kind": "torch", "path": str(path), "what": "zip bytes"})
    for i in range(CASES_PER_KIND):  # the pickle itself mutated, the archive rebuilt with valid checksums
        path = d / f"pkl{i}.ckpt"
        write_torch_zip(path, tensors, storages, pickle_bytes=_flip(rng, pkl, lo=2))
        cases.append({"kind": "torch", "path": str(path), "what": "pickle bytes"})
    for i in range(CASES_PER_KIND // 2):
        path = d / f"cut{i}.ckpt"
        path.write_bytes(raw[: int(rng.integers(0, len(raw)))])
        cases.append({"kind": "torch", "path": str(path), "what": "truncated"})
    for i in range(CASES_PER_KIND // 2):  # one storage entry shorter than its declared size
        cut = dict(storages)
        key = str(rng.choice(sorted(cut)))
        cut[key] = cut[key][: int(rng.integers(0, cut[key].size))]
        path = d / f"short{i}.ckpt"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("archive/data.pkl", pkl)
            zf.writestr("archive/byteorder", "little")
            for k, v in cut.items():
                zf.writestr(f"archive/data/{k}", v.tobytes())
        cases.append({"kind": "torch", "path": str(path), "what": "short storage"})
    return cases


def _safetensors_base(path: Path) -> None:
    rng = np.random.default_rng(1)
    arrays = {"w": rng.standard_normal((3, 4)).astype(np.float32), "ids": np.arange(5, dtype=np.int64) - 2,
              "h": rng.standard_normal((2, 2, 2)).astype(np.float16), "empty": np.zeros((0, 3), np.uint8)}
    sio.write_file(path, [sio.TensorSpec(k, v.dtype, v.shape, lambda v=v: v) for k, v in arrays.items()])


def _split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def _mutate_header(rng, header: dict) -> dict:
    header = json.loads(json.dumps(header))
    name = str(rng.choice(sorted(k for k in header if k != "__metadata__")))
    entry = header[name]
    choice = rng.choice(["dtype", "shape", "offset", "drop", "extra", "overlap", "metadata", "type"])
    value = _pick(rng, HOSTILE_INTS)
    if choice == "dtype":
        entry["dtype"] = str(rng.choice(["F32", "F16", "I64", "U8", "BF16", "F64", "Q4", "", "f32"]))
    elif choice == "shape":
        if entry["shape"]:
            entry["shape"][int(rng.integers(len(entry["shape"])))] = value
        else:
            entry["shape"] = [value]
    elif choice == "offset":
        entry["data_offsets"][int(rng.integers(2))] = value
    elif choice == "drop":
        del entry[str(rng.choice(sorted(entry)))]
    elif choice == "extra":
        entry["extra"] = 1
    elif choice == "overlap":
        other = header[str(rng.choice(sorted(k for k in header if k != "__metadata__")))]
        entry["data_offsets"] = list(other["data_offsets"])
    elif choice == "metadata":
        header["__metadata__"] = {"format": value}
    else:
        header[name] = [entry["dtype"], entry["shape"]]
    return header


def _safetensors_cases(d: Path, rng) -> list[dict]:
    base = d / "base.safetensors"
    _safetensors_base(base)
    raw = base.read_bytes()
    header, data = _split(raw)
    cases = [{"kind": "safetensors", "path": str(base), "what": "unchanged"}]
    for i in range(CASES_PER_KIND * 2):
        path = d / f"hdr{i}.safetensors"
        path.write_bytes(_join(_mutate_header(rng, header), data))
        cases.append({"kind": "safetensors", "path": str(path), "what": "header fields"})
    for i in range(CASES_PER_KIND):
        path = d / f"sflip{i}.safetensors"
        path.write_bytes(_flip(rng, raw))
        cases.append({"kind": "safetensors", "path": str(path), "what": "bytes"})
    for i in range(CASES_PER_KIND // 2):
        path = d / f"len{i}.safetensors"
        n = _pick(rng, [0, 1, 7, len(raw), 2**40, 2**64 - 1, int(rng.integers(0, 400))])
        path.write_bytes(struct.pack("<Q", n) + raw[8:])
        cases.append({"kind": "safetensors", "path": str(path), "what": "header length"})
    for i in range(CASES_PER_KIND // 2):
        path = d / f"scut{i}.safetensors"
        path.write_bytes(raw[: int(rng.integers(0, len(raw)))] if i % 2 else raw + b"\0" * int(rng.integers(1, 9)))
        cases.append({"kind": "safetensors", "path": str(path), "what": "truncated or extended"})
    return cases


@pytest.fixture(scope="module")
def fuzz_results(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(SEED)
    cases = _torch_cases(d, rng) + _safetensors_cases(d, rng)
    for i, c in enumerate(cases):
        c["id"] = i
    (d / "cases.json").write_text(json.dumps(cases))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(d / "cases.json")], capture_output=True, text=True,
                          timeout=600, env=env, cwd=d)
    results, started = {}, None
    for line in proc.stdout.splitlines():
        msg = json.loads(line)
        if msg.get("started"):
            started = msg["id"]
        else:
            results[msg["id"]] = msg
    assert proc.returncode == 0 and len(results) == len(cases), (
        f"the reader process died (exit {proc.returncode}) in case {started}: {cases[started or 0]}; "
        f"stderr: {proc.stderr[-2000:]}")
    return cases, results


def test_every_mutated_file_loads_predictably_or_fails_with_one_line(fuzz_results):
    from safetensors import safe_open

    cases, results = fuzz_results
    storages = {k: v.tobytes() for k, v in _storages().items()}
    counts = {"ok": 0, "error": 0}
    for case in cases:
        r = results[case["id"]]
        where = f"case {case['id']} ({case['kind']}, {case['what']}, {case['path']})"
        assert "defect" not in r, f"{where}: {r['defect']}"
        if "error" in r:
            counts["error"] += 1
            assert "\n" not in r["error"] and r["error"].startswith(case["path"]), f"{where}: {r['error']!r}"
            continue
        counts["ok"] += 1
        if case["kind"] == "torch":
            for key, got in r["ok"].items():
                skey, sdtype, numel, offset, shape, stride = got["meta"]
                storage = np.frombuffer(storages[skey], dtype=np.dtype(sdtype), count=numel)  # as declared
                want = expected_view(TensorMeta(skey, offset, tuple(shape), tuple(stride)), storage)
                assert got["hex"] == want.tobytes().hex() and got["shape"] == list(want.shape), f"{where}: {key}"
        else:
            try:
                with safe_open(case["path"], framework="numpy") as f:
                    ref = {k: f.get_tensor(k) for k in f.keys()}
            except Exception as e:  # noqa: BLE001
                pytest.fail(f"{where}: our reader accepted a file the safetensors library refuses ({e})")
            assert sorted(ref) == sorted(r["ok"]), where
            for key, got in r["ok"].items():
                same = got["hex"] == ref[key].tobytes().hex() and got["shape"] == list(ref[key].shape)
                assert same, f"{where}: {key}"
    # the mutations must really exercise both outcomes (and the unchanged files load)
    assert "ok" in results[0] and counts["error"] > len(cases) // 3 and counts["ok"] > 10, counts


def test_unchanged_files_load_exactly_the_original_tensors(fuzz_results):
    cases, results = fuzz_results
    storages, tensors = _storages(), _tensors()
    torch_base = results[next(c["id"] for c in cases if c["kind"] == "torch" and c["what"] == "unchanged")]["ok"]
    for key, meta in tensors.items():
        want = expected_view(meta, storages[meta.storage])
        assert torch_base[key]["hex"] == want.tobytes().hex() and torch_base[key]["dtype"] == str(want.dtype), key
