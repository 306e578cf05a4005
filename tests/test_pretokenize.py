"""Pre-tokenization: output format (tfds ArrayRecord, no TensorFlow), bad-item report, kill-and-resume, shards."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from lumina_jax.conversation import encode_conversation
from lumina_jax.data import pretokenize
from lumina_jax.data.records import PretokenizedDataset
from lumina_jax.testing.tokenizer import write_text_tokenizer_json
from lumina_jax.tokenizer import load_tokenizer
from lumina_jax.unirep import crop_size_list, images_to_unirep

CHUNK = 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from lumina_jax.image_tokenizer import ImageTokenizer
    from lumina_jax.testing.vqgan import write_vqgan_checkpoint

    d = tmp_path_factory.mktemp("pretok")
    tok = write_text_tokenizer_json(str(d / "tok.json"))
    vq_dir = str(write_vqgan_checkpoint(d / "vqgan", seed=0))
    rng = np.random.default_rng(0)
    items = []
    for i in range(9):
        size = [(40, 40), (50, 30), (30, 60)][i % 3]
        mode = "RGBA" if i == 4 else "RGB"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8), mode).save(d / f"im{i}.png")
        if i % 4 == 1:  # understanding item with two images
            Image.fromarray(rng.integers(0, 256, (33, 33, 3), dtype=np.uint8)).save(d / f"extra{i}.png")
            items.append({"id": f"u{i}", "conversations": [
                {"from": "human", "value": f"Compare <|image|> and <|image|> number {i}"},
                {"from": "gpt", "value": f"They differ {i}"}], "image": [f"im{i}.png", f"extra{i}.png"]})
        else:  # text-to-image item
            items.append({"id": f"g{i}", "conversations": [
                {"from": "human", "value": f"Generate an image of 32x32 according to the following prompt:\nthing {i}"},
                {"from": "gpt", "value": "<|image|>"}], "image": f"im{i}.png"})
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    bad = [
        {"id": "missing", "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "<|image|>"}],
         "image": ["does_not_exist.png"]},
        {"id": "corrupt", "conversations": [{"from": "human", "value": "<|image|> x"}, {"from": "gpt", "value": "y"}],
         "image": ["corrupt.png"]},
        {"id": "count", "conversations": [{"from": "human", "value": "<|image|> <|image|>"},
                                          {"from": "gpt", "value": "y"}], "image": ["im0.png"]},
        {"id": "long", "conversations": [{"from": "human", "value": "word " * 200}, {"from": "gpt", "value": "y"}]},
    ]
    text_only = {"id": "t", "conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hi"}]}
    items = items[:3] + [bad[0]] + items[3:6] + [text_only, bad[1]] + items[6:] + [bad[2], bad[3]]
    (d / "data.json").write_text(json.dumps(items))
    image_tokenizer = ImageTokenizer.from_checkpoint(vq_dir)
    return {"dir": d, "tok": tok, "vqgan": vq_dir, "items": items, "image_tokenizer": image_tokenizer}


def args(s, out, *extra):
    return ["--input", str(s["dir"] / "data.json"), "--out", str(out), "--target-size", "32", "--tokenizer",
            s["tok"], "--vqgan", s["vqgan"], "--chunk-size", str(CHUNK), "--batch-size", "4", "--max-length", "200",
            "--quiet", *extra]


def read_all(out):
    ds = PretokenizedDataset(str(out))
    return [(r["id"], r["tokens"].tolist(), r["labels"].tolist()) for r in (ds[i] for i in range(len(ds)))]


@pytest.fixture(scope="module")
def reference_run(setup):
    out = setup["dir"] / "uninterrupted"
    assert pretokenize.main(args(setup, out), image_tokenizer=setup["image_tokenizer"]) == 0
    return out


def test_output_is_a_tfds_dataset_with_report(setup, reference_run, capsys):
    import tensorflow_datasets as tfds

    assert importlib.util.find_spec("tensorflow") is None  # written and read without TensorFlow
    items = setup["items"]
    src = tfds.builder_from_directory(str(reference_run)).as_data_source(split="train")
    good = [i for i, it in enumerate(items) if it["id"] not in ("missing", "corrupt", "count", "long")]
    assert len(src) == len(good) and [int(src[k]["id"]) for k in range(len(src))] == good
    report = json.loads((reference_run / "pretokenize_report.json").read_text())
    assert report["num_items"] == len(items) and report["num_written"] == len(good) and report["num_bad"] == 4
    by_id = {items[b["id"]]["id"]: b for b in report["bad"]}
    assert by_id["missing"]["kind"] == "missing image" and "does_not_exist.png" in by_id["missing"]["reason"]
    assert by_id["corrupt"]["kind"] == "corrupt image" and "corrupt.png" in by_id["corrupt"]["reason"]
    assert by_id["count"]["kind"] == "placeholder mismatch"
    assert by_id["long"]["kind"] == "too long" and "> --max-length 200" in by_id["long"]["reason"]
    assert report["bad_by_kind"] == {"missing image": 1, "corrupt image": 1, "placeholder mismatch": 1, "too long": 1}
    # a finished run started again changes nothing and prints the same summary line
    assert pretokenize.main(args(setup, reference_run), image_tokenizer=setup["image_tokenizer"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"{len(items)} items: {len(good)} written" in line and "4 bad (corrupt image: 1, missing image: 1" in line


def test_records_equal_direct_tokenization(setup, reference_run):
    tokenizer, sp = load_tokenizer(setup["tok"])
    ds = PretokenizedDataset(str(reference_run))
    by_id = {ds[k]["id"]: ds[k] for k in range(len(ds))}
    for idx in (1, 4, 7):  # two images / RGBA image / text-only
        item = setup["items"][idx]
        paths = item.get("image", [])
        paths = [paths] if isinstance(paths, str) else paths
        imgs = [Image.open(setup["dir"] / p) for p in paths]
        unireps = images_to_unirep(imgs, setup["image_tokenizer"], crop_size_list(32), sp, batch_size=4)
        tokens, labels = encode_conversation(item["conversations"], tokenizer, sp, unireps)
        np.testing.assert_array_equal(by_id[idx]["tokens"], tokens)
        np.testing.assert_array_equal(by_id[idx]["labels"], labels)
        assert ds.lengths[list(ds.ids).index(idx)] == len(tokens)


def _subprocess_env(setup, delay=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(setup["dir"] / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    if delay is not None:
        env[pretokenize.COMMIT_DELAY_ENV] = str(delay)
    return env


@pytest.mark.slow
def test_killed_and_resumed_run_equals_uninterrupted(setup, reference_run):
    out = setup["dir"] / "killed"
    cmd = [sys.executable, "-m", "lumina_jax.data.pretokenize", *args(setup, out)]
    work = out / "_work" / "shard00000-of-00001"
    # 1st kill: chunk 1's file is written but not yet committed in the progress file
    proc = subprocess.Popen(cmd, env=_subprocess_env(setup, delay=1.0), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (work / "chunk00001.array_record").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((work / "progress.json").read_text())["next_chunk"] == 1
    assert not (out / "dataset_info.json").exists()
    # 2nd kill: at an arbitrary moment of a later chunk
    proc = subprocess.Popen(cmd, env=_subprocess_env(setup, delay=0.3), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while json.loads((work / "progress.json").read_text())["next_chunk"] < 3:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run(cmd, env=_subprocess_env(setup), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "4 bad" in done.stdout
    assert read_all(out) == read_all(reference_run)
    ref_report = json.loads((reference_run / "pretokenize_report.json").read_text())
    assert json.loads((out / "pretokenize_report.json").read_text()) == ref_report


def test_shards_assemble_into_the_same_dataset(setup, reference_run, capsys):
    out = setup["dir"] / "sharded"
    assert pretokenize.main(args(setup, out, "--shard", "1", "--num-shards", "2"),
                            image_tokenizer=setup["image_tokenizer"]) == 0
    assert "the dataset is assembled when every shard has finished" in capsys.readouterr().out
    assert not (out / "dataset_info.json").exists()
    assert pretokenize.main(args(setup, out, "--shard", "0", "--num-shards", "2"),
                            image_tokenizer=setup["image_tokenizer"]) == 0
    assert read_all(out) == read_all(reference_run)
    capsys.readouterr()
    assert pretokenize.main(args(setup, out, "--shard", "0", "--num-shards", "3")) == 1
    assert capsys.readouterr().err.strip().endswith("--num-shards (2 then, 3 now). Resume with the original ones, "
                                                    "or choose a new --out")
