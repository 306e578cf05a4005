"""The synthetic shapes set: deterministic, captions match the pixels, held-out combinations stay out of training,
and data.json goes through the real pre-tokenizer (image-only items start the assistant turn at image start)."""
import collections
import json
import os

import numpy as np
import pytest
from PIL import Image

from lumina_jax.demo import shapes
from lumina_jax.unirep import crop_size_list


def pixel_truth(spec, layout):
    """Independent check of a render: colours at points that must be inside / outside the shape."""
    img = np.asarray(shapes.render(spec, layout))
    s, l, t = layout.side, layout.left, layout.top
    inside = (t + s * 3 // 4, l + s // 2)  # inside all three kinds (low centre)
    outside_box = (0, 0) if (l, t) != (0, 0) else (img.shape[0] - 1, img.shape[1] - 1)
    corner = (t + 1, l + 1)  # inside the box's top-left corner: square only
    return img, inside, outside_box, corner


def test_item_is_deterministic_and_independent_of_set_size():
    a = shapes.SetConfig(num_items=50, seed=3)
    b = shapes.SetConfig(num_items=500, seed=3)
    items_a = list(shapes.training_items(a))
    assert items_a == [shapes.training_item(b, i) for i in range(50)]
    assert items_a != [shapes.training_item(shapes.SetConfig(seed=4), i) for i in range(50)]
    for it in items_a[:10]:
        assert np.array_equal(np.asarray(shapes.render(it.spec, it.layout)),
                              np.asarray(shapes.render(it.spec, it.layout)))


def test_captions_match_renders():
    cfg = shapes.SetConfig(target_size=64, num_items=120, seed=0)
    for it in shapes.training_items(cfg):
        spec = it.spec
        assert spec.caption == f"a {spec.colour} {spec.shape} on a {spec.background} background"
        assert spec.prompt == (f"Generate an image of {spec.width}x{spec.height} according to the following "
                               f"prompt:\n{spec.caption}")
        img, inside, outside, corner = pixel_truth(spec, it.layout)
        assert img.shape == (spec.height, spec.width, 3)
        assert tuple(img[inside]) == shapes.PALETTE[spec.colour], it
        assert tuple(img[outside]) == shapes.PALETTE[spec.background], it
        is_fg = tuple(img[corner]) == shapes.PALETTE[spec.colour]
        assert is_fg == (spec.shape == "square"), it  # circle and triangle leave the box corner empty
        # shape pixels (by coverage) over the box area is near the ideal fill ratio
        box = img[it.layout.top:it.layout.top + it.layout.side, it.layout.left:it.layout.left + it.layout.side]
        fg, bg = (np.asarray(shapes.PALETTE[c], np.float32) for c in (spec.colour, spec.background))
        cover = np.clip(((box - bg) @ (fg - bg)) / ((fg - bg) @ (fg - bg)), 0, 1)
        assert abs(cover.mean() - shapes.FILL_RATIOS[spec.shape]) < 0.03, (it, cover.mean())


def test_held_out_never_in_training_and_every_training_combination_appears():
    cfg = shapes.SetConfig(target_size=128, num_items=3 * len(shapes.combinations("train")), seed=1)
    items = list(shapes.training_items(cfg))
    seen = collections.Counter((it.spec.colour, it.spec.shape, it.spec.background) for it in items)
    assert not any((c, s) in shapes.HELD_OUT for c, s, _ in seen)
    assert set(seen) == set(shapes.combinations("train"))
    assert set(seen.values()) == {3}  # each combination once per round
    assert {it.spec.size for it in items} == set(crop_size_list(128))
    assert all(it.spec.colour != it.spec.background for it in items)
    # the held-out list covers each shape and each of its colours once, and all its combos are rendered fine
    assert sorted(s for _, s in shapes.HELD_OUT) == sorted(shapes.SHAPES)
    assert len(shapes.combinations("held_out")) == len(shapes.HELD_OUT) * (len(shapes.COLOURS) - 1)
    assert len(shapes.combinations("all")) == len(shapes.combinations("train")) + len(shapes.combinations("held_out"))
    share = np.mean([it.image_only for it in items])
    assert 0.14 < share < 0.27  # default image_only_fraction 0.2


def test_eval_specs_fixed_and_split():
    a = shapes.eval_specs(64, per_split=20)
    assert a == shapes.eval_specs(64, per_split=20)
    assert [s.held_out for s in a] == [False] * 20 + [True] * 20
    assert {s.size for s in a} == set(crop_size_list(64))
    assert len({(s.colour, s.shape, s.background) for s in a[20:]}) == 15  # every held-out combination


def test_spec_validation_errors_name_the_field():
    with pytest.raises(ValueError, match="shape 'star'"):
        shapes.ShapeSpec("star", "red", "blue", 32, 32)
    with pytest.raises(ValueError, match="both 'red'"):
        shapes.ShapeSpec("circle", "red", "red", 32, 32)
    with pytest.raises(ValueError, match="background 'pink'"):
        shapes.ShapeSpec("circle", "red", "pink", 32, 32)


class CodesFromPixels:
    """Stand-in image tokenizer: code of a 16x16 block = palette index of its top-left pixel (checks sizes)."""

    def encode(self, x):
        x = np.asarray(x)[:, ::16, ::16]
        rgb = (x + 1) * 127.5
        pal = np.asarray(list(shapes.PALETTE.values()), np.float32)
        return np.argmin(np.linalg.norm(rgb[..., None, :] - pal, axis=-1), axis=-1).astype(np.int32)


def test_written_set_is_deterministic_and_pretokenizes(tmp_path):
    from lumina_jax.data import pretokenize
    from lumina_jax.data.records import PretokenizedDataset
    from lumina_jax.testing.tokenizer import write_text_tokenizer_json
    from lumina_jax.tokenizer import load_tokenizer

    assert shapes.main(["--out", str(tmp_path / "a"), "--num-items", "24", "--seed", "5",
                        "--image-only-fraction", "0.25", "--quiet"]) == 0
    assert shapes.main(["--out", str(tmp_path / "b"), "--num-items", "24", "--seed", "5",
                        "--image-only-fraction", "0.25", "--quiet"]) == 0
    for name in ["data.json", "corpus.txt"] + [f"images/{i:06d}.png" for i in range(24)]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert shapes.main(["--out", str(tmp_path / "a"), "--num-items", "2", "--quiet"]) == 2  # exists: refused
    items = json.loads((tmp_path / "a" / "data.json").read_text())
    only = [it for it in items if it["meta"]["image_only"]]
    assert 0 < len(only) < 24
    assert len((tmp_path / "a" / "corpus.txt").read_text().splitlines()) == 2 * (24 - len(only))
    for it in items:
        with Image.open(tmp_path / "a" / it["image"][0]) as im:
            assert im.size == (it["meta"]["width"], it["meta"]["height"])

    tok_path = write_text_tokenizer_json(str(tmp_path / "tok.json"))
    out = tmp_path / "pretok"
    assert pretokenize.main(["--input", str(tmp_path / "a" / "data.json"), "--out", str(out), "--target-size", "64",
                             "--tokenizer", tok_path, "--quiet"], image_tokenizer=CodesFromPixels()) == 0
    report = json.loads((out / pretokenize.REPORT).read_text())
    assert report["num_bad"] == 0 and report["num_written"] == 24
    tok, sp = load_tokenizer(tok_path)
    ds = PretokenizedDataset(str(out))
    for r in (ds[i] for i in range(len(ds))):
        item = items[int(r["id"])]
        meta, tokens, labels = item["meta"], r["tokens"].tolist(), r["labels"].tolist()
        start = tokens.index(sp.image_start)
        # the image is the supervised assistant turn: start, height, width tokens, rows, end, end of turn
        assert tokens[start + 1:start + 3] == [sp.size_token(meta["height"] // 32), sp.size_token(meta["width"] // 32)]
        assert tokens[-2:] == [sp.image_end, sp.end_of_turn]
        assert labels[start:] == tokens[start:] and set(labels[:start]) == {-100}
        if meta["image_only"]:  # empty human turn: [bos, end of turn] then the image
            assert tokens[:start] == [sp.bos, sp.end_of_turn]
        else:
            assert tok.decode(tokens[1:start - 1]) == shapes.ShapeSpec(
                meta["shape"], meta["colour"], meta["background"], meta["width"], meta["height"]).prompt
        # codes follow the pixels: the top-left block of the image shows the background colour
        assert tokens[start + 3] == sp.img2bpe[shapes.COLOURS.index(meta["background"])]


def test_cli_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit):
        shapes.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--out", "--target-size", "--num-items", "--seed", "--image-only-fraction", "--min-extent",
                 "--max-extent", "--position-jitter", "--overwrite", "--quiet"):
        assert flag in text


def test_cli_bad_target_size_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # a usage error, found by argparse
        shapes.main(["--out", str(tmp_path / "x"), "--target-size", "50", "--quiet"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "argument --target-size: target_size=50" in err[-1] and err[0].startswith("usage:")
    assert not os.path.exists(tmp_path / "x")
