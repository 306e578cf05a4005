"""Attention on CPU, side by side: dense (the reference) vs blockwise in the train step of
benchmarks/train_step.py (hidden 256, 4 layers, 4 heads of 64, MLP 688, vocabulary 65536, batch 8, fp32),
at 512, 2048 and 4096 tokens per sequence.

Per length and implementation it prints
- tokens/s of the whole train step: median over --repeats timed steps, the implementations alternating
  step by step (and lengths interleaved) so both see the same machine load;
- the step's peak memory from XLA's memory analysis of the compiled program (temporaries + arguments);
- the attention's own memory: temporaries of the gradient of a 4-layer stack of the attention alone at
  the step's shapes (what the implementations differ in);
and the ratios blockwise / dense. The load average is printed at the start and the end.

    python benchmarks/attention.py                       # about 15 minutes on a quiet 2-core CPU
    python benchmarks/attention.py --seqs 512 --repeats 5
    python benchmarks/attention.py --seqs 4096 --repeats 0   # memory only (compiles, runs nothing)
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
    p.add_argument("--max-run-gib", type=float, default=12.0,
                   help="do not run a step whose compiled peak exceeds this (its memory is still reported)")
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


def main(argv=None):
    args = parse_args(argv)
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    runs, rows = {}, []
    for seq in args.seqs:
        tokens = make_batch(argparse.Namespace(batch=args.batch, seq=seq, seed=args.seed))
        for impl in IMPLS:
            t0 = time.perf_counter()
            compiled, state, batch = compile_ours(args, tokens, attention_impl=impl, attention_block=args.block)
            mem = compiled.memory_analysis()
            peak = mem.temp_size_in_bytes + mem.argument_size_in_bytes
            attn = attention_temp_bytes(args.batch, seq, impl, args.block)
            print(f"{seq:5d} {impl:9s}: compiled in {time.perf_counter() - t0:.1f}s, step peak {peak / GiB:.2f} GiB, "
                  f"attention fwd+bwd temporaries {attn / GiB:.3f} GiB", flush=True)
            rows.append({"seq": seq, "impl": impl, "peak": peak, "attn": attn, "times": []})
            if args.repeats and peak <= args.max_run_gib * GiB:
                holder = {"state": state}

                def run(compiled=compiled, batch=batch, holder=holder):
                    holder["state"], m = compiled(holder["state"], batch)
                    return float(m["loss"])

                run()  # warm-up
                runs[(seq, impl)] = run
            del state
    by_key = {(r["seq"], r["impl"]): r for r in rows}
    for i in range(args.repeats):
        for seq in args.seqs:
            for impl in IMPLS:
                if (seq, impl) in runs:
                    t0 = time.perf_counter()
                    runs[(seq, impl)]()
                    by_key[(seq, impl)]["times"].append(time.perf_counter() - t0)
        print(f"repeat {i + 1}/{args.repeats} done", flush=True)

    print(f"\nbatch {args.batch}, block {args.block}, fp32; tokens/s = median over {args.repeats} steps")
    print("| tokens | impl | tokens/s | step peak (XLA) | attention fwd+bwd temporaries, 4 layers |")
    print("|---|---|---|---|---|")
    for r in rows:
        tps = f"{args.batch * r['seq'] / float(np.median(r['times'])):.0f}" if r["times"] else "not run"
        print(f"| {r['seq']} | {r['impl']} | {tps} | {r['peak'] / GiB:.2f} GiB | {r['attn'] / GiB:.3f} GiB |")
    print()
    for seq in args.seqs:
        d, b = by_key[(seq, "dense")], by_key[(seq, "blockwise")]
        speed = (f"speed blockwise/dense {np.median(d['times']) / np.median(b['times']):.2f}x"
                 if d["times"] and b["times"] else "speed not measured")
        print(f"{seq} tokens: {speed}, step peak dense/blockwise {d['peak'] / b['peak']:.2f}x, "
              f"attention memory dense/blockwise {d['attn'] / max(b['attn'], 1):.1f}x")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
