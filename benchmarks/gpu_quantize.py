"""GPU: seconds per 768x768 image of a 7B-shaped decoder (random weights) with guidance 4, at batch 1 and 16,
bf16 weights and cache (the baseline) vs int8 weights vs int8 weights + an int8 KV cache, side by side in one
run. Prepared for a machine with one large GPU (the 7B bf16 weights take 14 GB, the batch-16 guided cache
about 41 GB in bf16); not run where this repository is developed, which has no GPU.

    python benchmarks/gpu_quantize.py                        # all options, batches 1 and 16
    python benchmarks/gpu_quantize.py --batches 1 --options none,int8

Each option is built from the same random weights (seed 0), compiled by one untimed call, then timed over
--repeats calls (best kept); the table prints seconds per image and the speed-up over the first option.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generate import IMG_HI, IMG_LO, VOCAB  # noqa: E402
from quantize import OPTIONS, build, image_workload, time_generation  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--options", default="none,int8,int8+int8",
                   help=f"comma-separated options, the first is the baseline (known: {', '.join(OPTIONS)})")
    p.add_argument("--batches", default="1,16", help="comma-separated images per call")
    p.add_argument("--size", type=int, default=768, help="square image side in pixels")
    p.add_argument("--cfg", type=float, default=4.0, help="guidance scale")
    p.add_argument("--image-top-k", type=int, default=2000, help="top-k inside images")
    p.add_argument("--repeats", type=int, default=1, help="timed calls per option and batch (best kept)")
    p.add_argument("--preset", default="7b", help="decoder shape (lumina_jax.config.PRESETS; 'tiny' for a dry run)")
    args = p.parse_args(argv)
    import jax

    from lumina_jax.config import PRESETS

    if jax.default_backend() != "gpu":
        print(f"note: running on {jax.default_backend()}, not a GPU; the figures will not be GPU figures",
              file=sys.stderr)
    cfg = PRESETS[args.preset].replace(param_dtype="bfloat16", dtype="bfloat16", scan_layers=False,
                                image_token_start=IMG_LO, image_token_end=IMG_HI, vocab_size=VOCAB)
    prompt, settings, ids, body = image_workload(args.size, args.cfg, args.image_top_k, seed=0)
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; {args.preset} shape, {args.size}x{args.size} = {body} body "
          f"tokens, cfg {args.cfg}, image top-k {args.image_top_k}", flush=True)
    names = args.options.split(",")
    base = {}
    for name in names:
        weights, kv = OPTIONS[name]
        model, params = build(cfg, weights, kv, seed=0)
        for batch in (int(b) for b in args.batches.split(",")):
            best, _ = time_generation(model, params, [prompt] * batch, settings, ids, args.repeats)
            per_image = best / batch
            base.setdefault(batch, per_image)
            print(f"{name:10s} batch {batch:3d}: {per_image:8.2f} s per image, {best:8.2f} s per call, "
                  f"speed-up over {names[0]} {base[batch] / per_image:5.2f}x", flush=True)
        del params


if __name__ == "__main__":
    main()
