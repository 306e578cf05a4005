"""The shapes analysis: exact on clean renders, robust to noise / blur / JPEG, and the accuracy table counts right."""
import io

import numpy as np
import pytest
from PIL import Image, ImageFilter

from lumina_jax.demo import shapes
from lumina_jax.demo import shape_analysis as sa


def renders(target_size, n, seed, split="all"):
    from lumina_jax.unirep import crop_size_list

    rng = np.random.default_rng(seed)
    sizes = crop_size_list(target_size)
    out = []
    for _ in range(n):
        spec = shapes.sample_spec(rng, sizes, split)
        layout = shapes.sample_layout(spec.width, spec.height, rng)
        out.append((spec, shapes.render(spec, layout)))
    return out


@pytest.fixture(scope="module")
def clean():
    return renders(64, 120, 0) + renders(128, 120, 1)


def noisy(img, rng, sigma):
    a = np.asarray(img, np.float32) + rng.normal(0, sigma, np.asarray(img).shape)
    return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8))


def jpeg(img, quality):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def test_clean_renders_all_correct_with_ideal_fill(clean):
    acc = sa.accuracy(clean)
    assert acc == {"n": 240.0, "background": 1.0, "colour": 1.0, "shape": 1.0, "size": 1.0, "all": 1.0}
    for spec, img in clean:
        a = sa.analyse(img)
        assert abs(a.fill_ratio - shapes.FILL_RATIOS[spec.shape]) < 0.04, (spec, a)
        left, top, right, bottom = a.bbox
        assert 0 < left < right < spec.width and 0 < top < bottom < spec.height


def test_every_combination_at_every_size():
    from lumina_jax.unirep import crop_size_list

    rng = np.random.default_rng(2)
    sizes = crop_size_list(64) + crop_size_list(128)
    pairs = []
    for k, (colour, shape, bg) in enumerate(shapes.combinations("all")):
        w, h = sizes[k % len(sizes)]
        spec = shapes.ShapeSpec(shape, colour, bg, w, h)
        pairs.append((spec, shapes.render(spec, shapes.sample_layout(w, h, rng))))
    assert sa.accuracy(pairs)["all"] == 1.0


@pytest.mark.parametrize("name", ["noise", "blur", "blur+noise", "jpeg90"])
def test_robust_to_degradations(clean, name):
    rng = np.random.default_rng(3)
    degrade = {
        "noise": lambda im: noisy(im, rng, 15.0),
        "blur": lambda im: im.filter(ImageFilter.GaussianBlur(1.0)),
        "blur+noise": lambda im: noisy(im.filter(ImageFilter.GaussianBlur(1.0)), rng, 10.0),
        "jpeg90": lambda im: jpeg(im, 90),
    }[name]
    acc = sa.accuracy([(spec, degrade(img)) for spec, img in clean])
    assert acc["background"] == 1.0 and acc["colour"] == 1.0 and acc["size"] == 1.0, acc
    assert acc["shape"] >= 0.99, acc


def test_wrong_images_are_scored_wrong():
    spec = shapes.ShapeSpec("circle", "red", "blue", 64, 64)
    blank = Image.new("RGB", (64, 64), shapes.PALETTE["blue"])
    a = sa.analyse(blank)
    assert (a.background, a.colour, a.shape, a.bbox) == ("blue", None, None, None)
    assert sa.score(spec, a) == {"background": True, "colour": False, "shape": False, "size": True, "all": False}
    for other in (shapes.ShapeSpec("square", "red", "blue", 64, 64), shapes.ShapeSpec("circle", "yellow", "blue", 64, 64),
                  shapes.ShapeSpec("circle", "red", "black", 64, 64), shapes.ShapeSpec("circle", "red", "blue", 64, 32),
                  shapes.ShapeSpec("triangle", "red", "blue", 64, 64)):
        s = sa.score(spec, sa.analyse(shapes.render(other)))
        wrong = {k for k in sa.ATTRIBUTES if getattr(other, k) != getattr(spec, k)}
        assert {k for k in sa.ATTRIBUTES if not s[k]} == wrong, other
        assert not s["all"]


def test_nearest_colour_and_fill_thresholds():
    for name, rgb in shapes.PALETTE.items():
        assert sa.nearest_colour(rgb) == name
        assert sa.nearest_colour(np.clip(np.asarray(rgb) + 30, 0, 255)) == name
    assert [sa.shape_from_fill(r) for r in (0.45, 0.6, 0.7, 0.85, 0.95, 1.0)] == [
        "triangle", "triangle", "circle", "circle", "square", "square"]


def test_accuracy_table_and_format():
    seen = [s for s in shapes.eval_specs(64, per_split=4) if not s.held_out]
    held = [s for s in shapes.eval_specs(64, per_split=4) if s.held_out]
    wrong_shape = {"circle": "square", "square": "triangle", "triangle": "circle"}

    def img(spec, ok):
        shown = spec if ok else shapes.ShapeSpec(wrong_shape[spec.shape], spec.colour, spec.background,
                                                 spec.width, spec.height)
        return shapes.render(shown)

    results = {3.0: [(s, img(s, True)) for s in seen + held],
               1.0: [(s, img(s, i % 2 == 0)) for i, s in enumerate(seen)] + [(s, img(s, False)) for s in held]}
    rows = sa.accuracy_table(results)
    assert [(r["guidance"], r["split"], r["n"]) for r in rows] == [
        (1.0, "seen", 4), (1.0, "held-out", 4), (3.0, "seen", 4), (3.0, "held-out", 4)]
    assert [r["shape"] for r in rows] == [0.5, 0.0, 1.0, 1.0]
    assert all(r["background"] == r["colour"] == r["size"] == 1.0 for r in rows)
    text = sa.format_table(rows)
    lines = text.splitlines()
    assert len(lines) == 5 and "background" in lines[0] and "held-out" in lines[2]
    assert "50.0%" in lines[1] and "0.0%" in lines[2]


def test_cli_prints_analysis(tmp_path, capsys):
    spec = shapes.ShapeSpec("triangle", "white", "black", 96, 32)
    shapes.render(spec).save(tmp_path / "t.png")
    assert sa.main([str(tmp_path / "t.png")]) == 0
    assert "96x32, a white triangle on a black background" in capsys.readouterr().out
    assert sa.main([str(tmp_path / "missing.png")]) == 2
