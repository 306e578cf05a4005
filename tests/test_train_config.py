"""Training configs: every shipped config loads, dotted overrides parse by field type, bad input gives one
clear line, train.py --help documents every flag."""
import subprocess
import sys

import pytest

from lumina_jax.training import config as config_lib
from test_train_helpers import REPO

CONFIGS = ["fpsft_7b_512", "fpsft_7b_768", "fpsft_7b_1024", "fpsft_34b_512", "omni_sft_7b", "tiny_cpu"]


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_load(name):
    cfg = config_lib.load_config(str(REPO / "configs" / f"{name}.py"))
    assert cfg.name == name
    assert config_lib.from_dict(cfg.to_dict()) == cfg  # round-trips through the JSON saved beside checkpoints
    if name != "tiny_cpu":
        o = cfg.optimizer
        assert (o.lr, o.min_lr, o.b1, o.b2, o.weight_decay, o.clip_grad_norm) == (2e-5, 2e-5, 0.9, 0.95, 0.1, 4.0)
        assert cfg.model.z_loss_weight == 1e-5 and not cfg.model.mask_image_logits
        assert cfg.model.param_dtype == "float32" and cfg.model.dtype == "bfloat16"
        assert cfg.checkpoint.init_from


def test_1024_stage_fits_a_1024px_image():
    cfg = config_lib.load_config(str(REPO / "configs" / "fpsft_7b_1024.py"))
    assert cfg.data.seq_len >= 4164 + 256  # the image's 4164 tokens plus a prompt
    assert cfg.model.max_position_embeddings == cfg.data.seq_len


def test_starting_point_option_only_on_first_stages():
    zero = {n: config_lib.load_config(str(REPO / "configs" / f"{n}.py")).checkpoint.zero_image_lm_head for n in CONFIGS}
    assert zero == {"fpsft_7b_512": True, "fpsft_34b_512": True, "fpsft_7b_768": False, "fpsft_7b_1024": False,
                    "omni_sft_7b": False, "tiny_cpu": False}


def test_overrides_parse_by_field_type():
    cfg = config_lib.load_config(str(REPO / "configs" / "tiny_cpu.py"), [
        "optimizer.lr=1e-4", "total_steps=2e3", "model.dropout=0.1", "checkpoint.async_save=false",
        "parallel.mesh=data=2,fsdp=2,tensor=2", "data.config_path=/x/y.yaml", "model.remat_policy=dots"])
    assert cfg.optimizer.lr == 1e-4 and cfg.total_steps == 2000 and isinstance(cfg.total_steps, int)
    assert cfg.model.dropout == 0.1 and cfg.checkpoint.async_save is False
    assert cfg.parallel.mesh == "data=2,fsdp=2,tensor=2" and cfg.data.config_path == "/x/y.yaml"
    assert cfg.model.remat_policy == "dots"


@pytest.mark.parametrize("override,message", [
    ("optimizer.lrr=1", "OptimizerConfig has no field 'lrr'"),
    ("optimizer=1", "'optimizer' is a section"),
    ("total_steps=abc", "total_steps=abc: expected int"),
    ("checkpoint.async_save=maybe", "expected a boolean"),
    ("lr", "expected key=value"),
    ("parallel.grad_accum_steps=3", "global_batch_size=8 is not a multiple of parallel.grad_accum_steps=3"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        config_lib.load_config(str(REPO / "configs" / "tiny_cpu.py"), [override])


def test_cli_help_and_errors():
    run = lambda *a: subprocess.run([sys.executable, str(REPO / "train.py"), *a], capture_output=True, text=True,
                                    cwd=str(REPO), timeout=120)
    out = run("--help")
    assert out.returncode == 0
    for flag in ("--config", "--print_config", "--max_steps", "--export_dir", "--export_hf_dir", "--export_dtype",
                 "--coordinator_address", "--num_processes", "--process_id", "--cpu_collectives"):
        assert flag in out.stdout
    bad = run("--config", str(REPO / "configs" / "tiny_cpu.py"), "optimizer.nope=1")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("train.py: error: override optimizer.nope")
    printed = run("--config", str(REPO / "configs" / "tiny_cpu.py"), "--print_config", "seed=7")
    assert printed.returncode == 0 and '"seed": 7' in printed.stdout


def test_overrides_are_validated_together_per_section():
    """Each section is rebuilt once with all its overrides: fields that must agree can change in any order."""
    path = str(REPO / "configs" / "demo_stage1.py")
    base = config_lib.load_config(path)
    assert (base.model.num_heads, base.model.num_kv_heads) == (5, 5)
    for order in (["model.num_kv_heads=2", "model.num_heads=2"], ["model.num_heads=2", "model.num_kv_heads=2"]):
        cfg = config_lib.load_config(path, order + ["model.head_dim=16", "model.hidden_size=32", "total_steps=3",
                                                    "optimizer.lr=1e-3", "model.num_heads=4"])
        assert (cfg.model.num_heads, cfg.model.num_kv_heads, cfg.model.head_dim) == (4, 2, 16)  # last wins
        assert cfg.total_steps == 3 and cfg.optimizer.lr == 1e-3 and cfg.model.num_layers == base.model.num_layers
    with pytest.raises(ValueError, match="num_heads=5 is not a multiple of num_kv_heads=2"):
        config_lib.load_config(path, ["model.num_kv_heads=2"])  # the final combination is still checked
