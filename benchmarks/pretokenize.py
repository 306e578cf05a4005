"""Pre-tokenization throughput: our chunked, batched, jitted VQGAN encoding vs one image at a time.

    python benchmarks/pretokenize.py [--num-images 64 --target-size 128 --width 32 --batch-size 16]

Three ways over the same images (random sizes of several aspect ratios, so several crop sizes occur):
  ours       `Pretokenizer.process_chunk`: crop + whiten every image of a chunk, group by crop size, encode
             in jitted batches of --batch-size, lay out UniRep tokens and conversation labels;
  baseline   the reference's procedure (`FlexARItemProcessor.process_image`): one image at a time through the
             VQGAN in fp32 (batch 1, with the same JAX encoder, compiled once per crop size) then a Python
             dict lookup per code; and, if taming-transformers is installed,
  taming     the same one-at-a-time loop with taming-transformers' PyTorch Encoder/VectorQuantizer (the
             reference's VQGAN code), on CPU.
JAX compilation is done in an untimed warm-up pass first. The VQGAN has
Chameleon's layout at width --width (Chameleon's is 128; the tiny default keeps the run short on CPU).
Prints images/s of each and the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=64, help="images to pre-tokenize (one per item)")
    p.add_argument("--target-size", type=int, default=128, help="crop-size list resolution")
    p.add_argument("--width", type=int, default=32, help="VQGAN base channels `ch` (Chameleon: 128)")
    p.add_argument("--codes", type=int, default=8192, help="VQGAN codebook size")
    p.add_argument("--batch-size", type=int, default=16, help="images per encoder call for ours")
    p.add_argument("--chunk-size", type=int, default=64, help="items per chunk for ours")
    p.add_argument("--no-taming", action="store_true", help="skip the PyTorch taming baseline")
    p.add_argument("--seed", type=int, default=0, help="seed of the random images and weights")
    return p


def _taming_encoder(cfg, ckpt_path):
    import torch
    from taming.modules.diffusionmodules.model import Encoder
    from taming.modules.vqvae.quantize import VectorQuantizer

    dd = dict(double_z=cfg.double_z, z_channels=cfg.z_channels, resolution=cfg.resolution, in_channels=cfg.in_channels,
              out_ch=cfg.out_ch, ch=cfg.ch, ch_mult=list(cfg.ch_mult), num_res_blocks=cfg.num_res_blocks,
              attn_resolutions=list(cfg.attn_resolutions), dropout=0.0)
    mods = torch.nn.ModuleDict({"encoder": Encoder(**dd), "quant_conv": torch.nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1),
                                "quantize": VectorQuantizer(cfg.n_embed, cfg.embed_dim, beta=0.25)})
    sd = torch.load(ckpt_path, weights_only=False)["state_dict"]
    mods.load_state_dict({k: v for k, v in sd.items() if k.split(".")[0] in mods}, strict=True)
    mods.eval()

    @torch.no_grad()
    def encode(x_hwc):
        x = torch.from_numpy(x_hwc[None]).permute(0, 3, 1, 2)
        z = mods["quant_conv"](mods["encoder"](x))
        _, _, (_, _, idx) = mods["quantize"](z)
        return idx.reshape(z.shape[2], z.shape[3]).numpy()

    return encode


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from tqdm import tqdm

    from lumina_jax.data.pretokenize import Pretokenizer, _load_image
    from lumina_jax.image_tokenizer import ImageTokenizer, preprocess
    from lumina_jax.testing.tokenizer import write_text_tokenizer_json
    from lumina_jax.testing.vqgan import tiny_vqgan_config, write_lightning_vqgan, write_vqgan_checkpoint
    from lumina_jax.unirep import crop_size_list, var_center_crop

    tmp = tempfile.mkdtemp(prefix="bench_pretok_")
    cfg = tiny_vqgan_config(ch=args.width, n_embed=args.codes, embed_dim=256, z_channels=256)
    vq_dir = write_vqgan_checkpoint(os.path.join(tmp, "vqgan"), cfg, seed=args.seed)
    tok_path = write_text_tokenizer_json(os.path.join(tmp, "tok.json"))
    rng = np.random.default_rng(args.seed)
    items = []
    aspects = [(1.0, 1.0), (2.0, 1.0)]
    for i in range(args.num_images):
        a = aspects[i % len(aspects)]
        scale = args.target_size * rng.uniform(0.9, 1.6) / np.sqrt(a[0] * a[1])
        w, h = int(a[0] * scale), int(a[1] * scale)
        path = os.path.join(tmp, f"im{i}.jpg")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=90)
        items.append((i, {"conversations": [{"from": "human", "value": f"Generate image {i}"},
                                            {"from": "gpt", "value": "<|image|>"}], "image": [path]}))
    crops = crop_size_list(args.target_size)
    image_tokenizer = ImageTokenizer.from_checkpoint(vq_dir)
    pretok = Pretokenizer(tok_path, None, args.target_size, 0, args.batch_size, False, 0, tmp, image_tokenizer)
    sizes = sorted({var_center_crop(_load_image(it["image"][0]), crops).size for _, it in items})
    print(f"{args.num_images} images, {len(sizes)} crop sizes {sizes}, VQGAN width {args.width}, "
          f"{args.codes} codes, devices {[d.platform for d in __import__('jax').devices()][:1]}")

    # warm-up (not timed): one full pass of ours compiles its batch shapes; batch 1 per crop size for the baseline
    pretok.process_chunk(items[: args.chunk_size])
    for w, h in tqdm(sizes, desc="compile batch 1"):
        image_tokenizer.encode(np.zeros((1, h, w, 3), np.float32)).block_until_ready()

    t0 = time.perf_counter()
    n_ours = 0
    for s in range(0, len(items), args.chunk_size):
        good, bad = pretok.process_chunk(items[s:s + args.chunk_size])
        assert not bad, bad
        n_ours += len(good)
    t_ours = time.perf_counter() - t0

    bpe = {int(c): int(c) + 4 for c in range(args.codes)}  # the reference's per-token dict lookup

    def one_at_a_time(encode):
        t = time.perf_counter()
        for _, it in items:
            img = var_center_crop(_load_image(it["image"][0]), crops)
            codes = np.asarray(encode(preprocess(img)))
            [bpe[int(c)] for c in codes.reshape(-1)]
        return time.perf_counter() - t

    t_base = one_at_a_time(lambda x: image_tokenizer.encode(x[None])[0])
    results = {"ours_images_per_s": n_ours / t_ours, "baseline_jax_one_at_a_time_images_per_s": len(items) / t_base}
    if not args.no_taming:
        try:
            import torch

            torch.set_num_threads(os.cpu_count() or 1)
            ckpt, _ = write_lightning_vqgan(os.path.join(tmp, "torch"), cfg, seed=args.seed, with_loss_keys=False)
            t_taming = one_at_a_time(_taming_encoder(cfg, ckpt))
            results["baseline_taming_torch_one_at_a_time_images_per_s"] = len(items) / t_taming
        except ImportError as e:
            print(f"taming baseline skipped ({e})")
    print(json.dumps({k: round(v, 2) for k, v in results.items()}))
    print(f"ours {results['ours_images_per_s']:.2f} img/s vs one-at-a-time (same JAX VQGAN) "
          f"{results['baseline_jax_one_at_a_time_images_per_s']:.2f} img/s: "
          f"{results['ours_images_per_s'] / results['baseline_jax_one_at_a_time_images_per_s']:.2f}x")
    if "baseline_taming_torch_one_at_a_time_images_per_s" in results:
        r = results["baseline_taming_torch_one_at_a_time_images_per_s"]
        print(f"ours vs one-at-a-time taming (PyTorch, reference VQGAN code) {r:.2f} img/s: "
              f"{results['ours_images_per_s'] / r:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
