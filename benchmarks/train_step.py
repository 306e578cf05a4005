"""Training-step throughput: our jitted step vs transformers' PyTorch Chameleon + torch AdamW, same run.

Same model (hidden 256, 4 layers, 4 heads, MLP 688, vocabulary 65536), same batch (8 x 512 tokens, all
supervised), fp32, AdamW (0.9, 0.95, wd 0.1) with global-norm clipping at 4, no dropout, no z-loss. Prints
tokens/s of each (median step time; the two alternate step by step so both see the same load) and the ratio.

    python benchmarks/train_step.py                 # about 2 minutes on a 2-core CPU
    python benchmarks/train_step.py --steps 5 --chunk_size 128
"""
from __future__ import annotations

import argparse
import os
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=3,
                   help="timed steps per implementation, alternating ours/torch (after 1 warm-up step each)")
    p.add_argument("--chunk_size", type=int, default=64, help="our loss: sequence positions per output-layer chunk")
    p.add_argument("--no_fused", action="store_true", help="our loss: autodiff of a rematerialised chunk loop")
    p.add_argument("--skip_torch", action="store_true", help="time only our step")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random batch and initialisation")
    return p.parse_args(argv)


MODEL = dict(vocab_size=65536, hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4, num_kv_heads=4,
             head_dim=64)


def make_batch(args):
    import numpy as np
    rng = np.random.default_rng(args.seed)
    # text ids only: transformers masks the image-token logits (ids 4..8195), which would make their CE infinite
    tokens = rng.integers(8196, MODEL["vocab_size"], (args.batch, args.seq + 1)).astype(np.int32)
    return tokens


def compile_ours(args, tokens, segment_ids=None, **model_overrides):
    """Our train step compiled ahead of time for this batch: (compiled step, initial state, batch).

    `segment_ids` (B, T): packed segments (default: one segment per row). `model_overrides`: ChameleonConfig
    fields to change (e.g. attention_impl="blockwise")."""
    import jax
    import numpy as np

    from lumina_jax import sharding
    from lumina_jax.config import ChameleonConfig
    from lumina_jax.state import init_train_state, train_state_shardings
    from lumina_jax.training import train_step as ts
    from lumina_jax.training.config import LossConfig, OptimizerConfig
    from lumina_jax.training.optimizer import learning_rate_schedule, make_optimizer

    cfg = ChameleonConfig(**{**MODEL, "dtype": "float32", "param_dtype": "float32", "z_loss_weight": 0.0,
                             "dropout": 0.0, **model_overrides})
    ocfg = OptimizerConfig(lr=1e-4, min_lr=1e-4, warmup_steps=0, b1=0.9, b2=0.95, weight_decay=0.1, clip_grad_norm=4.0)
    mesh = sharding.make_mesh("fsdp=1", devices=jax.devices()[:1])
    tx = make_optimizer(ocfg, 1000)
    ctx = ts.StepContext(cfg, LossConfig(chunk_size=args.chunk_size, fused_grad=not args.no_fused), tx,
                         learning_rate_schedule(ocfg, 1000), 1, mesh, sharding.FSDP_RULES)
    shardings = train_state_shardings(cfg, tx, mesh, sharding.FSDP_RULES)
    state = init_train_state(cfg, tx, mesh, sharding.FSDP_RULES, args.seed)
    B, T = tokens.shape[0], tokens.shape[1] - 1
    batch = ts.global_batch(ctx, {
        "inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((B, T), np.float32),
        "segment_ids": np.ones((B, T), np.int32) if segment_ids is None else segment_ids,
        "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)),
    })
    with sharding.sharding_context(mesh, sharding.FSDP_RULES):
        compiled = ts.jit_train_step(ctx, shardings).jitted.lower(state, batch).compile()
    return compiled, state, batch


def build_ours(args, tokens, **model_overrides):
    """Our step (compiled and run once); returns a closure running one more step."""
    t0 = time.perf_counter()
    compiled, state, batch = compile_ours(args, tokens, **model_overrides)
    holder = {"state": state}

    def run_step():
        holder["state"], m = compiled(holder["state"], batch)
        return float(m["loss"])  # waits for the step

    loss = run_step()
    print(f"ours : compile + first step {time.perf_counter() - t0:.1f}s, loss {loss:.4f}", flush=True)
    return run_step


def vocabulary_map(start: int = 4, end: int = 8196) -> dict:
    """A name -> id map with Chameleon's image-token naming (IMGIMG<letters>Z) for ids start..end-1."""
    names = {f"<tok{i}>": i for i in range(MODEL["vocab_size"]) if not start <= i < end}
    names.update({"IMGIMG" + "".join("ABCDEFGHIJ"[int(c)] for c in str(i - start)) + "Z": i
                  for i in range(start, end)})
    names["<image>"] = 8711
    return names


def build_torch(args, tokens):
    """transformers Chameleon + AdamW (run once); returns a closure running one more step."""
    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = transformers.ChameleonConfig(
        vocab_size=MODEL["vocab_size"], hidden_size=MODEL["hidden_size"], intermediate_size=MODEL["intermediate_size"],
        num_hidden_layers=MODEL["num_layers"], num_attention_heads=MODEL["num_heads"],
        num_key_value_heads=MODEL["num_kv_heads"], max_position_embeddings=4096, vocabulary_map=vocabulary_map(),
        vq_config=dict(base_channels=32, channel_multiplier=[1, 2], num_embeddings=64, embed_dim=32,
                       latent_channels=32, resolution=32),
    )
    config._attn_implementation = "sdpa"
    model = transformers.ChameleonForConditionalGeneration(config).train()
    params = [p for n, p in model.named_parameters() if "vqmodel" not in n]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    ids = torch.tensor(tokens, dtype=torch.long)

    def step():
        out = model(input_ids=ids, labels=ids)  # shifted CE over all positions inside transformers
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 4.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.item()

    t0 = time.perf_counter()
    loss = step()
    print(f"torch: first step {time.perf_counter() - t0:.1f}s, loss {loss:.4f} ({torch.get_num_threads()} threads)",
          flush=True)
    return step


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import numpy as np

    tokens = make_batch(args)
    ours = build_ours(args, tokens)
    theirs = None if args.skip_torch else build_torch(args, tokens)
    # alternate the two so both see the same machine load; report the median step time of each
    t_ours, t_torch = [], []
    for i in range(args.steps):
        t_ours.append(_timed(ours))
        if theirs is not None:
            t_torch.append(_timed(theirs))
        print(f"step {i + 1}: ours {t_ours[-1]:.2f}s" + (f", torch {t_torch[-1]:.2f}s" if t_torch else ""), flush=True)
    tokens_per_step = args.batch * args.seq
    ours_tps = tokens_per_step / float(np.median(t_ours))
    print(f"ours : {ours_tps:.0f} tokens/s")
    if theirs is None:
        return
    torch_tps = tokens_per_step / float(np.median(t_torch))
    print(f"torch: {torch_tps:.0f} tokens/s")
    print(f"ratio ours/torch: {ours_tps / torch_tps:.2f}x  (batch {args.batch} x {args.seq}, chunk {args.chunk_size}, "
          f"{'fused' if not args.no_fused else 'autodiff'} loss, fp32)")


if __name__ == "__main__":
    main()
