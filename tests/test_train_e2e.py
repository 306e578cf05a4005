"""train.py end to end on a small pre-tokenized set: the loss falls, TensorBoard and metrics are written,
weights export to the inference format and to safetensors that transformers loads, a converted checkpoint
initialises a run (with the image columns of lm_head zeroed), and a NaN loss stops the run cleanly."""
import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lumina_jax import param_checkpoint
from lumina_jax.config import ChameleonConfig
from lumina_jax.data.records import write_dataset
from lumina_jax.models.chameleon import Chameleon
from lumina_jax.training import config as config_lib
from lumina_jax.training import export, trainer
from test_train_helpers import REPO, TINY, checkpoint_steps, read_losses

transformers = pytest.importorskip("transformers")

SEQ = 64


def _train_main():
    spec = importlib.util.spec_from_file_location("train_cli", REPO / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def data_yaml(tmp_path_factory):
    """Conversations whose answers are arithmetic progressions of token ids (prompt tokens unsupervised)."""
    d = tmp_path_factory.mktemp("e2e_data")
    rng = np.random.default_rng(0)
    items = []
    for _ in range(300):
        n = int(rng.integers(12, 40))
        start, step = int(rng.integers(0, 512)), int(rng.integers(1, 4))
        tokens = ((start + step * np.arange(n)) % 512).astype(np.int32)
        labels = tokens.copy()
        labels[: int(rng.integers(1, 4))] = -100
        items.append((tokens, labels))
    write_dataset(str(d / "set"), items, records_per_shard=100)
    (d / "data.yaml").write_text("META:\n  - path: set\n")
    return str(d / "data.yaml")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_yaml):
    out = tmp_path_factory.mktemp("e2e_run")
    argv = ["--config", TINY, f"output_dir={out / 'run'}", "total_steps=200", f"data.config_path={data_yaml}",
            f"data.seq_len={SEQ}", "log.progress_bar=false",
            "--export_dir", str(out / "exported"), "--export_hf_dir", str(out / "hf"), "--export_dtype", "float32"]
    assert _train_main()(argv) == 0
    return out


@pytest.mark.slow
def test_loss_falls_and_metrics_are_written(trained):
    losses = read_losses(trained / "run")
    assert sorted(losses) == list(range(1, 201))
    first, last = np.mean([losses[s] for s in range(1, 11)]), np.mean([losses[s] for s in range(191, 201)])
    assert last < 0.4 * first, (first, last)
    rec = json.loads((trained / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("loss", "ce", "z_loss", "grad_norm", "lr", "tokens_per_s", "mfu"):
        assert key in rec and np.isfinite(rec[key]), key
    assert rec["tokens_per_s"] > 0 and rec["z_loss"] > 0
    assert list((trained / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert checkpoint_steps(trained / "run") == [150, 200]


@pytest.mark.slow
def test_exports_match_the_final_checkpoint_and_load_in_transformers(trained, tmp_path):
    # the exported inference checkpoint holds the final training weights
    assert export.export_from_run(str(trained / "run"), str(tmp_path / "again"), dtype="float32") == 200
    exported = param_checkpoint.restore_params(trained / "exported")
    again = param_checkpoint.restore_params(tmp_path / "again")
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    cfg = ChameleonConfig.from_dict(param_checkpoint.read_json(trained / "exported", "config.json"))
    assert cfg.scan_layers and cfg.dropout == 0.0 and cfg.param_dtype == "float32"

    # transformers reads the safetensors export and computes the same logits (text columns; HF masks images)
    hf = transformers.ChameleonForConditionalGeneration.from_pretrained(trained / "hf", dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16)).astype(np.int32)
    ours = np.asarray(Chameleon(cfg.replace(dtype="float32")).apply({"params": exported}, jnp.asarray(ids)))
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    text = np.r_[0:cfg.image_token_start, cfg.image_token_end:cfg.vocab_size]
    np.testing.assert_allclose(ours[..., text], theirs[..., text], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_init_from_converted_checkpoint_zeroes_image_columns(trained, tmp_path):
    cfg = config_lib.load_config(TINY, [f"output_dir={tmp_path / 'ft'}", f"checkpoint.init_from={trained / 'exported'}",
                                        "checkpoint.zero_image_lm_head=true", "model.dropout=0.05"])
    run = trainer.setup(cfg)
    run.checkpointer.close()
    assert run.start_step == 0 and run.ctx.model_config.dropout == 0.05
    source = param_checkpoint.restore_params(trained / "exported")
    params = jax.device_get(run.state["params"])
    lo, hi = cfg.model.image_token_start, cfg.model.image_token_end
    kernel = params["lm_head"]["kernel"]
    assert np.all(kernel[:, lo:hi] == 0)
    np.testing.assert_array_equal(kernel[:, hi:], np.asarray(source["lm_head"]["kernel"])[:, hi:])
    np.testing.assert_array_equal(params["layers"]["mlp"]["up_proj"]["kernel"],
                                  np.asarray(source["layers"]["mlp"]["up_proj"]["kernel"]))


def test_nan_loss_stops_with_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "nan"
    cfg = config_lib.load_config(TINY, [f"output_dir={out}", "total_steps=10", "optimizer.warmup_steps=0",
                                        "optimizer.lr=1e30", "optimizer.clip_grad_norm=0",
                                        "checkpoint.save_interval_steps=1", "data.seq_len=32",
                                        "log.progress_bar=false", "log.tensorboard=false"])
    with pytest.raises(trainer.NonFiniteLossError, match=r"step 2: .*not finite.*last good checkpoint: step 1"):
        trainer.train(cfg)
    assert checkpoint_steps(out) == [1]
    assert max(read_losses(out)) == 1
