"""End to end on CPU: a tiny random Lumina-style model directory + Chameleon-like tokenizer folder (real file
formats) -> `convert assemble` -> `infer.py` (PNGs + JSON sidecars), the Python API on an 8-device mesh,
task presets with input images, and the one-line errors."""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import infer  # noqa: E402
from lumina_jax.convert.__main__ import main as convert_main  # noqa: E402
from lumina_jax.inference import InferenceError, Lumina  # noqa: E402
from lumina_jax.sampling.generate import split_generation  # noqa: E402
from lumina_jax.testing.tokenizer import write_text_tokenizer_json  # noqa: E402
from lumina_jax.testing.vqgan import tiny_vqgan_config, write_lightning_vqgan  # noqa: E402
from lumina_jax.tokenizer import vocab_from_json  # noqa: E402
from lumina_jax.unirep import unirep_to_codes  # noqa: E402

TARGET = 64  # crop list of 64 px: (128,32) (96,32) (64,32) (64,64) (32,64) (32,96) (32,128)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lumina")
    tok_dir = root / "chameleon_tokenizer"
    tok_dir.mkdir()
    write_text_tokenizer_json(str(tok_dir / "text_tokenizer.json"))
    ckpt, yaml_path = write_lightning_vqgan(tok_dir, config=tiny_vqgan_config(n_embed=8192), seed=0)
    assert ckpt.name == "vqgan.ckpt" and yaml_path.name == "vqgan.yaml"
    vocab = vocab_from_json(str(tok_dir / "text_tokenizer.json"))
    cfg = transformers.ChameleonConfig(
        vocab_size=65536, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocabulary_map=vocab, max_position_embeddings=512,
        vq_config=dict(base_channels=32, channel_multiplier=[1, 2], num_embeddings=64, embed_dim=32,
                       latent_channels=32, resolution=32))
    torch.manual_seed(0)
    hf = transformers.ChameleonForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        hf.lm_head.weight.mul_(30.0)  # peakier than the 0.02 init
    hf.save_pretrained(root / "hf")
    out = root / "assembled"
    assert convert_main(["assemble", "--model", str(root / "hf"), "--tokenizer", str(tok_dir), "--out", str(out),
                         "--target-size", str(TARGET), "--compute-dtype", "float32", "--no-progress"]) == 0
    manifest = json.loads((out / "lumina.json").read_text())
    assert manifest["target_size"] == TARGET and (out / "decoder" / "params").is_dir()
    assert (out / "vqgan" / "vqgan_config.json").is_file() and (out / manifest["tokenizer"]).is_file()
    return out


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(path)
    return path


