"""VQGAN training for any image source: straight-through quantizer, codebook updates, dead-code restarts.

The model is `lumina_jax.models.vqgan.VQGAN` (Chameleon's layout: ch_mult 1,1,2,2,4, 16x downsampling, mid
attention) at a configurable width and codebook size. `train(cfg, batches)` runs the jitted step on the
images `batches(step)` returns, one image size per step, cycling through `cfg.train_sizes`; the demo model's
tokenizer is trained this way on generated shapes (`lumina_jax.demo.vqgan`). The loss is

    l1 * |x - x'| + l2 * (x - x')^2 + beta * (z - sg(e))^2     (+ codebook * (sg(z) - e)^2 with 'grad')

with the straight-through estimator from the quantized code e back to the encoder output z. By default
(`codebook_update="ema"`) each code is the moving average of the encoder outputs assigned to it; 'grad'
moves the codes by Adam on the codebook term instead. GroupNorm uses `norm_groups` groups (8: taming's
32 would be one channel per group at ch 32, an instance norm that erases flat colours). Codebook usage
is tracked as an exponential moving average of the code frequencies; every `restart_every` steps (also at
step 0, which initialises the codebook from data) codes used less than `dead_fraction` of uniform are
re-initialised from random encoder outputs of the batch. Restarts stop after `restart_until` of training,
so the decoder settles on the final codebook.

`save_checkpoint` writes a VQGAN checkpoint directory (`params/` + `vqgan_config.json`, read by
`lumina_jax.image_tokenizer.ImageTokenizer.from_checkpoint`) plus `train_report.json`; `reconstruct`
measures pixel error and codebook usage of a trained tokenizer.

Differences from the reference (taming-transformers VQModel training): no LPIPS perceptual loss and no
patch discriminator (their weights would have to be downloaded; flat synthetic images do not need them);
an L1 + L2 pixel loss instead; moving-average codes by default (taming trains them by gradient; with 'grad'
the non-legacy VQ loss, beta weighting the commitment term); GroupNorm groups configurable (taming: 32);
dead-code restarts (taming has none); Adam with warm-up and cosine decay; batches come from a function, not
a dataset reader.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image
from tqdm import tqdm

from lumina_jax import param_checkpoint
from lumina_jax.image_tokenizer import CONFIG_FILE, map_batched_by_shape, preprocess, to_uint8
from lumina_jax.models.vqgan import VQGAN, VQGANConfig, init_params, nearest_codes

REPORT_FILE = "train_report.json"


def flag_field(default, help: str):
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class VQGANTrainConfig:
    """Model, image sizes, optimisation and codebook settings of a run; the fields document the demo's flags."""

    # model (VQGANConfig fields; ch_mult is fixed to Chameleon's (1, 1, 2, 2, 4))
    ch: int = flag_field(32, "base channels (a multiple of --norm-groups); levels get ch * (1,1,2,2,4)")
    norm_groups: int = flag_field(8, "GroupNorm groups (taming/Chameleon: 32 at ch 128, 4 channels per group); keep "
                                     "several channels per group: at one the norm removes each channel's mean, i.e. "
                                     "flat colours")
    num_res_blocks: int = flag_field(1, "ResnetBlocks per encoder level (decoder levels get one more); Chameleon: 2")
    z_channels: int = flag_field(64, "encoder output / decoder input channels")
    embed_dim: int = flag_field(16, "code vector width")
    n_embed: int = flag_field(512, "codebook size (number of codes)")
    # image sizes and batch
    train_sizes: str = flag_field("64x64,128x32,32x128,128x128",
                                  "WxH image sizes cycled step by step (each is compiled once), multiples of 16")
    batch_pixels: int = flag_field(16384, "pixels per step: a step at size WxH takes max(1, batch_pixels // (W*H)) "
                                          "images (rounded down to a multiple of num_devices), so every step costs "
                                          "about the same")
    # optimisation
    steps: int = flag_field(1000, "optimizer steps")
    lr: float = flag_field(6e-4, "peak Adam learning rate")
    warmup_steps: int = flag_field(100, "linear warm-up steps")
    final_lr_fraction: float = flag_field(0.1, "cosine decay ends at this fraction of lr")
    b1: float = flag_field(0.5, "Adam beta1 (taming's VQGAN uses 0.5)")
    b2: float = flag_field(0.9, "Adam beta2 (taming's VQGAN uses 0.9)")
    clip_grad_norm: float = flag_field(1.0, "global gradient-norm clipping; 0 disables")
    l1_weight: float = flag_field(1.0, "weight of the mean absolute pixel error (pixels in [-1, 1])")
    l2_weight: float = flag_field(1.0, "weight of the mean squared pixel error")
    codebook_update: str = flag_field("ema", "how codes move: 'ema' (each code is the moving average of the encoder "
                                             "outputs assigned to it) or 'grad' (Adam on the codebook loss)")
    ema_decay: float = flag_field(0.95, "decay per step of the 'ema' code averages")
    codebook_weight: float = flag_field(1.0, "weight of the codebook loss (sg(z) - e)^2 ('grad' update only)")
    beta: float = flag_field(0.25, "weight of the commitment loss (z - sg(e))^2")
    # codebook usage
    usage_decay: float = flag_field(0.99, "decay of the moving average of code frequencies, per step")
    restart_every: int = flag_field(50, "steps between dead-code restarts (0 disables restarts)")
    dead_fraction: float = flag_field(0.03, "a code is dead when its average frequency is below this fraction of "
                                            "1/n_embed")
    restart_until: float = flag_field(0.8, "no restarts after this fraction of the steps")
    restart_noise: float = flag_field(0.01, "std of the noise added to encoder outputs copied into dead codes")
    # run
    seed: int = flag_field(0, "seed of parameters, images and restarts")
    num_devices: int = flag_field(1, "devices the batch is split over (a 'data' mesh axis); 1 = no split")
    log_every: int = flag_field(50, "steps between loss read-outs (progress bar postfix and the report's history)")

    def __post_init__(self):
        who = type(self).__name__
        if self.norm_groups < 1 or self.ch < 1 or self.ch % self.norm_groups:
            raise ValueError(f"{who}: ch={self.ch} must be a positive multiple of norm_groups={self.norm_groups}")
        for name in ("num_res_blocks", "z_channels", "embed_dim", "n_embed", "batch_pixels", "steps", "num_devices",
                     "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{who}: {name}={getattr(self, name)} must be >= 1")
        if self.codebook_update not in ("ema", "grad"):
            raise ValueError(f"{who}: codebook_update={self.codebook_update!r} must be 'ema' or 'grad'")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"{who}: ema_decay={self.ema_decay} must be in [0, 1)")
        self.sizes  # validates train_sizes

    @property
    def sizes(self) -> list[tuple[int, int]]:
        return parse_sizes(self.train_sizes)

    def batch_size(self, size: tuple[int, int]) -> int:
        """Images per step at `size` (W, H)."""
        b = max(1, self.batch_pixels // (size[0] * size[1]))
        return max(self.num_devices, b - b % self.num_devices)

    def vqgan_config(self) -> VQGANConfig:
        res = max(max(s) for s in self.sizes)
        return VQGANConfig(embed_dim=self.embed_dim, n_embed=self.n_embed, z_channels=self.z_channels,
                           resolution=res, ch=self.ch, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=self.num_res_blocks,
                           norm_groups=self.norm_groups)


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'64x64,128x32' -> [(64, 64), (128, 32)]; each side a positive multiple of 16."""
    out = []
    for part in text.split(","):
        try:
            w, h = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise ValueError(f"train_sizes: {part!r} is not WxH") from None
        if w < 16 or h < 16 or w % 16 or h % 16:
            raise ValueError(f"train_sizes: {part!r} sides must be positive multiples of 16")
        out.append((w, h))
    return out


# ---------------------------------------------------------------------------------------------------------
# training step (pure functions)
# ---------------------------------------------------------------------------------------------------------
def make_optimizer(cfg: VQGANTrainConfig):
    sched = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1), max(cfg.steps, cfg.warmup_steps + 1),
                                               end_value=cfg.lr * cfg.final_lr_fraction)
    parts = [optax.clip_by_global_norm(cfg.clip_grad_norm)] if cfg.clip_grad_norm > 0 else []
    return optax.chain(*parts, optax.adam(sched, b1=cfg.b1, b2=cfg.b2))


def quantize(z, embedding):
    """Nearest codes of z (..., D) and the straight-through vectors: (z_st, codes, codebook loss, commitment loss).

    z_st equals embedding[codes] in the forward pass; its gradient flows unchanged to z. The codebook loss
    mean((sg(z) - e)^2) trains the codes, the commitment loss mean((z - sg(e))^2) the encoder.
    """
    sg = jax.lax.stop_gradient
    codes = nearest_codes(z, sg(embedding))
    e = jnp.take(embedding, codes, axis=0)
    codebook = jnp.mean(jnp.square(sg(z) - e))
    commit = jnp.mean(jnp.square(z - sg(e)))
    return z + sg(e - z), codes, codebook, commit


def vq_losses(model, params, images, cfg: VQGANTrainConfig):
    """(loss, (metrics, codes, latents)) of one batch: pixel losses through the straight-through estimator."""
    z = model.apply({"params": params}, images, method=VQGAN.encode_latents)  # (B, h, w, D) float32
    z_st, codes, codebook, commit = quantize(z, params["quantize"]["embedding"])
    recon = model.apply({"params": params}, z_st, method=VQGAN.decode_latents)
    l1 = jnp.mean(jnp.abs(recon - images))
    l2 = jnp.mean(jnp.square(recon - images))
    codebook_term = cfg.codebook_weight * codebook if cfg.codebook_update == "grad" else 0.0
    loss = cfg.l1_weight * l1 + cfg.l2_weight * l2 + codebook_term + cfg.beta * commit
    metrics = {"loss": loss, "l1": l1, "l2": l2, "codebook": codebook, "commit": commit}
    return loss, (metrics, codes, z)


def ema_codebook(ema_count, ema_sum, embedding, codes, latents, decay: float):
    """One moving-average codebook update: (ema_count, ema_sum, embedding).

    ema_count[i] and ema_sum[i] average, with `decay` per step, how many encoder outputs chose code i and
    their sum; a code becomes ema_sum / ema_count. A code nobody chooses keeps its vector (both decay alike).
    """
    n = embedding.shape[0]
    flat = latents.reshape(-1, latents.shape[-1]).astype(jnp.float32)
    idx = codes.reshape(-1)
    count = jnp.bincount(idx, length=n).astype(jnp.float32)
    total = jax.ops.segment_sum(flat, idx, num_segments=n)
    ema_count = decay * ema_count + (1.0 - decay) * count
    ema_sum = decay * ema_sum + (1.0 - decay) * total
    ok = ema_count > 1e-20
    embedding = jnp.where(ok[:, None], ema_sum / jnp.where(ok, ema_count, 1.0)[:, None], embedding)
    return ema_count, ema_sum, embedding


def restart_dead_codes(embedding, usage, latents, key, cfg: VQGANTrainConfig):
    """Re-initialise codes whose usage is below dead_fraction / n_embed from random encoder outputs.

    Returns (embedding, usage, number restarted); restarted codes get usage 1 / n_embed (a grace period).
    """
    n = embedding.shape[0]
    flat = latents.reshape(-1, latents.shape[-1])
    k1, k2 = jax.random.split(key)
    pick = jax.random.randint(k1, (n,), 0, flat.shape[0])
    fresh = flat[pick] + cfg.restart_noise * jax.random.normal(k2, embedding.shape, embedding.dtype)
    dead = usage < cfg.dead_fraction / n
    embedding = jnp.where(dead[:, None], fresh, embedding)
    usage = jnp.where(dead, 1.0 / n, usage)
    return embedding, usage, jnp.sum(dead)


@functools.lru_cache(maxsize=4)
def make_train_step(cfg: VQGANTrainConfig, batch_sharding=None, replicated=None):
    """jitted (state, images, step) -> (state, metrics); state = {params, opt_state, usage}, donated.

    Cached per config, so repeated runs of the same config (tests, resumed sessions) compile once.
    """
    model, optimizer = VQGAN(cfg.vqgan_config()), make_optimizer(cfg)

    restart_last = int(cfg.restart_until * cfg.steps)

    def step_fn(state, images, step):
        grad_fn = jax.value_and_grad(lambda p: vq_losses(model, p, images, cfg), has_aux=True)
        (_, (metrics, codes, z)), grads = grad_fn(state["params"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = jax.tree.map(lambda p, u: p + u, state["params"], updates)
        n = cfg.n_embed
        ema_count, ema_sum = state["ema_count"], state["ema_sum"]
        if cfg.codebook_update == "ema":
            ema_count, ema_sum, emb = ema_codebook(ema_count, ema_sum, state["params"]["quantize"]["embedding"],
                                                   codes, jax.lax.stop_gradient(z), cfg.ema_decay)
            params = {**params, "quantize": {"embedding": emb}}
        freq = jnp.bincount(codes.reshape(-1), length=n).astype(jnp.float32) / codes.size
        usage = cfg.usage_decay * state["usage"] + (1.0 - cfg.usage_decay) * freq
        metrics["batch_codes_used"] = jnp.sum(freq > 0)
        metrics["restarted"] = jnp.zeros((), jnp.int32)
        if cfg.restart_every > 0:
            do = (step % cfg.restart_every == 0) & (step <= restart_last)
            key = jax.random.fold_in(jax.random.key(cfg.seed), step)
            seen = jnp.where(step == 0, 0.0, usage)  # step 0: every code starts from an encoder output
            emb, new_usage, count = restart_dead_codes(params["quantize"]["embedding"], seen, jax.lax.stop_gradient(z),
                                                       key, cfg)
            restarted = do & (emb != params["quantize"]["embedding"]).any(axis=1)
            params = {**params, "quantize": {"embedding": jnp.where(do, emb, params["quantize"]["embedding"])}}
            usage = jnp.where(do, new_usage, usage)
            # a restarted code starts its averages afresh at its new vector, with the mass of one encoder output
            ema_count = jnp.where(restarted, 1.0 - cfg.ema_decay, ema_count)
            ema_sum = jnp.where(restarted[:, None], (1.0 - cfg.ema_decay) * emb, ema_sum)
            metrics["restarted"] = jnp.where(do, count, 0).astype(jnp.int32)
        metrics["codes_alive"] = jnp.sum(usage >= cfg.dead_fraction / n)
        return {"params": params, "opt_state": opt_state, "usage": usage, "ema_count": ema_count,
                "ema_sum": ema_sum}, metrics

    kw = {}
    if batch_sharding is not None:
        kw = dict(in_shardings=(replicated, batch_sharding, replicated), out_shardings=(replicated, replicated))
    return jax.jit(step_fn, donate_argnums=(0,), **kw)


def init_state(cfg: VQGANTrainConfig, optimizer):
    params = init_params(cfg.vqgan_config(), cfg.seed)
    # zero usage: the restart at step 0 fills the whole codebook with encoder outputs (data-dependent init)
    emb = params["quantize"]["embedding"]
    return {"params": params, "opt_state": optimizer.init(params), "usage": jnp.zeros((cfg.n_embed,), jnp.float32),
            "ema_count": jnp.zeros((cfg.n_embed,), jnp.float32), "ema_sum": jnp.zeros(emb.shape, jnp.float32)}


def _mesh_shardings(cfg: VQGANTrainConfig):
    if cfg.num_devices == 1:
        return None, None
    devices = jax.devices()
    if len(devices) < cfg.num_devices:
        raise ValueError(f"{type(cfg).__name__}: num_devices={cfg.num_devices} but only {len(devices)} devices exist")
    mesh = jax.make_mesh((cfg.num_devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=devices[:cfg.num_devices])
    return NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())


def train(cfg: VQGANTrainConfig, batches: Callable[[int], np.ndarray], progress: bool = True) -> tuple[dict, dict]:
    """Runs the training on `batches(step)` ((B, H, W, 3) float32 in [-1, 1], B = `cfg.batch_size` of the step's
    size); returns (params as numpy, report dict)."""
    batch_sharding, replicated = _mesh_shardings(cfg)
    step_fn = make_train_step(cfg, batch_sharding, replicated)
    state = init_state(cfg, make_optimizer(cfg))
    if replicated is not None:
        state = jax.device_put(state, replicated)
    history, restarted, pending = [], 0, []
    t0 = time.time()
    bar = tqdm(range(cfg.steps), desc="vqgan", unit="step", disable=not progress)
    for step in bar:
        images = batches(step)  # produced while the previous step runs (async dispatch)
        if batch_sharding is not None:
            images = jax.device_put(images, batch_sharding)
        state, metrics = step_fn(state, images, np.int32(step))
        pending.append(metrics["restarted"])
        if (step + 1) % cfg.log_every == 0 or step == cfg.steps - 1:
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            restarted += int(sum(int(r) for r in jax.device_get(pending)))
            pending = []
            history.append({"step": step + 1, "seconds": round(time.time() - t0, 1),
                            **{k: round(v, 6) for k, v in m.items()}})
            bar.set_postfix(loss=f"{m['loss']:.4f}", l1=f"{m['l1']:.4f}", alive=int(m["codes_alive"]))
    bar.close()
    params = jax.device_get(state["params"])
    report = {"config": dataclasses.asdict(cfg), "vqgan_config": cfg.vqgan_config().to_dict(),
              "train_seconds": round(time.time() - t0, 1), "codes_restarted": restarted, "history": history,
              "codes_alive_at_end": int(jax.device_get(metrics["codes_alive"]))}
    return params, report


# ---------------------------------------------------------------------------------------------------------
# evaluation and output
# ---------------------------------------------------------------------------------------------------------
def reconstruct(tokenizer, images: Sequence[Image.Image], progress: bool = False) -> tuple[list[Image.Image], dict]:
    """Encodes and decodes each image through `tokenizer` (images of one size together).

    Returns the reconstructions, in order, and the figures: pixel error (uint8 scale), PSNR, codebook usage
    and the perplexity of the codes used."""
    bar = tqdm(total=len(images), desc="eval images", disable=not progress)

    def run(chunk):
        """(codes, reconstruction, |error| sum, error^2 sum, values) per image of one size."""
        x = np.stack([preprocess(im) for im in chunk])
        codes = np.asarray(tokenizer.encode(x))
        out = to_uint8(np.asarray(tokenizer.decode(codes)))
        err = out.astype(np.float64) - ((x + 1) * 127.5).round()
        bar.update(len(chunk))
        return [(c.reshape(-1), Image.fromarray(o), float(np.abs(e).sum()), float(np.square(e).sum()), e.size)
                for c, o, e in zip(codes, out, err)]

    per_image = map_batched_by_shape(list(images), lambda im: im.size, run)
    bar.close()
    recon = [r[1] for r in per_image]
    abs_err, sq_err, npix = (sum(r[k] for r in per_image) for k in (2, 3, 4))
    codes = np.concatenate([r[0] for r in per_image])
    n = tokenizer.config.n_embed
    freq = np.bincount(codes, minlength=n) / codes.size
    nz = freq[freq > 0]
    mse = sq_err / npix
    return recon, {
        "images": len(images), "codes_used": int((freq > 0).sum()), "codebook_size": n,
        "codebook_usage": float((freq > 0).mean()), "code_perplexity": float(np.exp(-(nz * np.log(nz)).sum())),
        "mean_abs_error_uint8": abs_err / npix, "psnr_db": float(10 * math.log10(255.0 ** 2 / max(mse, 1e-12))),
    }


def save_checkpoint(out: str, params: dict, cfg: VQGANTrainConfig, report: dict, overwrite: bool = False) -> None:
    """Writes params/ + vqgan_config.json + train_report.json atomically."""
    with param_checkpoint.atomic_directory(out, overwrite=overwrite) as tmp:
        param_checkpoint.save_params(tmp, params)
        param_checkpoint.write_json(tmp, CONFIG_FILE, cfg.vqgan_config().to_dict())
        param_checkpoint.write_json(tmp, REPORT_FILE, report)
