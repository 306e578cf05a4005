"""Chameleon's VQGAN image tokenizer (taming-transformers `VQModel`) in Flax Linen, NHWC.

Axis legend (the package's, see lumina_jax/__init__.py): B batch, H/W image height/width, h/w latent grid
(H/16, W/16), C channels, E code width, M codebook size.

The parameter tree mirrors the PyTorch names (`encoder/down_2/block_0/norm1/scale` for
`encoder.down.2.block.0.norm1.weight`), so the conversion table in `lumina_jax.convert.vqgan` is a
mechanical renaming: conv kernels (O, I, kh, kw) -> (kh, kw, I, O), GroupNorm weight -> scale,
`quantize.embedding.weight` -> `quantize/embedding` (M, E).

Differences from the reference (taming `Encoder`/`Decoder`/`VectorQuantizer`; docs/reference.md, "VQGAN"):
- NHWC instead of NCHW; any H, W divisible by the downsampling factor, batched.
- GroupNorm statistics, attention softmax and the code search always run in float32, also when the
  convolutions compute in bfloat16 (`dtype="bfloat16"`).
- The quantizer returns only the code indices (B, h, w); no loss, no straight-through estimator
  (the tokenizer is frozen), and `z_q` is a gather instead of a one-hot matmul (identical in fp32).
- No timestep embedding, no `conv_shortcut` (unused by the VQModel), no dropout (inference only).
- With dtype float32, convolutions and attention request `Precision.HIGHEST`, so accelerators do not
  drop to TF32/bf16 passes (PyTorch allows TF32 in cuDNN convolutions by default).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import yaml

NORM_GROUPS = 32  # GroupNorm groups of every taming Normalize() (the default of VQGANConfig.norm_groups)
NORM_EPS = 1e-6  # GroupNorm epsilon of every taming Normalize()


@dataclasses.dataclass(frozen=True)
class VQGANConfig:
    """The fields of `model.params` (and its `ddconfig`) in a taming/Chameleon `vqgan.yaml`."""

    embed_dim: int = 256  # code vector width E (codebook columns, quant_conv output)
    n_embed: int = 8192  # codebook size M
    z_channels: int = 256  # encoder output / decoder input channels
    double_z: bool = False  # encoder outputs 2*z_channels (must be False for a VQModel)
    resolution: int = 512  # nominal training resolution; only used to place attention blocks
    in_channels: int = 3  # image channels in
    out_ch: int = 3  # image channels out
    ch: int = 128  # base channel count
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # per-level channel multipliers; len-1 downsamplings
    num_res_blocks: int = 2  # ResnetBlocks per encoder level (decoder levels have one more)
    attn_resolutions: tuple[int, ...] = ()  # nominal resolutions whose levels get an AttnBlock per ResnetBlock
    dropout: float = 0.0  # ResnetBlock dropout (training only; ignored here)
    # GroupNorm groups. Not a taming field: taming's Normalize() always uses 32, which Chameleon's width 128
    # (4+ channels per group) suits. Narrow models need fewer groups: at 1 channel per group the norm is an
    # instance norm per channel, which removes each channel's mean over the image (its flat colour).
    norm_groups: int = NORM_GROUPS

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        if self.double_z:
            raise ValueError("VQGANConfig: double_z=true is not supported (a VQModel's quant_conv takes z_channels inputs)")
        if self.norm_groups < 1:
            raise ValueError(f"VQGANConfig: norm_groups={self.norm_groups} must be >= 1")
        for name, c in [("ch", self.ch)] + [(f"ch*ch_mult[{i}]", self.ch * m) for i, m in enumerate(self.ch_mult)]:
            if c % self.norm_groups:
                raise ValueError(f"VQGANConfig: {name}={c} channels is not a multiple of norm_groups={self.norm_groups}")
        if not self.ch_mult or self.num_res_blocks < 1:
            raise ValueError(f"VQGANConfig: need at least one level and one res block (ch_mult={self.ch_mult}, num_res_blocks={self.num_res_blocks})")

    @property
    def downsample_factor(self) -> int:
        """Pixels per code along each side (16 for Chameleon)."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def encoder_attn_levels(self) -> tuple[int, ...]:
        """Encoder levels with attention, computed exactly as taming does (`curr_res //= 2` per level)."""
        levels, res = [], self.resolution
        for i in range(len(self.ch_mult)):
            if res in self.attn_resolutions:
                levels.append(i)
            if i != len(self.ch_mult) - 1:
                res //= 2
        return tuple(levels)

    @property
    def decoder_attn_levels(self) -> tuple[int, ...]:
        """Decoder levels with attention (taming starts at `resolution // 2**(L-1)` and doubles)."""
        n = len(self.ch_mult)
        levels, res = [], self.resolution // 2 ** (n - 1)
        for i in reversed(range(n)):
            if res in self.attn_resolutions:
                levels.append(i)
            if i != 0:
                res *= 2
        return tuple(sorted(levels))

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "VQGANConfig":
        """Builds a config from `model.params`-style fields (nested `ddconfig` or flat); unknown keys are ignored."""
        flat = {k: v for k, v in d.items() if k != "ddconfig"}
        flat.update(d.get("ddconfig") or {})
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in flat.items() if k in names}
        for required in ("embed_dim", "n_embed"):
            if required not in kwargs:
                raise ValueError(f"{source}: missing field '{required}'")
        if kwargs.get("attn_resolutions") is None:
            kwargs.pop("attn_resolutions", None)
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, path: str) -> "VQGANConfig":
        """Reads a taming/Chameleon `vqgan.yaml` (`model.params` with `embed_dim`, `n_embed`, `ddconfig`)."""
        with open(path) as f:
            doc = yaml.safe_load(f)
        if not isinstance(doc, dict):
            raise ValueError(f"{path}: not a YAML mapping")
        params = doc.get("model", {}).get("params") if isinstance(doc.get("model"), dict) else None
        if params is None:
            params = doc.get("params", doc)  # tolerate a bare `params:` block or the fields at top level
        if not isinstance(params, dict) or "ddconfig" not in params:
            raise ValueError(f"{path}: missing key 'model.params.ddconfig'")
        return cls.from_dict(params, source=f"{path}: model.params")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        d["attn_resolutions"] = list(self.attn_resolutions)
        return d

    def to_yaml_dict(self) -> dict[str, Any]:
        """The `model.params` layout of a taming `vqgan.yaml` (without lossconfig)."""
        if self.norm_groups != NORM_GROUPS:
            raise ValueError(f"VQGANConfig: norm_groups={self.norm_groups} has no vqgan.yaml form "
                             f"(taming's GroupNorm always uses {NORM_GROUPS} groups)")
        d = self.to_dict()
        d.pop("norm_groups")
        top = {"embed_dim": d.pop("embed_dim"), "n_embed": d.pop("n_embed")}
        return {"model": {"target": "taming.models.vqgan.VQModel", "params": {**top, "ddconfig": d}}}

    def replace(self, **kw) -> "VQGANConfig":
        return dataclasses.replace(self, **kw)


