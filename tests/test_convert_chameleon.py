"""Conversion of Hugging Face Chameleon / Lumina safetensors: layout, round trip, bad input, config mapping."""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict
from safetensors import safe_open
from safetensors.numpy import save_file as np_save_file
from safetensors.torch import load_file, save_file

from lumina_jax import param_checkpoint
from lumina_jax.config import ChameleonConfig
from lumina_jax.convert import chameleon as conv
from lumina_jax.convert import hf_config as hfc
from lumina_jax.convert import safetensors_io as sio
from lumina_jax.convert.__main__ import main as convert_main
from lumina_jax.convert.errors import ConversionError

transformers = pytest.importorskip("transformers")

VOCAB = 512
REPO = Path(__file__).resolve().parents[1]


def vocabulary_map(start=4, end=260):
    names = {f"<tok{i}>": i for i in range(VOCAB) if not start <= i < end}
    names.update({"IMGIMG" + "".join("ABCDEFGHIJ"[int(c)] for c in str(i - start)) + "Z": i for i in range(start, end)})
    return names


def hf_config(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocabulary_map=vocabulary_map(),
                vq_config=dict(base_channels=32, channel_multiplier=[1, 2], num_embeddings=64, embed_dim=32,
                               latent_channels=32, resolution=32))
    base.update(kw)
    return transformers.ChameleonConfig(**base)


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    model = transformers.ChameleonForConditionalGeneration(hf_config()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # make norms distinguishable from their init values
                p.add_(0.1 * torch.randn_like(p))
    return model


def save(model, directory, dtype=torch.float32, **kw):
    """save_pretrained in `dtype` (a copy of the model is cast; the shared fixture stays fp32)."""
    (copy.deepcopy(model).to(dtype) if dtype != torch.float32 else model).save_pretrained(directory, **kw)
    return directory


def run_cli(*argv) -> int:
    return convert_main([*map(str, argv), "--no-progress"])


def decoder_tensors(directory) -> dict[str, torch.Tensor]:
    """Every non-VQGAN tensor of a HF directory, read with the safetensors library (independent reader)."""
    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys() if not k.startswith("model.vqmodel.")})
    return out


def assert_bit_identical(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].contiguous().view(torch.uint8).equal(b[k].contiguous().view(torch.uint8)), k


# ------------------------------------------------------------------------------------------ layout

def test_layout_matches_model_and_transforms(tmp_path, hf_model):
    src = save(hf_model, tmp_path / "hf")
    assert run_cli("chameleon", src, tmp_path / "ck") == 0
    cfg = ChameleonConfig.from_dict(param_checkpoint.read_json(tmp_path / "ck", "config.json"))
    params = param_checkpoint.restore_params(tmp_path / "ck")
    flat = flatten_dict(params, sep="/")
    assert {k: v.shape for k, v in flat.items()} == conv.model_leaf_shapes(cfg)  # the decoder's eval_shape
    sd = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    N, K, H, D = 4, 2, 16, 64  # query heads, kv heads, head dim, model dim
    q = sd["model.layers.1.self_attn.q_proj.weight"]  # (N*H, D): row n*H+j is head n, dim j
    np.testing.assert_array_equal(flat["layers/self_attn/q_proj/kernel"][1][:, 2, 5], q[2 * H + 5])
    k = sd["model.layers.0.self_attn.k_proj.weight"]
    np.testing.assert_array_equal(flat["layers/self_attn/k_proj/kernel"][0][:, 1, 3], k[H + 3])
    o = sd["model.layers.0.self_attn.o_proj.weight"]  # (D, N*H)
    np.testing.assert_array_equal(flat["layers/self_attn/o_proj/kernel"][0][3, 7], o[:, 3 * H + 7])
    np.testing.assert_array_equal(flat["layers/mlp/down_proj/kernel"][1], sd["model.layers.1.mlp.down_proj.weight"].T)
    np.testing.assert_array_equal(flat["lm_head/kernel"], sd["lm_head.weight"].T)
    np.testing.assert_array_equal(flat["embed_tokens/embedding"], sd["model.embed_tokens.weight"])
    np.testing.assert_array_equal(flat["layers/self_attn/k_norm/bias"][1], sd["model.layers.1.self_attn.k_norm.bias"])
    assert flat["layers/self_attn/k_norm/scale"].shape == (2, K, H) and flat["layers/self_attn/q_proj/kernel"].shape == (2, D, N, H)
    meta = param_checkpoint.read_json(tmp_path / "ck", "conversion.json")
    n_vq = sum(k.startswith("model.vqmodel.") for k in sd)
    assert n_vq > 0 and meta["skipped_key_prefixes"] == {"model.vqmodel.": n_vq}
    assert meta["tensors_converted"] == 3 + 13 * 2 and (meta["q_norm_rows"], meta["k_norm_rows"]) == (4, 2)
    assert (tmp_path / "ck" / "hf_config.json").read_bytes() == (src / "config.json").read_bytes()


