"""Images <-> VQGAN codes: the jitted, batched image tokenizer and the reference pre/post-processing.

    tok = ImageTokenizer.from_checkpoint("ckpts/vqgan")        # written by `python -m lumina_jax.convert vqgan`
    codes = tok.encode(images)      # (B, H, W, 3) float in [-1, 1] -> (B, H/16, W/16) int32
    images = tok.decode(codes)      # (B, h, w) int -> (B, 16h, 16w, 3) float32, unclamped
    codes = tok.encode_pil([pil, ...])          # list of (h, w) int32 numpy arrays
    pils = tok.decode_to_pil(codes)             # list of PIL RGB images

Pre/post-processing follows Lumina's path (Meta's `ImageTokenizer`; docs/reference.md, "Image pre- and post-processing"): transparency
is blended onto white, pixels map to [-1, 1] with `x/255*2-1`; on the way out values are clamped,
mapped with `(x+1)/2*255` in float32 and truncated (not rounded) to uint8. No resizing happens here
(cropping to a Lumina size is the data pipeline's job).
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, Hashable, Sequence, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from lumina_jax import param_checkpoint
from lumina_jax.models.vqgan import VQGAN, VQGANConfig, abstract_params

CONFIG_FILE = "vqgan_config.json"
DTYPES = ("float32", "bfloat16")

T = TypeVar("T")
R = TypeVar("R")


def map_batched_by_shape(items: Sequence[T], shape_of: Callable[[T], Hashable],
                         fn: Callable[[list[T]], Sequence[R]], max_batch: int | None = None) -> list[R]:
    """Calls `fn` on lists of items with equal `shape_of(item)`, at most `max_batch` at a time (None: a whole
    group), and returns its results in the order of `items`; `fn` returns one result per item it is given.

    The VQGAN compiles once per image shape and batch size, so images are encoded and decoded in groups of
    one shape.
    """
    out: list[Any] = [None] * len(items)
    groups: dict[Hashable, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(shape_of(item), []).append(i)
    for idx in groups.values():
        step = max_batch or len(idx)
        for s in range(0, len(idx), step):
            chunk = idx[s:s + step]
            for i, result in zip(chunk, fn([items[i] for i in chunk]), strict=True):
                out[i] = result
    return out


def whiten_transparency(img: Image.Image) -> Image.Image:
    """RGB as is; otherwise blend any transparency onto white (float64, then truncate to uint8)."""
    if img.mode == "RGB":
        return img
    rgba = np.array(img.convert("RGBA"))
    if not (rgba[:, :, 3] < 255).any():
        return img.convert("RGB")
    alpha = rgba[:, :, 3] / 255.0
    rgb = (1 - alpha[:, :, None]) * 255 + alpha[:, :, None] * rgba[:, :, :3]
    return Image.fromarray(rgb.astype("uint8"), "RGB")


def preprocess(image: Image.Image | np.ndarray) -> np.ndarray:
    """PIL image (any mode) or uint8 array (H, W[, 3|4]) -> (H, W, 3) float32 in [-1, 1]; no resizing."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"preprocess: arrays must be uint8 pixels, got dtype {image.dtype}")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"preprocess: expected a PIL image or a uint8 array, got {type(image).__name__}")
    x = np.array(whiten_transparency(image)) / 255.0  # float64 as the reference
    return (x * 2 - 1).astype(np.float32)


def to_uint8(images: Any) -> np.ndarray:
    """Float images in [-1, 1] (any leading dims, channels last) -> uint8, exactly as the reference (float32 math)."""
    x = np.asarray(images, dtype=np.float32)
    x = (np.clip(x, np.float32(-1.0), np.float32(1.0)) + np.float32(1.0)) / np.float32(2.0)
    return (x * np.float32(255)).astype(np.uint8)


def postprocess(image: Any) -> Image.Image:
    """(H, W, 3) float array in [-1, 1] -> PIL RGB (clamped, (x+1)/2*255, truncated to uint8)."""
    arr = to_uint8(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"postprocess: expected one (H, W, 3) image, got shape {arr.shape}")
    return Image.fromarray(arr).convert("RGB")


@functools.lru_cache(maxsize=8)
def _compiled(config: VQGANConfig, dtype: str):
    """(module, jitted encode_with_features, jitted decode), shared by every tokenizer of the same config.

    `encode` uses `encode_with_features` too (the extra outputs are small), so one executable per shape.
    """
    model = VQGAN(config, dtype=jnp.dtype(dtype))
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=VQGAN.encode_with_features))
    decode = jax.jit(lambda p, c: model.apply({"params": p}, c, method=VQGAN.decode))
    return model, encode, decode