# ----------------------------------------------------------------------------------------------------
# building blocks


def swish(x):
    return x * jax.nn.sigmoid(x)


class GroupNorm(nn.Module):
    """GroupNorm(groups, eps 1e-6, affine) with float32 statistics; output in `dtype`."""

    dtype: Any = jnp.float32
    groups: int = NORM_GROUPS

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        xf = x.astype(jnp.float32)
        g = xf.reshape(*x.shape[:-1], self.groups, c // self.groups)
        axes = tuple(range(1, g.ndim - 2)) + (g.ndim - 1,)  # spatial dims + channels within a group
        mean = jnp.mean(g, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(g - mean), axis=axes, keepdims=True)  # biased, two-pass like torch
        y = ((g - mean) * jax.lax.rsqrt(var + NORM_EPS)).reshape(x.shape)
        return (y * scale + bias).astype(self.dtype)


def _conv(features: int, kernel: int, dtype, name: str, stride: int = 1, padding: Any = "SAME") -> nn.Conv:
    if padding == "SAME":
        p = (kernel - 1) // 2
        padding = ((p, p), (p, p))  # torch padding=1 (3x3) or 0 (1x1)
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                   dtype=dtype, param_dtype=jnp.float32, precision=_precision(dtype), name=name)


def _precision(dtype) -> jax.lax.Precision | None:
    """float32 means true float32 (no TF32 / bf16 passes on accelerators); bf16 uses the default."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


class ResnetBlock(nn.Module):
    """h = conv1(swish(GN1(x))); h = conv2(swish(GN2(h))); out = shortcut(x) + h."""

    out_channels: int
    dtype: Any = jnp.float32
    groups: int = NORM_GROUPS

    @nn.compact
    def __call__(self, x):
        h = _conv(self.out_channels, 3, self.dtype, "conv1")(swish(GroupNorm(self.dtype, self.groups, name="norm1")(x)))
        h = _conv(self.out_channels, 3, self.dtype, "conv2")(swish(GroupNorm(self.dtype, self.groups, name="norm2")(h)))
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, self.dtype, "nin_shortcut")(x)
        return x.astype(self.dtype) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions, scale C^-0.5, float32 softmax, residual."""

    dtype: Any = jnp.float32
    groups: int = NORM_GROUPS

    @nn.compact
    def __call__(self, x):
        b, hh, ww, c = x.shape
        h = GroupNorm(self.dtype, self.groups, name="norm")(x)
        q = _conv(c, 1, self.dtype, "q")(h).reshape(b, hh * ww, c)
        k = _conv(c, 1, self.dtype, "k")(h).reshape(b, hh * ww, c)
        v = _conv(c, 1, self.dtype, "v")(h).reshape(b, hh * ww, c)
        prec = _precision(self.dtype)
        logits = jnp.einsum("bic,bjc->bij", q, k, preferred_element_type=jnp.float32, precision=prec) * (c ** -0.5)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bij,bjc->bic", weights, v, precision=prec).reshape(b, hh, ww, c)
        return x.astype(self.dtype) + _conv(c, 1, self.dtype, "proj_out")(out)


