"""Quantised decoding of the shipped demo model: logit error of int8 weights and of the int8 / fp8 KV cache
against the unquantised model (stated bounds), the saved int8 directory (loads without the float copy, same
weights as quantising at load time, input untouched), and infer.py with --quantize / --kv-cache."""
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from lumina_jax import state
from lumina_jax.convert.__main__ import main as convert_main
from lumina_jax.demo.shapes import ShapeSpec
from lumina_jax.inference import DEFAULT_CHECKPOINT, DEMO_CFG_MIN_P, InferenceError, Lumina
from lumina_jax.models import quantization

from test_quantization import _decode_logits  # noqa: E402  (tests/ is on sys.path under pytest)

SPEC = ShapeSpec("square", "red", "blue", 128, 128)


@pytest.fixture(scope="module")
def demo():
    return Lumina.load(DEFAULT_CHECKPOINT)


@pytest.fixture(scope="module")
def prompt(demo):
    """The demo prompt with the image header and the first image row, as (1, T) ids."""
    ids = demo.prompt_ids(SPEC.caption, "t2i", size=SPEC.size) + demo.answer_header("t2i", SPEC.size)
    rng = np.random.default_rng(0)
    body = list(rng.integers(demo.ids.image_first, demo.ids.image_first + 512, 4))
    return jnp.asarray([ids + body], jnp.int32)


def _relative_error(base, other):
    """(max, mean) |other - base| over the logits, relative to their standard deviation."""
    err = np.abs(other - base)
    return err.max() / base.std(), err.mean() / base.std()


@pytest.mark.parametrize("quantize,kv,max_bound,mean_bound", [
    ("int8", None, 0.08, 0.0125),  # measured 0.039 / 0.0062
    (None, "int8", 0.04, 0.005),  # measured 0.020 / 0.0021
    (None, "fp8", 0.2, 0.02),  # measured 0.105 / 0.0092
    ("int8", "int8", 0.09, 0.013),  # measured 0.043 / 0.0065
])
def test_demo_model_logit_error_is_bounded(demo, prompt, quantize, kv, max_bound, mean_bound):
    base = _decode_logits(demo.config, demo.params, prompt)
    q = Lumina.load(DEFAULT_CHECKPOINT, quantize=quantize, kv_cache=kv)
    got = _decode_logits(q.config, q.params, prompt)
    worst, mean = _relative_error(base, got)
    assert worst <= max_bound and mean <= mean_bound, (worst, mean)
    assert worst > 1e-4  # the option changed the computation


def test_saved_int8_directory_loads_without_the_float_copy(tmp_path, monkeypatch):
    out = tmp_path / "demo-int8"
    before = sorted((p.relative_to(DEFAULT_CHECKPOINT), p.stat().st_mtime_ns) for p in DEFAULT_CHECKPOINT.rglob("*"))
    assert convert_main(["quantize", "--checkpoint", str(DEFAULT_CHECKPOINT), "--out", str(out)]) == 0
    assert sorted((p.relative_to(DEFAULT_CHECKPOINT), p.stat().st_mtime_ns)
                  for p in DEFAULT_CHECKPOINT.rglob("*")) == before  # the input is only read
    size = lambda d: sum(p.stat().st_size for p in (d / "decoder" / "params").rglob("*") if p.is_file())
    assert size(out) < size(DEFAULT_CHECKPOINT)  # (Orbax compresses both, the fp32 original more)

    at_load = Lumina.load(DEFAULT_CHECKPOINT, quantize="int8")

    def no_float_copy(*a, **k):
        raise AssertionError("a saved int8 directory must not be quantised again")

    monkeypatch.setattr(state, "quantize_sharded", no_float_copy)
    stored = Lumina.load(out)  # int8 without a flag
    assert stored.config.weight_quant == "int8"
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
    # fp32 demo weights: the int8 kernels take a quarter; the embedding (a third of the model) stays fp32
    assert nbytes(stored.params) < 0.55 * nbytes(Lumina.load(DEFAULT_CHECKPOINT).params)
    kernel = stored.params["layers_0"]["mlp"]["up_proj"]["kernel"]
    assert quantization.is_quantized(kernel) and quantization.qarray(kernel).qvalue.dtype == jnp.int8
    for a, b in zip(jax.tree.leaves(stored.params), jax.tree.leaves(at_load.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(InferenceError, match="stored int8-quantised; it cannot load unquantised"):
        Lumina.load(out, quantize="none")
    assert convert_main(["quantize", "--checkpoint", str(out), "--out", str(tmp_path / "again")]) == 1


def test_infer_cli_with_int8_weights_and_kv_cache(tmp_path, capsys):
    path = Path(__file__).resolve().parents[1] / "infer.py"
    mod_spec = importlib.util.spec_from_file_location("infer_cli_quant", path)
    infer = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(infer)
    rc = infer.main(["--prompt", SPEC.caption, "--size", "128x128", "--cfg", "3", "--cfg-min-p", str(DEMO_CFG_MIN_P),
                     "--image-top-k", "16", "--max-new-tokens", "128", "--seed", "0", "--quantize", "int8",
                     "--kv-cache", "int8", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    pngs = sorted(tmp_path.glob("*.png"))
    assert len(pngs) == 1
    with Image.open(pngs[0]) as im:
        assert im.size == (128, 128)
    meta = next(tmp_path.glob("*.json")).read_text()
    assert '"quantize": "int8"' in meta and '"kv_cache": "int8"' in meta