class ImageTokenizer:
    """A VQGAN with jitted, batched `encode` / `decode` (compiled once per input shape).

    `dtype="bfloat16"` runs the convolutions in bfloat16; GroupNorm statistics, the attention softmax and
    the code search stay float32. With a `mesh`, the batch is split over `batch_axes` (default: the
    mesh's "data" and "fsdp" axes; padded to a multiple of their size) and the parameters are replicated.
    """

    def __init__(self, config: VQGANConfig, params: Any, dtype: str = "float32",
                 mesh: jax.sharding.Mesh | None = None, batch_axes: Sequence[str] | None = None):
        if dtype not in DTYPES:
            raise ValueError(f"ImageTokenizer: dtype must be one of {DTYPES}, got '{dtype}'")
        self.config, self.dtype, self.mesh = config, dtype, mesh
        self.model = _compiled(config, dtype)[0]
        if mesh is not None:
            P, S = jax.sharding.PartitionSpec, jax.sharding.NamedSharding
            if batch_axes is None:  # the project's batch axes (lumina_jax.sharding), else every mesh axis
                batch_axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names) or tuple(mesh.axis_names)
            self.batch_axes = tuple(batch_axes)
            self._batch_sharding = S(mesh, P(self.batch_axes))
            params = jax.device_put(params, S(mesh, P()))
            self._batch_size_multiple = int(np.prod([mesh.shape[a] for a in self.batch_axes]))
        else:
            self._batch_sharding, self._batch_size_multiple = None, 1
            params = jax.tree.map(jnp.asarray, params)
        self.params = params
        _, self._encode_with_features, self._decode = _compiled(config, dtype)

    @classmethod
    def from_checkpoint(cls, directory: str | os.PathLike, dtype: str = "float32", **kwargs) -> "ImageTokenizer":
        """Loads a directory written by `python -m lumina_jax.convert vqgan` (`params/` + `vqgan_config.json`)."""
        config = VQGANConfig.from_dict(param_checkpoint.read_json(directory, CONFIG_FILE), source=f"{directory}/{CONFIG_FILE}")
        target = param_checkpoint.abstract_like(abstract_params(config))
        params = param_checkpoint.restore_params(directory, target)
        return cls(config, params, dtype=dtype, **kwargs)

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    # ------------------------------------------------------------------------------------------------
    def _place(self, x: jax.Array) -> tuple[jax.Array, int]:
        """Pads the batch to the mesh's multiple and shards it; returns (array, true batch size)."""
        b = x.shape[0]
        if self._batch_sharding is None:
            return x, b
        pad = (-b) % self._batch_size_multiple
        if pad:
            x = jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)], axis=0)
        return jax.device_put(x, self._batch_sharding), b

    def encode(self, images: Any) -> jax.Array:
        """(B, H, W, 3) float in [-1, 1], H and W multiples of the downsampling factor -> (B, H/f, W/f) int32."""
        x, b = self._place(self._check_images(images))
        return self._encode_with_features(self.params, x)[2][:b]

    def encode_with_features(self, images: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(encoder output (B, h, w, z_channels), quant_conv output (B, h, w, D), codes (B, h, w)), float32."""
        x, b = self._place(self._check_images(images))
        return tuple(a[:b] for a in self._encode_with_features(self.params, x))

    def _check_images(self, images: Any) -> jax.Array:
        images = jnp.asarray(images, jnp.float32)
        f, c = self.downsample_factor, self.config.in_channels
        if images.ndim != 4 or images.shape[-1] != c:
            raise ValueError(f"ImageTokenizer.encode: expected images (B, H, W, {c}), got shape {images.shape}")
        if images.shape[1] % f or images.shape[2] % f or images.shape[1] == 0 or images.shape[2] == 0:
            raise ValueError(f"ImageTokenizer.encode: height and width must be positive multiples of {f}, "
                             f"got {images.shape[1]}x{images.shape[2]}")
        return images

    def decode(self, codes: Any) -> jax.Array:
        """(B, h, w) int codes -> (B, f*h, f*w, 3) float32 images, unclamped."""
        codes = jnp.asarray(codes)
        if codes.ndim != 3 or not jnp.issubdtype(codes.dtype, jnp.integer):
            raise ValueError(f"ImageTokenizer.decode: expected integer codes (B, h, w), got {codes.dtype} {codes.shape}")
        if codes.size:
            lo, hi = int(jnp.min(codes)), int(jnp.max(codes))
            if lo < 0 or hi >= self.config.n_embed:
                raise ValueError(f"ImageTokenizer.decode: codes must lie in [0, {self.config.n_embed}), got [{lo}, {hi}]")
        x, b = self._place(codes.astype(jnp.int32))
        return self._decode(self.params, x)[:b]

    # ------------------------------------------------------------------------------------------------
    def encode_pil(self, images: Sequence[Image.Image | np.ndarray], max_batch: int = 16) -> list[np.ndarray]:
        """PIL images (any sizes that are multiples of f) -> one (h, w) int32 array each, in input order.

        Images of the same size are encoded together, in batches of at most `max_batch`.
        """
        arrays = [preprocess(im) for im in images]
        encode = lambda chunk: list(np.asarray(self.encode(np.stack(chunk))))
        return map_batched_by_shape(arrays, lambda a: a.shape[:2], encode, max_batch)

    def decode_to_pil(self, codes: Any) -> list[Image.Image] | Image.Image:
        """(B, h, w) codes -> list of PIL RGB images; a single (h, w) grid -> one PIL image."""
        codes = np.asarray(codes)
        single = codes.ndim == 2
        images = to_uint8(self.decode(codes[None] if single else codes))
        pils = [Image.fromarray(a).convert("RGB") for a in images]
        return pils[0] if single else pils
