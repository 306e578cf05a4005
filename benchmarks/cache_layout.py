"""KV-cache layout for decoding: the decoder's per-layer cache vs the layouts it replaced, same run.

Each variant runs prefill plus `--steps` one-token steps inside one jitted `lax.fori_loop`, on the same random
weights, computing the final hidden states only (the output projection is the same for all). Variants:

- ours: `Chameleon.__call__` with unscanned layers and the per-layer cache of `init_cache` (what the
  sampler runs): each layer's buffer is updated in place;
- stacked cache, unscanned weights: one (L, B, S, K, H) cache, each layer reading its slice and the new
  slices stacked back every step;
- per-layer cache, scanned weights: the canonical checkpoint layout, each layer's weights sliced from the
  stacked tree every step;
- stacked cache, scanned weights: `nn.scan` over the blocks with the stacked cache as a scanned input and
  output (the layout `Chameleon` had before the per-layer cache).

The variants alternate run by run so that load from other processes hits them alike. Prints the median
time per decode step of each and its ratio to ours, plus the load average.

    python benchmarks/cache_layout.py                     # small shape of benchmarks/generate.py
    python benchmarks/cache_layout.py --shape medium --runs 3
"""
from __future__ import annotations

import argparse
import os
import time

SHAPES = {  # as benchmarks/generate.py
    "small": dict(hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4, num_kv_heads=4, head_dim=64),
    "medium": dict(hidden_size=1024, intermediate_size=2816, num_layers=8, num_heads=16, num_kv_heads=16,
                   head_dim=64),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="small", help="model shape (default small)")
    p.add_argument("--rows", type=int, default=2, help="batch rows (2: one guided image)")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens prefilled before the steps")
    p.add_argument("--steps", type=int, default=256, help="one-token decode steps per run")
    p.add_argument("--runs", type=int, default=5, help="timed runs per variant, alternating (median reported)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from lumina_jax.config import ChameleonConfig
    from lumina_jax.models import chameleon as C
    from lumina_jax.models.attention import KVCache
    from lumina_jax.state import init_params

    cfg = ChameleonConfig(vocab_size=65536, dtype="float32", param_dtype="float32", **SHAPES[args.shape])
    ucfg = cfg.replace(scan_layers=False)
    R, P, steps = args.rows, args.prompt, args.steps
    S = P + steps
    scanned = init_params(cfg, args.seed)
    unscanned = C.unstack_layers(scanned)
    prompt = jnp.ones((R, P), jnp.int32)
    # the per-layer buffers' shape, stacked
    shape = (cfg.num_layers, *jax.eval_shape(lambda: C.init_cache(ucfg, R, S))[0].k.shape)
    block = C.DecoderBlock(ucfg)
    norm = C.RMSNorm(cfg.rms_norm_eps, jnp.float32, jnp.float32)

    def embed(p, tokens):
        return C.Embedding(cfg).apply({"params": p["embed_tokens"]}, tokens)

    def ours(p, tokens, positions, cache, index):
        return C.Chameleon(ucfg).apply({"params": p}, tokens, positions=positions, cache=cache, cache_index=index,
                                       return_hidden=True)

    def stacked_unscanned(p, tokens, positions, cache, index):
        x, ks, vs = embed(p, tokens), [], []
        for i in range(cfg.num_layers):
            x, c = block.apply({"params": p[f"layers_{i}"]}, x, KVCache(cache.k[i], cache.v[i]), positions, None, index)
            ks.append(c.k)
            vs.append(c.v)
        return norm.apply({"params": p["norm"]}, x), KVCache(jnp.stack(ks), jnp.stack(vs))

    def per_layer_scanned(p, tokens, positions, cache, index):
        x, new = embed(p, tokens), []
        for i, c in enumerate(cache):
            layer = jax.tree.map(lambda w: w[i], p["layers"])
            x, c = block.apply({"params": layer}, x, c, positions, None, index)
            new.append(c)
        return norm.apply({"params": p["norm"]}, x), tuple(new)

    layers = nn.scan(C.DecoderBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.num_layers)(cfg)

    def stacked_scanned(p, tokens, positions, cache, index):
        x, cache = layers.apply({"params": p["layers"]}, embed(p, tokens), cache, positions, None, index)
        return norm.apply({"params": p["norm"]}, x), cache

    per_layer = lambda: C.init_cache(ucfg, R, S)
    stacked = lambda: KVCache(jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))
    variants = {
        "ours: per-layer cache, unscanned weights": (ours, unscanned, per_layer),
        "stacked cache, unscanned weights": (stacked_unscanned, unscanned, stacked),
        "per-layer cache, scanned weights sliced": (per_layer_scanned, scanned, per_layer),
        "stacked cache, scanned weights (nn.scan)": (stacked_scanned, scanned, stacked),
    }

    def decode_loop(forward, init):
        def run(p):
            positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (R, P))
            h, cache = forward(p, prompt, positions, init(), jnp.zeros((R,), jnp.int32))

            def step(i, carry):
                cache, acc = carry
                index = jnp.full((R,), P + i, jnp.int32)
                h, cache = forward(p, jnp.ones((R, 1), jnp.int32), index[:, None], cache, index)
                return cache, acc + h[:, 0, 0]

            return jax.lax.fori_loop(0, steps, step, (cache, h[:, -1, 0]))[1]
        return jax.jit(run)

    jitted = {name: (decode_loop(fwd, init), p) for name, (fwd, p, init) in variants.items()}
    outputs = {name: np.asarray(f(p)) for name, (f, p) in jitted.items()}  # compile; all must agree
    ref = outputs["ours: per-layer cache, unscanned weights"]
    worst = max(float(np.abs(o - ref).max()) for o in outputs.values())
    times = {name: [] for name in jitted}
    for _ in range(args.runs):
        for name, (f, p) in jitted.items():
            t = time.perf_counter()
            f(p).block_until_ready()
            times[name].append(time.perf_counter() - t)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; jax {jax.__version__}; {args.shape} shape "
          f"(hidden {cfg.hidden_size}, {cfg.num_layers} layers), {R} rows, {S} slots, {steps} steps, "
          f"{args.runs} runs each; max |difference| of the outputs {worst:.1e}")
    base = float(np.median(times["ours: per-layer cache, unscanned weights"]))
    for name, ts in times.items():
        med = float(np.median(ts))
        print(f"{name:42s} {med * 1e3 / steps:8.3f} ms/step   {med / base:5.2f}x ours")


if __name__ == "__main__":
    main()