class Downsample(nn.Module):
    """Zero-pad right and bottom by one, then a 3x3 stride-2 conv (taming's asymmetric padding)."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return _conv(x.shape[-1], 3, self.dtype, "conv", stride=2, padding=((0, 1), (0, 1)))(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(x.shape[-1], 3, self.dtype, "conv")(x)


class Level(nn.Module):
    """One resolution level: ResnetBlocks (each optionally followed by an AttnBlock) and a resampler."""

    out_channels: int
    num_blocks: int
    with_attn: bool
    resample: str | None  # "down", "up" or None
    dtype: Any = jnp.float32
    groups: int = NORM_GROUPS

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_blocks):
            x = ResnetBlock(self.out_channels, self.dtype, self.groups, name=f"block_{i}")(x)
            if self.with_attn:
                x = AttnBlock(self.dtype, self.groups, name=f"attn_{i}")(x)
        if self.resample == "down":
            x = Downsample(self.dtype, name="downsample")(x)
        elif self.resample == "up":
            x = Upsample(self.dtype, name="upsample")(x)
        return x


class Mid(nn.Module):
    dtype: Any = jnp.float32
    groups: int = NORM_GROUPS

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        x = ResnetBlock(c, self.dtype, self.groups, name="block_1")(x)
        x = AttnBlock(self.dtype, self.groups, name="attn_1")(x)
        return ResnetBlock(c, self.dtype, self.groups, name="block_2")(x)


class Encoder(nn.Module):
    """(B, H, W, in_channels) -> (B, H/f, W/f, z_channels)."""

    config: VQGANConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg, n = self.config, len(self.config.ch_mult)
        h = _conv(cfg.ch, 3, self.dtype, "conv_in")(x.astype(self.dtype))
        for i, m in enumerate(cfg.ch_mult):
            h = Level(cfg.ch * m, cfg.num_res_blocks, i in cfg.encoder_attn_levels,
                      "down" if i != n - 1 else None, self.dtype, cfg.norm_groups, name=f"down_{i}")(h)
        h = Mid(self.dtype, cfg.norm_groups, name="mid")(h)
        h = swish(GroupNorm(self.dtype, cfg.norm_groups, name="norm_out")(h))
        return _conv(cfg.z_channels, 3, self.dtype, "conv_out")(h)


class Decoder(nn.Module):
    """(B, h, w, z_channels) -> (B, f*h, f*w, out_ch); no output activation (no tanh)."""

    config: VQGANConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z):
        cfg = self.config
        h = _conv(cfg.ch * cfg.ch_mult[-1], 3, self.dtype, "conv_in")(z.astype(self.dtype))
        h = Mid(self.dtype, cfg.norm_groups, name="mid")(h)
        for i in reversed(range(len(cfg.ch_mult))):  # submodules named up_{i} as the torch ModuleList
            h = Level(cfg.ch * cfg.ch_mult[i], cfg.num_res_blocks + 1, i in cfg.decoder_attn_levels,
                      "up" if i != 0 else None, self.dtype, cfg.norm_groups, name=f"up_{i}")(h)
        h = swish(GroupNorm(self.dtype, cfg.norm_groups, name="norm_out")(h))
        return _conv(cfg.out_ch, 3, self.dtype, "conv_out")(h)


def nearest_codes(z: jax.Array, codebook: jax.Array) -> jax.Array:
    """Index of the nearest codebook row for each vector of z (..., E), in float32.

    Uses the reference's expansion `sum(z^2) + sum(e^2) - 2 z.e` (same rounding behaviour); argmin returns
    the first index on ties.
    """
    zf = z.astype(jnp.float32).reshape(-1, z.shape[-1])
    e = codebook.astype(jnp.float32)
    d = (jnp.sum(zf ** 2, axis=1, keepdims=True) + jnp.sum(e ** 2, axis=1)[None, :]
         - 2.0 * jnp.matmul(zf, e.T, precision=jax.lax.Precision.HIGHEST))
    return jnp.argmin(d, axis=1).astype(jnp.int32).reshape(z.shape[:-1])


class VQGAN(nn.Module):
    """Encoder + quant_conv + codebook + post_quant_conv + decoder. Call a method with `apply(..., method=)`."""

    config: VQGANConfig
    dtype: Any = jnp.float32  # compute dtype of convolutions; norms, softmax and code search stay float32

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg, self.dtype)
        self.quant_conv = _conv(cfg.embed_dim, 1, self.dtype, "quant_conv")
        self.quantize = Codebook(cfg.n_embed, cfg.embed_dim)
        self.post_quant_conv = _conv(cfg.z_channels, 1, self.dtype, "post_quant_conv")
        self.decoder = Decoder(cfg, self.dtype)

    def encode_latents(self, images):
        """quant_conv(encoder(images)) (B, h, w, E), float32: the vectors that get quantized."""
        return self.quant_conv(self.encoder(images)).astype(jnp.float32)

    def encode_with_features(self, images):
        """(encoder output, quant_conv output, codes): the intermediate results of `encode`, float32."""
        feats = self.encoder(images)
        latents = self.quant_conv(feats).astype(jnp.float32)
        return feats.astype(jnp.float32), latents, nearest_codes(latents, self.quantize.embedding)

    def encode(self, images):
        """images (B, H, W, 3) in [-1, 1] -> codes (B, H/f, W/f) int32, raster order."""
        return nearest_codes(self.encode_latents(images), self.quantize.embedding)

    def lookup(self, codes):
        """codes (B, h, w) -> code vectors (B, h, w, E) float32."""
        return jnp.take(self.quantize.embedding, codes, axis=0)

    def decode_latents(self, zq):
        """Quantized vectors (B, h, w, E) -> images (B, f*h, f*w, out_ch) float32, unclamped."""
        return self.decoder(self.post_quant_conv(zq.astype(self.dtype))).astype(jnp.float32)

    def decode(self, codes):
        """codes (B, h, w) int -> images (B, f*h, f*w, out_ch) float32, unclamped."""
        return self.decode_latents(self.lookup(codes))

    def __call__(self, images):
        """Full round trip (used to create every parameter at init)."""
        return self.decode(self.encode(images))


class Codebook(nn.Module):
    """The quantizer's codebook, `quantize/embedding` (M, E), kept in float32."""

    n_embed: int
    embed_dim: int

    def setup(self):
        n = self.n_embed

        def init(key, shape, dtype):  # taming: uniform(-1/M, 1/M)
            return jax.random.uniform(key, shape, dtype, -1.0 / n, 1.0 / n)

        self.embedding = self.param("embedding", init, (n, self.embed_dim), jnp.float32)


