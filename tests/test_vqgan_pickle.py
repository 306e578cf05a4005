"""The restricted reader of torch checkpoint files: it reads what torch.save writes and runs nothing else."""
import io
import os
import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch

from lumina_jax.convert import torch_pickle
from lumina_jax.convert.__main__ import main as convert_main
from lumina_jax.convert.errors import ConversionError


def _zip_with_pickle(path, payload: bytes, name="archive"):
    """A torch.save-shaped zip archive whose data.pkl is `payload`."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name}/data.pkl", payload)
        zf.writestr(f"{name}/byteorder", "little")
        zf.writestr(f"{name}/version", "3\n")
    return path


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _WritesFile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


class _Evals:
    def __reduce__(self):
        return (eval, ("__import__('os').getpid()",))


@pytest.mark.parametrize("make, refused", [
    (lambda m: {"state_dict": {"w": _RunsShell(m)}}, os.system.__module__ + ".system"),
    (lambda m: {"state_dict": {}, "hparams": _WritesFile(m)}, "io.open"),
    (lambda m: [_Evals()], "builtins.eval"),
], ids=["os.system", "open", "eval"])
def test_code_running_pickle_is_refused_and_nothing_runs(tmp_path, make, refused):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(make(marker), protocol=2)
    assert refused.encode().split(b".")[-1] in payload  # the crafted pickle really references the callable
    evil = _zip_with_pickle(tmp_path / "evil.ckpt", payload)
    with pytest.raises(ConversionError, match=f"refusing to load.*'{refused}'"):
        torch_pickle.load_checkpoint(evil)
    assert not marker.exists()


def test_crafted_checkpoint_is_refused_by_the_cli(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = _zip_with_pickle(tmp_path / "vqgan.ckpt", pickle.dumps({"state_dict": {"w": _RunsShell(marker)}}, protocol=2))
    (tmp_path / "vqgan.yaml").write_text("model:\n  params:\n    embed_dim: 32\n    n_embed: 64\n    ddconfig: {ch: 32}\n")
    rc = convert_main(["vqgan", "--ckpt", str(evil), "--config", str(tmp_path / "vqgan.yaml"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 1 and "refusing to load" in err and "system" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "o").exists()
    # the torch.load(weights_only=True) path refuses it too
    rc = convert_main(["vqgan", "--ckpt", str(evil), "--config", str(tmp_path / "vqgan.yaml"), "--out",
                       str(tmp_path / "o"), "--torch-load"])
    assert rc == 1 and "weights_only" in capsys.readouterr().err
    assert not marker.exists()


def test_plain_pickle_file_is_not_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "legacy.ckpt"
    path.write_bytes(pickle.dumps(_RunsShell(marker)))
    with pytest.raises(ConversionError, match="not a zip-format"):
        torch_pickle.load_checkpoint(path)
    assert not marker.exists()


def test_persistent_ids_other_than_storages_are_refused(tmp_path):
    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return ("module", "os") if obj == "x" else None

    buf = io.BytesIO()
    P(buf, protocol=2).dump({"a": "x"})
    with pytest.raises(ConversionError, match="unexpected persistent id"):
        torch_pickle.load_checkpoint(_zip_with_pickle(tmp_path / "p.ckpt", buf.getvalue()))


def test_reads_what_torch_save_writes(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    obj = {
        "state_dict": {
            "f32": torch.randn(3, 5),
            "view": base[1:, ::2],  # offset + strides into a shared storage
            "transposed": base.t(),
            "bf16": torch.randn(7).to(torch.bfloat16),
            "f16": torch.randn(2, 2).half(),
            "i64": torch.arange(5),
            "bool": torch.tensor([True, False]),
            "scalar": torch.tensor(3.5),
            "param": torch.nn.Parameter(torch.ones(2, 2)),
            "empty": torch.zeros(0, 3),
        },
        "epoch": 3, "hparams": {"lr": 1e-4, "names": ["a", "b"], "size": torch.Size([2, 3]), "raw": b"\x00\xff",
                    "tags": {"x", "y"}},
    }
    path = tmp_path / "ok.ckpt"
    torch.save(obj, path)
    got = torch_pickle.load_checkpoint(path)
    assert got["epoch"] == 3 and got["hparams"]["names"] == ["a", "b"] and got["hparams"]["raw"] == b"\x00\xff"
    assert got["hparams"]["size"] == (2, 3) and got["hparams"]["tags"] == {"x", "y"}
    for k, t in obj["state_dict"].items():
        lazy = got["state_dict"][k]
        assert isinstance(lazy, torch_pickle.LazyTensor) and tuple(lazy.shape) == tuple(t.shape)
        arr = lazy.numpy()
        if t.dtype == torch.bfloat16:
            assert arr.dtype == ml_dtypes.bfloat16
            np.testing.assert_array_equal(arr.astype(np.float32), t.float().numpy())
        else:
            np.testing.assert_array_equal(arr, t.detach().numpy())
            assert arr.dtype == t.detach().numpy().dtype