def _run_cli(capsys, *argv):
    code = infer.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_text_to_image_writes_pngs_and_sidecars(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = _run_cli(capsys, "--checkpoint", model_dir, "--prompt", "a red fox", "--prompt",
                                 "a small wooden house next to a lake", "--size", "64x32", "--cfg", "3",
                                 "--image-top-k", "500", "--seed", "7", "--num-images", "2", "--max-new-tokens", "24",
                                 "--out", out, "--no-progress")
    assert code == 0, err
    sidecars = sorted(out.glob("*.json"))
    assert len(sidecars) == 4
    for i, p in enumerate(sidecars):
        meta = json.loads(p.read_text())
        assert meta["prompt"] == ["a red fox", "a small wooden house next to a lake"][i // 2]
        assert meta["seed"] == 7 + i % 2 and meta["task"] == "t2i"
        assert meta["settings"]["cfg_scale"] == 3.0 and meta["settings"]["image_top_k"] == 500
        assert meta["settings"]["size"] == "64x32" and meta["run"]["checkpoint"] == str(model_dir)
        assert meta["text"].startswith("<|image|>") and meta["num_images"] == 1
        assert meta["unfinished_image"] is None
        png = out / meta["images"][0]
        with Image.open(png) as im:
            assert im.size == (64, 32)
    assert "wrote 4 image(s)" in stdout


def test_api_sharded_matches_one_device_and_structure(model_dir):
    lm = Lumina.load(model_dir)
    # the CLI test's settings and batch shape (one compilation shared in this process), a non-square size
    kw = dict(task="t2i", size=(32, 64), guidance=3.0, image_top_k=500, seed=7, num_images=2, max_new_tokens=24,
              progress=False, decode_images=False)
    prompts = ["a cat", "a dog sleeping on a sofa in the afternoon sun"]  # different prompt lengths
    one = lm.generate(prompts, **kw)
    sharded = Lumina.load(model_dir, mesh="data=2,tensor=4")
    assert sharded.mesh.shape["tensor"] == 4
    many = sharded.generate(prompts, **kw)
    assert [r.token_ids for r in many] == [r.token_ids for r in one]
    ids = lm.ids
    for r in one:
        segs = split_generation(r.token_ids, ids)
        assert len(segs.images) == 1
        codes, h, w = unirep_to_codes(segs.images[0], lm.special)
        assert (h, w) == (2, 1) and codes.shape == (4, 2)
        assert all(not (ids.image_first <= t < ids.image_last) for t in segs.text_ids if t >= 0)
    assert one[0].token_ids != one[1].token_ids  # seeds 7 and 8 differ


def test_cli_omni_task_with_input_image(model_dir, photo, tmp_path, capsys):
    out = tmp_path / "depth"
    code, _, err = _run_cli(capsys, "--checkpoint", model_dir, "--task", "depth", "--image", photo,
                            "--max-new-tokens", "30", "--out", out, "--no-progress")
    assert code == 0, err
    meta = json.loads(next(out.glob("*.json")).read_text())
    assert meta["settings"]["cfg_scale"] == 1.0 and meta["settings"]["image_top_k"] == 200  # Omni defaults
    lm = Lumina.load(model_dir)
    ids = lm.prompt_ids(None, "depth", [photo])
    text = lm.tokenizer.decode([t for t in ids if not (4 <= t < 8196)])
    assert "Depth estimation." in text
    segs = split_generation(ids[1:], lm.ids)
    assert len(segs.images) == 1  # the input image, laid out as UniRep
    unirep_to_codes(segs.images[0], lm.special)
    # multi-turn: a previous answer's <|image|> takes the next image; every message ends with the separator
    turns = [("Draw a cat.", "<|image|>"), ("Now describe it.", None)]
    ids = lm.prompt_ids(turns, "chat", [photo])
    assert ids[0] == lm.special.bos and ids[-1] == lm.special.end_of_turn
    assert ids.count(lm.special.end_of_turn) == 3 and ids.count(lm.special.image_start) == 1
    with pytest.raises(ValueError, match="placeholder"):
        lm.prompt_ids(turns, "chat", [])


@pytest.mark.parametrize("argv,needle", [
    (["--size", "100x64"], "not on the crop list"),
    (["--task", "depth", "--image", "/nonexistent/photo.png"], "image file not found: /nonexistent/photo.png"),
    (["--size", "64by64"], "not WIDTHxHEIGHT"),
    (["--task", "depth"], "takes 1 input image"),
    (["--seed", "4294967295", "--num-images", "2"], "seeds up to 4294967296 are needed but they must lie in [0, 4294967295]"),
])
def test_cli_errors_are_one_line(model_dir, tmp_path, capsys, argv, needle):
    code, _, err = _run_cli(capsys, "--checkpoint", model_dir, "--out", tmp_path / "o", "--no-progress", *argv)
    assert code == 1
    lines = [x for x in err.strip().splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], err


def test_cli_unreadable_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    code, _, err = _run_cli(capsys, "--checkpoint", bad, "--out", tmp_path / "o")
    assert code == 1 and "not an assembled model directory" in err
    (bad / "lumina.json").write_text(json.dumps({"decoder": "decoder", "vqgan": "vqgan",
                                                 "tokenizer": "tokenizer/text_tokenizer.json"}))
    code, _, err = _run_cli(capsys, "--checkpoint", bad, "--out", tmp_path / "o")
    assert code == 1 and "unreadable checkpoint" in err


def test_decoder_config_disagreeing_with_tokenizer_is_refused(model_dir, tmp_path):
    """The image range in decoder/config.json is data checked against the tokenizer's ids, never overridden."""
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    cfg_path = copy / "decoder" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["image_token_end"] = 8000
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(InferenceError, match=r"decoder and tokenizer disagree: .*config.json: image_token_start/end "
                                             r"= \[4, 8000\) but the tokenizer's image tokens are ids \[4, 8196\)"):
        Lumina.load(copy)


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        infer.main(["--help"])
    text = capsys.readouterr().out
    for flag in ["--checkpoint", "--prompt", "--prompts-file", "--size", "--cfg", "--cfg-min-p", "--image-top-k", "--text-top-k",
                 "--temperature", "--top-p", "--seed", "--num-images", "--image", "--task", "--mesh", "--out",
                 "--max-new-tokens", "--rules", "--dtype", "--target-size", "--unconstrained-size"]:
        assert flag in text
    for task in ["t2i", "depth", "segmentation", "condition-to-image", "chat"]:
        assert task in text


def test_assemble_errors(tmp_path):
    from lumina_jax.convert.assemble import assemble
    from lumina_jax.convert.errors import ConversionError

    (tmp_path / "m").mkdir()
    with pytest.raises(ConversionError, match="no config.json"):
        assemble(tmp_path / "m", tmp_path / "t", tmp_path / "o")
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "t").mkdir()
    with pytest.raises(ConversionError, match="missing text_tokenizer.json"):
        assemble(tmp_path / "m", tmp_path / "t", tmp_path / "o")


def test_prompts_file_formats(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a fox\n\n  \na lake at dawn\n")
    args = infer.build_parser().parse_args(["--checkpoint", "x", "--out", "o", "--prompts-file", str(txt),
                                            "--image", "a.png"])
    assert infer.read_prompts(args) == (["a fox", "a lake at dawn"], [["a.png"], ["a.png"]])
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "Depth estimation.", "images": ["x.png"]}\n{"prompt": "hi"}\n')
    args = infer.build_parser().parse_args(["--checkpoint", "x", "--out", "o", "--prompts-file", str(jl)])
    assert infer.read_prompts(args) == (["Depth estimation.", "hi"], [["x.png"], []])
    jl.write_text('{"text": "no prompt key"}\n')
    from lumina_jax.inference import InferenceError

    with pytest.raises(InferenceError, match=r"p.jsonl:1: expected"):
        infer.read_prompts(args)


def test_cli_jacobi_window_records_steps_and_accepted_tokens(model_dir, tmp_path, capsys):
    out = tmp_path / "sjd"
    code, _, err = _run_cli(capsys, "--checkpoint", model_dir, "--prompt", "a red fox", "--size", "64x32", "--cfg", "3",
                            "--image-top-k", "500", "--seed", "7", "--max-new-tokens", "24", "--jacobi-window", "4",
                            "--out", out, "--no-progress")
    assert code == 0, err
    meta = json.loads(next(out.glob("*.json")).read_text())
    accepted = meta["decode"]["tokens_accepted_per_step"]
    assert meta["settings"]["jacobi_window"] == 4 and meta["settings"]["jacobi_coupling"] is True
    assert meta["decode"]["steps"] == len(accepted) and all(1 <= a <= 4 for a in accepted)
    assert sum(accepted) == meta["num_tokens"] - 3  # the header <racm3:break> h w was fed, not generated
    assert meta["num_images"] == 1 and meta["unfinished_image"] is None
    code, _, err = _run_cli(capsys, "--checkpoint", model_dir, "--prompt", "x", "--jacobi-window", "1", "--out", out,
                            "--no-progress")
    assert code == 1 and "jacobi_window must be 0 (off) or an integer >= 2, got 1" in err