@pytest.mark.parametrize("rows", [(1, 1), (2, 1), (4, 2)])
def test_key_table_shapes_equal_decoder_eval_shape(rows):
    cfg = ChameleonConfig(vocab_size=96, hidden_size=32, intermediate_size=80, num_layers=3, num_heads=4,
                          num_kv_heads=2, head_dim=8, q_norm_rows=rows[0], k_norm_rows=rows[1],
                          image_token_start=4, image_token_end=20, swin_norm=rows[0] == 2)
    assert conv.leaf_shapes(cfg) == conv.model_leaf_shapes(cfg)


# -------------------------------------------------------------------------------------- round trip

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_bit_identical_sharded(tmp_path, hf_model, dtype):
    """Sharded source (index json) -> Orbax -> sharded export: same keys, dtypes and bytes; and the export
    loads in transformers with identical logits."""
    src = save(hf_model, tmp_path / "hf", dtype, max_shard_size="200KB")
    assert (src / sio.INDEX_NAME).is_file()
    assert run_cli("chameleon", src, tmp_path / "ck") == 0
    params = param_checkpoint.restore_params(tmp_path / "ck")
    expected = np.dtype(ml_dtypes.bfloat16 if dtype == torch.bfloat16 else np.float32)
    assert {v.dtype for v in jax.tree.leaves(params)} == {expected}
    assert run_cli("chameleon-export", tmp_path / "ck", tmp_path / "back", "--max-shard-size", "100KB") == 0
    back = tmp_path / "back"
    index = json.loads((back / sio.INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((back / s).stat().st_size <= 100_000 or
                                   len([k for k, v in index["weight_map"].items() if v == s]) == 1 for s in shards)
    assert_bit_identical(decoder_tensors(src), decoder_tensors(back))
    assert json.loads((back / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    # transformers loads the export (the VQGAN is absent and re-initialised) with the same decoder outputs
    # as the source directory.
    reloaded = transformers.ChameleonForConditionalGeneration.from_pretrained(back, dtype=torch.float32).eval()
    source = transformers.ChameleonForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, source(input_ids=ids).logits)


@pytest.mark.parametrize("rows", [1, 2])
def test_round_trip_lumina_rows_and_heads_export(tmp_path, hf_model, rows):
    """Lumina q/k-norm layout (1 or 2 rows for 4 q heads / 2 kv heads) round-trips bit-identically, and
    --qk-norm-rows heads writes the transformers layout (rows repeated per head)."""
    src = save(hf_model, tmp_path / "hf")
    tensors = load_file(src / "model.safetensors")
    for key in [k for k in tensors if "_norm." in k]:
        tensors[key] = tensors[key][:rows].clone()
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    assert run_cli("chameleon", src, tmp_path / "ck", "--dtype", "bfloat16") == 0
    cfg = ChameleonConfig.from_dict(param_checkpoint.read_json(tmp_path / "ck", "config.json"))
    assert (cfg.q_norm_rows, cfg.k_norm_rows, cfg.param_dtype) == (rows, rows, "bfloat16")
    # bf16 storage of an fp32 source: exporting back as float32 is not the source; as bfloat16 it is exact.
    assert run_cli("chameleon-export", tmp_path / "ck", tmp_path / "back", "--dtype", "float32") == 0
    got = decoder_tensors(tmp_path / "back")
    ref = decoder_tensors(src)
    assert got["model.layers.0.self_attn.q_norm.weight"].shape == (rows, 16)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k].to(torch.bfloat16).float(), rtol=0, atol=0)
    assert run_cli("chameleon-export", tmp_path / "ck", tmp_path / "heads", "--qk-norm-rows", "heads") == 0
    heads = decoder_tensors(tmp_path / "heads")
    q = ref["model.layers.1.self_attn.q_norm.bias"].to(torch.bfloat16)
    assert torch.equal(heads["model.layers.1.self_attn.q_norm.bias"], q.repeat_interleave(4 // rows, dim=0))
    assert heads["model.layers.1.self_attn.k_norm.weight"].shape == (2, 16)


def test_export_without_hf_config_loads_in_transformers(tmp_path, hf_model):
    """A checkpoint without hf_config.json (e.g. trained from scratch) exports a config transformers loads."""
    src = save(hf_model, tmp_path / "hf")
    assert run_cli("chameleon", src, tmp_path / "ck") == 0
    (tmp_path / "ck" / "hf_config.json").unlink()
    assert run_cli("chameleon-export", tmp_path / "ck", tmp_path / "back") == 0
    reloaded = transformers.ChameleonForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, hf_model(input_ids=ids).logits, rtol=0, atol=0)


# --------------------------------------------------------------------------------------- bad input

def _expect_failure(capsys, tmp_path, argv, *needles):
    out = tmp_path / "out"
    capsys.readouterr()  # drop save_pretrained's progress output
    assert run_cli(*argv, out) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for n in needles:
        assert n in err, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]  # no temporary left behind
    return err


def test_missing_shard(tmp_path, hf_model, capsys):
    src = save(hf_model, tmp_path / "hf", max_shard_size="200KB")
    victim = sorted(src.glob("model-*.safetensors"))[1]
    victim.unlink()
    _expect_failure(capsys, tmp_path, ["chameleon", src], "missing", victim.name)


def test_truncated_file(tmp_path, hf_model, capsys):
    src = save(hf_model, tmp_path / "hf")
    path = src / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    _expect_failure(capsys, tmp_path, ["chameleon", src], "truncated", "model.safetensors")


def test_wrong_shape_and_unknown_key_are_all_named(tmp_path, hf_model, capsys):
    src = save(hf_model, tmp_path / "hf")
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:100].clone()
    tensors["model.layers.0.self_attn.rotary.inv_freq"] = torch.ones(8)
    del tensors["model.norm.weight"]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    _expect_failure(capsys, tmp_path, ["chameleon", src], "wrong shapes", "model.layers.1.mlp.up_proj.weight [100, 64]",
                    "(expected [176, 64])", "unexpected keys", "model.layers.0.self_attn.rotary.inv_freq",
                    "missing keys", "model.norm.weight")


