"""Cost of the train step's finiteness check: the step as trained vs the same step without the check, same run.

The step returns one boolean per floating-point array of the updated parameters and optimizer state
(`metrics["state_finite"]`, computed with the update so nothing non-finite is ever saved). The baseline is
the identical step with that output removed. Same model and batch as benchmarks/train_step.py (hidden 256,
4 layers, vocabulary 65536, 8 x 512 tokens, fp32 AdamW); the two steps alternate so both see the same load;
medians reported.

    python benchmarks/finite_check.py            # about 2 minutes on a 2-core CPU
    python benchmarks/finite_check.py --steps 7
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant, alternating (after 1 warm-up each)")
    p.add_argument("--seed", type=int, default=0, help="seed of the batch and initialisation")
    return p.parse_args(argv)


def build(with_check: bool, tokens, seed: int):
    """A closure running one step of the train step (with or without the check) and waiting for it."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from lumina_jax import sharding
    from lumina_jax.config import ChameleonConfig
    from lumina_jax.state import init_train_state, train_state_shardings
    from lumina_jax.training import train_step as ts
    from lumina_jax.training.config import LossConfig, OptimizerConfig
    from lumina_jax.training.optimizer import learning_rate_schedule, make_optimizer
    from train_step import MODEL

    cfg = ChameleonConfig(**MODEL, dtype="float32", param_dtype="float32", z_loss_weight=0.0, dropout=0.0)
    ocfg = OptimizerConfig(lr=1e-4, min_lr=1e-4, warmup_steps=0, weight_decay=0.1, clip_grad_norm=4.0)
    mesh = sharding.make_mesh("fsdp=1", devices=jax.devices()[:1])
    tx = make_optimizer(ocfg, 1000)
    ctx = ts.StepContext(cfg, LossConfig(chunk_size=64), tx, learning_rate_schedule(ocfg, 1000), 1, mesh,
                         sharding.FSDP_RULES)
    shardings = train_state_shardings(cfg, tx, mesh, sharding.FSDP_RULES)
    checked = ts.finite_flags
    if not with_check:
        ts.finite_flags = lambda tree: jnp.ones((0,), bool)
    try:
        step = ts.jit_train_step(ctx, shardings)
        b, t = tokens.shape[0], tokens.shape[1] - 1
        batch = ts.global_batch(ctx, {
            "inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((b, t), np.float32),
            "segment_ids": np.ones((b, t), np.int32), "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)),
        })
        holder = {"state": init_train_state(cfg, tx, mesh, sharding.FSDP_RULES, seed)}

        def run_step():
            holder["state"], m = step(holder["state"], batch)
            jax.block_until_ready(m)

        run_step()  # compile while the patch is in place
    finally:
        ts.finite_flags = checked
    return run_step


def main(argv=None) -> int:
    args = parse_args(argv)
    from train_step import make_batch

    tokens = make_batch(argparse.Namespace(batch=8, seq=512, seed=args.seed))
    runs = {"checked": build(True, tokens, args.seed), "unchecked": build(False, tokens, args.seed)}
    times = {k: [] for k in runs}
    for _ in range(args.steps):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    for name in runs:
        print(f"{name:9s}: median step {med[name]:.3f}s over {args.steps} steps")
    print(f"ratio checked/unchecked: {med['checked'] / med['unchecked']:.3f}  (8 x 512 tokens, fp32, 1 device)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
