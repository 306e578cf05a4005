"""UniRep: Lumina-mGPT's token layout of an image, the crop-size lists and the resize-and-crop.

All three follow the reference (docs/reference.md, 'UniRep layout', 'Crop list' and 'Resize and crop').

Layout of a W x H image (multiples of 32), codes of shape (H/16, W/16):
    [image_start, size_base + H/32, size_base + W/32, row_0..., new_line, ..., row_{H/16-1}..., new_line, image_end]

Differences from the reference: `var_center_crop` crops at the centre unless given an explicit numpy
Generator with `random_crop=True` (the reference always draws the offset from Python's global `random`);
decoding validates the size tokens, the row lengths, the new lines and the image ids and says which is wrong
(the reference asserts only the total length); images of the same crop size are encoded as one batch.
"""
from __future__ import annotations

import argparse
import functools
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from lumina_jax.image_tokenizer import map_batched_by_shape, postprocess, preprocess
from lumina_jax.tokenizer import SpecialIds
from lumina_jax.validation import int_flag

PATCH_SIZE = 32  # pixels per size-token unit; the VQGAN downsamples 16x, so one patch is 2x2 codes
LATENT_STRIDE = 16


class UniRepError(ValueError):
    """A token sequence that is not a well-formed UniRep image."""


# ---------------------------------------------------------------------------------------------------------
# Crop sizes and resize-and-crop
# ---------------------------------------------------------------------------------------------------------
def generate_crop_size_list(num_patches: int, patch_size: int = PATCH_SIZE, max_ratio: float = 4.0):
    """Every (W, H) with W*H <= num_patches patches and aspect <= max_ratio, widest first (reference order)."""
    out = []
    wp, hp = num_patches, 1
    while wp > 0:
        if max(wp, hp) / min(wp, hp) <= max_ratio:
            out.append((wp * patch_size, hp * patch_size))
        if (hp + 1) * wp <= num_patches:
            hp += 1
        else:
            wp -= 1
    return out


