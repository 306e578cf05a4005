"""VQGAN encode/decode throughput: lumina-jax (jitted, batched) vs the PyTorch original, same weights, same run.

The baseline is taming-transformers 0.0.1 (`Encoder`, `Decoder`, `VectorQuantizer`: the modules
Chameleon's and Lumina's tokenizers run), in eval mode under `torch.no_grad()`, fed the same batch.
Weights are random (nothing is downloaded) with Chameleon's layout; `--ch 128 --size 512` is the real
model and resolution. Compile time of the jitted functions is reported separately, not in the rates.

    python benchmarks/vqgan.py                        # reduced width, 256 px, CPU (about 1-2 minutes)
    python benchmarks/vqgan.py --ch 128 --size 512    # the real model's cost
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ch", type=int, default=64, help="base channel count (Chameleon: 128); multiple of 32")
    p.add_argument("--n-embed", type=int, default=8192, help="codebook size (Chameleon: 8192)")
    p.add_argument("--embed-dim", type=int, default=256, help="code width = z_channels (Chameleon: 256)")
    p.add_argument("--size", type=int, default=256, help="image height and width in pixels (multiple of 16)")
    p.add_argument("--width", type=int, default=None, help="image width if different from --size (non-square)")
    p.add_argument("--batch", type=int, default=2, help="images per call, both implementations")
    p.add_argument("--iters", type=int, default=3, help="timed calls per measurement (median reported)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="our compute dtype")
    p.add_argument("--torch-threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and images")
    return p.parse_args(argv)


def median_time(fn, iters: int) -> float:
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> None:
    args = parse_args(argv)
    import jax
    import torch
    from taming.modules.diffusionmodules.model import Decoder, Encoder
    from taming.modules.vqvae.quantize import VectorQuantizer

    from lumina_jax.convert.vqgan import state_dict_from_params
    from lumina_jax.image_tokenizer import ImageTokenizer
    from lumina_jax.testing.vqgan import random_vqgan_params, tiny_vqgan_config

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    cfg = tiny_vqgan_config(ch=args.ch, n_embed=args.n_embed, embed_dim=args.embed_dim, z_channels=args.embed_dim,
                            resolution=args.size)
    params = random_vqgan_params(cfg, args.seed)
    h, w = args.size, args.width or args.size
    print(f"VQGAN ch={cfg.ch} ch_mult={cfg.ch_mult} codebook {cfg.n_embed}x{cfg.embed_dim}; batch {args.batch} "
          f"of {h}x{w}; jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")

    # ours
    tok = ImageTokenizer(cfg, params, dtype=args.dtype)
    x = np.random.default_rng(args.seed).uniform(-1, 1, (args.batch, h, w, 3)).astype(np.float32)
    t = time.perf_counter()
    codes = np.asarray(tok.encode(x))
    compile_enc = time.perf_counter() - t
    t = time.perf_counter()
    tok.decode(codes).block_until_ready()
    compile_dec = time.perf_counter() - t
    ours_enc = median_time(lambda: tok.encode(x).block_until_ready(), args.iters)
    ours_dec = median_time(lambda: tok.decode(codes).block_until_ready(), args.iters)

    # the PyTorch original on the same weights
    dd = dict(double_z=False, z_channels=cfg.z_channels, resolution=cfg.resolution, in_channels=3, out_ch=3, ch=cfg.ch,
              ch_mult=list(cfg.ch_mult), num_res_blocks=cfg.num_res_blocks, attn_resolutions=[], dropout=0.0)
    ref = torch.nn.Module()
    ref.encoder, ref.decoder = Encoder(**dd), Decoder(**dd)
    ref.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim, beta=0.25)
    ref.quant_conv = torch.nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
    ref.post_quant_conv = torch.nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict_from_params(params, cfg).items()}, strict=True)
    ref.eval()
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    ct = torch.from_numpy(codes.reshape(-1).copy()).long()

    @torch.no_grad()
    def torch_encode():
        return ref.quantize(ref.quant_conv(ref.encoder(xt)))[2][2]

    @torch.no_grad()
    def torch_decode():
        zq = ref.quantize.get_codebook_entry(ct, (args.batch, h // 16, w // 16, cfg.embed_dim))
        return ref.decoder(ref.post_quant_conv(zq))

    torch_codes = torch_encode().reshape(codes.shape).numpy()  # warm-up, and a sanity check of the comparison
    torch_encode_s = median_time(torch_encode, args.iters)
    torch_decode_s = median_time(torch_decode, args.iters)

    agree = float(np.mean(torch_codes == codes))
    print(f"codes identical to torch: {100 * agree:.2f}%   (compile: encode {compile_enc:.1f} s, decode {compile_dec:.1f} s)")
    print(f"{'':8s}{'lumina-jax img/s':>18s}{'torch img/s':>14s}{'ratio':>8s}")
    for name, ours_s, ref_s in [("encode", ours_enc, torch_encode_s), ("decode", ours_dec, torch_decode_s)]:
        print(f"{name:8s}{args.batch / ours_s:18.2f}{args.batch / ref_s:14.2f}{ref_s / ours_s:7.2f}x")


if __name__ == "__main__":
    main()
