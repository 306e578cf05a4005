"""Decoding speed with each quantisation option, side by side in one run: tokens/s of our sampler on the medium
shape of benchmarks/generate.py (hidden 1024, 8 layers, 16 heads, MLP 2816, vocabulary 65536), one 256x256
image (273 body tokens + end of turn) with guidance 4 and image top-k 2000, from the same random weights.

Baseline: no quantisation (float32 weights and cache, as benchmarks/generate.py runs this shape on CPU).
Options: int8 weights (`weight_quant="int8"`), an int8 or fp8 KV cache (`kv_cache_quant`), and int8 weights
with an int8 cache. Each is compiled once (excluded), then timed over --repeats runs (best kept); the ratio to
the baseline is printed per option, with the load average. On CPU, XLA dequantises int8 into float32 before
every matrix product, so the options are not expected to be faster here: the figure says what they cost;
the memory-bound accelerator case is docs/quantization.md's aot table and benchmarks/gpu_quantize.py.

    python benchmarks/quantize.py                 # about 5 minutes on an idle 2-core host
    python benchmarks/quantize.py --batch 4 --options none,int8+int8
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generate import EOT, IMAGE_START, IMG_HI, IMG_LO, SHAPES, SIZE_BASE, VOCAB  # noqa: E402

OPTIONS = {  # name -> (weight_quant, kv_cache_quant)
    "none": ("none", "none"),
    "int8": ("int8", "none"),
    "kv-int8": ("none", "int8"),
    "kv-fp8": ("none", "fp8"),
    "int8+int8": ("int8", "int8"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="medium", choices=list(SHAPES), help="model shape of benchmarks/generate.py")
    p.add_argument("--options", default=",".join(OPTIONS),
                   help=f"comma-separated options to time, the first is the baseline (known: {', '.join(OPTIONS)})")
    p.add_argument("--size", type=int, default=256, help="square image side in pixels (multiple of 32)")
    p.add_argument("--batch", type=int, default=1, help="images per call")
    p.add_argument("--cfg", type=float, default=4.0, help="guidance scale")
    p.add_argument("--image-top-k", type=int, default=2000, help="top-k inside images")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights and compute dtype of the baseline (default float32, as benchmarks/generate.py)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per option (the best is reported)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and of sampling")
    return p.parse_args(argv)


def build(cfg, weights: str, kv: str, seed: int, head_scale: float = 1.0):
    """(decode model, parameters) of `cfg` with the option applied: the same random weights for every option,
    quantised on the default device when `weights` is "int8"."""
    import jax

    from lumina_jax import sharding as S
    from lumina_jax import state
    from lumina_jax.sampling.decode import ChameleonDecodeModel

    ocfg = cfg.replace(weight_quant=weights, kv_cache_quant=kv)
    params = state.init_params(cfg, seed)
    if head_scale != 1.0:
        params = jax.tree_util.tree_map_with_path(
            lambda p, x: x * head_scale if "lm_head" in jax.tree_util.keystr(p) else x, params)
    if weights != "none":
        mesh = S.make_mesh("data=1", devices=jax.devices()[:1])
        params = state.quantize_sharded(params, ocfg, mesh, S.TENSOR_PARALLEL_RULES)
    return ChameleonDecodeModel(ocfg), params


def time_generation(model, params, prompts, settings, ids, repeats: int):
    """(best wall seconds over `repeats` timed calls after one compiling call, the rows of the last call)."""
    from lumina_jax.sampling.generate import generate_tokens

    def run():
        t0 = time.perf_counter()
        rows = generate_tokens(model, params, prompts, seeds=list(range(len(prompts))), settings=settings, ids=ids)
        return rows, time.perf_counter() - t0

    run()  # compile
    timed = [run() for _ in range(max(1, repeats))]
    return min(t for _, t in timed), timed[-1][0]


def image_workload(size: int, cfg_scale: float, image_top_k: int, seed: int):
    """(prompt ending with the image header of a size x size image, sampling settings, token ids, body tokens):
    the workload of benchmarks/generate.py (32 random text tokens, end of turn, <racm3:break>, h, w)."""
    from lumina_jax.sampling import processors
    from lumina_jax.tokenizer import SpecialIds

    side = size // 32
    body = (2 * side) * (2 * side + 1) + 1
    rng = np.random.default_rng(seed)
    prompt = [0] + rng.integers(9000, 60000, 32).tolist() + [EOT, IMAGE_START, SIZE_BASE + side, SIZE_BASE + side]
    settings = processors.SamplingSettings(cfg_scale=cfg_scale, image_top_k=image_top_k, max_new_tokens=body + 1,
                                           constrain_size=False)
    ids = processors.TokenIds.from_special_ids(SpecialIds.from_layout(IMG_HI - IMG_LO, VOCAB), VOCAB)
    return prompt, settings, ids, body


def main(argv=None):
    args = parse_args(argv)
    import jax

    from lumina_jax.config import ChameleonConfig

    names = args.options.split(",")
    unknown = [n for n in names if n not in OPTIONS]
    if unknown:
        raise SystemExit(f"--options: unknown {unknown}; known: {list(OPTIONS)}")
    kw = SHAPES[args.shape]
    cfg = ChameleonConfig(vocab_size=VOCAB, hidden_size=kw["hidden_size"], intermediate_size=kw["intermediate_size"],
                          num_layers=kw["num_hidden_layers"], num_heads=kw["num_attention_heads"],
                          num_kv_heads=kw["num_attention_heads"], head_dim=kw["hidden_size"] // kw["num_attention_heads"],
                          image_token_start=IMG_LO, image_token_end=IMG_HI, param_dtype=args.dtype, dtype=args.dtype,
                          scan_layers=False)
    prompt, settings, ids, body = image_workload(args.size, args.cfg, args.image_top_k, args.seed)
    max_new = settings.max_new_tokens
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; jax {jax.__version__} on "
          f"{jax.devices()[0].platform}; shape {args.shape}, {args.dtype}, {args.size}x{args.size} image = {body} "
          f"body tokens, batch {args.batch}, cfg {args.cfg}, image top-k {args.image_top_k}", flush=True)
    base_rate = None
    for name in names:
        weights, kv = OPTIONS[name]
        model, params = build(cfg, weights, kv, args.seed, head_scale=20.0)  # peakier logits, as generate.py
        best, rows = time_generation(model, params, [prompt] * args.batch, settings, ids, args.repeats)
        if any(r.tokens[body - 1] != ids.image_end for r in rows):
            raise SystemExit(f"{name}: the sampler did not close the image where expected")
        rate = max_new * args.batch / best
        base_rate = base_rate or rate
        print(f"{name:10s} weights {weights:4s} KV {kv:4s}  {rate:8.1f} tok/s  {args.batch / best:6.3f} img/s  "
              f"ratio to {names[0]} {rate / base_rate:5.2f}x", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
