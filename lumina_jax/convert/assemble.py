"""`assemble`: one directory holding everything inference needs, from a Lumina-mGPT model directory plus
Chameleon's tokenizer folder.

    python -m lumina_jax.convert assemble --model Lumina-mGPT-7B-768 --tokenizer ckpts/chameleon/tokenizer \\
        --out ckpts/lumina-7b-768 --target-size 768

Layout written (atomically: nothing appears unless every part converted):
    OUT/lumina.json            manifest: parts, target size, sources
    OUT/decoder/               params/ (Orbax) + config.json (+ hf_config.json, conversion.json)
    OUT/vqgan/                 params/ (Orbax) + vqgan_config.json
    OUT/tokenizer/             text_tokenizer.json (Chameleon's) and, if the model directory has one,
                               the Hugging Face tokenizer.json that Lumina encodes prompts with
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from lumina_jax import param_checkpoint
from lumina_jax.convert import chameleon as conv_decoder, hf_config as hfc, vqgan as conv_vqgan
from lumina_jax.convert.errors import ConversionError
from lumina_jax.tokenizer import SpecialIds, TextTokenizer
from lumina_jax.unirep import crop_size_list, target_size_flag

MANIFEST = "lumina.json"
TOKENIZER_FILES = ("text_tokenizer.json", "vqgan.yaml", "vqgan.ckpt")


def assemble(model_dir: str | Path, tokenizer_dir: str | Path, out: str | Path, *, target_size: int = 512,
             dtype: str | None = None, compute_dtype: str = "bfloat16", overwrite: bool = False,
             progress: bool = True) -> dict:
    """Converts and gathers the parts; returns the manifest written to OUT/lumina.json."""

    model_dir, tokenizer_dir, out = Path(model_dir), Path(tokenizer_dir), Path(out)
    if not (model_dir / "config.json").is_file():
        raise ConversionError(f"{model_dir}: no config.json (expected a Lumina-mGPT / Hugging Face model directory)")
    for name in TOKENIZER_FILES:
        if not (tokenizer_dir / name).is_file():
            raise ConversionError(f"{tokenizer_dir}: missing {name} (expected Chameleon's tokenizer folder with "
                                  f"{', '.join(TOKENIZER_FILES)})")
    try:
        crop_size_list(target_size)
    except ValueError as e:
        raise ConversionError(f"--target-size: {e}") from None
    try:
        param_checkpoint.check_output_dir(out, overwrite, inputs=[model_dir, tokenizer_dir])
    except param_checkpoint.CheckpointError as e:
        raise ConversionError(str(e)) from None
    try:
        text_tok = TextTokenizer.load(str(tokenizer_dir / "text_tokenizer.json"))
        special = SpecialIds.from_tokenizer(text_tok)
    except ValueError as e:
        raise ConversionError(f"{tokenizer_dir / 'text_tokenizer.json'}: {e}") from None
    # the parts must fit together: checked from their configs, before minutes of conversion
    vq_cfg = conv_vqgan.read_yaml_config(str(tokenizer_dir / "vqgan.yaml"))
    if vq_cfg.n_embed != special.num_image_codes:
        raise ConversionError(f"{tokenizer_dir}: vqgan.yaml has {vq_cfg.n_embed} codes but text_tokenizer.json "
                              f"has {special.num_image_codes} image tokens")
    hf_path = model_dir / "config.json"
    vocab_size = hfc.chameleon_config_from_hf(conv_decoder.read_hf_config(hf_path), source=str(hf_path)).vocab_size
    if vocab_size < text_tok.vocab_size:
        raise ConversionError(f"{hf_path}: vocab_size {vocab_size} is smaller than the {text_tok.vocab_size} "
                              f"entries of {tokenizer_dir / 'text_tokenizer.json'}")
    try:
        with param_checkpoint.atomic_directory(out, overwrite=overwrite, inputs=[model_dir, tokenizer_dir]) as tmp:
            cfg = conv_decoder.convert(model_dir, tmp / "decoder", dtype=dtype, compute_dtype=compute_dtype,
                                       progress=progress)
            conv_vqgan.convert(str(tokenizer_dir / "vqgan.ckpt"), str(tokenizer_dir / "vqgan.yaml"), str(tmp / "vqgan"),
                               progress=progress)
            (tmp / "tokenizer").mkdir()
            shutil.copyfile(tokenizer_dir / "text_tokenizer.json", tmp / "tokenizer" / "text_tokenizer.json")
            tokenizer = "tokenizer/text_tokenizer.json"
            if (model_dir / "tokenizer.json").is_file():  # the HF tokenizer Lumina encodes prompts with
                shutil.copyfile(model_dir / "tokenizer.json", tmp / "tokenizer" / "tokenizer.json")
                tokenizer = "tokenizer/tokenizer.json"
            manifest = {
                "format": 1,
                "decoder": "decoder",
                "vqgan": "vqgan",
                "tokenizer": tokenizer,
                "target_size": int(target_size),
                "sources": {"model": str(model_dir.absolute()), "tokenizer": str(tokenizer_dir.absolute())},
                "mask_image_logits": bool(cfg.mask_image_logits),
            }
            param_checkpoint.write_json(tmp, MANIFEST, manifest)
    except param_checkpoint.CheckpointError as e:
        raise ConversionError(str(e)) from None
    return manifest


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__.split("\n\n", 1)[0] + "\n\n" + __doc__.split("\n\n", 1)[1]
    parser.add_argument("--model", required=True,
                        help="Lumina-mGPT (Hugging Face layout) model directory: config.json + *.safetensors")
    parser.add_argument("--tokenizer", required=True,
                        help="Chameleon's tokenizer folder holding text_tokenizer.json, vqgan.yaml and vqgan.ckpt")
    parser.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    parser.add_argument("--target-size", type=target_size_flag, default=512,
                        help="training resolution of the model (512, 768 or 1024): its crop list limits the "
                             "image sizes at inference (default: 512)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="storage dtype of the decoder parameters (default: as in the safetensors)")
    parser.add_argument("--compute-dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16",
                        help="decoder activation/matmul dtype recorded in decoder/config.json (default: bfloat16)")
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace --out if it exists and was written by lumina-jax (holds "
                             f"{param_checkpoint.OUTPUT_MARKER}); never a path that is, holds or lies inside an input")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")


def run(args: argparse.Namespace) -> int:
    m = assemble(args.model, args.tokenizer, args.out, target_size=args.target_size, dtype=args.dtype,
                 compute_dtype=args.compute_dtype, overwrite=args.overwrite, progress=args.progress)
    print(f"wrote {args.out}: decoder, vqgan, {m['tokenizer']}, target size {m['target_size']}")
    return 0
