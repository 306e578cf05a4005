"""Evaluate a shapes demo model: generate a fixed list of prompts at several guidance scales and score them.

    python -m lumina_jax.demo.evaluate                          # the shipped demo weights, guidance 1 and 3
    python -m lumina_jax.demo.evaluate --checkpoint runs/demo/model --guidance 1,3 --per-split 96 --out eval/
    python -m lumina_jax.demo.evaluate --cfg-min-p 0                # guidance exactly as the reference

The prompts are `lumina_jax.demo.shapes.eval_specs`: `--per-split` seen and `--per-split` held-out
colour-shape combinations, their sizes cycling through the crop list of the model's target size. Every
prompt is generated once per guidance scale with the same seeds (text-to-image template, size tokens
forced to the requested size, as `infer.py --size` does), all prompts of one scale in one batch. Each
image is measured by `lumina_jax.demo.shape_analysis` (border colour, dominant inner colour, fill ratio of
the shape's bounding box, size) and the table of accuracies per attribute, split and scale is printed.

Sampling defaults are the demo's (`make demo`): image top-k 16, temperature 1 and, with guidance, the
plausibility floor `--cfg-min-p 0.05` (codes below 5% of the conditional top code's probability are not
sampled; `lumina_jax.sampling.processors.SamplingSettings.cfg_min_p`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from PIL import Image

from lumina_jax import param_checkpoint
from lumina_jax.demo.shape_analysis import accuracy_table, format_table
from lumina_jax.demo.shapes import eval_specs
from lumina_jax.inference import (DEFAULT_CHECKPOINT, DEMO_CFG_MIN_P, InferenceError, Lumina, add_jacobi_flags,
                                  jacobi_settings)
from lumina_jax.sampling import processors
from lumina_jax.validation import SEED_MAX, check_float, float_flag, int_flag

PER_SPLIT = 96  # prompts per split: one image moves a split's accuracy by about 1 point


def parse_scales(text: str) -> list[float]:
    try:
        scales = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--guidance {text!r}: expected comma-separated numbers, e.g. 1,3") from None
    if not scales:
        raise ValueError(f"--guidance {text!r}: expected one or more scales, e.g. 1,3")
    for s in scales:
        check_float(f"--guidance {text!r}: each scale", s, 0.0, lo_open=True)
    return scales


def generate_specs(lm, specs: Sequence, guidance: float, seed: int = 0, image_top_k: int = 16,
                   temperature: float = 1.0, max_new_tokens: int = 128, progress: bool = True,
                   cfg_min_p: float = 0.0, jacobi=None) -> list:
    """One PIL image per spec (or None where no image came out), all specs in one batch; row i uses seed + i.

    Sizes differ per row, so rows are built here with their own forced size tokens (the per-row `forced_hw`
    of the sampler) instead of one `Lumina.generate` call (and one compilation) per size.
    """

    settings = processors.SamplingSettings(cfg_scale=float(guidance), cfg_min_p=float(cfg_min_p),
                                           image_top_k=int(image_top_k), text_top_k=10, temperature=float(temperature),
                                           top_p=1.0, max_new_tokens=int(max_new_tokens), constrain_size=True)
    prompts, forced, headers = [], [], []
    for s in specs:
        h, w = lm.size_to_patches(s.size)
        header = [lm.ids.image_start, lm.ids.size_base + h, lm.ids.size_base + w]
        prompts.append(lm.prompt_ids(s.caption, "t2i", [], s.size) + header)
        forced.append((h, w))
        headers.append(header)
    rows = lm._run(prompts, [seed + i for i in range(len(specs))], forced, settings, progress, jacobi=jacobi)
    results = []
    for s, header, r in zip(specs, headers, rows):
        r.tokens = header + r.tokens
        results.append(lm._result(s.caption, "t2i", 0, r, settings, s.size, jacobi))
    lm._decode_all(results)
    return [next((im for im in r.images if not isinstance(im, str)), None) for r in results]


def evaluate(lm, scales: Sequence[float], per_split: int = PER_SPLIT, seed: int = 0, spec_seed: int = 1234,
             image_top_k: int = 16, temperature: float = 1.0, out_dir: str | None = None,
             progress: bool = True, cfg_min_p: float = 0.0, jacobi=None) -> list[dict]:
    """Generates and scores; returns the rows of `shape_analysis.accuracy_table` (and saves PNGs to out_dir)."""


    specs = eval_specs(lm.target_size, per_split=per_split, seed=spec_seed)
    results = {}
    for g in scales:
        images = generate_specs(lm, specs, g, seed=seed, image_top_k=image_top_k, temperature=temperature,
                                progress=progress, cfg_min_p=cfg_min_p, jacobi=jacobi)
        # a missing image scores as a blank 1x1 picture: wrong on every attribute
        pairs = [(s, im if im is not None else Image.new("RGB", (1, 1))) for s, im in zip(specs, images)]
        results[g] = pairs
        if out_dir:
            d = Path(out_dir) / f"guidance{g:g}"
            d.mkdir(parents=True, exist_ok=True)
            for i, (s, im) in enumerate(pairs):
                im.save(d / f"{i:03d}_{s.colour}_{s.shape}_on_{s.background}_{s.width}x{s.height}.png")
    return accuracy_table(results)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lumina_jax.demo.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None,
                   help="assembled model directory (default: the shipped demo weights, lumina_jax/demo_weights)")
    p.add_argument("--guidance", default="1,3", help="comma-separated guidance (cfg) scales to evaluate")
    p.add_argument("--per-split", type=int_flag(1), default=PER_SPLIT,
                   help="prompts of seen and of held-out colour-shape combinations (each; one image is "
                        "100/N points of a split's accuracy)")
    p.add_argument("--seed", type=int_flag(0, SEED_MAX), default=0, help="sampling seed of the first prompt (prompt i: seed + i)")
    p.add_argument("--spec-seed", type=int_flag(0, SEED_MAX), default=1234, help="seed that picks the evaluation prompts")
    p.add_argument("--image-top-k", type=int_flag(0), default=16, help="top-k over image codes")
    p.add_argument("--temperature", type=float_flag(0.0), default=1.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--cfg-min-p", type=float_flag(0.0, 1.0, hi_open=True), default=DEMO_CFG_MIN_P,
                   help="with guidance, sample only codes whose conditional probability is at least this share "
                        "of the top code's (0 = guidance as the reference)")
    add_jacobi_flags(p)
    p.add_argument("--out", default=None,
                   help="also save every generated image under OUT/guidance<g>/ (OUT: a new or empty directory)")
    p.add_argument("--json", default=None,
                   help="also write the table rows to this JSON file (a new file in an existing directory)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--quantize", default=None, choices=["none", "int8"],
                   help="evaluate with int8 weights (Lumina.load(quantize=...); default: as stored)")
    p.add_argument("--kv-cache", default=None, choices=["none", "int8", "fp8"],
                   help="evaluate with a quantised KV cache (Lumina.load(kv_cache=...); default none)")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    try:
        scales = parse_scales(args.guidance)
        jacobi = jacobi_settings(args.jacobi_window, args.jacobi_coupling)
        if args.json:
            param_checkpoint.check_output_file(args.json)
        if args.out and os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
            raise ValueError(f"--out {args.out}: exists and is not an empty directory (earlier images are kept)")
    except (ValueError, InferenceError, param_checkpoint.CheckpointError) as e:
        parser.error(str(e))
    try:
        lm = Lumina.load(args.checkpoint or DEFAULT_CHECKPOINT, quantize=args.quantize, kv_cache=args.kv_cache)
    except InferenceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    rows = evaluate(lm, scales, args.per_split, args.seed, args.spec_seed, args.image_top_k, args.temperature,
                    args.out, progress=not args.quiet, cfg_min_p=args.cfg_min_p, jacobi=jacobi)
    sjd = f"SJD window {jacobi.window} {'coupled' if jacobi.coupled else 'plain'}" if jacobi else "autoregressive"
    print(f"checkpoint {lm.directory}, target size {lm.target_size}, image top-k {args.image_top_k}, "
          f"temperature {args.temperature:g}, cfg min-p {args.cfg_min_p:g}, {sjd}, {time.perf_counter() - t0:.0f} s")
    print(format_table(rows))
    if args.json:
        with param_checkpoint.atomic_file(args.json) as tmp:
            tmp.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
