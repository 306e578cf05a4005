import numpy as np
import pytest

from lumina_jax import param_checkpoint


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "ckpt"
    with pytest.raises(RuntimeError):
        with param_checkpoint.atomic_directory(out) as d:
            param_checkpoint.save_params(d, {"w": np.ones(3, np.float32)})
            raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_save_restore_roundtrip(tmp_path):
    params = {"a": {"kernel": np.arange(12, dtype=np.float32).reshape(3, 4)}}
    with param_checkpoint.atomic_directory(tmp_path / "c") as d:
        param_checkpoint.save_params(d, params)
        param_checkpoint.write_json(d, "config.json", {"x": 1})
    out = param_checkpoint.restore_params(tmp_path / "c")
    np.testing.assert_array_equal(np.asarray(out["a"]["kernel"]), params["a"]["kernel"])
    assert param_checkpoint.read_json(tmp_path / "c", "config.json") == {"x": 1}
    with pytest.raises(param_checkpoint.CheckpointError, match="missing"):
        param_checkpoint.read_json(tmp_path / "c", "nope.json")


def test_atomic_directory_result_is_not_private(tmp_path):
    import os
    import stat

    with param_checkpoint.atomic_directory(tmp_path / "c") as d:
        param_checkpoint.write_json(d, "x.json", {})
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "c").st_mode) == 0o777 & ~umask


def test_save_without_host_copy_restores_the_same(tmp_path):
    params = {"a": {"kernel": np.arange(12, dtype=np.float32).reshape(3, 4)}, "b": np.ones(5, np.int32)}
    with param_checkpoint.atomic_directory(tmp_path / "c") as d:
        param_checkpoint.save_params(d, params, host_copy=False)
    out = param_checkpoint.restore_params(tmp_path / "c")
    np.testing.assert_array_equal(np.asarray(out["a"]["kernel"]), params["a"]["kernel"])
    np.testing.assert_array_equal(np.asarray(out["b"]), params["b"])