def init_params(config: VQGANConfig, rng: jax.Array | int) -> dict:
    """Random float32 parameters with the full tree (encoder, decoder, codebook, both 1x1 convs).

    `rng` is a jax key or an int seed. Sampled leaf by leaf with numpy from the abstract tree
    (LeCun-normal kernels, zero biases, unit norm scales, taming's uniform(-1/M, 1/M) codebook):
    tracing `Module.init` through the whole network, or one jax.random call per shape, costs 15-30 s.
    """
    seed = rng if isinstance(rng, int) else [int(v) for v in np.asarray(jax.random.key_data(rng)).ravel()]
    gen = np.random.default_rng(seed)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_params(config))
    out = []
    for kp, leaf in leaves:
        name = kp[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            x = gen.standard_normal(leaf.shape, np.float32) / np.float32(np.sqrt(fan_in))
        elif name == "scale":
            x = np.ones(leaf.shape, np.float32)
        elif name == "embedding":
            x = gen.uniform(-1.0 / config.n_embed, 1.0 / config.n_embed, leaf.shape).astype(np.float32)
        else:
            x = np.zeros(leaf.shape, np.float32)
        out.append(jnp.asarray(x))
    return jax.tree_util.tree_unflatten(treedef, out)


@functools.lru_cache(maxsize=16)
def abstract_params(config: VQGANConfig) -> dict:
    """ShapeDtypeStructs of the parameter tree, without allocating anything (cached per config; do not mutate)."""
    f = config.downsample_factor
    x = jax.ShapeDtypeStruct((1, f, f, config.in_channels), jnp.float32)
    return jax.eval_shape(VQGAN(config).init, jax.random.key(0), x)["params"]
