"""`quantize`: an assembled inference directory with int8 decoder weights, so loading needs no bf16 copy.

    python -m lumina_jax.convert quantize --checkpoint ckpts/lumina-34b-768 --out ckpts/lumina-34b-768-int8

The decoder's projections and output head are quantised (per output channel, as `Lumina.load(quantize="int8")`
does at load time) and stored as int8 values plus scales, in the unscanned inference layout; its config.json
records `weight_quant: "int8"`. Every other part (VQGAN, tokenizer, manifest, side files) is copied unchanged.
`Lumina.load` / `infer.py` then load it int8 without a flag. The input directory is only read.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import jax

from lumina_jax import param_checkpoint, sharding as S, state
from lumina_jax.config import ChameleonConfig
from lumina_jax.convert.errors import ConversionError


def quantize_directory(src: str | Path, out: str | Path, *, mesh: str | None = None, overwrite: bool = False) -> Path:
    """Writes `out`: `src` with its decoder quantised to int8 (restored, quantised and written on `mesh`)."""


    src, out = Path(src), Path(out)
    try:
        manifest = param_checkpoint.read_json(src, "lumina.json")
        dec_name = manifest["decoder"]
        cfg = ChameleonConfig.from_dict(param_checkpoint.read_json(src / dec_name, "config.json"))
    except (param_checkpoint.CheckpointError, KeyError, ValueError) as e:
        raise ConversionError(f"{src}: not an assembled model directory ({type(e).__name__}: {e})") from None
    if cfg.weight_quant != "none":
        raise ConversionError(f"{src / dec_name / 'config.json'}: already weight_quant={cfg.weight_quant!r}")
    qcfg = cfg.replace(scan_layers=False, weight_quant="int8")
    mesh_obj = S.make_mesh(mesh) if mesh else S.make_mesh("data=1", devices=jax.devices()[:1])
    try:
        params = state.restore_params(src / dec_name, qcfg, mesh_obj, S.TENSOR_PARALLEL_RULES)
        with param_checkpoint.atomic_directory(out, overwrite=overwrite) as tmp:
            for item in src.iterdir():  # everything but the decoder's parameters, unchanged
                if item.name == dec_name:
                    continue
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
            (tmp / dec_name).mkdir()
            for item in (src / dec_name).iterdir():
                if item.name not in (param_checkpoint.PARAMS_SUBDIR, "config.json"):
                    (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / dec_name / item.name)
            state.save_quantized(tmp / dec_name, params, qcfg)
            param_checkpoint.write_json(tmp / dec_name, "config.json", qcfg.to_dict())
    except param_checkpoint.CheckpointError as e:
        raise ConversionError(str(e)) from None
    return out


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__
    parser.add_argument("--checkpoint", required=True, help="assembled model directory (lumina.json, decoder/, ...)")
    parser.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    parser.add_argument("--mesh", default=None,
                        help="device mesh to quantise on, e.g. tensor=8 (default: one device); the written files "
                             "do not depend on it")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def run(args: argparse.Namespace) -> int:
    if Path(args.out).absolute() == Path(args.checkpoint).absolute():
        raise ConversionError("--out must differ from --checkpoint (the input is never modified)")
    out = quantize_directory(args.checkpoint, args.out, mesh=args.mesh, overwrite=args.overwrite)
    print(f"wrote {out}: int8 decoder weights (weight_quant=int8 in decoder/config.json)")
    return 0
