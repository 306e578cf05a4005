"""Export trained weights: to the inference checkpoint format (params/ + config.json, the scanned decoder
layout of docs/design.md) and on to Hugging Face safetensors through the conversion module's exporter.

    python -m lumina_jax.training.export RUN_DIR OUT_DIR [--step N] [--hf_dir HF_DIR] [--dtype bfloat16]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

import jax
from jax.experimental import multihost_utils

from lumina_jax import param_checkpoint
from lumina_jax.config import ChameleonConfig
from lumina_jax.convert import chameleon as convert_chameleon
from lumina_jax.models.chameleon import stack_layers
from lumina_jax.state import abstract_train_state
from lumina_jax.training import config as config_lib
from lumina_jax.training import train_step as ts
from lumina_jax.training import trainer
from lumina_jax.training.train_checkpoint import TrainCheckpointer

DTYPES = ("bfloat16", "float16", "float32")


def export_run_state(params: Any, model_config: ChameleonConfig, out_dir: str, *, hf_dir: str = "",
                     dtype: str = "bfloat16", source_dir: str = "", qk_norm_rows: str = "auto") -> None:
    """Writes `params` (sharded jax arrays, any mesh, any number of processes) to `out_dir`.

    All processes call this; each writes its own shards through Orbax, process 0 writes config.json (and
    hf_config.json copied from `source_dir`, the init checkpoint, when it has one so the HF export keeps
    the original config fields). With `hf_dir`, process 0 then converts `out_dir` to safetensors; its
    q/k-norm tensors keep the stored row count when the init checkpoint came from a Hugging Face/Lumina
    file (hf_config.json; an exact round trip) and are expanded to one row per head otherwise (the
    transformers layout), unless `qk_norm_rows` is "stored" or "heads".
    """
    if dtype not in DTYPES:
        raise ValueError(f"export dtype {dtype!r} is not one of {DTYPES}")
    if not out_dir:
        out_dir = os.path.join(os.path.dirname(hf_dir.rstrip("/")) or ".", Path(hf_dir).name + "_lumina_jax")
    out = Path(out_dir).absolute()
    if out.exists():
        raise FileExistsError(f"export directory already exists: {out}")
    if not model_config.scan_layers:
        params = stack_layers(params)
    cast = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(dtype), p))
    params = cast(params)
    param_checkpoint.save_params(out, params)
    if jax.process_index() == 0:
        config = model_config.replace(param_dtype=dtype, scan_layers=True, dropout=0.0)
        param_checkpoint.write_json(out, "config.json", config.to_dict())
        has_hf_config = bool(source_dir) and (Path(source_dir) / "hf_config.json").is_file()
        if has_hf_config:
            shutil.copyfile(Path(source_dir) / "hf_config.json", out / "hf_config.json")
        if hf_dir:
            rows = qk_norm_rows if qk_norm_rows != "auto" else ("stored" if has_hf_config else "heads")
            convert_chameleon.export(out, hf_dir, dtype=None, qk_norm_rows=rows, progress=True)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("lumina_jax_export_done")


def export_from_run(run_dir: str, out_dir: str, *, step: Optional[int] = None, hf_dir: str = "",
                    dtype: str = "bfloat16") -> int:
    """Exports the parameters of checkpoint `step` (default: newest) of the training run in `run_dir`."""
    ckpt = TrainCheckpointer(os.path.join(run_dir, "checkpoints"), save_interval_steps=1, max_to_keep=None,
                             async_save=False)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{run_dir}/checkpoints: no training checkpoint to export")
    cfg = config_lib.from_dict(ckpt.restore_config(step))
    # the run's state on every device of this one process, whatever mesh and hosts the run had
    cfg = config_lib.apply_overrides(cfg, ["parallel.mesh=fsdp=-1", "parallel.num_slices=1", "checkpoint.resume=false",
                                           f"output_dir={run_dir}", "parallel.num_processes=0",
                                           "parallel.coordinator_address="])
    model_cfg = trainer.resolve_model_config(cfg)
    ctx = ts.make_context(cfg, ts.make_mesh(cfg), model_cfg)
    state, _ = ckpt.restore(step, abstract_train_state(model_cfg, ctx.tx, ctx.mesh, ctx.rules))
    ckpt.close()
    export_run_state(state["params"], model_cfg, out_dir, hf_dir=hf_dir, dtype=dtype,
                     source_dir=cfg.checkpoint.init_from)
    return int(step)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Export the weights of a training run checkpoint to the inference "
                                            "checkpoint format (params/ + config.json) and optionally to Hugging "
                                            "Face safetensors.")
    p.add_argument("run_dir", help="the training run's output_dir (holds checkpoints/)")
    p.add_argument("out_dir", help="new inference checkpoint directory (params/ + config.json)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step to export (default: the newest)")
    p.add_argument("--hf_dir", default="", help="also write Hugging Face config.json + safetensors here")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="dtype of the exported weights")
    args = p.parse_args(argv)
    try:
        step = export_from_run(args.run_dir, args.out_dir, step=args.step, hf_dir=args.hf_dir, dtype=args.dtype)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"export: {e}", file=sys.stderr)
        return 2
    print(f"exported step {step} of {args.run_dir} to {args.out_dir}" + (f" and {args.hf_dir}" if args.hf_dir else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
