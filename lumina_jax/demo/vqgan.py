"""Train the demo model's VQGAN on the synthetic shapes set, then measure its reconstructions.

    python -m lumina_jax.demo.vqgan --out ckpts/demo_vqgan            # defaults: the demo recipe
    python -m lumina_jax.demo.vqgan --out runs/vq --steps 200 --n-embed 256

The training is `lumina_jax.training.vqgan_train` (model, loss, codebook updates and restarts are described
there). Images are rendered on the fly from the training split of `lumina_jax.demo.shapes` (held-out
colour-shape combinations are never seen), one image size per step, cycling through `--train-sizes`.

Output: a VQGAN checkpoint directory (`params/` + `vqgan_config.json`, read by
`lumina_jax.image_tokenizer.ImageTokenizer.from_checkpoint`) plus `train_report.json`: losses, codebook
usage and perplexity, reconstruction error and the shapes analysis of reconstructed held-out images.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time
from typing import Any, Sequence

import numpy as np

from lumina_jax import param_checkpoint
from lumina_jax.demo import shapes
from lumina_jax.demo.shape_analysis import accuracy
from lumina_jax.image_tokenizer import ImageTokenizer, preprocess
from lumina_jax.training import vqgan_train
from lumina_jax.training.vqgan_train import REPORT_FILE, VQGANTrainConfig, flag_field
from lumina_jax.unirep import crop_size_list


@dataclasses.dataclass(frozen=True)
class DemoVQGANConfig(VQGANTrainConfig):
    """Everything a run depends on; each field is also a command-line flag (--field-name)."""

    # shapes of the training images
    min_extent: float = flag_field(0.5, "smallest shape side / min(W, H) of the training images")
    max_extent: float = flag_field(0.85, "largest shape side / min(W, H) of the training images")
    position_jitter: float = flag_field(0.6, "shape offset from the centre as a fraction of the free room")
    # held-out evaluation
    eval_target_sizes: str = flag_field("64,128", "UniRep target sizes whose crop lists the held-out evaluation uses")
    eval_per_size: int = flag_field(6, "held-out images per evaluation size")

    def __post_init__(self):
        super().__post_init__()
        self.eval_sizes  # validates eval_target_sizes

    @property
    def eval_sizes(self) -> list[tuple[int, int]]:
        out = []
        for t in self.eval_target_sizes.split(","):
            try:
                target = int(t)
            except ValueError:
                raise ValueError(f"DemoVQGANConfig: eval_target_sizes entry {t!r} is not an integer") from None
            out += [s for s in crop_size_list(target) if s not in out]
        return out


def training_batch(cfg: DemoVQGANConfig, step: int) -> np.ndarray:
    """(B, H, W, 3) float32 in [-1, 1]: training-split shapes at size `sizes[step % len(sizes)]`, seeded by (seed, step).

    B = `cfg.batch_size(size)`."""
    size = cfg.sizes[step % len(cfg.sizes)]
    rng = np.random.default_rng([cfg.seed, 3, step])
    out = []
    for _ in range(cfg.batch_size(size)):
        spec = shapes.sample_spec(rng, [size], "train")
        layout = shapes.sample_layout(*size, rng, cfg.min_extent, cfg.max_extent, cfg.position_jitter)
        out.append(preprocess(shapes.render(spec, layout)))
    return np.stack(out)


def heldout_images(sizes: Sequence[tuple[int, int]], per_size: int, seed: int = 7) -> list[tuple[Any, Any]]:
    """(spec, PIL image) pairs of held-out combinations, `per_size` at each size, default layouts of the set."""
    d = shapes.SetConfig()
    out = []
    for k, size in enumerate(sizes):
        rng = np.random.default_rng([seed, k])
        for _ in range(per_size):
            spec = shapes.sample_spec(rng, [size], "held_out")
            layout = shapes.sample_layout(*size, rng, d.min_extent, d.max_extent, d.position_jitter)
            out.append((spec, shapes.render(spec, layout)))
    return out


def evaluate(tokenizer, pairs: Sequence[tuple[Any, Any]], progress: bool = False) -> dict:
    """Reconstruct each image through the tokenizer; report pixel error, codebook usage and analysis accuracy.

    `pairs` are (ShapeSpec, PIL image)."""
    recon, figures = vqgan_train.reconstruct(tokenizer, [im for _, im in pairs], progress)
    return {**figures, "analysis_accuracy": accuracy([(spec, im) for (spec, _), im in zip(pairs, recon)]),
            "analysis_accuracy_originals": accuracy(list(pairs))}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lumina_jax.demo.vqgan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="checkpoint directory to write (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--no-eval", action="store_true", help="skip the held-out reconstruction evaluation")
    for f in dataclasses.fields(DemoVQGANConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                       help=f"{f.metadata['help']} (default: {f.default})")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = DemoVQGANConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DemoVQGANConfig)})
        if not args.overwrite and os.path.exists(args.out):
            raise param_checkpoint.CheckpointError(f"--out {args.out} already exists (pass --overwrite to replace it)")
    except (ValueError, RuntimeError) as e:
        print(f"lumina_jax.demo.vqgan: {e}", file=sys.stderr)
        return 2
    params, report = vqgan_train.train(cfg, functools.partial(training_batch, cfg), progress=not args.quiet)
    if not args.no_eval:
        tok = ImageTokenizer(cfg.vqgan_config(), params)
        t0 = time.time()
        report["heldout_eval"] = evaluate(tok, heldout_images(cfg.eval_sizes, cfg.eval_per_size), progress=not args.quiet)
        report["heldout_eval"]["seconds"] = round(time.time() - t0, 1)
    vqgan_train.save_checkpoint(args.out, params, cfg, report, overwrite=args.overwrite)
    last = report["history"][-1]
    print(f"trained {cfg.steps} steps in {report['train_seconds']:.0f}s: loss {last['loss']:.4f}, "
          f"l1 {last['l1']:.4f}, codes alive {report['codes_alive_at_end']}/{cfg.n_embed}")
    if "heldout_eval" in report:
        ev = report["heldout_eval"]
        acc = ev["analysis_accuracy"]
        print(f"held-out reconstructions ({ev['images']} images): PSNR {ev['psnr_db']:.1f} dB, "
              f"codes used {ev['codes_used']}/{ev['codebook_size']} (perplexity {ev['code_perplexity']:.0f}), "
              f"analysis: background {acc['background']:.1%}, colour {acc['colour']:.1%}, shape {acc['shape']:.1%}, "
              f"size {acc['size']:.1%}")
    print(f"wrote {args.out} ({REPORT_FILE} has the figures)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
