"""The demo recipe end to end at toy size: every stage runs, and its output is a loadable inference directory.

Slow (about 2 minutes on 2 cores): seven subprocesses, each compiling its own small programs.
"""
import json

import numpy as np
import pytest

from lumina_jax.demo import recipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_recipe")
    report = recipe.run_recipe(out, seed=0, preset="smoke")
    return out, report


def test_every_stage_timed_and_report_written(smoke_run):
    out, report = smoke_run
    assert list(report["stages"]) == list(recipe.STAGES)
    for name, t in report["stages"].items():
        assert t["wall_s"] >= 0 and t["cpu_s"] >= 0, name
    assert json.loads((out / recipe.REPORT).read_text())["stages"] == report["stages"]
    assert report["total"]["wall_s"] >= sum(t["wall_s"] for t in report["stages"].values()) - 1


def test_small_vocabulary_keeps_special_ids_by_name(smoke_run):
    from lumina_jax.tokenizer import load_tokenizer

    out, _ = smoke_run
    tok, sp = load_tokenizer(str(out / "model" / "tokenizer" / "tok.model"))
    n_embed = json.loads((out / "model" / "vqgan" / "vqgan_config.json").read_text())["n_embed"]
    # image codes right after the four basic ids, then <eoss>, <racm3:break>, the reserved names
    assert sp.num_image_codes == n_embed == 64
    assert (sp.image_token_start, sp.image_token_end) == (4, 4 + n_embed)
    assert (sp.image_end, sp.image_start) == (4 + n_embed, 5 + n_embed)
    assert sp.end_of_turn == 6 + n_embed + (8706 - 8194)
    assert sp.max_size_patches >= 8  # a 256-px side at target size 128
    assert tok.vocab_size < 2000
    dec = json.loads((out / "model" / "decoder" / "config.json").read_text())
    assert dec["vocab_size"] == tok.vocab_size
    assert (dec["image_token_start"], dec["image_token_end"]) == (4, 4 + n_embed)


def test_image_only_items_start_at_the_image_start_token(smoke_run):
    from lumina_jax.data.records import PretokenizedDataset
    from lumina_jax.tokenizer import load_tokenizer

    out, report = smoke_run
    _, sp = load_tokenizer(str(out / "tokenizer" / "tok.model"))
    for size in (64, 128):
        items = json.loads((out / f"shapes{size}" / "data.json").read_text())
        ds = PretokenizedDataset(str(out / "data" / f"stage{size}"))
        assert len(ds) == len(items)
        n_only = 0
        for i in range(len(ds)):
            r = ds[i]
            if items[r["id"]]["meta"]["image_only"]:
                n_only += 1
                assert r["tokens"][0] == sp.image_start and np.all(r["labels"][1:] >= 0)
            else:
                assert r["tokens"][0] == sp.bos and sp.image_start in r["tokens"].tolist()
        assert n_only == report["data"][str(size)]["image_only"]


def test_assembled_directory_generates_an_image(smoke_run):
    from lumina_jax.inference import Lumina

    out, _ = smoke_run
    lm = Lumina.load(out / "model")
    assert lm.target_size == 128
    res = lm.generate(["a red circle on a blue background"], size=(160, 96), guidance=3.0, image_top_k=8, seed=0,
                      max_new_tokens=96, progress=False)
    assert res[0].images and res[0].images[0].size == (160, 96)


def test_assembled_directory_names_no_machine_path(smoke_run):
    out, _ = smoke_run
    files = [p for p in (out / "model").rglob("*") if p.is_file()]
    assert any(p.name == "commit_success.txt" for p in files) and any(p.suffix == ".model" for p in files)
    for p in files:
        assert str(out).encode() not in p.read_bytes(), p  # the run directory appears in no shipped file
