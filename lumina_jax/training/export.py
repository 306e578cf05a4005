"""Export trained weights: to the inference checkpoint format (params/ + config.json, the scanned decoder
layout of docs/design.md) and on to Hugging Face safetensors through the conversion module's exporter.

    python -m lumina_jax.training.export RUN_DIR OUT_DIR [--step N] [--hf_dir HF_DIR] [--dtype bfloat16]

Parameters holding NaN or inf, or values the export dtype cannot hold, are refused. Both outputs are
written under temporary names and renamed when complete, and never replace an existing directory, so a
failed export leaves nothing behind.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from lumina_jax import param_checkpoint
from lumina_jax.config import ChameleonConfig
from lumina_jax.convert import chameleon as convert_chameleon
from lumina_jax.convert.errors import ConversionError
from lumina_jax.models.chameleon import stack_layers
from lumina_jax.state import abstract_train_state, nonfinite_leaves
from lumina_jax.training import config as config_lib
from lumina_jax.training import train_step as ts
from lumina_jax.training import trainer
from lumina_jax.training.train_checkpoint import TrainCheckpointer, UnreadableCheckpointError, innermost_line
from lumina_jax.validation import int_flag

DTYPES = ("bfloat16", "float16", "float32")


def check_export_dirs(out_dir: str, hf_dir: str = "", inputs=()) -> tuple[Path, Optional[Path]]:
    """(inference checkpoint dir, HF dir or None): both new (an export never replaces a directory), outside
    `inputs` and apart from each other; checked before any work (train.py calls it before training). An empty
    `out_dir` becomes `<hf_dir>_lumina_jax` beside it."""
    if not out_dir and not hf_dir:
        raise ValueError("no export directory given")
    if not out_dir:
        out_dir = os.path.join(os.path.dirname(hf_dir.rstrip("/")) or ".", Path(hf_dir).name + "_lumina_jax")
    out = param_checkpoint.check_output_dir(out_dir, inputs=inputs)
    hf = param_checkpoint.check_output_dir(hf_dir, inputs=[*inputs, out]) if hf_dir else None
    return out, hf


def check_finite(params: Any, what: str) -> None:
    """Raises ValueError naming the arrays of `params` that hold NaN or inf."""
    bad = nonfinite_leaves(params)
    if bad:
        raise ValueError(f"{what}: {len(bad)} arrays hold NaN or inf {param_checkpoint.one_line_list(bad, 4)}; "
                         "refusing to export them")


@contextlib.contextmanager
def _output_directory(out: Path) -> Iterator[Path]:
    """`param_checkpoint.atomic_directory(out)` for every process: process 0 makes the temporary directory
    and renames it at the end, the others learn its name and write their shards into it."""
    primary, several = jax.process_index() == 0, jax.process_count() > 1
    with param_checkpoint.atomic_directory(out) if primary else contextlib.nullcontext() as tmp:
        if several:
            name = (tmp.name if primary else "").encode().ljust(256, b"\0")
            name = np.asarray(multihost_utils.broadcast_one_to_all(np.frombuffer(name, np.uint8)), np.uint8)
            tmp = out.parent / bytes(name).rstrip(b"\0").decode()
        yield tmp
        if several:
            multihost_utils.sync_global_devices("lumina_jax_export_written")


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
    out, hf = check_export_dirs(out_dir, hf_dir, inputs=[source_dir or None])
    check_finite(params, "the parameters to export")
    if not model_config.scan_layers:
        params = stack_layers(params)
    cast = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(dtype), p))
    params = cast(params)
    check_finite(params, f"the parameters cast to {dtype} (values beyond its range; export as float32)")
    with _output_directory(out) as tmp:
        param_checkpoint.save_params(tmp, params)
        if jax.process_index() == 0:
            config = model_config.replace(param_dtype=dtype, scan_layers=True, dropout=0.0)
            param_checkpoint.write_json(tmp, "config.json", config.to_dict())
            has_hf_config = bool(source_dir) and (Path(source_dir) / "hf_config.json").is_file()
            if has_hf_config:
                shutil.copyfile(Path(source_dir) / "hf_config.json", tmp / "hf_config.json")
            if hf is not None:  # from the complete temporary directory: a failure here leaves neither
                rows = qk_norm_rows if qk_norm_rows != "auto" else ("stored" if has_hf_config else "heads")
                convert_chameleon.export(tmp, hf, dtype=None, qk_norm_rows=rows, progress=True)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("lumina_jax_export_done")


def export_from_run(run_dir: str, out_dir: str, *, step: Optional[int] = None, hf_dir: str = "",
                    dtype: str = "bfloat16") -> int:
    """Exports the parameters of checkpoint `step` (default: newest) of the training run in `run_dir`."""
    check_export_dirs(out_dir, hf_dir, inputs=[run_dir])
    ckpt = TrainCheckpointer(os.path.join(run_dir, "checkpoints"), save_interval_steps=1, max_to_keep=None,
                             async_save=False)
    steps = ckpt.all_steps()
    if not steps:
        raise FileNotFoundError(f"{run_dir}/checkpoints: no training checkpoint to export")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise ValueError(f"{run_dir}/checkpoints: no checkpoint of step {step}; there are {steps}")
    try:
        state, model_cfg, init_from = _restore_run_state(ckpt, step, run_dir)
    finally:
        ckpt.close()
    bad = nonfinite_leaves(ts.checked_state(state))
    if bad:  # saved by a version that did not check, or damaged on disk: not a state to publish
        raise ValueError(f"checkpoint step {step} in {ckpt.directory}: {len(bad)} arrays of its parameters and "
                         f"optimizer state hold NaN or inf {param_checkpoint.one_line_list(bad, 4)}; refusing to "
                         f"export it (choose an earlier finite one with --step; there are {steps})")
    export_run_state(state["params"], model_cfg, out_dir, hf_dir=hf_dir, dtype=dtype, source_dir=init_from)
    return int(step)


def _restore_run_state(ckpt: TrainCheckpointer, step: int, run_dir: str) -> tuple[Any, ChameleonConfig, str]:
    """(train state, model config, the run's init_from) of checkpoint `step`, on this process's devices."""
    try:
        saved = ckpt.restore_config(step)
    except Exception as e:  # noqa: BLE001 - Orbax and JSON errors alike
        raise UnreadableCheckpointError(step, ckpt.directory, f"config: {innermost_line(e)}") from e
    cfg = config_lib.from_dict(saved)
    # the run's state on every device of this one process, whatever mesh and hosts the run had
    cfg = config_lib.apply_overrides(cfg, ["parallel.mesh=fsdp=-1", "parallel.num_slices=1", "checkpoint.resume=false",
                                           f"output_dir={run_dir}", "parallel.num_processes=0",
                                           "parallel.coordinator_address="])
    model_cfg = trainer.resolve_model_config(cfg)
    ctx = ts.make_context(cfg, ts.make_mesh(cfg), model_cfg)
    state, _ = ckpt.restore(step, abstract_train_state(model_cfg, ctx.tx, ctx.mesh, ctx.rules))
    return state, model_cfg, cfg.checkpoint.init_from


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Export the weights of a training run checkpoint to the inference "
                                            "checkpoint format (params/ + config.json) and optionally to Hugging "
                                            "Face safetensors.")
    p.add_argument("run_dir", help="the training run's output_dir (holds checkpoints/)")
    p.add_argument("out_dir", help="new inference checkpoint directory (params/ + config.json)")
    p.add_argument("--step", type=int_flag(0), default=None, help="checkpoint step to export (default: the newest)")
    p.add_argument("--hf_dir", default="", help="also write Hugging Face config.json + safetensors here")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="dtype of the exported weights")
    args = p.parse_args(argv)
    try:
        step = export_from_run(args.run_dir, args.out_dir, step=args.step, hf_dir=args.hf_dir, dtype=args.dtype)
    except (OSError, ValueError, param_checkpoint.CheckpointError, ConversionError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    print(f"exported step {step} of {args.run_dir} to {args.out_dir}" + (f" and {args.hf_dir}" if args.hf_dir else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
