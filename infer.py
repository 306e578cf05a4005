"""Generate images and text with a Lumina-mGPT model directory (built by `python -m lumina_jax.convert assemble`).

Examples:
    python infer.py --checkpoint ckpts/lumina-7b-768 --prompt "a red fox in the snow" --size 768x768 \\
        --cfg 4 --seed 0 --num-images 2 --out out/
    python infer.py --checkpoint ckpts/lumina-7b-768-omni --task depth --image photo.jpg --out out/
    python infer.py --checkpoint ckpts/lumina-7b-512 --task chat --prompt "What is this? <|image|>" \\
        --image photo.jpg --out out/ --mesh tensor=8

Writes NNN_seedS_K.png for every generated image and NNN_seedS.json with the prompt, the generated text
(<|image|> marks each image) and every setting; NNN continues after the files already in --out, so no
earlier output is replaced. Tasks: see --task.
"""
from __future__ import annotations

import argparse
import json
import sys

from lumina_jax.inference import (DEFAULT_CHECKPOINT, InferenceError, Lumina, add_jacobi_flags, add_placement_flags,
                                  check_seed, load_image_file, parse_size, writable_output_dir)
from lumina_jax.tasks import TASKS
from lumina_jax.unirep import target_size_flag
from lumina_jax.validation import SEED_MAX, float_flag, int_flag, parse_json


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="infer.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None,
                   help="assembled model directory (lumina.json, decoder/, vqgan/, tokenizer/); default: the shipped "
                        "demo model lumina_jax/demo_weights (shapes on coloured backgrounds, 128-px crop list)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", default=None,
                     help="a prompt (repeat for several; all run in one batch)")
    src.add_argument("--prompts-file", default=None,
                     help="text file with one prompt per line (blank lines skipped); or .jsonl of "
                          '{"prompt": str, "images": [paths]} objects')
    p.add_argument("--task", default="t2i", choices=list(TASKS),
                   help="prompt preset: " + "; ".join(f"{t.name}: {t.description}" for t in TASKS.values()))
    p.add_argument("--image", action="append", default=[],
                   help="input image file for every prompt (repeat for several; understanding, omni and chat tasks)")
    p.add_argument("--size", default=None,
                   help="WIDTHxHEIGHT of generated images, e.g. 768x512; must be on the model's crop list. "
                        "Forces the size tokens (and fills the t2i prompt). Without it t2i uses the square target "
                        "size (e.g. 768x768) and other tasks sample the size tokens from the crop list")
    p.add_argument("--target-size", type=target_size_flag, default=None,
                   help="training resolution whose crop list applies (default: the directory's lumina.json)")
    p.add_argument("--cfg", type=float_flag(0.0, lo_open=True), default=None,
                   help="guidance scale, > 0 (default: the task's; 1 = off)")
    p.add_argument("--cfg-min-p", type=float_flag(0.0, 1.0, hi_open=True), default=0.0,
                   help="with guidance, sample image codes only among those whose conditional probability is at "
                        "least this share of the top code's (0 = off, as the reference; the demo uses 0.05)")
    p.add_argument("--image-top-k", type=int_flag(0), default=None,
                   help="top-k inside images (default: the task's; 0 = off)")
    p.add_argument("--text-top-k", type=int_flag(0), default=None,
                   help="top-k outside images (default: the task's, 10; 0 = off)")
    p.add_argument("--temperature", type=float_flag(0.0), default=1.0,
                   help="sampling temperature (0 = greedy; default 1)")
    p.add_argument("--top-p", type=float_flag(0.0, 1.0, lo_open=True), default=1.0,
                   help="nucleus sampling mass after top-k, in (0, 1] (default 1 = off)")
    p.add_argument("--seed", type=int_flag(0, SEED_MAX), default=0,
                   help=f"seed of the first image, 0..{SEED_MAX}; image j of a prompt uses seed + j")
    p.add_argument("--num-images", type=int_flag(1), default=1, help="answers per prompt (default 1)")
    p.add_argument("--max-new-tokens", type=int_flag(1), default=8192,
                   help="generation length limit per answer (default 8192)")
    p.add_argument("--unconstrained-size", action="store_true",
                   help="sample the size tokens freely, as the reference (default: only crop-list sizes)")
    add_jacobi_flags(p)
    add_placement_flags(p)
    p.add_argument("--out", required=True,
                   help="output directory for the PNGs and JSON sidecars (created; files of earlier runs are kept: "
                        "new ones take the next free number NNN)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    return p


def read_prompts(args) -> tuple[list[str], list[list[str]]]:
    """(prompts, image lists) from --prompt / --prompts-file plus --image."""

    if args.prompts_file:
        name = args.prompts_file
        try:
            with open(name, "rb") as f:
                data = f.read()
        except OSError as e:
            raise InferenceError(f"--prompts-file {name}: {e.strerror}") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InferenceError(f"--prompts-file {name}: not UTF-8 text (byte {data[e.start]:#04x} at offset "
                                 f"{e.start})") from None
        if "\x00" in text:
            raise InferenceError(f"--prompts-file {name}: holds NUL bytes (a binary file, not text)")
        lines = text.splitlines()
        if name.endswith(".jsonl"):
            prompts, images = [], []
            for n, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                prompt, files = _jsonl_item(line, f"{name}:{n}")
                prompts.append(prompt)
                images.append(files + list(args.image))
            return prompts, images
        prompts = [x for x in lines if x.strip()]
    else:
        prompts = list(args.prompt or [""])
    if not prompts:
        raise InferenceError("no prompts given (use --prompt or --prompts-file)")
    return prompts, [list(args.image) for _ in prompts]


def _jsonl_item(line: str, where: str) -> tuple[str, list[str]]:
    """One JSONL line: {"prompt": str, "images": [str, ...]} (images optional); a mistake names the line."""

    usage = 'expected {"prompt": "...", "images": ["path", ...]}'
    try:
        item = parse_json(line, where)
    except ValueError as e:
        raise InferenceError(f"{e}; {usage}") from None
    if not isinstance(item, dict) or "prompt" not in item:
        raise InferenceError(f"{where}: {usage}, got {line.strip()[:80]!r}")
    if not isinstance(item["prompt"], str):
        raise InferenceError(f"{where}: \"prompt\" must be a string, got {type(item['prompt']).__name__}")
    files = item.get("images", [])
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise InferenceError(f"{where}: \"images\" must be a list of paths, got {json.dumps(files)[:80]}")
    return item["prompt"], files


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        prompts, images = read_prompts(args)
        size = parse_size(args.size) if args.size else None
        check_seed(args.seed, args.num_images)
        writable_output_dir(args.out)  # before the model loads and generates
        opened = {f: load_image_file(f) for files in images for f in files}  # decoded before the model loads
        images = [[opened[f] for f in files] for files in images]
        lm = Lumina.load(args.checkpoint or DEFAULT_CHECKPOINT, mesh=args.mesh, rules=args.rules, dtype=args.dtype,
                         target_size=args.target_size, quantize=args.quantize, kv_cache=args.kv_cache)
        if size is not None:
            lm.size_to_patches(size)
        results = lm.generate(prompts, task=args.task, images=images, size=size, guidance=args.cfg,
                              cfg_min_p=args.cfg_min_p, image_top_k=args.image_top_k, text_top_k=args.text_top_k,
                              temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                              num_images=args.num_images, max_new_tokens=args.max_new_tokens,
                              constrain_size=not args.unconstrained_size, progress=args.progress,
                              jacobi_window=args.jacobi_window, jacobi_coupling=args.jacobi_coupling)
        run_info = {k: v for k, v in vars(args).items() if k not in ("prompt", "progress")}
        written = Lumina.save(results, args.out, run_info=run_info)
    except InferenceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    n_img = sum(1 for p in written if p.suffix == ".png")
    for r in results:
        if r.unfinished_image:
            print(f"warning: seed {r.seed}: the length limit cut an image ({r.unfinished_image}); "
                  "raise --max-new-tokens", file=sys.stderr)
    numbers = sorted({p.name.split("_")[0] for p in written})
    print(f"wrote {n_img} image(s) and {len(results)} JSON file(s) to {args.out} (numbers {numbers[0]}..{numbers[-1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