def test_unknown_key_alone(tmp_path, hf_model, capsys):
    src = save(hf_model, tmp_path / "hf")
    tensors = load_file(src / "model.safetensors")
    tensors["model.extra.weight"] = torch.zeros(3)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    _expect_failure(capsys, tmp_path, ["chameleon", src], "unexpected keys [model.extra.weight]")


@pytest.mark.parametrize("field,value,needle", [
    ("architectures", ["LlamaForCausalLM"], "architectures=['LlamaForCausalLM'] is not supported"),
    ("model_type", "llama", "model_type='llama' is not supported"),
    ("hidden_act", "gelu", "hidden_act='gelu'"),
    ("rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}, "rope_type='linear'"),
])
def test_unsupported_config(tmp_path, hf_model, capsys, field, value, needle):
    src = save(hf_model, tmp_path / "hf")
    cfg = json.loads((src / "config.json").read_text())
    cfg[field] = value
    (src / "config.json").write_text(json.dumps(cfg))
    _expect_failure(capsys, tmp_path, ["chameleon", src], "config.json", needle)


def test_cli_subprocess_exit_status_and_existing_output(tmp_path, hf_model):
    """The real entry point: a bad directory exits non-zero with one line; an existing OUT is refused."""
    env_cmd = [sys.executable, "-m", "lumina_jax.convert", "chameleon"]
    r = subprocess.run([*env_cmd, str(tmp_path / "nope"), str(tmp_path / "out")], capture_output=True, text=True,
                       cwd=REPO, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "nope" in r.stderr.strip().splitlines()[-1] and not (tmp_path / "out").exists()
    src = save(hf_model, tmp_path / "hf")
    (tmp_path / "out").mkdir()
    with pytest.raises(ConversionError, match="already exists"):
        conv.convert(src, tmp_path / "out", progress=False)


def test_help_documents_every_flag():
    for command in ("chameleon", "chameleon-export"):
        r = subprocess.run([sys.executable, "-m", "lumina_jax.convert", command, "--help"], capture_output=True,
                           text=True, cwd=REPO, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
        assert r.returncode == 0
        for flag in ("--dtype", "--overwrite", "--no-progress"):
            assert flag in r.stdout
    assert "--max-shard-size" in r.stdout and "--qk-norm-rows" in r.stdout and "--hf-config" in r.stdout


# ------------------------------------------------------------------------------------ config mapping

def _hf_dict(**kw):
    d = {"model_type": "chameleon", "architectures": ["ChameleonForConditionalGeneration"], "vocab_size": 9000,
         "hidden_size": 256, "num_attention_heads": 8, "num_key_value_heads": 2, "num_hidden_layers": 3,
         "intermediate_size": 512, "rope_parameters": {"rope_type": "default", "rope_theta": 20000.0}}
    d.update(kw)
    return d


def test_config_mapping_fields_and_defaults():
    cfg = hfc.chameleon_config_from_hf(_hf_dict(), q_norm_rows=8, k_norm_rows=2)
    assert (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_layers) == (256, 8, 2, 32, 3)
    assert (cfg.rope_theta, cfg.rms_norm_eps, cfg.swin_norm, cfg.max_position_embeddings) == (20000.0, 1e-5, False, 4096)
    assert (cfg.image_token_start, cfg.image_token_end, cfg.mask_image_logits) == (4, 8196, True)
    old = hfc.chameleon_config_from_hf(_hf_dict(rope_parameters=None, rope_theta=500.0, mask_image_logits=False))
    assert old.rope_theta == 500.0 and old.mask_image_logits is False
    vm = {"<s>": 0, **{f"IMGIMG{chr(65 + i)}Z": 10 + i for i in range(5)}}
    assert hfc.image_token_range({"vocabulary_map": vm}, 100, "c") == (10, 15)


@pytest.mark.parametrize("kw,needle", [
    (dict(tie_word_embeddings=True), "tie_word_embeddings"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(rope_parameters=None, rope_scaling={"type": "linear", "factor": 2}), "rope_scaling"),
    (dict(num_key_value_heads=3), "num_key_value_heads=3"),
    (dict(head_dim=64), "head_dim=64"),
    (dict(attention_dropout=0.1), "attention_dropout"),
    (dict(vocabulary_map={"IMGIMGAZ": 4, "IMGIMGCZ": 6}), "contiguous"),
    (dict(vocab_size=1000), "vocabulary_map is missing"),
])
def test_config_rejections_name_the_field(kw, needle):
    with pytest.raises(ConversionError, match=needle):
        hfc.chameleon_config_from_hf(_hf_dict(**kw), source="x/config.json")


def test_hf_config_from_chameleon_round_trips():
    cfg = ChameleonConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=8, q_norm_rows=4, k_norm_rows=2, image_token_start=4,
                          image_token_end=260, swin_norm=True, rope_theta=123.0, mask_image_logits=False)
    hf = hfc.hf_config_from_chameleon(cfg, "float32")
    back = hfc.chameleon_config_from_hf(hf, q_norm_rows=4, k_norm_rows=2, param_dtype=cfg.param_dtype, dtype=cfg.dtype)
    assert back == cfg
    hfc.check_hf_config_matches(hf, cfg, "x")
    with pytest.raises(ConversionError, match="num_hidden_layers=2 .checkpoint: 3."):
        hfc.check_hf_config_matches(hf, cfg.replace(num_layers=3), "x")


# --------------------------------------------------------------------------------------- safetensors

def test_safetensors_reader_writer_against_library(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"a": rng.standard_normal((3, 5)).astype(np.float32),
              "b": rng.standard_normal((7,)).astype(ml_dtypes.bfloat16),
              "c": rng.standard_normal((2, 2, 2)).astype(np.float16)}
    np_save_file(arrays, tmp_path / "lib.safetensors")
    _, infos = sio.read_header(tmp_path / "lib.safetensors")
    for k, v in arrays.items():
        got = sio.read_tensor(infos[k])
        assert got.dtype == v.dtype and got.tobytes() == v.tobytes()
    specs = [sio.TensorSpec(k, v.dtype, v.shape, (lambda v=v: v)) for k, v in arrays.items()]
    sio.write_file(tmp_path / "ours.safetensors", specs, {"format": "pt"})
    with safe_open(tmp_path / "ours.safetensors", "numpy") as f:
        assert f.metadata() == {"format": "pt"}
        for k, v in arrays.items():
            assert f.get_tensor(k).tobytes() == v.tobytes() and f.get_tensor(k).dtype == v.dtype
    assert sio.parse_size("5GB") == 5 * 10**9 and sio.parse_size("2MiB") == 2 * 2**20 and sio.parse_size("100") == 100
    with pytest.raises(ConversionError, match="max-shard-size"):
        sio.parse_size("lots")
    (tmp_path / "junk.safetensors").write_bytes(b"\x05")
    with pytest.raises(ConversionError, match="truncated"):
        sio.read_header(tmp_path / "junk.safetensors")


# ------------------------------------------------------------------------------------------ memory

_MEASURE = """
import sys
from lumina_jax.convert import chameleon
def hwm():
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
chameleon.model_leaf_shapes(chameleon.ChameleonConfig())  # warm jax/flax before the baseline
before = hwm()
chameleon.convert(sys.argv[1], sys.argv[2], progress=False)
print(hwm() - before)
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc to read peak RSS")
def test_peak_memory_is_one_model_copy(tmp_path):
    """Streaming conversion: peak RSS grows by about one model copy plus one tensor, not two copies."""
    D, L, V, Fdim, Hh = 1024, 4, 16384, 2816, 8
    rng = np.random.default_rng(0)

    def r(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    t = {"model.embed_tokens.weight": r(V, D), "lm_head.weight": r(V, D), "model.norm.weight": r(D)}
    for i in range(L):
        p = f"model.layers.{i}."
        t.update({p + f"self_attn.{n}_proj.weight": r(D, D) for n in "qkvo"})
        t.update({p + f"self_attn.{n}_norm.{w}": r(1, D // Hh) for n in "qk" for w in ("weight", "bias")})
        t.update({p + "mlp.gate_proj.weight": r(Fdim, D), p + "mlp.up_proj.weight": r(Fdim, D),
                  p + "mlp.down_proj.weight": r(D, Fdim), p + "input_layernorm.weight": r(D),
                  p + "post_attention_layernorm.weight": r(D)})
    src = tmp_path / "hf"
    src.mkdir()
    np_save_file(t, src / "model.safetensors", {"format": "pt"})
    model_bytes = sum(v.nbytes for v in t.values())
    del t
    (src / "config.json").write_text(json.dumps({
        "model_type": "chameleon", "architectures": ["ChameleonXLLMXForConditionalGeneration"], "vocab_size": V,
        "hidden_size": D, "intermediate_size": Fdim, "num_hidden_layers": L, "num_attention_heads": Hh,
        "num_key_value_heads": Hh, "rope_theta": 10000.0}))
    r_ = subprocess.run([sys.executable, "-c", _MEASURE, str(src), str(tmp_path / "ck")], capture_output=True,
                        text=True, cwd=REPO, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert r_.returncode == 0, r_.stderr[-2000:]
    growth = int(r_.stdout.strip().splitlines()[-1])
    # one copy (the stacked arrays) + one tensor being read (lm_head, 18% here) + small change; a second
    # copy (e.g. Orbax's defensive host copy, or keeping the source tensors) would be >= 2x.
    assert growth < 1.5 * model_bytes, (growth / model_bytes, model_bytes)
    assert param_checkpoint.restore_params(tmp_path / "ck")["lm_head"]["kernel"].shape == (D, V)
    shutil.rmtree(src)  # 0.7 GB of files; pytest keeps the temporary directories of recent runs
    shutil.rmtree(tmp_path / "ck")
