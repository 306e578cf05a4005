"""Train the Lumina-mGPT decoder (FP-SFT / Omni-SFT) from a config file plus key=value overrides.

    python train.py --config configs/tiny_cpu.py output_dir=runs/example total_steps=200
    python train.py --config configs/fpsft_7b_512.py output_dir=gs://... data.config_path=data.yaml \
        checkpoint.init_from=ckpts/lumina_7b_512 parallel.mesh=fsdp=-1

Re-running the same command resumes from the newest checkpoint in output_dir. See docs/training.md.
"""
import argparse
import logging
import sys

from lumina_jax.validation import int_flag

EPILOG = """exit status: 0 done (or stopped by SIGTERM after saving); 1 a mistake in the config, the data, the
mesh, the output or export directory or the checkpoint to resume (one line naming it, nothing written);
2 a usage error (flags, or a key=value override that is malformed or names no config field); 3 the loss,
gradient norm or updated parameters became NaN/inf (that state is not saved; the message names the last
finite checkpoint).

An unreadable newest checkpoint (a truncated or deleted array file, a broken JSON file) is refused with
its step named; checkpoint.resume_from_previous_on_error=true resumes from the newest earlier one that
reads instead, and moves the unreadable ones to <output_dir>/unreadable_checkpoints/."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train the Lumina-mGPT decoder. Settings come from --config (a Python file defining "
                    "get_config()) and dotted key=value overrides, e.g. optimizer.lr=1e-5 parallel.mesh=data=2,fsdp=4. "
                    "Re-running with the same output_dir resumes from its newest checkpoint.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="experiment config file, e.g. configs/fpsft_7b_512.py")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted config overrides (output_dir=..., total_steps=..., optimizer.lr=..., model.dropout=...)")
    p.add_argument("--print_config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("--max_steps", type=int_flag(1), default=None,
                   help="stop after this many steps in this invocation (checkpoint saved), even before total_steps")
    p.add_argument("--export_dir", default="",
                   help="after training, write an inference checkpoint (params/ + config.json) to this new directory "
                        "(checked before training; never replaces a directory)")
    p.add_argument("--export_hf_dir", default="",
                   help="after training, also write Hugging Face safetensors (config.json + model*.safetensors) to this "
                        "new directory")
    p.add_argument("--export_dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="dtype of exported weights (the reference saves bf16)")
    p.add_argument("--coordinator_address", default="", help="multi-host: host:port of process 0 (or JAX_COORDINATOR_ADDRESS)")
    p.add_argument("--num_processes", type=int_flag(1), default=0,
                   help="multi-host: number of processes (or JAX_NUM_PROCESSES)")
    p.add_argument("--process_id", type=int_flag(0), default=-1, help="multi-host: index of this process (or JAX_PROCESS_ID)")
    p.add_argument("--cpu_collectives", default="", choices=["", "gloo", "mpi"],
                   help="collectives implementation for multi-process CPU runs (gloo for tests on one machine)")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("lumina_jax").setLevel(logging.INFO)
    import jax  # after argument parsing, so --help is fast

    if args.cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", args.cpu_collectives)
    from lumina_jax import param_checkpoint
    from lumina_jax.convert.errors import ConversionError
    from lumina_jax.training import config as config_lib
    from lumina_jax.training import export
    from lumina_jax.training import trainer

    overrides = list(args.overrides)
    for flag, key in ((args.coordinator_address, "parallel.coordinator_address"),
                      (args.num_processes, "parallel.num_processes")):
        if flag:
            overrides.append(f"{key}={flag}")
    if args.process_id >= 0:
        overrides.append(f"parallel.process_id={args.process_id}")
    try:
        cfg = config_lib.load_config(args.config, overrides)
    except config_lib.OverrideError as e:
        parser.error(str(e))  # exit status 2
    except (ValueError, OSError) as e:
        return _error(e)
    if args.print_config:
        print(cfg.to_json())
        return 0
    exporting = bool(args.export_dir or args.export_hf_dir)
    try:
        if exporting:  # before training, not after it
            export.check_export_dirs(args.export_dir, args.export_hf_dir, inputs=[cfg.checkpoint.init_from or None])
        trainer.maybe_initialize_distributed(cfg)
    except (ValueError, OSError, param_checkpoint.CheckpointError) as e:
        return _error(e)
    try:
        result = trainer.train(cfg, max_steps=args.max_steps)
    except trainer.NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except trainer.RunError as e:
        return _error(e)
    if exporting:
        try:
            export.export_run_state(result.params, result.model_config, args.export_dir, hf_dir=args.export_hf_dir,
                                    dtype=args.export_dtype, source_dir=cfg.checkpoint.init_from)
        except (ValueError, OSError, param_checkpoint.CheckpointError, ConversionError) as e:
            return _error(e)
    if result.stopped_by_signal:
        print(f"train.py: stopped by signal at step {result.step}; checkpoint saved in {cfg.output_dir}",
              file=sys.stderr)
    return 0


def _error(e: BaseException) -> int:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
