"""`python -m lumina_jax.convert <command> [flags]`: one entry point for every conversion.

Each command lives in its own module exposing `add_arguments(parser, command)` and `run(args) -> int`
(`args.command` says which command ran, so one module can serve a command and its export twin).
Errors that the user can fix (a missing file, a bad key, a wrong shape, an output path that would touch an
input) are raised as `ConversionError` or `CheckpointError` and printed as one line naming the problem, with
exit status 1; a bad flag value is a usage error (exit status 2).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# Conversion never needs an accelerator; keep JAX (started by Orbax) on the host unless told otherwise.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from lumina_jax.param_checkpoint import CheckpointError
from lumina_jax.convert.errors import ConversionError

# command name -> (module, one-line help)
COMMANDS = {
    "chameleon": ("lumina_jax.convert.chameleon", "Hugging Face Chameleon / Lumina-mGPT safetensors -> Orbax"),
    "chameleon-export": ("lumina_jax.convert.chameleon", "Orbax decoder checkpoint -> Hugging Face safetensors"),
    "vqgan": ("lumina_jax.convert.vqgan", "Meta's vqgan.ckpt + vqgan.yaml -> Orbax"),
    "vqgan-export": ("lumina_jax.convert.vqgan", "Orbax VQGAN checkpoint -> PyTorch state_dict file"),
    "assemble": ("lumina_jax.convert.assemble", "one inference directory: decoder + VQGAN + tokenizer + configs"),
    "quantize": ("lumina_jax.convert.quantize", "an inference directory with int8 decoder weights"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lumina_jax.convert",
        description="Convert published PyTorch checkpoints to lumina-jax Orbax checkpoints and back.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            p.set_defaults(_unavailable=module_name)
            continue
        module.add_arguments(p, name)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's warnings would add lines to a one-line error
    if getattr(args, "_unavailable", None):
        print(f"error: command '{args.command}' is not available in this build ({args._unavailable})", file=sys.stderr)
        return 2
    try:
        return int(args._module.run(args) or 0)
    except (ConversionError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