@functools.lru_cache(maxsize=None)
def _crop_sizes(target_size: int, patch_size: int, max_ratio: float) -> tuple:
    return tuple(generate_crop_size_list((target_size // patch_size) ** 2, patch_size, max_ratio))


def crop_size_list(target_size: int, patch_size: int = PATCH_SIZE, max_ratio: float = 4.0) -> list[tuple[int, int]]:
    """The (W, H) crop sizes used for a training/inference resolution `target_size` (e.g. 512 -> 49 sizes)."""
    if target_size < patch_size or target_size % patch_size:
        raise ValueError(f"target_size={target_size} is not a positive multiple of patch_size={patch_size}")
    return list(_crop_sizes(target_size, patch_size, max_ratio))


def target_size_flag(text: str) -> int:
    """An argparse `type=` for a training resolution: one that has a crop list (a positive multiple of 32)."""
    value = int_flag(lo=1)(text)
    try:
        crop_size_list(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{e} (e.g. 512, 768, 1024)") from None
    return value


def best_crop_size(width: int, height: int, crop_sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The crop size whose aspect ratio is closest to width/height; ties go to the larger (W, H) tuple."""
    def score(c):
        rw, rh = c[0] / width, c[1] / height
        return min(rw, rh) / max(rw, rh), c

    return tuple(max(crop_sizes, key=score))


def center_crop(img: Image.Image, crop_size: tuple[int, int], rng: np.random.Generator | None = None,
                random_crop: bool = False) -> Image.Image:
    """BOX-halve while both sides are >= 2x the crop, BICUBIC-resize to cover the crop, then crop.

    The crop is centred, or at a uniformly random offset drawn from `rng` when `random_crop` is True.
    """
    cw, ch = crop_size
    while img.size[0] >= 2 * cw and img.size[1] >= 2 * ch:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), resample=Image.BOX)
    scale = max(cw / img.size[0], ch / img.size[1])
    img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), resample=Image.BICUBIC)
    free_w, free_h = img.size[0] - cw, img.size[1] - ch
    if random_crop:
        if rng is None:
            raise ValueError("random_crop=True needs an explicit numpy Generator rng")
        left, top = int(rng.integers(0, free_w + 1)), int(rng.integers(0, free_h + 1))
    else:
        left, top = free_w // 2, free_h // 2
    return img.crop((left, top, left + cw, top + ch))


def var_center_crop(img: Image.Image, crop_sizes: Sequence[tuple[int, int]], rng: np.random.Generator | None = None,
                    random_crop: bool = False) -> Image.Image:
    """Resize-and-crop `img` to the crop size of closest aspect ratio (reference semantics, centred by default)."""
    return center_crop(img, best_crop_size(img.size[0], img.size[1], crop_sizes), rng=rng, random_crop=random_crop)


# ---------------------------------------------------------------------------------------------------------
# Codes <-> UniRep tokens
# ---------------------------------------------------------------------------------------------------------
def unirep_length(width: int, height: int) -> int:
    """Tokens of a W x H image: 3 + (H/16)(W/16 + 1) + 1."""
    return 3 + (height // LATENT_STRIDE) * (width // LATENT_STRIDE + 1) + 1


def codes_to_unirep(codes: np.ndarray, special: SpecialIds) -> np.ndarray:
    """(H/16, W/16) VQGAN codes -> the UniRep token ids (int32) of the layout above."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[0] % 2 or codes.shape[1] % 2 or codes.size == 0:
        raise UniRepError(f"codes must be a non-empty (h, w) grid with even sides, got shape {codes.shape}")
    if codes.min() < 0 or codes.max() >= special.num_image_codes:
        raise UniRepError(f"image codes outside 0..{special.num_image_codes - 1}: min {codes.min()}, max {codes.max()}")
    h, w = codes.shape
    body = np.empty((h, w + 1), np.int32)
    body[:, :w] = special.img2bpe[codes]
    body[:, w] = special.new_line
    head = [special.image_start, special.size_token(h // 2), special.size_token(w // 2)]
    return np.concatenate([np.asarray(head, np.int32), body.reshape(-1), np.asarray([special.image_end], np.int32)])


def unirep_to_codes(tokens: Sequence[int], special: SpecialIds) -> tuple[np.ndarray, int, int]:
    """UniRep tokens -> (codes (2h, 2w) int32, h_grids, w_grids), checking the structure.

    Leading `image_start` and trailing `image_end` are optional, but an opened image must be closed.
    Raises UniRepError naming the defect (position counted in the given sequence).
    """
    t = np.asarray(tokens, np.int64).reshape(-1)
    off = 0
    if t.size and t[0] == special.image_start:
        if t[-1] != special.image_end:
            raise UniRepError(f"image is not closed: last token is {int(t[-1])}, expected image end {special.image_end}")
        t, off = t[1:-1], 1
    elif t.size and t[-1] == special.image_end:
        t = t[:-1]
    if t.size < 2:
        raise UniRepError(f"missing size tokens: {t.size} token(s) after the image start")
    sizes = []
    for k, name in enumerate(("height", "width")):
        n = int(t[k]) - special.size_base
        if not 1 <= n <= special.max_size_patches:
            raise UniRepError(f"{name} token at position {off + k} is {int(t[k])}, not a size token "
                              f"({special.size_base + 1}..{special.size_base + special.max_size_patches})")
        sizes.append(n)
    hg, wg = sizes
    body = t[2:]
    row = 2 * wg + 1
    if body.size != 2 * hg * row:
        raise UniRepError(f"{body.size} body tokens for a {hg}x{wg}-patch image, expected {2 * hg} rows of "
                          f"{2 * wg} codes + new line = {2 * hg * row}")
    grid = body.reshape(2 * hg, row)
    bad_nl = np.nonzero(grid[:, -1] != special.new_line)[0]
    if bad_nl.size:
        r = int(bad_nl[0])
        raise UniRepError(f"row {r} does not end with new line {special.new_line}: token at position "
                          f"{off + 2 + r * row + row - 1} is {int(grid[r, -1])} (row length wrong or new line missing)")
    ids = grid[:, :-1]
    valid = (ids >= 0) & (ids < special.bpe2img.shape[0])
    codes = np.full(ids.shape, -1, np.int64)
    codes[valid] = special.bpe2img[ids[valid]]
    bad = np.argwhere(codes < 0)
    if bad.size:
        r, c = (int(x) for x in bad[0])
        raise UniRepError(f"token at position {off + 2 + r * row + c} (row {r}, column {c}) is {int(ids[r, c])}, "
                          f"not an image token")
    return codes.astype(np.int32), hg, wg


# ---------------------------------------------------------------------------------------------------------
# Images <-> UniRep tokens through the VQGAN (`lumina_jax.image_tokenizer.ImageTokenizer`)
# ---------------------------------------------------------------------------------------------------------
def prepare_image(img: Image.Image, crop_sizes: Sequence[tuple[int, int]], rng: np.random.Generator | None = None,
                  random_crop: bool = False) -> np.ndarray:
    """Crop (on the image's own mode, as the reference) then whiten transparency -> (H, W, 3) float32 in [-1, 1]."""
    return preprocess(var_center_crop(img, crop_sizes, rng=rng, random_crop=random_crop))


def encode_arrays(arrays: Sequence[np.ndarray], image_tokenizer, batch_size: int = 8) -> list[np.ndarray]:
    """VQGAN codes of prepared images, batched by shape.

    A partial last batch is padded to the next power of two (at most `batch_size`), so each image shape
    compiles at most log2(batch_size) + 1 times and padding wastes less than half a batch.
    """
    def encode(part: list[np.ndarray]) -> list[np.ndarray]:
        padded = min(batch_size, 1 << (len(part) - 1).bit_length())
        batch = np.zeros((padded,) + part[0].shape, np.float32)
        batch[:len(part)] = np.stack(part)
        return list(np.asarray(image_tokenizer.encode(batch))[:len(part)])

    return map_batched_by_shape(arrays, lambda a: tuple(a.shape), encode, batch_size)


def images_to_unirep(images: Iterable[Image.Image], image_tokenizer, crop_sizes: Sequence[tuple[int, int]],
                     special: SpecialIds, rng: np.random.Generator | None = None, random_crop: bool = False,
                     batch_size: int = 8) -> list[np.ndarray]:
    """UniRep token ids of each image (crop, whiten, VQGAN-encode in batches of equal size, lay out)."""
    arrays = [prepare_image(im, crop_sizes, rng, random_crop) for im in images]
    return [codes_to_unirep(c, special) for c in encode_arrays(arrays, image_tokenizer, batch_size)]


def image_to_unirep(img: Image.Image, image_tokenizer, crop_sizes: Sequence[tuple[int, int]], special: SpecialIds,
                    rng: np.random.Generator | None = None, random_crop: bool = False) -> np.ndarray:
    """UniRep token ids of one image."""
    return images_to_unirep([img], image_tokenizer, crop_sizes, special, rng, random_crop, batch_size=1)[0]


def unirep_to_array(tokens: Sequence[int], image_tokenizer, special: SpecialIds) -> np.ndarray:
    """Validated UniRep tokens -> decoded image array (16h', 16w', 3) float32 (unclamped)."""
    codes, _, _ = unirep_to_codes(tokens, special)
    return np.asarray(image_tokenizer.decode(codes[None]))[0]


def unirep_to_image(tokens: Sequence[int], image_tokenizer, special: SpecialIds) -> Image.Image:
    """Validated UniRep tokens -> PIL RGB image (clamped, truncated to uint8 as the reference)."""

    return postprocess(unirep_to_array(tokens, image_tokenizer, special))
