"""Speculative Jacobi decoding vs one token per step, on the shipped demo model, side by side in one run.

Baseline: the autoregressive sampler (`jacobi_window=0`). Against it: plain SJD (fresh draft noise every
step) and coupled SJD (fixed per-position draft noise) at each window L. All runs generate the same prompts
with the same seeds at the demo's settings (`make demo`): 128x128 images (8x8 latent codes = 73 body tokens,
then end-of-turn), guidance 3, cfg min-p 0.05, image top-k 16, temperature 1, size tokens forced. Reported per
mode: model steps per image (the prefill's first token counts as one step; the answer's end-of-turn is one
more), tokens accepted per step inside images, loop iterations of the batch (its slowest row), images/s
(compilation excluded: one warm-up call first; the median of --repeats timed calls) and the ratios to the
baseline. The load average is printed too: run it under `flock` on a shared machine.

    python benchmarks/jacobi.py                          # batch 8, windows 8,16,32 (~5 minutes on 2 cores)
    python benchmarks/jacobi.py --batch 1 --windows 16 --repeats 3
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="assembled model directory (default: the shipped demo model)")
    p.add_argument("--windows", default="8,16,32", help="comma-separated SJD windows L (tokens per model step)")
    p.add_argument("--batch", type=int, default=8, help="prompts generated together (one image each)")
    p.add_argument("--repeats", type=int, default=2, help="timed calls per mode (the median is reported)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first prompt (prompt i uses seed + i)")
    p.add_argument("--guidance", type=float, default=3.0, help="guidance scale (the demo's 3)")
    return p.parse_args(argv)


def run_mode(lm, prompts, args, window, coupled):
    """(results of the last call, median seconds per call)."""
    kw = dict(task="t2i", size=(128, 128), guidance=args.guidance, cfg_min_p=0.05, image_top_k=16, temperature=1.0,
              seeds=[args.seed + i for i in range(len(prompts))], max_new_tokens=128, progress=False,
              decode_images=False, jacobi_window=window, jacobi_coupling=coupled)
    lm.generate(prompts, **kw)  # compile
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        results = lm.generate(prompts, **kw)
        times.append(time.perf_counter() - t0)
    return results, statistics.median(times)


def main(argv=None):
    args = parse_args(argv)
    import jax

    from lumina_jax.demo.shapes import eval_specs
    from lumina_jax.inference import DEFAULT_CHECKPOINT, Lumina

    lm = Lumina.load(args.checkpoint or DEFAULT_CHECKPOINT)
    specs = eval_specs(lm.target_size, per_split=-(-args.batch // 2), seed=1234)
    prompts = [s.caption for s in specs][:args.batch]
    windows = [int(w) for w in args.windows.split(",") if w.strip()]
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; jax {jax.__version__} on "
          f"{jax.devices()[0].platform}; demo model {lm.directory.name}, {len(prompts)} prompts x 1 image 128x128, "
          f"guidance {args.guidance:g}, cfg min-p 0.05, image top-k 16, temperature 1, {args.repeats} timed call(s)")
    modes = [("autoregressive", 0, False)] + [(f"SJD L={w}", w, False) for w in windows] + \
            [(f"coupled SJD L={w}", w, True) for w in windows]
    print(f"{'mode':20s} {'steps/image':>11s} {'tok/step in image':>17s} {'loop iters':>10s} {'images/s':>9s} "
          f"{'fewer steps':>11s} {'speed-up':>8s}")
    base = None
    rows = []
    for name, window, coupled in modes:
        results, seconds = run_mode(lm, prompts, args, window, coupled)
        steps = statistics.mean(r.steps for r in results)
        assert all(r.images and not r.unfinished_image for r in results), f"{name}: an image was not finished"
        per_step = [a for r in results for a in (r.accepted or [])[1:-1]]  # the image body's steps
        tok_step = statistics.mean(per_step) if per_step else 1.0
        iters = max(r.steps for r in results)
        ips = len(prompts) / seconds
        if base is None:
            base = (steps, ips)
        print(f"{name:20s} {steps:11.1f} {tok_step:17.2f} {iters:10d} {ips:9.2f} {base[0] / steps:10.2f}x "
              f"{ips / base[1]:7.2f}x", flush=True)
        rows.append(dict(mode=name, steps=steps, tokens_per_step=tok_step, images_per_s=ips))
    return rows


if __name__ == "__main__":
    main()
    sys.exit(0)
