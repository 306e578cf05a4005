"""The shipped demo checkpoint (lumina_jax/demo_weights): loads, and draws what a prompt asks for."""
import json

import numpy as np
import pytest

from lumina_jax.demo.shapes import ShapeSpec
from lumina_jax.demo.shape_analysis import analyse
from lumina_jax.inference import DEFAULT_CHECKPOINT, DEMO_CFG_MIN_P, MAX_SEED, InferenceError, Lumina

MAX_BYTES = 25 * 2**20


@pytest.fixture(scope="module")
def demo():
    return Lumina.load(DEFAULT_CHECKPOINT)


def test_shipped_checkpoint_is_small_and_complete():
    files = [p for p in DEFAULT_CHECKPOINT.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= MAX_BYTES
    manifest = json.loads((DEFAULT_CHECKPOINT / "lumina.json").read_text())
    for part in ("decoder", "vqgan", "tokenizer"):
        assert (DEFAULT_CHECKPOINT / manifest[part]).exists(), part


def _generate(demo, spec):
    res = demo.generate([spec.caption], size=spec.size, guidance=3.0, cfg_min_p=DEMO_CFG_MIN_P, image_top_k=16, seed=0,
                        max_new_tokens=128, progress=False)
    assert res[0].stopped == "end_of_turn" and len(res[0].images) == 1
    return res[0].images[0]


SPEC = ShapeSpec("square", "red", "blue", 128, 128)  # a seen combination


def test_generates_requested_size(demo):
    assert _generate(demo, SPEC).size == SPEC.size


def test_generates_requested_background_and_colour(demo):
    """The issue's CI check (background colour by the evaluation's analysis), plus the shape colour."""
    seen = analyse(_generate(demo, SPEC))
    assert seen.background == SPEC.background
    assert seen.colour == SPEC.colour


def test_infer_cli_uses_the_shipped_weights_by_default(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "infer.py"
    mod_spec = importlib.util.spec_from_file_location("infer_cli", path)
    infer = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(infer)
    rc = infer.main(["--prompt", "a yellow circle on a black background", "--size", "160x96", "--cfg", "3",
                     "--cfg-min-p", str(DEMO_CFG_MIN_P), "--image-top-k", "16", "--max-new-tokens", "128",
                     "--seed", "1", "--out", str(tmp_path)])
    assert rc == 0
    # the bar counts toward what a 160x96 image needs (6 rows of 10 codes + new line, end of image, end of turn)
    assert "68/68" in capsys.readouterr().err
    pngs = sorted(tmp_path.glob("*.png"))
    assert len(pngs) == 1
    from PIL import Image

    with Image.open(pngs[0]) as im:
        assert im.size == (160, 96)


def test_eval_shapes_cli_prints_the_table_for_each_scale(tmp_path, capsys):
    from lumina_jax.demo import evaluate as eval_shapes

    out = tmp_path / "rows.json"
    rc = eval_shapes.main(["--per-split", "2", "--guidance", "1,3", "--quiet", "--json", str(out),
                           "--out", str(tmp_path / "png")])
    assert rc == 0
    text = capsys.readouterr().out
    assert f"cfg min-p {eval_shapes.DEMO_CFG_MIN_P:g}" in text and "held-out" in text
    rows = json.loads(out.read_text())
    assert sorted((r["guidance"], r["split"]) for r in rows) == [(1.0, "held-out"), (1.0, "seen"), (3.0, "held-out"),
                                                                 (3.0, "seen")]
    assert all(r["n"] == 2 and r["size"] == 1.0 for r in rows)  # sizes are forced, so always right
    assert len(list((tmp_path / "png" / "guidance3").glob("*.png"))) == 4


def test_eval_shapes_cli_refuses_a_bad_floor(capsys):
    from lumina_jax.demo import evaluate as eval_shapes

    assert eval_shapes.main(["--cfg-min-p", "1"]) == 2
    assert "--cfg-min-p 1.0: must be in [0, 1)" in capsys.readouterr().err


# ---- per-prompt seeds, padded batches, progress totals ----------------------------------------------------------
def _pixels(result):
    return [np.asarray(im) for im in result.images]


def test_per_prompt_seeds_give_each_prompt_what_it_gets_alone_bit_for_bit(demo):
    """Prompts with their own seeds in one padded call: tokens and pixels equal those of each prompt alone."""
    kw = dict(size=(128, 128), guidance=3.0, cfg_min_p=DEMO_CFG_MIN_P, image_top_k=16, max_new_tokens=74, num_images=2,
              pad_rows_to=4)
    reports = []
    both = demo.generate(["a red circle on a blue background", "a white square on a green background"],
                         seeds=[5, 9], progress=lambda done, total: reports.append((done, total)), **kw)
    alone = (demo.generate(["a red circle on a blue background"], seed=5, progress=lambda *a: None, **kw)
             + demo.generate(["a white square on a green background"], seed=9, progress=lambda *a: None, **kw))
    assert [r.seed for r in both] == [5, 6, 9, 10] == [r.seed for r in alone]
    for b, a in zip(both, alone):
        assert b.token_ids == a.token_ids
        assert all(np.array_equal(x, y) for x, y in zip(_pixels(b), _pixels(a)))
    assert len({tuple(r.token_ids) for r in both}) == 4  # four different seeds, four different images
    # progress counts toward the 74 tokens a 128x128 answer needs (8 x (8 + 1) + end of image + end of turn)
    assert {t for _, t in reports} == {74} and reports[-1] == (74, 74)
    assert [d for d, _ in reports] == sorted(d for d, _ in reports)


def test_expected_new_tokens_follow_the_image_size(demo):
    assert demo.expected_new_tokens((128, 128), 3, 8192) == 74
    assert demo.expected_new_tokens((128, 128), 3, 50) == 50
    # a sampled size: the longest crop size, 64x256 (2 size tokens, 16 rows of 4 codes + new line, 2 ends)
    assert demo.expected_new_tokens(None, 1, 8192) == 2 + 16 * (4 + 1) + 2
    assert demo.expected_new_tokens(None, 0, 300) == 300  # a text answer: only the length limit is known


@pytest.mark.parametrize("kw, message", [
    (dict(seed=MAX_SEED + 1), "seed must be an integer in [0, 4294967295]"),
    (dict(seed=-1), "got -1"),
    (dict(seed=MAX_SEED, num_images=2), "seed must be an integer in [0, 4294967294] (with 2 image(s)"),
    (dict(seeds=[0, 1]), "2 seeds for 1 prompts"),
    (dict(guidance=float("nan")), "guidance must be a finite number, got nan"),
    (dict(cfg_min_p=float("inf")), "cfg_min_p must be a finite number, got inf"),
    (dict(temperature=float("-inf")), "temperature must be a finite number"),
    (dict(pad_rows_to=0), "pad_rows_to must be >= 1"),
])
def test_generate_refuses_bad_seeds_and_numbers_before_running(demo, kw, message):
    with pytest.raises(InferenceError) as e:
        demo.generate(["a red circle on a blue background"], size=(128, 128), progress=False, **kw)
    assert message in str(e.value)
