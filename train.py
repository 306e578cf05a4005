"""Train the Lumina-mGPT decoder (FP-SFT / Omni-SFT) from a config file plus key=value overrides.

    python train.py --config configs/tiny_cpu.py output_dir=runs/example total_steps=200
    python train.py --config configs/fpsft_7b_512.py output_dir=gs://... data.config_path=data.yaml \
        checkpoint.init_from=ckpts/lumina_7b_512 parallel.mesh=fsdp=-1

Re-running the same command resumes from the newest checkpoint in output_dir. See docs/training.md.
"""
import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train the Lumina-mGPT decoder. Settings come from --config (a Python file defining "
                    "get_config()) and dotted key=value overrides, e.g. optimizer.lr=1e-5 parallel.mesh=data=2,fsdp=4. "
                    "Re-running with the same output_dir resumes from its newest checkpoint.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="experiment config file, e.g. configs/fpsft_7b_512.py")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted config overrides (output_dir=..., total_steps=..., optimizer.lr=..., model.dropout=...)")
    p.add_argument("--print_config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("--max_steps", type=int, default=None,
                   help="stop after this many steps in this invocation (checkpoint saved), even before total_steps")
    p.add_argument("--export_dir", default="",
                   help="after training, write an inference checkpoint (params/ + config.json) to this directory")
    p.add_argument("--export_hf_dir", default="",
                   help="after training, also write Hugging Face safetensors (config.json + model*.safetensors) here")
    p.add_argument("--export_dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="dtype of exported weights (the reference saves bf16)")
    p.add_argument("--coordinator_address", default="", help="multi-host: host:port of process 0 (or JAX_COORDINATOR_ADDRESS)")
    p.add_argument("--num_processes", type=int, default=0, help="multi-host: number of processes (or JAX_NUM_PROCESSES)")
    p.add_argument("--process_id", type=int, default=-1, help="multi-host: index of this process (or JAX_PROCESS_ID)")
    p.add_argument("--cpu_collectives", default="", choices=["", "gloo", "mpi"],
                   help="collectives implementation for multi-process CPU runs (gloo for tests on one machine)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("lumina_jax").setLevel(logging.INFO)
    import jax  # after argument parsing, so --help is fast

    if args.cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", args.cpu_collectives)
    from lumina_jax.training import config as config_lib
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
    except (ValueError, FileNotFoundError) as e:
        print(f"train.py: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(cfg.to_json())
        return 0
    trainer.maybe_initialize_distributed(cfg)
    try:
        result = trainer.train(cfg, max_steps=args.max_steps)
    except trainer.NonFiniteLossError as e:
        print(f"train.py: {e}", file=sys.stderr)
        return 3
    if args.export_dir or args.export_hf_dir:
        from lumina_jax.training import export
        export.export_run_state(result.params, result.model_config, args.export_dir, hf_dir=args.export_hf_dir,
                                dtype=args.export_dtype, source_dir=cfg.checkpoint.init_from)
    if result.stopped_by_signal:
        print(f"train.py: stopped by signal at step {result.step}; checkpoint saved in {cfg.output_dir}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
