"""Bad input to every command: one line naming the defect, the right exit status, inputs untouched, nothing left.

Every case runs a command's `main(argv)` in this process against a shared tree of tiny inputs in the real file
formats (a Hugging Face model directory, converted checkpoints, a VQGAN Lightning file, a tokenizer, prompt
files, images, corpora), with every output path inside that tree. The whole tree is hashed (names, kinds,
bytes, link targets) before and after: an input changed, a partial output or a stray temporary file fails
the case. Exit status 1 is a mistake in a file or value the command read (exactly one stderr line,
"error: ..."); 2 is a usage error (argparse's usage lines and one "error:" line). Cases marked `early` also
prove that the command stopped before its expensive step (loading the model, compiling, encoding): that step
is replaced by one that fails the test.

Classes and their instances are listed in CASES; the ids say what each instance is.
"""
import hashlib
import json
import os
import shutil
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import infer  # noqa: E402
from lumina_jax import tokenizer_train  # noqa: E402
from lumina_jax.aot import __main__ as aot_main  # noqa: E402
from lumina_jax.config import model_preset  # noqa: E402
from lumina_jax.convert import chameleon, safetensors_io as sio  # noqa: E402
from lumina_jax.convert.__main__ import main as convert_main  # noqa: E402
from lumina_jax.convert.hf_config import hf_config_from_chameleon  # noqa: E402
from lumina_jax.convert.vqgan import state_dict_from_params  # noqa: E402
from lumina_jax.data import pretokenize  # noqa: E402
from lumina_jax.demo import evaluate as demo_evaluate, recipe as demo_recipe, shape_analysis  # noqa: E402
from lumina_jax.demo import vqgan as demo_vqgan  # noqa: E402
from lumina_jax.serve import __main__ as serve_main  # noqa: E402
from lumina_jax.testing.tokenizer import write_text_tokenizer_json  # noqa: E402
from lumina_jax.testing.torch_zip import TensorMeta, write_torch_zip  # noqa: E402
from lumina_jax.testing.vqgan import (random_vqgan_params, tiny_vqgan_config, write_vqgan_checkpoint,  # noqa: E402
                                      write_vqgan_yaml)

MAINS = {"convert": convert_main, "infer": infer.main, "pretok": pretokenize.main, "tok": tokenizer_train.main,
         "aot": aot_main.main, "serve": serve_main.main, "evaluate": demo_evaluate.main, "recipe": demo_recipe.main,
         "demo-vqgan": demo_vqgan.main, "analysis": shape_analysis.main}
# the expensive step a command must not reach when a case is `early`
EXPENSIVE = {"infer": "lumina_jax.inference.Lumina.load", "aot": "lumina_jax.aot.__main__.run",
             "pretok": "lumina_jax.data.pretokenize.run_shard", "convert": "lumina_jax.param_checkpoint.save_params",
             "serve": "lumina_jax.inference.Lumina.load", "evaluate": "lumina_jax.inference.Lumina.load",
             "recipe": "lumina_jax.demo.recipe._run", "demo-vqgan": "lumina_jax.training.vqgan_train.train"}


# ------------------------------------------------------------------------------------------ the input tree

def write_hf_model(directory: Path, **config_changes) -> Path:
    """A tiny Chameleon model directory (config.json + model.safetensors), written without torch."""
    cfg = model_preset("tiny")
    directory.mkdir(parents=True)
    hf = {**hf_config_from_chameleon(cfg, "float32"), **config_changes}
    (directory / "config.json").write_text(json.dumps(hf))
    rng = np.random.default_rng(0)
    specs = [sio.TensorSpec(p.hf_key, np.dtype(np.float32), p.hf_shape,
                            lambda s=p.hf_shape: (0.02 * rng.standard_normal(s)).astype(np.float32))
             for p in chameleon.plan_keys(cfg)]
    sio.write_model(directory, specs, 10**9)
    return directory


