"""A resumed pre-tokenization must match the interrupted run in everything that shapes the records.

A run is interrupted after its first committed chunk (the state a kill leaves; the kill itself is tested in
test_pretokenize.py), then restarted with edited input content, a reordered input, another tokenizer,
another VQGAN and other settings: each restart is refused with one line naming what changed, and leaves the
output untouched; the restart with the original arguments then completes to exactly the uninterrupted result.
"""
import hashlib
import json
import os
import fcntl
import shutil

import numpy as np
import pytest
from PIL import Image

from lumina_jax.data import pretokenize
from lumina_jax.data.records import PretokenizedDataset
from lumina_jax.testing.tokenizer import write_text_tokenizer_json
from lumina_jax.testing.vqgan import write_vqgan_checkpoint


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    rng = np.random.default_rng(0)
    items = []
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"im{i}.png")
        items.append({"id": f"g{i}", "image": f"im{i}.png", "conversations": [
            {"from": "human", "value": f"Generate an image of 32x32 according to the following prompt:\nthing {i}"},
            {"from": "gpt", "value": "<|image|>"}]})
    (d / "data.json").write_text(json.dumps(items))
    tok = write_text_tokenizer_json(str(d / "tok.json"))
    other_tok = d / "tok_reformatted.json"  # the same tokenizer, other bytes: content is what is compared
    other_tok.write_text(json.dumps(json.loads((d / "tok.json").read_text()), indent=1))
    return {"dir": d, "items": items, "tok": tok, "other_tok": str(other_tok),
            "vqgan": str(write_vqgan_checkpoint(d / "vqgan", seed=0)),
            "vqgan_again": str(write_vqgan_checkpoint(d / "vqgan_again", seed=0)),  # same weights, new files
            "other_vqgan": str(write_vqgan_checkpoint(d / "vqgan_seed1", seed=1))}


def argv(s, out, *extra, data="data.json", tok=None, vqgan=None):
    return ["--input", str(s["dir"] / data), "--out", str(out), "--target-size", "32", "--tokenizer",
            tok or s["tok"], "--vqgan", vqgan or s["vqgan"], "--chunk-size", "2", "--quiet", *extra]


def read_all(out):
    ds = PretokenizedDataset(str(out))
    return [(r["id"], r["tokens"].tolist(), r["labels"].tolist()) for r in (ds[i] for i in range(len(ds)))]


def digest(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def reference(inputs):
    out = inputs["dir"] / "reference"
    assert pretokenize.main(argv(inputs, out)) == 0
    return read_all(out)


def interrupted_run(s, out, monkeypatch, after_chunks=1, *extra):
    """Runs until `after_chunks` chunks are committed, then stops as a kill would (no cleanup code runs)."""
    real = pretokenize.Pretokenizer.process_chunk
    calls = []

    def process_chunk(self, items):
        if len(calls) == after_chunks:
            raise KeyboardInterrupt("killed")
        calls.append(1)
        return real(self, items)

    with monkeypatch.context() as m:
        m.setattr(pretokenize.Pretokenizer, "process_chunk", process_chunk)
        with pytest.raises(KeyboardInterrupt):
            pretokenize.main(argv(s, out, *extra))


def edited_input(s, name, change):
    items = json.loads(json.dumps(s["items"]))
    change(items)
    (s["dir"] / name).write_text(json.dumps(items))
    return name


def _edit_text(items):
    items[1]["conversations"][0]["value"] += " (edited)"


def _reorder(items):
    items.reverse()


def _append(items):
    items.append(dict(items[0], id="new"))


EDITS = [
    (dict(data=("edited.json", _edit_text)), "--input content ("),
    (dict(data=("reordered.json", _reorder)), "--input content ("),
    (dict(data=("appended.json", _append)), "--input item count (6 then, 7 now)"),
    (dict(tok="other_tok"), "--tokenizer content ("),
    (dict(vqgan="other_vqgan"), "--vqgan weights ("),
    (dict(extra=["--target-size", "64"]), "--target-size (32 then, 64 now)"),
    (dict(extra=["--max-length", "50"]), "--max-length (0 then, 50 now)"),
    (dict(extra=["--random-crop"]), "--random-crop (False then, True now)"),
    (dict(extra=["--seed", "7"]), "--seed (0 then, 7 now)"),
    (dict(extra=["--chunk-size", "3"]), "--chunk-size (2 then, 3 now)"),
    (dict(extra=["--num-shards", "2"]), "--num-shards (1 then, 2 now)"),
]


def test_a_resume_with_any_changed_input_or_setting_is_refused_then_the_original_completes(
        inputs, reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    interrupted_run(inputs, out, monkeypatch)
    before = digest(out)
    for change, needle in EDITS:
        kw = {}
        if "data" in change:
            kw["data"] = edited_input(inputs, *change["data"])
        if "tok" in change:
            kw["tok"] = inputs[change["tok"]]
        if "vqgan" in change:
            kw["vqgan"] = inputs[change["vqgan"]]
        capsys.readouterr()
        args = argv(inputs, out, *change.get("extra", []), **kw)
        if "--chunk-size" in change.get("extra", []):  # the later flag wins in argparse
            args = args[:args.index("--chunk-size")] + args[args.index("--chunk-size") + 2:]
        assert pretokenize.main(args) == 1, change
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "was started with different inputs or settings" in err[0], err
        assert needle in err[0], (needle, err[0])
        assert digest(out) == before, change  # nothing written by a refused run
    # the same VQGAN converted again (other Orbax file names) and a moved tokenizer file are the same content
    moved_tok = tmp_path / "moved_tok.json"
    shutil.copyfile(inputs["tok"], moved_tok)
    assert pretokenize.main(argv(inputs, out, tok=str(moved_tok), vqgan=inputs["vqgan_again"])) == 0
    assert read_all(out) == reference


def test_a_start_that_committed_nothing_does_not_bind_the_next_run(inputs, tmp_path, monkeypatch):
    out = tmp_path / "out"
    interrupted_run(inputs, out, monkeypatch, 0)  # died in its first chunk
    assert pretokenize.main(argv(inputs, out, "--max-length", "50")) == 0
    clean = tmp_path / "clean"
    assert pretokenize.main(argv(inputs, clean, "--max-length", "50")) == 0
    assert read_all(out) == read_all(clean)


def test_a_second_run_on_a_busy_shard_is_refused_and_changes_nothing(inputs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    interrupted_run(inputs, out, monkeypatch)
    lock = out / "_work" / "shard00000-of-00001.lock"
    before = digest(out)
    with open(lock, "a+") as f:  # another run holding the shard (a separate open file: flock conflicts)
        fcntl.flock(f, fcntl.LOCK_EX)
        capsys.readouterr()
        assert pretokenize.main(argv(inputs, out)) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "shard 0/1 is being written by another run" in err and "\n" not in err
        assert digest(out) == before
    assert pretokenize.main(argv(inputs, out)) == 0  # free again: the resume completes


def test_a_different_run_config_is_refused_while_another_shard_runs_even_before_its_first_commit(
        inputs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    interrupted_run(inputs, out, monkeypatch, 0, "--shard", "1", "--num-shards", "2")
    lock = out / "_work" / "shard00001-of-00002.lock"
    with open(lock, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        capsys.readouterr()
        assert pretokenize.main(argv(inputs, out, "--shard", "0", "--num-shards", "2", "--seed", "5")) == 1
        assert "--seed (0 then, 5 now)" in capsys.readouterr().err
    assert os.listdir(out / "_work" / "shard00001-of-00002") == []
