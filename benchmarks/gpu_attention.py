"""GPU attention, side by side: dense (the reference) vs cuDNN flash attention in a 7B-shaped train step.

The model is the 7B preset cut to 4 layers (hidden 4096, 32 heads of 128, MLP 11008, vocabulary 65536),
fp32 master weights and bf16 compute, packed rows (two segments each) of 4096 tokens, AdamW; the real train
step of lumina_jax.training.train_step on one GPU. Prints tokens/s (median step time; the implementations
alternate step by step so both see the same conditions) and MFU (model FLOPs 6N + 12 L H Dh T per token,
over the GPU's peak bf16 FLOP/s), and the ratio.

    python benchmarks/gpu_attention.py                          # needs a GPU; about 5 minutes on an H100
    python benchmarks/gpu_attention.py --batch 2 --repeats 10
    python benchmarks/gpu_attention.py --preset tiny --impls dense blockwise --seq 256 --allow-cpu  # smoke run
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

from lumina_jax.config import model_preset
from lumina_jax.models.attention_ops import resolve_impl
from train_step import compile_ours  # benchmarks/train_step.py

# Dense bf16 peak FLOP/s by device kind (vendor data sheets, without sparsity).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12, "B200": 2250e12}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="7b", help="model preset whose shapes are used (7b; tiny for a smoke run)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--seq", type=int, default=4096, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=1, help="sequences per step")
    p.add_argument("--impls", nargs="+", default=["dense", "cudnn"], help="attention implementations to compare")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per implementation (after one warm-up step)")
    p.add_argument("--remat", default="full", help="model.remat_policy (full, as the FP-SFT configs train)")
    p.add_argument("--chunk_size", type=int, default=1024, help="loss: sequence positions per output-layer chunk")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="the GPU's peak bf16 TFLOP/s for MFU (default: from the device kind, see PEAK_BF16)")
    p.add_argument("--allow-cpu", action="store_true", help="run on a non-GPU backend (smoke test of the script)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random batch and initialisation")
    args = p.parse_args(argv)
    args.no_fused = False
    return args


def packed_batch(batch: int, seq: int, vocab: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random text tokens (batch, seq + 1) and segment ids: two packed segments per row, split at 60%."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(min(8196, vocab // 2), vocab, (batch, seq + 1)).astype(np.int32)  # text ids
    segments = np.where(np.arange(seq) < int(seq * 0.6), 1, 2).astype(np.int32)
    return tokens, np.broadcast_to(segments, (batch, seq)).copy()


def model_flops_per_token(cfg, seq: int) -> float:
    """6N (matrix parameters, embedding table excluded) + 12 L H Dh T."""
    D, F, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    attn = D * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    n = L * (attn + 3 * D * F) + D * cfg.vocab_size
    return 6.0 * n + 12.0 * L * cfg.num_heads * cfg.head_dim * seq


def peak_flops(args) -> float:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_BF16.items():
        if name in kind:
            return flops
    raise SystemExit(f"unknown peak bf16 FLOP/s for device kind {kind!r}: pass --peak-tflops")


def main(argv=None) -> int:
    args = parse_args(argv)
    backend = jax.default_backend()
    if backend != "gpu" and not args.allow_cpu:
        print(f"error: this benchmark needs a GPU (JAX backend is {backend!r}); --allow-cpu for a smoke run",
              file=sys.stderr)
        return 2
    cfg = model_preset(args.preset, num_layers=args.layers, dtype="bfloat16", param_dtype="float32",
                     remat_policy=args.remat, dropout=0.0)
    overrides = {f: getattr(cfg, f) for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                                              "num_heads", "num_kv_heads", "head_dim", "q_norm_rows", "k_norm_rows",
                                              "swin_norm", "dtype", "param_dtype", "remat_policy")}
    tokens, segments = packed_batch(args.batch, args.seq, cfg.vocab_size, args.seed)
    peak = peak_flops(args) if backend == "gpu" else 0.0
    print(f"{jax.devices()[0].device_kind}: {args.layers} layers of the {args.preset} preset, {args.batch} x {args.seq} "
          f"tokens, bf16 compute, remat {args.remat}", flush=True)
    runs = {}
    for impl in args.impls:
        t0 = time.perf_counter()
        compiled, state, batch = compile_ours(args, tokens, segment_ids=segments, attention_impl=impl, **overrides)
        holder = {"state": state}

        def run(compiled=compiled, batch=batch, holder=holder):
            holder["state"], m = compiled(holder["state"], batch)
            return float(m["loss"])

        loss = run()
        resolved = resolve_impl(impl, backend, cfg.dtype)
        print(f"{impl} ({resolved}): compile + first step {time.perf_counter() - t0:.1f}s, loss {loss:.4f}", flush=True)
        runs[impl] = (run, [])
    for _ in range(args.repeats):
        for impl, (run, times) in runs.items():
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
    per_token = model_flops_per_token(cfg, args.seq)
    results = {}
    for impl, (_, times) in runs.items():
        tps = args.batch * args.seq / float(np.median(times))
        mfu = f", MFU {tps * per_token / peak:.1%}" if peak else ""
        results[impl] = tps
        print(f"{impl:9s}: {tps:.0f} tokens/s{mfu}  (median of {len(times)} steps)")
    base, *others = args.impls
    for impl in others:
        print(f"ratio {impl}/{base}: {results[impl] / results[base]:.2f}x")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    sys.exit(main())