def write_vqgan_ckpt(path: Path, config) -> Path:
    """A Lightning-style vqgan.ckpt ({"state_dict": ...}) in torch.save's format, written without torch."""
    sd = state_dict_from_params(random_vqgan_params(config, 0), config)
    storages = {str(i): a.reshape(-1) for i, a in enumerate(sd.values())}
    tensors = {k: TensorMeta(str(i), 0, a.shape, tuple(s // a.itemsize for s in a.strides))
               for i, (k, a) in enumerate(sd.items())}
    return Path(write_torch_zip(path, tensors, storages))


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A valid 1x1 PNG whose header then claims width x height (CRC fixed): what a decompression bomb looks like."""
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    path.write_bytes(bytes(data))
    return path


def damaged_copy(src: Path, dst: Path, how: str) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    arrays = sorted((dst / "params" / "ocdbt.process_0" / "d").iterdir())  # the array bytes
    for p in arrays if how in ("missing", "trunc") else []:
        if how == "missing":
            p.unlink()
        else:
            p.write_bytes(p.read_bytes()[:10])
    if how == "no-metadata":
        shutil.rmtree(dst / "params" / "d")
    return dst


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    r = tmp_path_factory.mktemp("faults")
    hf = write_hf_model(r / "hf")
    write_hf_model(r / "hf_heads0", num_attention_heads=0)
    write_hf_model(r / "hf_hidden_str", hidden_size="abc")
    write_hf_model(r / "hf_vocab_map", vocabulary_map=["IMGIMGAZ"])
    write_hf_model(r / "hf_rope", rope_parameters={"rope_theta": -1.0, "rope_type": "default"})
    nan_dir = write_hf_model(r / "hf_nan")
    (nan_dir / "config.json").write_text((nan_dir / "config.json").read_text().replace('"rms_norm_eps": 1e-05',
                                                                                       '"rms_norm_eps": NaN'))
    for name, change in [("hf_overlap", "overlap"), ("hf_trunc", "trunc"), ("hf_escape", "escape"),
                         ("hf_negdim", "negdim")]:
        d = r / name
        shutil.copytree(hf, d)
        raw = (d / "model.safetensors").read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
        if change == "trunc":
            (d / "model.safetensors").write_bytes(raw[:-100])
            continue
        if change == "escape":
            (d / "model.safetensors").rename(d / "x.safetensors")
            (d / "model.safetensors.index.json").write_text(json.dumps(
                {"weight_map": {k: "../hf/model.safetensors" for k in header if k != "__metadata__"}}))
            continue
        if change == "overlap":  # four bytes into the tensor before it
            header["model.norm.weight"]["data_offsets"] = [o - 4 for o in header["model.norm.weight"]["data_offsets"]]
        else:
            header["model.norm.weight"]["shape"] = [-64]
        h = json.dumps(header).encode()
        (d / "model.safetensors").write_bytes(struct.pack("<Q", len(h)) + h + data)
    (r / "nest").mkdir()
    shutil.copytree(hf, r / "nest" / "hf")
    os.symlink(hf, r / "hf_link")
    (r / "userdir").mkdir()
    (r / "userdir" / "notes.txt").write_text("my own files\n")
    (r / "afile").write_text("a file where a directory is expected\n")
    assert convert_main(["chameleon", str(hf), str(r / "conv"), "--no-progress"]) == 0
    shutil.copytree(r / "conv", r / "conv_copy")
    os.symlink(r / "conv_copy", r / "conv_link")
    damaged_copy(r / "conv", r / "conv_missing", "missing")
    damaged_copy(r / "conv", r / "conv_trunc", "trunc")
    damaged_copy(r / "conv", r / "conv_nometa", "no-metadata")
    bad_cfg = damaged_copy(r / "conv", r / "conv_badcfg", "none")
    cfg = json.loads((bad_cfg / "config.json").read_text())
    (bad_cfg / "config.json").write_text(json.dumps({**cfg, "head_dim": "x"}))
    bin_cfg = damaged_copy(r / "conv", r / "conv_bincfg", "none")
    (bin_cfg / "config.json").write_bytes(b"\xff\xfe{}")

    tok = r / "tok"
    tok.mkdir()
    write_text_tokenizer_json(str(tok / "text_tokenizer.json"))
    vq_cfg = tiny_vqgan_config()
    write_vqgan_ckpt(tok / "vqgan.ckpt", vq_cfg)
    write_vqgan_yaml(tok / "vqgan.yaml", vq_cfg)
    write_vqgan_checkpoint(r / "vq", vq_cfg)
    tok8192 = r / "tok8192"  # codes match the tokenizer's image tokens; the tiny decoder's vocabulary is too small
    tok8192.mkdir()
    write_text_tokenizer_json(str(tok8192 / "text_tokenizer.json"))
    write_vqgan_ckpt(tok8192 / "vqgan.ckpt", tiny_vqgan_config(n_embed=8192))
    write_vqgan_yaml(tok8192 / "vqgan.yaml", tiny_vqgan_config(n_embed=8192))
    (r / "configs").mkdir()
    (r / "configs" / "broken.py").write_text("def get_config(:\n")
    (r / "configs" / "imports.py").write_text("import no_such_module_anywhere\n")
    y = r / "yaml"
    y.mkdir()
    base_yaml = (tok / "vqgan.yaml").read_text()
    for name, old, new in [("ch_abc", "ch: 32", "ch: abc"), ("ch_mult_neg", "  - 2\n", "  - -2\n"),
                           ("res_float", "num_res_blocks: 2", "num_res_blocks: 1.0e+30"),
                           ("embed_str", "n_embed: 64", "n_embed: many"),
                           ("dropout_nan", "dropout: 0.0", "dropout: .nan")]:
        assert old in base_yaml, old
        (y / f"{name}.yaml").write_text(base_yaml.replace(old, new, 1))
    (y / "binary.yaml").write_bytes(b"\x9c\x00\xffmodel: 1")
    (y / "malformed.yaml").write_text("model: [1, 2\n")
    c = r / "ckpt"
    c.mkdir()
    st = {"0": np.arange(12, dtype=np.float32)}
    for name, meta in [("neg_stride", TensorMeta("0", 11, (4,), (-1,))),
                       ("big_stride", TensorMeta("0", 0, (2,), (2**62,))),
                       ("neg_numel", TensorMeta("0", 0, (4,), (1,), numel=-1)),
                       ("past_end", TensorMeta("0", 10, (4,), (1,))), ("expanded", TensorMeta("0", 0, (99,), (0,)))]:
        write_torch_zip(c / f"{name}.ckpt", {"encoder.conv_in.weight": meta}, st)
    (c / "not_zip.ckpt").write_bytes(b"\x80\x02}q\x00.")

    p = r / "prompts"
    p.mkdir()
    (p / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (p / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (p / "nul.txt").write_bytes(b"a prompt\x00\n")
    (p / "int_prompt.jsonl").write_text('{"prompt": 5}\n')
    (p / "images_str.jsonl").write_text('{"prompt": "x <|image|>", "images": "photo.png"}\n')
    (p / "list_line.jsonl").write_text('["a fox"]\n')
    (p / "nan.jsonl").write_text('{"prompt": "x", "seed": NaN}\n')
    (p / "null_prompt.jsonl").write_text('{"prompt": "a"}\n{"prompt": null}\n')
    im = r / "images"
    im.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(im / "ok.png")
    (im / "truncated.png").write_bytes((im / "ok.png").read_bytes()[:200])
    png_claiming(im / "bomb.png", 30000, 30000)
    (im / "text.png").write_text("not an image\n")
    (im / "dir.png").mkdir()

    d = r / "data"
    d.mkdir()
    (d / "items.json").write_text(json.dumps([{"conversations": [{"from": "human", "value": "hi"},
                                                                 {"from": "gpt", "value": "hello"}]}]))
    (d / "images.json").write_text(json.dumps([{"conversations": [{"from": "human", "value": "<|image|>"},
                                                                  {"from": "gpt", "value": "x"}], "image": "a.png"}]))
    (d / "latin1.json").write_bytes('[{"x": "caf\xe9"}]'.encode("latin-1"))
    (d / "object.json").write_text('{"items": []}')
    (d / "nan.json").write_text("[NaN]")
    (d / "huge.json").write_text("[1e999]")
    (d / "truncated.json").write_text('[{"conversations": [')
    (d / "empty.json").write_text("[]")
    k = r / "corpus"
    k.mkdir()
    (k / "empty.txt").write_text("")
    (k / "spaces.txt").write_text(" \n\t\n\n")
    (k / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (k / "nul.txt").write_bytes(b"some text\x00more\n")
    (k / "cut.txt").write_bytes("naïve".encode()[:3])
    (k / "ok.txt").write_text("the cat sat on the mat\n" * 50)
    (k / "tok.model").write_text("an earlier output\n")
    (k / "tok.vocab").write_text("an earlier output\n")
    return r


def tree_digest(root: Path) -> dict[str, str]:
    """Every path under `root` -> a digest of what it is: file bytes, link target, or directory."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# ------------------------------------------------------------------------------------------------ the table

def case(cmd, argv, code, needle, early=False, id=None):
    return pytest.param(cmd, argv, code, needle, early, id=id)


TOK = "{r}/tok/text_tokenizer.json"
PRETOK = ["--tokenizer", TOK, "--vqgan", "{r}/vq", "--quiet"]
INFER = ["--no-progress", "--max-new-tokens", "8"]
AOT = ["--topology", "v5e:2x2", "--config", str(REPO / "configs" / "tiny_cpu.py")]

CASES = [
    # -- an output path that is, holds or lies inside an input; --overwrite of what lumina-jax did not write
    case("convert", ["chameleon", "{r}/hf", "{r}/hf", "--overwrite"], 1, "the output is the input", id="out-is-src"),
    case("convert", ["chameleon", "{r}/nest/hf", "{r}/nest", "--overwrite"], 1, "the output contains the input",
         id="out-holds-src"),
    case("convert", ["chameleon", "{r}/hf", "{r}/hf/jax"], 1, "the output lies inside the input", id="out-in-src"),
    case("convert", ["chameleon", "{r}/hf_link", "{r}/hf", "--overwrite"], 1, "the output is the input",
         id="out-is-src-via-link"),
    case("convert", ["chameleon", "{r}/hf", "{r}/userdir", "--overwrite"], 1, "has no lumina_jax_output.json",
         id="overwrite-user-dir"),
    case("convert", ["chameleon", "{r}/hf", "{r}/afile", "--overwrite"], 1, "is not a directory",
         id="overwrite-file"),
    case("convert", ["chameleon", "{r}/hf", "{r}/afile/sub"], 1, "afile is not a directory", id="out-under-file"),
    case("convert", ["chameleon", "{r}/hf", "{r}/conv_link", "--overwrite"], 1, "is a link", id="overwrite-link"),
    case("convert", ["chameleon", "{r}/hf", "{r}/conv"], 1, "already exists (pass --overwrite", id="exists"),
    case("convert", ["chameleon-export", "{r}/conv", "{r}/conv", "--overwrite"], 1, "the output is the input",
         id="export-out-is-src"),
    case("convert", ["chameleon-export", "{r}/conv", "{r}/hf", "--overwrite"], 1, "has no lumina_jax_output.json",
         id="export-over-hf-download"),
    case("convert", ["chameleon-export", "{r}/conv", "{r}/afile", "--overwrite"], 1, "is not a directory",
         id="export-overwrite-file"),
    case("convert", ["chameleon-export", "{r}/conv", "{r}/userdir/hf", "--hf-config", "{r}/userdir"], 1,
         "the output lies inside the input", id="export-out-in-hf-config"),
    case("convert", ["vqgan", "--ckpt", "{r}/tok/vqgan.ckpt", "--config", "{r}/tok/vqgan.yaml", "--out", "{r}/tok",
                     "--overwrite"], 1, "the output contains the input", id="vqgan-out-holds-ckpt"),
    case("convert", ["vqgan", "--ckpt", "{r}/tok/vqgan.ckpt", "--config", "{r}/tok/vqgan.yaml", "--out",
                     "{r}/tok/vqgan.ckpt", "--overwrite"], 1, "the output is the input", id="vqgan-out-is-ckpt"),
    case("convert", ["vqgan-export", "--checkpoint", "{r}/vq", "--out", "{r}/vq/params/x.ckpt"], 1,
         "the output lies inside the input", id="vqgan-export-into-src"),
    case("convert", ["vqgan-export", "--checkpoint", "{r}/vq", "--out", "{r}/tok/vqgan.ckpt", "--overwrite"], 1,
         "was not written by lumina-jax", id="vqgan-export-over-foreign-ckpt"),
    case("convert", ["vqgan-export", "--checkpoint", "{r}/vq", "--out", "{r}/x.ckpt", "--yaml-out",
                     "{r}/tok/vqgan.yaml", "--overwrite"], 1, "was not written by lumina-jax",
         id="vqgan-export-over-foreign-yaml"),
    case("convert", ["vqgan-export", "--checkpoint", "{r}/vq", "--out", "{r}/userdir", "--overwrite"], 1,
         "is not a file", id="vqgan-export-over-dir"),
    case("convert", ["vqgan-export", "--checkpoint", "{r}/vq", "--out", "{r}/missing/dir/v.ckpt"], 1,
         "missing/dir does not exist", id="vqgan-export-missing-dir"),
    case("convert", ["assemble", "--model", "{r}/hf", "--tokenizer", "{r}/tok", "--out", "{r}/hf", "--overwrite"],
         1, "the output is the input", id="assemble-out-is-model"),
    case("convert", ["assemble", "--model", "{r}/nest/hf", "--tokenizer", "{r}/tok", "--out", "{r}/nest",
                     "--overwrite"], 1, "the output contains the input", id="assemble-out-holds-model"),
    case("convert", ["assemble", "--model", "{r}/hf", "--tokenizer", "{r}/tok", "--out", "{r}/tok/asm"], 1,
         "the output lies inside the input", id="assemble-out-in-tokenizer"),
    case("aot", [*AOT, "--json", "{r}/afile"], 2, "--json {r}/afile: already exists", early=True,
         id="aot-json-exists"),
    case("aot", [*AOT, "--json", "{r}/afile", "--overwrite"], 2, "was not written by lumina-jax", early=True,
         id="aot-json-overwrite-foreign-file"),
    case("evaluate", ["--json", "{r}/afile"], 2, "{r}/afile: already exists", early=True, id="evaluate-json-exists"),
    case("evaluate", ["--json", "{r}/missing/rows.json"], 2, "directory {r}/missing does not exist", early=True,
         id="evaluate-json-missing-dir"),
    case("evaluate", ["--out", "{r}/userdir"], 2, "--out {r}/userdir: exists and is not an empty directory",
         early=True, id="evaluate-out-user-dir"),
    case("recipe", ["--out", "{r}/userdir"], 1, "a non-empty directory that this recipe did not start", early=True,
         id="recipe-out-user-dir"),
    case("recipe", ["--out", "{r}/afile"], 1, "--out {r}/afile: exists and is not a directory", early=True,
         id="recipe-out-file"),
    case("recipe", ["--out", "{r}", "--vqgan", "{r}/vq"], 1, "the output contains the input {r}/vq", early=True,
         id="recipe-vqgan-inside-out"),
    case("demo-vqgan", ["--out", "{r}/userdir", "--overwrite", "--quiet"], 2, "has no lumina_jax_output.json",
         early=True, id="demo-vqgan-overwrite-user-dir"),
    case("demo-vqgan", ["--out", "{r}/afile/x", "--quiet"], 2, "afile is not a directory", early=True,
         id="demo-vqgan-out-under-file"),
    case("pretok", ["--input", "{r}/data/items.json", "--out", "{r}/data/items.json", "--target-size", "32", *PRETOK],
         1, "exists and is not a directory", early=True, id="pretok-out-is-input"),
    case("pretok", ["--input", "{r}/data/items.json", "--out", "{r}/userdir", "--target-size", "32", *PRETOK], 1,
         "a non-empty directory that this command did not start", early=True, id="pretok-out-user-dir"),
    case("pretok", ["--input", "{r}/data/items.json", "--out", "{r}/tok", "--target-size", "32", *PRETOK], 1,
         "a non-empty directory that this command did not start", early=True, id="pretok-out-is-tokenizer-dir"),
    case("infer", ["--out", "{r}/afile", "--prompt", "a fox", *INFER], 1, "afile is not a directory", early=True,
         id="infer-out-is-file"),
    case("infer", ["--out", "{r}/afile/sub", "--prompt", "a fox", *INFER], 1, "afile is not a directory",
         early=True, id="infer-out-under-file"),
    case("tok", ["--input", "{r}/corpus/ok.txt", "--out-prefix", "{r}/corpus/tok", "--text-vocab-size", "300"], 1,
         "tok.model already exists", id="tok-earlier-output"),
    case("tok", ["--input", "{r}/corpus/ok.txt", "--out-prefix", "{r}/afile/tok", "--text-vocab-size", "300"], 1,
         "cannot create", id="tok-out-under-file"),

    # -- numeric flags: NaN, infinities, out-of-range and non-integer values are usage errors (exit 2)
    case("infer", ["--out", "{r}/o", "--cfg", "nan", *INFER], 2, "--cfg: must be a finite number, got nan",
         early=True, id="infer-cfg-nan"),
    case("infer", ["--out", "{r}/o", "--cfg", "0", *INFER], 2, "--cfg: must be > 0.0", early=True, id="infer-cfg-0"),
    case("infer", ["--out", "{r}/o", "--temperature", "inf", *INFER], 2, "--temperature: must be a finite number",
         early=True, id="infer-temperature-inf"),
    case("infer", ["--out", "{r}/o", "--temperature", "-1", *INFER], 2, "--temperature: must be >= 0.0",
         early=True, id="infer-temperature-negative"),
    case("infer", ["--out", "{r}/o", "--top-p", "0", *INFER], 2, "--top-p: must be in (0.0, 1.0]", early=True,
         id="infer-top-p-0"),
    case("infer", ["--out", "{r}/o", "--top-p=-nan", *INFER], 2, "--top-p: must be a finite number",
         early=True, id="infer-top-p-nan"),
    case("infer", ["--out", "{r}/o", "--cfg-min-p", "1", *INFER], 2, "--cfg-min-p: must be in [0.0, 1.0)",
         early=True, id="infer-cfg-min-p-1"),
    case("infer", ["--out", "{r}/o", "--seed", "1e20", *INFER], 2, "--seed: expected an integer, got '1e20'",
         early=True, id="infer-seed-float"),
    case("infer", ["--out", "{r}/o", "--seed", "100000000000000000000", *INFER], 2,
         "--seed: must be in [0, 4294967295]", early=True, id="infer-seed-huge"),
    case("infer", ["--out", "{r}/o", "--seed", "-1", *INFER], 2, "--seed: must be in [0, 4294967295], got -1",
         early=True, id="infer-seed-negative"),
    case("infer", ["--out", "{r}/o", "--num-images", "0", *INFER], 2, "--num-images: must be >= 1", early=True,
         id="infer-num-images-0"),
    case("infer", ["--out", "{r}/o", "--image-top-k", "-5", *INFER], 2, "--image-top-k: must be >= 0",
         early=True, id="infer-top-k-negative"),
    case("infer", ["--out", "{r}/o", "--no-progress", "--max-new-tokens", "0"], 2, "--max-new-tokens: must be >= 1",
         early=True, id="infer-max-new-tokens-0"),
    case("infer", ["--out", "{r}/o", "--target-size", "100", *INFER], 2, "--target-size: target_size=100",
         early=True, id="infer-target-size-100"),
    case("pretok", ["--input", "{r}/data/items.json", "--out", "{r}/o", "--target-size", "32", "--chunk-size", "-3",
                    *PRETOK], 2, "--chunk-size: must be >= 1, got -3", early=True, id="pretok-chunk-negative"),
    case("pretok", ["--input", "{r}/data/items.json", "--out", "{r}/o", "--target-size", "32", "--chunk-size", "0",
                    *PRETOK], 2, "--chunk-size: must be >= 1, got 0", early=True, id="pretok-chunk-0"),
    case("pretok", ["--input", "{r}/data/items.json", "--out", "{r}/o", "--target-size", "32", "--batch-size", "0",
                    *PRETOK], 2, "--batch-size: must be >= 1", early=True, id="pretok-batch-0"),
    case("pretok", ["--input", "{r}/data/items.json", "--out", "{r}/o", "--target-size", "32", "--num-workers", "0",
                    *PRETOK], 2, "--num-workers: must be in [1, 256]", early=True, id="pretok-workers-0"),
    case("pretok", ["--input", "{r}/data/items.json", "--out", "{r}/o", "--target-size", "32", "--max-length", "-1",
                    *PRETOK], 2, "--max-length: must be >= 0", early=True, id="pretok-max-length-negative"),
    case("pretok", ["--input", "{r}/data/items.json", "--out", "{r}/o", "--target-size", "100", *PRETOK], 2,
         "--target-size: target_size=100", early=True, id="pretok-target-size-100"),
    case("pretok", ["--input", "{r}/data/items.json", "--out", "{r}/o", "--target-size", "32", "--seed", "-1",
                    *PRETOK], 2, "--seed: must be in [0, 4294967295]", early=True, id="pretok-seed-negative"),
    case("pretok", ["--input", "{r}/data/items.json", "--out", "{r}/o", "--target-size", "32", "--num-shards", "0",
                    *PRETOK], 2, "--num-shards: must be >= 1", early=True, id="pretok-shards-0"),
    case("pretok", ["--input", "{r}/data/items.json", "--out", "{r}/o", "--target-size", "32", "--shard", "2",
                    "--num-shards", "2", *PRETOK], 2, "--shard 2 is not in 0..1", early=True, id="pretok-shard-range"),
    case("tok", ["--input", "{r}/corpus/ok.txt", "--out-prefix", "{r}/o/t", "--text-vocab-size", "-5"], 2,
         "--text-vocab-size: must be in [1, 1048576], got -5", id="tok-vocab-negative"),
    case("tok", ["--input", "{r}/corpus/ok.txt", "--out-prefix", "{r}/o/t", "--character-coverage", "nan"], 2,
         "--character-coverage: must be a finite number", id="tok-coverage-nan"),
    case("tok", ["--input", "{r}/corpus/ok.txt", "--out-prefix", "{r}/o/t", "--character-coverage", "0.5"], 2,
         "--character-coverage: must be in [0.98, 1.0]", id="tok-coverage-low"),
    case("tok", ["--input", "{r}/corpus/ok.txt", "--out-prefix", "{r}/o/t", "--reserved-end", "100"], 2,
         "--reserved-end: must be in [8806", id="tok-reserved-end-low"),
    case("aot", [*AOT, "--mfu", "nan"], 2, "--mfu: must be a finite number", early=True, id="aot-mfu-nan"),
    case("aot", [*AOT, "--slices", "0"], 2, "--slices: must be in [1, 4096]", early=True, id="aot-slices-0"),
    case("aot", [*AOT, "--per-device-batch", "inf"], 2, "--per-device-batch: must be a finite number", early=True,
         id="aot-batch-inf"),
    case("aot", [*AOT, "--json", "{r}/missing/report.json"], 2, "does not exist or is not writable", early=True,
         id="aot-json-missing-dir"),
    case("aot", [*AOT, "--json", "{r}/userdir"], 2, "--json {r}/userdir: is a directory", early=True,
         id="aot-json-is-dir"),
    case("convert", ["assemble", "--model", "{r}/hf", "--tokenizer", "{r}/tok", "--out", "{r}/o", "--target-size",
                     "100"], 2, "--target-size: target_size=100", id="assemble-target-size-100"),
    case("convert", ["chameleon-export", "{r}/conv", "{r}/o", "--max-shard-size", "0"], 2,
         "--max-shard-size: must be positive", id="export-shard-size-0"),
    case("convert", ["chameleon-export", "{r}/conv", "{r}/o", "--max-shard-size=-5GB"], 2,
         "--max-shard-size: cannot parse '-5GB'", id="export-shard-size-negative"),

    # -- config fields of the wrong type or range in the files read, named with their value
    case("convert", ["chameleon", "{r}/hf_heads0", "{r}/o"], 1, "num_attention_heads must be in [1,",
         id="hf-heads-0"),
    case("convert", ["chameleon", "{r}/hf_hidden_str", "{r}/o"], 1, "hidden_size must be an integer, got 'abc'",
         id="hf-hidden-string"),
    case("convert", ["chameleon", "{r}/hf_nan", "{r}/o"], 1, "NaN is not a number JSON allows", id="hf-eps-nan"),
    case("convert", ["chameleon", "{r}/hf_vocab_map", "{r}/o"], 1, "vocabulary_map must be an object",
         id="hf-vocabulary-map-list"),
    case("convert", ["chameleon", "{r}/hf_rope", "{r}/o"], 1, "rope_theta must be > 0.0, got -1.0",
         id="hf-rope-negative"),
    case("convert", ["chameleon-export", "{r}/conv_badcfg", "{r}/o"], 1, "ChameleonConfig.head_dim must be an integer",
         id="export-config-head-dim-string"),
    case("convert", ["chameleon-export", "{r}/conv_bincfg", "{r}/o"], 1, "config.json: not UTF-8 text (byte 0xff",
         id="export-config-binary"),
    *[case("convert", ["vqgan", "--ckpt", "{r}/tok/vqgan.ckpt", "--config", f"{{r}}/yaml/{name}.yaml", "--out",
                       "{r}/o"], 1, needle, id=f"vqgan-yaml-{name}")
      for name, needle in [("ch_abc", "VQGANConfig.ch must be an integer, got 'abc'"),
                           ("ch_mult_neg", "VQGANConfig.ch_mult[2] must be in [1, 64], got -2"),
                           ("res_float", "VQGANConfig.num_res_blocks must be an integer, got 1e+30"),
                           ("embed_str", "VQGANConfig.n_embed must be an integer, got 'many'"),
                           ("dropout_nan", "VQGANConfig.dropout must be a finite number, got nan"),
                           ("binary", "binary.yaml: not UTF-8 text (byte 0x9c at offset 0)"),
                           ("malformed", "malformed.yaml: malformed YAML")]],

    # -- damaged binary inputs: every offset, size and stride checked before a byte is read
    case("convert", ["chameleon", "{r}/hf_overlap", "{r}/o"], 1, "overlaps the tensor before it",
         id="safetensors-overlap"),
    case("convert", ["chameleon", "{r}/hf_negdim", "{r}/o"], 1, "shape must be a list of non-negative integers",
         id="safetensors-negative-dim"),
    case("convert", ["chameleon", "{r}/hf_trunc", "{r}/o"], 1, "truncated", id="safetensors-truncated"),
    case("convert", ["chameleon", "{r}/hf_escape", "{r}/o"], 1, "weight_map must map tensor names to file names",
         id="safetensors-index-leaves-directory"),
    *[case("convert", ["vqgan", "--ckpt", f"{{r}}/ckpt/{name}.ckpt", "--config", "{r}/tok/vqgan.yaml", "--out",
                       "{r}/o"], 1, needle, id=f"pickle-{name}")
      for name, needle in [("neg_stride", "tensor encoder.conv_in.weight: negative offset, size or stride"),
                           ("big_stride", "tensor encoder.conv_in.weight: shape [2], stride [4611686018427387904]"),
                           ("neg_numel", "malformed storage reference"),
                           ("past_end", "reach element 13 of storage data/0, which has 12"),
                           ("expanded", "99 elements view a storage of 12"),
                           ("not_zip", "not a zip-format torch checkpoint")]],
    case("convert", ["chameleon-export", "{r}/conv_missing", "{r}/o"], 1, "unreadable checkpoint",
         id="export-missing-array-file"),
    case("convert", ["chameleon-export", "{r}/conv_trunc", "{r}/o"], 1, "unreadable checkpoint",
         id="export-truncated-array-file"),
    case("convert", ["chameleon-export", "{r}/conv_nometa", "{r}/o"], 1, "no array metadata",
         id="export-missing-metadata"),
    case("convert", ["vqgan-export", "--checkpoint", "{r}/conv_trunc", "--out", "{r}/v.ckpt"], 1,
         "vqgan_config.json: missing", id="vqgan-export-not-a-vqgan"),

    # -- text and image files a user passes: encodings, JSON structure, damaged or oversized images
    *[case("infer", ["--out", "{r}/o", "--prompts-file", f"{{r}}/prompts/{name}", *INFER], 1, needle, early=True,
           id=f"prompts-{name}")
      for name, needle in [("binary.txt", "binary.txt: not UTF-8 text (byte 0x80 at offset 128)"),
                           ("latin1.txt", "latin1.txt: not UTF-8 text (byte 0xe9 at offset 3)"),
                           ("nul.txt", "nul.txt: holds NUL bytes"),
                           ("int_prompt.jsonl", 'int_prompt.jsonl:1: "prompt" must be a string, got int'),
                           ("images_str.jsonl", 'images_str.jsonl:1: "images" must be a list of paths'),
                           ("list_line.jsonl", "list_line.jsonl:1: expected {"),
                           ("nan.jsonl", "nan.jsonl:1: malformed JSON (NaN is not a number JSON allows)"),
                           ("null_prompt.jsonl", 'null_prompt.jsonl:2: "prompt" must be a string, got NoneType'),
                           ("missing.txt", "missing.txt: No such file or directory")]],
    case("infer", ["--out", "{r}/o", "--prompts-file", "{r}/prompts", *INFER], 1, "prompts: Is a directory",
         early=True, id="prompts-directory"),
    *[case("infer", ["--out", "{r}/o", "--task", "depth", "--image", f"{{r}}/images/{name}", *INFER], 1, needle,
           early=True, id=f"image-{name}")
      for name, needle in [("truncated.png", "images/truncated.png: unreadable (image file is truncated"),
                           ("bomb.png", "images/bomb.png: unreadable (Image size (900000000 pixels) exceeds"),
                           ("text.png", "images/text.png: unreadable (cannot identify image file"),
                           ("dir.png", "image file not found: {r}/images/dir.png"),
                           ("none.png", "image file not found: {r}/images/none.png")]],
    *[case("pretok", ["--input", f"{{r}}/data/{name}", "--out", "{r}/o", "--target-size", "32", *PRETOK], 1, needle,
           early=True, id=f"pretok-input-{name}")
      for name, needle in [("latin1.json", "latin1.json: not UTF-8 text (byte 0xe9"),
                           ("object.json", "top level must be a list of items, got dict"),
                           ("nan.json", "NaN is not a number JSON allows"),
                           ("huge.json", "1e999 overflows a float"),
                           ("truncated.json", "truncated.json: malformed JSON"),
                           ("missing.json", "missing.json: no such file")]],
    case("pretok", ["--input", "{r}/data", "--out", "{r}/o", "--target-size", "32", *PRETOK], 1,
         "--input {r}/data: is a directory", early=True, id="pretok-input-directory"),
    case("pretok", ["--input", "{r}/data/items.json", "--out", "{r}/o", "--target-size", "32", "--tokenizer",
                    "{r}/nope.json", "--quiet"], 1, "nope.json: tokenizer file does not exist", early=True,
         id="pretok-tokenizer-missing"),
    case("pretok", ["--input", "{r}/data/items.json", "--out", "{r}/o", "--target-size", "32", "--tokenizer",
                    "{r}/data/items.json", "--quiet"], 1, "not a readable tokenizers JSON file", early=True,
         id="pretok-tokenizer-wrong-file"),
    case("pretok", ["--input", "{r}/data/items.json", "--out", "{r}/o", "--target-size", "32", "--tokenizer", TOK,
                    "--vqgan", "{r}/tok", "--quiet"], 1, "--vqgan {r}/tok: {r}/tok/vqgan_config.json: missing",
         early=True, id="pretok-vqgan-not-converted"),
    case("pretok", ["--input", "{r}/data/items.json", "--out", "{r}/o", "--target-size", "32", "--tokenizer", TOK,
                    "--vqgan", "{r}/conv_trunc", "--quiet"], 1, "--vqgan {r}/conv_trunc", early=True,
         id="pretok-vqgan-is-decoder"),
    case("pretok", ["--input", "{r}/data/images.json", "--out", "{r}/o", "--target-size", "32", "--tokenizer", TOK,
                    "--quiet"], 1, "item 0 has images but no --vqgan", early=True, id="pretok-images-without-vqgan"),
    case("pretok", ["--input", "{r}/data/items.json", "--out", "{r}/o", "--target-size", "32", "--image-root",
                    "{r}/afile", *PRETOK], 1, "--image-root {r}/afile: not a directory", early=True,
         id="pretok-image-root-file"),
    *[case("tok", ["--input", f"{{r}}/corpus/{name}", "--out-prefix", "{r}/o/t"], 1, needle, id=f"corpus-{name}")
      for name, needle in [("empty.txt", "empty.txt: no text to learn from"),
                           ("spaces.txt", "spaces.txt: no text to learn from"),
                           ("binary.txt", "binary.txt: not UTF-8 text (byte 0x80 at offset 128)"),
                           ("nul.txt", "nul.txt: holds NUL bytes"),
                           ("cut.txt", "cut.txt: ends inside a UTF-8 character"),
                           ("missing.txt", "missing.txt: no such file")]],
    case("tok", ["--input", "{r}/corpus/ok.txt", "{r}/corpus", "--out-prefix", "{r}/o/t"], 1,
         "--input {r}/corpus: is a directory", id="corpus-directory"),

    # -- mistakes in a request named as what they are, found before the work
    case("infer", ["--out", "{r}/o", "--mesh", "tensor=16", *INFER], 1, "mesh 'tensor=16': ", id="infer-mesh-too-big"),
    case("infer", ["--out", "{r}/o", "--mesh", "foo=2", *INFER], 1, "mesh 'foo=2': mesh spec field 'foo=2'",
         id="infer-mesh-unknown-axis"),
    case("infer", ["--out", "{r}/o", "--prompt", "a red circle " * 100, *INFER], 1,
         "the model's context is 256 tokens", id="infer-prompt-too-long"),
    case("infer", ["--out", "{r}/o", "--seed", "4294967295", "--num-images", "2", *INFER], 1,
         "seeds up to 4294967296 are needed but they must lie in [0, 4294967295]", early=True,
         id="infer-seed-range-with-images"),
    case("infer", ["--out", "{r}/o", "--size", "100x100", *INFER], 1, "size 100x100 is not on the crop list",
         id="infer-size-off-list"),
    case("infer", ["--out", "{r}/o", "--checkpoint", "{r}/afile", *INFER], 1,
         "afile: checkpoint directory is a file, not a directory", id="infer-checkpoint-is-file"),
    case("infer", ["--out", "{r}/o", "--checkpoint", "{r}/hf", *INFER], 1, "not an assembled model directory",
         id="infer-checkpoint-is-hf-download"),
    case("convert", ["assemble", "--model", "{r}/hf", "--tokenizer", "{r}/tok", "--out", "{r}/o"], 1,
         "vqgan.yaml has 64 codes but text_tokenizer.json has 8192 image tokens", early=True,
         id="assemble-codes-disagree"),
    case("convert", ["assemble", "--model", "{r}/hf", "--tokenizer", "{r}/tok8192", "--out", "{r}/o"], 1,
         "vocab_size 512 is smaller than the 65536 entries", early=True, id="assemble-vocabulary-too-small"),
    case("convert", ["assemble", "--model", "{r}/hf", "--tokenizer", "{r}/tok8192", "--out", "{r}/tok8192",
                     "--overwrite"], 1, "the output is the input", early=True, id="assemble-out-is-tokenizer"),
    case("convert", ["chameleon-export", "{r}/nowhere", "{r}/o"], 1, "error: {r}/nowhere/config.json: missing",
         id="export-source-missing"),
    case("pretok", ["--input", "{r}/data/empty.json", "--out", "{r}/o", "--target-size", "32", *PRETOK], 1,
         "empty.json: holds no items", early=True, id="pretok-input-empty"),
    case("aot", [*AOT, "--config", "{r}/afile"], 2, "--config {r}/afile: expected a Python experiment file",
         early=True, id="aot-config-not-python"),
    case("aot", [*AOT, "--config", "{r}/configs/broken.py"], 2, "broken.py:1: invalid syntax", id="aot-config-syntax"),
    case("aot", [*AOT, "--config", "{r}/configs/imports.py"], 2, "imports.py: ModuleNotFoundError",
         id="aot-config-import-fails"),
    case("serve", ["--max-batch", "0"], 2, "--max-batch: must be >= 1, got 0", early=True, id="serve-max-batch-0"),
    case("serve", ["--max-wait-ms", "inf"], 2, "--max-wait-ms: must be a finite number", early=True,
         id="serve-max-wait-inf"),
    case("serve", ["--port", "-1"], 2, "--port: must be in [0, 65535], got -1", early=True, id="serve-port-negative"),
    case("evaluate", ["--guidance", "1,nan"], 2, "each scale must be a finite number, got nan", early=True,
         id="evaluate-guidance-nan"),
    case("evaluate", ["--guidance", "0"], 2, "each scale must be > 0.0, got 0.0", early=True,
         id="evaluate-guidance-0"),
    case("evaluate", ["--per-split", "-2"], 2, "--per-split: must be >= 1", early=True, id="evaluate-per-split"),
    case("recipe", ["--out", "{r}/recipe", "--seed", "-1"], 2, "--seed: must be in [0, 4294967167]", early=True,
         id="recipe-seed-negative"),
    case("recipe", ["--out", "{r}/recipe", "--preset", "huge"], 2, "--preset: invalid choice", early=True,
         id="recipe-preset-unknown"),
    case("demo-vqgan", ["--out", "{r}/o", "--min-extent", "nan", "--quiet"], 2, "--min-extent: must be a finite",
         early=True, id="demo-vqgan-extent-nan"),
    case("demo-vqgan", ["--out", "{r}/o", "--min-extent", "0.8", "--max-extent", "0.5", "--quiet"], 2,
         "DemoVQGANConfig.max_extent must be in [0.8, 0.9], got 0.5", early=True, id="demo-vqgan-extents-crossed"),
    case("demo-vqgan", ["--out", "{r}/o", "--eval-per-size", "0", "--quiet"], 2,
         "DemoVQGANConfig.eval_per_size must be >= 1, got 0", early=True, id="demo-vqgan-eval-per-size-0"),
    case("analysis", ["{r}/images/ok.png", "{r}/images/bomb.png"], 1, "bomb.png: cannot read image (Image size",
         id="analysis-bomb"),
    case("analysis", ["{r}/images/truncated.png"], 1, "truncated.png: cannot read image", id="analysis-truncated"),
    case("analysis", ["{r}/images/none.png"], 1, "none.png: cannot read image", id="analysis-missing"),
]


@pytest.mark.parametrize("cmd,argv,code,needle,early", CASES)
def test_bad_input_is_one_line_and_changes_nothing(world, monkeypatch, capsys, cmd, argv, code, needle, early):
    argv = [a.replace("{r}", str(world)) for a in argv]
    needle = needle.replace("{r}", str(world))
    if early:
        def reached(*a, **k):
            raise AssertionError(f"{cmd} reached {EXPENSIVE[cmd]} before refusing")
        monkeypatch.setattr(EXPENSIVE[cmd], reached)
    before = tree_digest(world)
    capsys.readouterr()
    try:
        rc = MAINS[cmd](argv)
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert rc == code, err
    if code == 1:
        assert len(lines) == 1 and lines[0].startswith("error: "), err
    else:
        assert "error: " in lines[-1] and all(x.startswith(("usage:", " ")) for x in lines[:-1]), err
    assert needle in lines[-1], f"{needle!r} not in {lines[-1]!r}"
    assert tree_digest(world) == before, "an input changed or an output was left behind"


# ------------------------------------------------------------------------ outputs are never replaced, values API

def test_a_second_infer_run_never_replaces_the_first_runs_files(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--out", str(out), "--prompt", "a red circle", "--no-progress", "--max-new-tokens", "96",
            "--image-top-k", "16", "--seed", "3"]
    assert infer.main(argv) == 0
    first = tree_digest(out)
    assert sorted(first) == ["000_seed3.json", "000_seed3_0.png"]  # t2i without --size: the square target size
    assert json.loads((out / "000_seed3.json").read_text())["settings"]["size"] == "128x128"
    (out / "001_seed3.json").write_text("a user's own file that happens to carry the next number\n")
    mine = tree_digest(out)
    assert infer.main(argv + ["--num-images", "2"]) == 0
    after = tree_digest(out)
    assert {k: after[k] for k in mine} == mine  # every earlier file unchanged
    assert sorted(set(after) - set(mine)) == ["002_seed3.json", "002_seed3_0.png", "003_seed4.json",
                                              "003_seed4_0.png"]
    assert "(numbers 002..003)" in capsys.readouterr().out
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]


@pytest.mark.parametrize("kw,needle", [
    (dict(cfg_scale=float("nan")), "cfg_scale must be a finite number, got nan"),
    (dict(temperature=float("inf")), "temperature must be a finite number, got inf"),
    (dict(top_p=float("nan")), "top_p must be a finite number"),
    (dict(cfg_min_p=float("-inf")), "cfg_min_p must be a finite number"),
    (dict(image_top_k=2.5), "image_top_k must be an integer, got 2.5"),
    (dict(max_new_tokens=True), "max_new_tokens must be an integer, got True"),
    (dict(text_top_k="10"), "text_top_k must be an integer, got '10'"),
])
def test_sampling_settings_refuse_non_finite_and_non_integer_values(kw, needle):
    from lumina_jax.sampling.processors import SamplingSettings

    with pytest.raises(ValueError) as e:
        SamplingSettings(**kw)
    assert needle in str(e.value)


@pytest.mark.parametrize("kw,needle", [
    (dict(guidance=float("nan")), "guidance must be a finite number"),
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(cfg_min_p=float("inf")), "cfg_min_p must be a finite number"),
    (dict(seed=2**32), "seed must be in [0, 4294967295], got 4294967296"),
    (dict(seed=-1), "got -1"),
    (dict(seed=1.5), "seed must be an integer, got 1.5"),
    (dict(seed=2**32 - 2, num_images=3), "seeds up to 4294967296 are needed but they must lie in [0, 4294967295]"),
    (dict(image_top_k=2.5), "image_top_k must be an integer, got 2.5"),
    (dict(text_top_k="10"), "text_top_k must be an integer, got '10'"),
    (dict(guidance="3"), "guidance must be a number, got '3'"),
    (dict(num_images=0), "num_images must be >= 1, got 0"),
    (dict(prompts=["a red circle " * 100]), "prompt 0 is"),
])
def test_generate_api_refuses_what_the_cli_refuses(demo_model, kw, needle):
    from lumina_jax.inference import InferenceError

    prompts = kw.pop("prompts", ["a red circle"])
    with pytest.raises(InferenceError) as e:
        demo_model.generate(prompts, max_new_tokens=4, progress=False, **kw)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.fixture(scope="module")
