"""Deterministic analysis of one shapes image, and accuracy tables over many (prompt spec, image) pairs.

    python -m lumina_jax.demo.shape_analysis image.png [...]     # prints what each image shows

What an image shows is measured without any model (colours are `lumina_jax.demo.shapes.PALETTE` names):
- background: the per-channel median of a border ring (width min(W, H)/16, at least 1 px) -> nearest colour;
- shape colour: among pixels farther than `FOREGROUND_DISTANCE` from the measured background, the most
  frequent nearest palette colour other than the background;
- shape kind: pixels nearer the measured shape colour than the measured background (the halfway rule, so
  anti-aliased edges count by coverage), the largest 8-connected component with holes filled, and its
  area / bounding-box area: below 0.643 a triangle (ideal 0.5), below 0.893 a circle (pi/4), else a square (1.0);
- size: the image's (W, H).

`accuracy_table({guidance: [(spec, image), ...]})` scores each attribute per guidance scale and per split
(seen or held-out colour-shape combinations) and `format_table` prints it.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Mapping, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from lumina_jax.demo.shapes import COLOURS, FILL_RATIOS, PALETTE, ShapeSpec

ATTRIBUTES = ("background", "colour", "shape", "size")
FOREGROUND_DISTANCE = 70.0  # RGB distance from the background beyond which a pixel may be shape (palette gap ~148)
# Fill-ratio boundaries halfway between the ideal ratios: triangle | circle | square.
_KINDS = sorted(FILL_RATIOS.items(), key=lambda kv: kv[1])
FILL_THRESHOLDS = tuple((a[1] + b[1]) / 2 for a, b in zip(_KINDS, _KINDS[1:]))
_PALETTE_RGB = np.asarray([PALETTE[c] for c in COLOURS], np.float32)


@dataclasses.dataclass(frozen=True)
class ShapeAnalysis:
    """What one image shows; None where it could not be measured (e.g. no shape at all)."""

    background: str | None  # nearest palette colour of the border
    colour: str | None  # dominant palette colour of the non-background pixels
    shape: str | None  # kind from the fill ratio
    fill_ratio: float  # shape area / bounding-box area (0 when there is no shape)
    bbox: tuple[int, int, int, int] | None  # (left, top, right, bottom), right/bottom exclusive
    size: tuple[int, int]  # (W, H) of the image


def nearest_colour(rgb: Sequence[float]) -> str:
    """Palette name nearest to one RGB triple (Euclidean; first in `COLOURS` order on ties)."""
    d = np.linalg.norm(_PALETTE_RGB - np.asarray(rgb, np.float32)[None, :], axis=1)
    return COLOURS[int(np.argmin(d))]


def shape_from_fill(ratio: float) -> str:
    """Shape kind whose ideal fill ratio is nearest (boundaries `FILL_THRESHOLDS`)."""
    for (kind, _), bound in zip(_KINDS, FILL_THRESHOLDS):
        if ratio < bound:
            return kind
    return _KINDS[-1][0]


def border_pixels(arr: np.ndarray) -> np.ndarray:
    """(N, 3) pixels of the border ring of an (H, W, 3) array, width max(1, round(min(H, W) / 16))."""
    h, w = arr.shape[:2]
    r = max(1, int(round(min(h, w) / 16)))
    mask = np.zeros((h, w), bool)
    mask[:r], mask[-r:], mask[:, :r], mask[:, -r:] = True, True, True, True
    return arr[mask]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return ndimage.binary_fill_holes(labels == 1 + int(np.argmax(sizes)))


def analyse(image: Image.Image) -> ShapeAnalysis:
    """Measures background colour, shape colour, shape kind and size of one image (deterministic)."""
    arr = np.asarray(image.convert("RGB"), np.float32)
    size = (arr.shape[1], arr.shape[0])
    bg_rgb = np.median(border_pixels(arr), axis=0)
    background = nearest_colour(bg_rgb)
    pixels = arr.reshape(-1, 3)
    far = np.linalg.norm(pixels - bg_rgb, axis=1) > FOREGROUND_DISTANCE
    labels = np.argmin(np.linalg.norm(pixels[:, None, :] - _PALETTE_RGB[None], axis=2), axis=1)
    bg_index = COLOURS.index(background)
    candidates = far & (labels != bg_index)
    if not candidates.any():
        return ShapeAnalysis(background, None, None, 0.0, None, size)
    counts = np.bincount(labels[candidates], minlength=len(COLOURS))
    colour_index = int(np.argmax(counts))
    fg_rgb = np.median(pixels[candidates & (labels == colour_index)], axis=0)
    nearer_fg = np.linalg.norm(pixels - fg_rgb, axis=1) < np.linalg.norm(pixels - bg_rgb, axis=1)
    mask = _largest_component(nearer_fg.reshape(arr.shape[:2]))
    ys, xs = np.nonzero(mask)
    bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    fill = float(mask.sum()) / float((bbox[2] - bbox[0]) * (bbox[3] - bbox[1]))
    return ShapeAnalysis(background, COLOURS[colour_index], shape_from_fill(fill), fill, bbox, size)


# ---------------------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------------------
def score(spec: ShapeSpec, analysis: ShapeAnalysis) -> dict[str, bool]:
    """Per attribute: does the image show what `spec` asked for? Plus "all" (every attribute right)."""
    out = {"background": analysis.background == spec.background, "colour": analysis.colour == spec.colour,
           "shape": analysis.shape == spec.shape, "size": analysis.size == spec.size}
    out["all"] = all(out.values())
    return out


def accuracy(pairs: Sequence[tuple[ShapeSpec, Image.Image]]) -> dict[str, float]:
    """Share of correct images per attribute (and "all") over (spec, image) pairs, plus the count "n"."""
    scores = [score(spec, analyse(img)) for spec, img in pairs]
    out: dict[str, float] = {"n": float(len(scores))}
    for key in ATTRIBUTES + ("all",):
        out[key] = float(np.mean([s[key] for s in scores])) if scores else float("nan")
    return out


def accuracy_table(results: Mapping[float, Sequence[tuple[ShapeSpec, Image.Image]]]) -> list[dict]:
    """Rows {guidance, split, n, background, colour, shape, size, all} for each guidance scale and for the
    seen and held-out combinations (in that order); splits without images are left out."""
    rows = []
    for guidance in sorted(results):
        pairs = results[guidance]
        for split, held in (("seen", False), ("held-out", True)):
            part = [(s, im) for s, im in pairs if s.held_out == held]
            if part:
                rows.append({"guidance": float(guidance), "split": split, **accuracy(part)})
    return rows


def format_table(rows: Sequence[dict]) -> str:
    """Plain-text table of `accuracy_table` rows, accuracies in percent."""
    head = ["guidance", "split", "n"] + list(ATTRIBUTES) + ["all"]
    lines = [" ".join(f"{h:>10}" for h in head)]
    for r in rows:
        cells = [f"{r['guidance']:>10g}", f"{r['split']:>10}", f"{int(r['n']):>10d}"]
        cells += [f"{100 * r[k]:>9.1f}%" for k in list(ATTRIBUTES) + ["all"]]
        lines.append(" ".join(cells))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lumina_jax.demo.shape_analysis",
                                description="Print what each image shows: background colour, shape colour, "
                                            "shape kind (with its fill ratio) and size.")
    p.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    args = p.parse_args(argv)
    for path in args.images:
        try:
            with Image.open(path) as im:
                a = analyse(im)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # PIL's kinds of bad file
            print(f"error: {path}: cannot read image ({e})", file=sys.stderr)
            return 1
        print(f"{path}: {a.size[0]}x{a.size[1]}, a {a.colour} {a.shape} on a {a.background} background "
              f"(fill {a.fill_ratio:.3f}, bbox {a.bbox})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
