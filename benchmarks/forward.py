"""Forward-pass throughput: our jitted Flax decoder vs transformers' PyTorch Chameleon, same weights and inputs.

A random transformers `ChameleonForConditionalGeneration` is built, saved with `save_pretrained`, converted
with `lumina_jax.convert.chameleon`, and both models run full forwards (logits for every position) on the
same token batch in the same process. Prints tokens/s of each, the ratio, and the max logit difference as a
sanity check.

    python benchmarks/forward.py                       # hidden 512, 4 layers, vocab 65536, batch 4 x 512
    python benchmarks/forward.py --dtype bfloat16 --iters 5
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512, help="model width D (default 512)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    p.add_argument("--heads", type=int, default=8, help="query heads (default 8)")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: = --heads, MHA)")
    p.add_argument("--intermediate", type=int, default=None,
                   help="MLP width F (default: Chameleon's rule 256*ceil(8D/3/256))")
    p.add_argument("--vocab", type=int, default=65536, help="vocabulary size (default 65536; image ids 4..8195)")
    p.add_argument("--swin-norm", action="store_true", help="swin-norm blocks (34B layout) instead of pre-norm")
    p.add_argument("--batch", type=int, default=4, help="sequences per forward (default 4)")
    p.add_argument("--length", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="parameter and compute dtype on both sides (default float32)")
    p.add_argument("--warmup", type=int, default=1, help="untimed forwards per side after compilation (default 1)")
    p.add_argument("--iters", type=int, default=3, help="timed forwards per side; the median is reported (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and tokens (default 0)")
    return p.parse_args(argv)


def vocabulary_map(vocab: int, start: int = 4, end: int = 8196) -> dict[str, int]:
    end = min(end, vocab)
    names = {f"<tok{i}>": i for i in range(vocab) if not start <= i < end}
    names.update({"IMGIMG" + "".join("ABCDEFGHIJ"[int(c)] for c in str(i - start)) + "Z": i for i in range(start, end)})
    return names


def interleaved_medians(fns, warmup: int, iters: int) -> list[float]:
    """Median wall time of each callable; iterations alternate between them so that load from other
    processes on a shared machine hits both sides alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(iters):
        for fn, ts in zip(fns, times):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return [sorted(ts)[len(ts) // 2] for ts in times]


def main(argv=None) -> None:
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers

    from lumina_jax import param_checkpoint
    from lumina_jax.config import ChameleonConfig
    from lumina_jax.convert.chameleon import convert
    from lumina_jax.models.chameleon import Chameleon

    inter = args.intermediate or 256 * -(-int(8 * args.hidden / 3) // 256)
    torch.manual_seed(args.seed)
    hf_cfg = transformers.ChameleonConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=inter, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads or args.heads, swin_norm=args.swin_norm,
        vocabulary_map=vocabulary_map(args.vocab),
        vq_config=dict(base_channels=32, channel_multiplier=[1, 2], num_embeddings=64, embed_dim=32,
                       latent_channels=32, resolution=32),
    )
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    hf = transformers.ChameleonForConditionalGeneration(hf_cfg).eval().to(torch_dtype)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(Path(tmp) / "hf")
        convert(Path(tmp) / "hf", Path(tmp) / "ckpt", compute_dtype=args.dtype, progress=False)
        cfg = ChameleonConfig.from_dict(param_checkpoint.read_json(Path(tmp) / "ckpt", "config.json"))
        params = jax.device_put(param_checkpoint.restore_params(Path(tmp) / "ckpt"))

    tokens = np.random.default_rng(args.seed).integers(0, args.vocab, (args.batch, args.length), dtype=np.int32)
    n_tokens = args.batch * args.length

    model = Chameleon(cfg)
    forward = jax.jit(lambda p, t: model.apply({"params": p}, t))
    jtokens = jnp.asarray(tokens)
    t = time.perf_counter()
    ours_logits = forward(params, jtokens).block_until_ready()
    compile_s = time.perf_counter() - t
    ttokens = torch.from_numpy(tokens).long()

    def torch_forward():
        with torch.inference_mode():
            return hf(input_ids=ttokens).logits

    torch_logits = torch_forward()
    ours_s, torch_s = interleaved_medians(
        [lambda: forward(params, jtokens).block_until_ready(), torch_forward], args.warmup, args.iters)

    text = np.r_[0:4, min(8196, args.vocab):args.vocab]
    diff = float(np.abs(np.asarray(ours_logits, np.float32)[..., text] - torch_logits.float().numpy()[..., text]).max())
    ours_tps, torch_tps = n_tokens / ours_s, n_tokens / torch_s
    params_m = sum(p.numel() for n, p in hf.named_parameters() if not n.startswith("model.vqmodel.")) / 1e6
    print(f"shape: hidden {args.hidden}, layers {args.layers}, heads {args.heads}/{args.kv_heads or args.heads}, "
          f"mlp {inter}, vocab {args.vocab}, {params_m:.1f}M decoder params, batch {args.batch} x {args.length}, "
          f"{args.dtype}; jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads, attn {hf.config._attn_implementation}), "
          f"{os.cpu_count()} CPUs")
    print(f"lumina-jax (jit, compile {compile_s:.1f}s): {ours_s * 1e3:9.1f} ms/forward  {ours_tps:10.1f} tokens/s")
    print(f"transformers (PyTorch eager):       {torch_s * 1e3:9.1f} ms/forward  {torch_tps:10.1f} tokens/s")
    print(f"ratio lumina-jax / transformers: {ours_tps / torch_tps:.2f}x   (max |logit diff| over text ids {diff:.2e})")


if __name__ == "__main__":
    main()
