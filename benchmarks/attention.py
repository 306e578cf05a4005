"""Attention on CPU, side by side: dense (the reference) vs blockwise in the train step of
benchmarks/train_step.py (hidden 256, 4 layers, 4 heads of 64, MLP 688, vocabulary 65536, batch 8, fp32),
at 512, 2048 and 4096 tokens per sequence.

Per length and implementation it prints
- tokens/s of the whole train step: median over --repeats timed steps, the two implementations alternating
  step by step so both see the same machine load (at --time-batch sequences, when the full batch would
  take more memory than a shared machine should give: --max-run-gib);
- the step's peak memory from XLA's memory analysis of the compiled program (temporaries + arguments);
- the attention's own memory: temporaries of the gradient of a 4-layer stack of the attention alone at
  the step's shapes (what the implementations differ in);
and the ratios blockwise / dense. The load average is printed at the start and the end.

    python benchmarks/attention.py --seqs 512 --repeats 5    # the 512-token speed comparison
    python benchmarks/attention.py --seqs 2048 4096 --time-batch 1
    python benchmarks/attention.py --repeats 0               # memory only (compiles, runs nothing)
"""
from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lumina_jax.models import attention_ops  # noqa: E402
from train_step import MODEL, compile_ours, make_batch  # noqa: E402  (benchmarks/train_step.py)

IMPLS = ("dense", "blockwise")
GiB = 1024 ** 3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, nargs="+", default=[512, 2048, 4096], help="tokens per sequence")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per implementation and length (0: memory only)")
    p.add_argument("--block", type=int, default=512, help="blockwise query/key block (model.attention_block)")
    p.add_argument("--chunk_size", type=int, default=64, help="loss: sequence positions per output-layer chunk")
    p.add_argument("--time-batch", type=int, default=0,
                   help="sequences per timed step (default: --batch); memory is always reported at --batch")
    p.add_argument("--max-run-gib", type=float, default=6.0,
                   help="do not time a length whose compiled step peak exceeds this (its memory is still reported)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random batch and initialisation")
    args = p.parse_args(argv)
    args.no_fused = False
    return args


def attention_temp_bytes(batch: int, seq: int, impl: str, block: int) -> int:
    """Temporaries of the gradient of a stack of 4 attention layers alone (a scan, as the model runs its
    layers) at the step's shapes: what each layer keeps for its backward plus the working memory."""
    L, N, K, H = MODEL["num_layers"], MODEL["num_heads"], MODEL["num_kv_heads"], MODEL["head_dim"]
    q = jax.ShapeDtypeStruct((batch, seq, N, H), jnp.float32)
    kv = jax.ShapeDtypeStruct((L, batch, seq, K, H), jnp.float32)
    seg = jax.ShapeDtypeStruct((batch, seq), jnp.int32)

    def loss(q, k, v, seg):
        def layer(x, kv):
            return x + attention_ops.attention(x, kv[0], kv[1], impl=impl, segment_ids=seg, block=block), None
        return jnp.sum(jax.lax.scan(layer, q, (k, v))[0])

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, seg).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def step_peak(compiled) -> int:
    mem = compiled.memory_analysis()
    return mem.temp_size_in_bytes + mem.argument_size_in_bytes


def time_steps(args, seq: int, batch: int) -> dict:
    """Step times per implementation at `batch` x `seq`: both compiled, a warm-up step each, then
    --repeats steps alternating between them; the programs are freed before returning."""
    tokens = make_batch(argparse.Namespace(batch=batch, seq=seq, seed=args.seed))
    runs, times = {}, {impl: [] for impl in IMPLS}
    for impl in IMPLS:
        compiled, state, data = compile_ours(args, tokens, attention_impl=impl, attention_block=args.block)
        if step_peak(compiled) > args.max_run_gib * GiB:
            print(f"{seq:5d} {impl:9s}: not timed at batch {batch}: peak {step_peak(compiled) / GiB:.2f} GiB > "
                  f"--max-run-gib {args.max_run_gib}", flush=True)
            return {}
        holder = {"state": state}

        def run(compiled=compiled, data=data, holder=holder):
            holder["state"], m = compiled(holder["state"], data)
            return float(m["loss"])

        run()  # warm-up
        runs[impl] = run
    for _ in range(args.repeats):
        for impl, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[impl].append(time.perf_counter() - t0)
    print(f"{seq:5d}: timed at batch {batch}: " + ", ".join(
        f"{impl} {batch * seq / float(np.median(t)):.0f} tokens/s" for impl, t in times.items()), flush=True)
    return times


def main(argv=None):
    args = parse_args(argv)
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    rows = {}
    for seq in args.seqs:
        tokens = make_batch(argparse.Namespace(batch=args.batch, seq=seq, seed=args.seed))
        for impl in IMPLS:  # memory at the benchmark's batch: compiled only, nothing allocated
            compiled, _, _ = compile_ours(args, tokens, attention_impl=impl, attention_block=args.block)
            attn = attention_temp_bytes(args.batch, seq, impl, args.block)
            rows[(seq, impl)] = {"peak": step_peak(compiled), "attn": attn, "times": []}
            print(f"{seq:5d} {impl:9s}: step peak {rows[(seq, impl)]['peak'] / GiB:.2f} GiB, "
                  f"attention gradient temporaries {attn / GiB:.3f} GiB", flush=True)
        if args.repeats:
            batch = args.time_batch or args.batch
            for impl, t in time_steps(args, seq, batch).items():
                rows[(seq, impl)].update(times=t, time_batch=batch)

    print(f"\nmemory at batch {args.batch}, block {args.block}, fp32; tokens/s = median over {args.repeats} steps")
    print("| tokens | impl | tokens/s (batch) | step peak (XLA) | attention gradient temporaries, 4 layers |")
    print("|---|---|---|---|---|")
    for (seq, impl), r in rows.items():
        tps = (f"{r['time_batch'] * seq / float(np.median(r['times'])):.0f} ({r['time_batch']})"
               if r["times"] else "not run")
        print(f"| {seq} | {impl} | {tps} | {r['peak'] / GiB:.2f} GiB | {r['attn'] / GiB:.3f} GiB |")
    print()
    for seq in args.seqs:
        d, b = rows[(seq, "dense")], rows[(seq, "blockwise")]
        speed = (f"speed blockwise/dense {np.median(d['times']) / np.median(b['times']):.2f}x"
                 if d["times"] and b["times"] else "speed not measured")
        print(f"{seq} tokens: {speed}, step peak dense/blockwise {d['peak'] / b['peak']:.2f}x, "
              f"attention memory dense/blockwise {d['attn'] / max(b['attn'], 1):.1f}x")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
