"""python -m lumina_jax.aot: compile the train step or the generation loop for a named TPU topology here.

    python -m lumina_jax.aot --topology v5p:4x4x4 --slices 2 --config configs/fpsft_7b_512.py --mode train \
        parallel.grad_accum_steps=8 --per-device-batch 8
    python -m lumina_jax.aot --topology v5e:2x4 --config configs/fpsft_7b_768.py --mode generate \
        parallel.mesh=tensor=-1 generate.batch_size=4

Exit status: 0 fits, 3 does not fit (the report names the largest buffers), 2 bad arguments.
"""
from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only TPU devices come from libtpu; run nothing on a TPU
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from lumina_jax import param_checkpoint  # noqa: E402
from lumina_jax.aot.programs import GenerateSpec, lower_generate, lower_train  # noqa: E402
from lumina_jax.aot.report import compile_and_report, format_report  # noqa: E402
from lumina_jax.aot.topology import build_mesh, parse_topology, topology_devices  # noqa: E402
from lumina_jax.models.attention_ops import resolve_impl  # noqa: E402
from lumina_jax.training.config import apply_override, load_config  # noqa: E402
from lumina_jax.validation import float_flag, int_flag  # noqa: E402

EXIT_DOES_NOT_FIT = 3
REPORT_MARK = "written_by_lumina_jax_aot"  # in every --json report: what --overwrite may replace


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lumina_jax.aot",
        description="Ahead-of-time compilation for a named TPU topology on this (CPU-only) host: builds the "
                    "mesh of the config on the topology's devices, compiles the real train step or generation "
                    "loop and reports memory per device, FLOPs and whether it fits.",
        epilog="Overrides are dotted key=value pairs of the TrainConfig (e.g. parallel.mesh=fsdp=-1,tensor=4 "
               "parallel.grad_accum_steps=8 model.remat_policy=full data.seq_len=4096) and, for --mode "
               "generate, of the generation workload (generate.batch_size, generate.image_size, "
               "generate.prompt_len, generate.cfg_scale, generate.image_top_k, generate.text_top_k, "
               "generate.param_dtype). Exit status: 0 fits, 3 does not fit, 2 bad arguments.")
    p.add_argument("--topology", required=True,
                   help="TPU slice as <generation>:<shape>, generation one of v4, v5e, v5p, v6e; e.g. v5e:2x2, v5p:4x4x4")
    p.add_argument("--slices", type=int_flag(1, 4096), default=None,
                   help="number of such slices joined over the data-centre network; the mesh's data axis spans "
                        "them. Same as the override parallel.num_slices=N, which train.py reads (default: the "
                        "config's parallel.num_slices)")
    p.add_argument("--config", required=True, help="experiment file configs/<name>.py defining get_config()")
    p.add_argument("--mode", choices=("train", "generate"), default="train",
                   help="train: the train step with optimizer, remat and accumulation of the config; generate: "
                        "prefill + the guided decode loop (default train)")
    p.add_argument("--per-device-batch", type=float_flag(0.0), default=0,
                   help="train: set data.global_batch_size to this many sequences per chip times the chip count "
                        "(0 = keep the config's global batch)")
    p.add_argument("--mfu", type=float_flag(0.0, 1.0, lo_open=True), default=0.4,
                   help="model FLOPs utilisation assumed for the step-time estimate (default 0.4)")
    p.add_argument("--json", default="", help="also write the report as JSON to this path (in an existing directory)")
    p.add_argument("--overwrite", action="store_true",
                   help="let --json replace an earlier report of this tool (never another file)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (see below)")
    return p


def split_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """(TrainConfig overrides, generate.* overrides without the prefix)."""
    train, gen = [], []
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key=value")
        (gen if item.startswith("generate.") else train).append(item.removeprefix("generate."))
    return train, gen


def run(args: argparse.Namespace):
    """Builds, compiles and reports; returns the Report (raises ValueError on bad input)."""
    if not 0 < args.mfu <= 1:
        raise ValueError(f"--mfu {args.mfu}: must be in (0, 1]")
    train_over, gen_over = split_overrides(args.overrides)
    if gen_over and args.mode != "generate":
        raise ValueError(f"generate.* overrides given with --mode {args.mode}: {gen_over}")
    if args.slices is not None:
        train_over.append(f"parallel.num_slices={args.slices}")
    try:
        cfg = load_config(args.config, train_over)
    except (SyntaxError, ImportError, NameError) as e:  # the experiment file itself does not run
        raise ValueError(f"--config {args.config}: {type(e).__name__}: {e}") from None
    topo = parse_topology(args.topology, cfg.parallel.num_slices)
    if args.per_device_batch:
        total = args.per_device_batch * topo.num_chips
        if total != int(total):
            raise ValueError(f"--per-device-batch {args.per_device_batch} x {topo.num_chips} chips is not a whole batch")
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, global_batch_size=int(total)))  # re-checked
    # attention_impl=auto means what it would on the target chips (the splash kernel), not on this CPU host
    impl = resolve_impl(cfg.model.attention_impl, "tpu", cfg.model.dtype)
    cfg = dataclasses.replace(cfg, model=cfg.model.replace(attention_impl=impl))
    devices = topology_devices(topo)
    mesh = build_mesh(topo, devices, cfg.parallel.mesh)
    if args.mode == "train":
        program = lower_train(cfg, mesh)
    else:
        spec = GenerateSpec()
        for item in gen_over:
            key, text = item.split("=", 1)
            spec = apply_override(spec, key.strip(), text.strip(), "generate." + key.strip())
        program = lower_generate(cfg.model, spec, mesh, cfg.parallel.rules)
    return compile_and_report(program, topo, mesh, mfu=args.mfu)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    if args.json:  # before the compile, which can take minutes
        folder = os.path.dirname(os.path.abspath(args.json))
        if os.path.isdir(args.json) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            parser.error(f"--json {args.json}: " + ("is a directory" if os.path.isdir(args.json) else
                                                    f"directory {folder} does not exist or is not writable"))
        try:
            param_checkpoint.check_output_file(args.json, args.overwrite, written_here=_is_report)
        except param_checkpoint.CheckpointError as e:
            parser.error(f"--json {e}")
    if not args.config.endswith(".py"):
        parser.error(f"--config {args.config}: expected a Python experiment file configs/<name>.py")
    try:
        rep = run(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(rep))
    if args.json:
        with param_checkpoint.atomic_file(args.json, args.overwrite, written_here=_is_report) as tmp:
            tmp.write_text(json.dumps({**rep.to_dict(), REPORT_MARK: True}, indent=2, default=str) + "\n")
    return 0 if rep.fits else EXIT_DOES_NOT_FIT


def _is_report(path) -> bool:
    """Whether `path` is a report this tool wrote (a JSON object carrying REPORT_MARK)."""
    try:
        return json.loads(Path(path).read_bytes()).get(REPORT_MARK) is True
    except (OSError, ValueError, AttributeError):
        return False


if __name__ == "__main__":
    sys.exit(main())