def demo_model():
    from lumina_jax.inference import DEFAULT_CHECKPOINT, Lumina

    return Lumina.load(DEFAULT_CHECKPOINT)


def test_overwrite_replaces_what_lumina_jax_wrote_and_nothing_else(tmp_path):
    hf = write_hf_model(tmp_path / "hf")
    out = tmp_path / "jax"
    assert convert_main(["chameleon", str(hf), str(out), "--no-progress"]) == 0
    (out / "stale.txt").write_text("from the first run\n")
    assert convert_main(["chameleon", str(hf), str(out), "--overwrite", "--no-progress"]) == 0
    assert (out / "lumina_jax_output.json").is_file() and not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "jax"]  # no temporary or old copy left
    vq = write_vqgan_checkpoint(tmp_path / "vq", tiny_vqgan_config())
    for _ in range(2):  # the second export replaces the first one's files (they carry the export's mark)
        assert convert_main(["vqgan-export", "--checkpoint", str(vq), "--out", str(tmp_path / "v.ckpt"),
                             "--yaml-out", str(tmp_path / "v.yaml"), "--overwrite"]) == 0
    assert (tmp_path / "v.yaml").read_text().startswith("# written by lumina-jax vqgan-export\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "jax", "v.ckpt", "v.yaml", "vq"]
