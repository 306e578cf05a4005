"""UniRep golden layouts (docs/reference.md#unirep-layout), crop lists and resize-and-crop, VQGAN round trips and malformed sequences."""
import numpy as np
import pytest
from PIL import Image

from lumina_jax.testing.tokenizer import write_text_tokenizer_json
from lumina_jax.tokenizer import load_tokenizer
from lumina_jax.unirep import UniRepError, best_crop_size, codes_to_unirep, crop_size_list, images_to_unirep, \
    unirep_length, unirep_to_codes, unirep_to_image, var_center_crop

SPEC_512 = [(1024, 256), (992, 256), (960, 256), (928, 256), (896, 256), (896, 288), (864, 288), (832, 288),
            (800, 288), (800, 320), (768, 320), (736, 320), (736, 352), (704, 352), (672, 352), (672, 384),
            (640, 384), (608, 384), (608, 416), (576, 416), (576, 448), (544, 448), (544, 480), (512, 480),
            (512, 512), (480, 512), (480, 544), (448, 544), (448, 576), (416, 576), (416, 608), (384, 608),
            (384, 640), (384, 672), (352, 672), (352, 704), (352, 736), (320, 736), (320, 768), (320, 800),
            (288, 800), (288, 832), (288, 864), (288, 896), (256, 896), (256, 928), (256, 960), (256, 992),
            (256, 1024)]


@pytest.fixture(scope="module")
def special(tmp_path_factory):
    return load_tokenizer(write_text_tokenizer_json(str(tmp_path_factory.mktemp("tok") / "t.json")))[1]


@pytest.fixture(scope="module")
def vqgan(tmp_path_factory):
    from lumina_jax.image_tokenizer import ImageTokenizer
    from lumina_jax.testing.vqgan import write_vqgan_checkpoint

    return ImageTokenizer.from_checkpoint(write_vqgan_checkpoint(tmp_path_factory.mktemp("vq") / "vqgan", seed=0))


def test_crop_size_lists_match_spec():
    assert crop_size_list(512) == SPEC_512
    l768, l1024 = crop_size_list(768), crop_size_list(1024)
    assert len(l768) == 73 and l768[0] == (1536, 384) and l768[-1] == (384, 1536)
    assert len(l1024) == 97 and l1024[0] == (2048, 512) and l1024[-1] == (512, 2048)
    for target, lst in [(512, SPEC_512), (768, l768), (1024, l1024)]:
        assert all(w * h <= target * target and max(w, h) / min(w, h) <= 4 for w, h in lst)
    lengths = [unirep_length(w, h) for w, h in SPEC_512]
    assert (min(lengths), max(lengths)) == (916, 1092)
    assert [min(unirep_length(w, h) for w, h in l) for l in (l768, l1024)] == [2140, 3846]
    assert [max(unirep_length(w, h) for w, h in l) for l in (l768, l1024)] == [2404, 4228]
    assert unirep_length(512, 512) == 1060 and unirep_length(768, 768) == 2356 and unirep_length(1024, 1024) == 4164
    with pytest.raises(ValueError, match="target_size=500"):
        crop_size_list(500)


def test_layout_of_1024x256_image(special):
    codes = np.random.default_rng(0).integers(0, 8192, (256 // 16, 1024 // 16))
    toks = codes_to_unirep(codes, special)
    assert toks.dtype == np.int32 and len(toks) == 1044
    assert toks[:3].tolist() == [8197, 8812, 8836] and toks[-1] == 8196  # height token before width token
    rows = toks[3:-1].reshape(16, 65)
    assert (rows[:, 64] == 8803).all()
    np.testing.assert_array_equal(rows[:, :64], codes + 4)  # raster order, code c -> id c + 4
    back, h, w = unirep_to_codes(toks, special)
    assert (h, w) == (8, 32)
    np.testing.assert_array_equal(back, codes)
    np.testing.assert_array_equal(unirep_to_codes(toks[1:-1], special)[0], codes)  # markers optional


def test_var_center_crop_reference_examples():
    assert var_center_crop(Image.new("RGB", (1920, 1080)), crop_size_list(512)).size == (672, 384)
    assert var_center_crop(Image.new("RGB", (300, 200)), crop_size_list(512)).size == (608, 416)
    assert var_center_crop(Image.new("RGB", (4000, 1000)), crop_size_list(768)).size == (1536, 384)
    # ties of the aspect score go to the larger (W, H) tuple
    assert best_crop_size(100, 100, [(32, 32), (64, 64), (48, 48)]) == (64, 64)


def test_var_center_crop_resampling_and_offsets():
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (700, 1500, 3), dtype=np.uint8))
    sizes = [(512, 224), (256, 256)]
    # By hand: (512, 224) is the best aspect; 1500x700 >= 2x crop, so one BOX halving to 750x350, then
    # BICUBIC to round(750 * s) x round(350 * s) with s = max(512/750, 224/350), then a centred crop.
    half = img.resize((750, 350), resample=Image.BOX)
    s = max(512 / 750, 224 / 350)
    big = half.resize((round(750 * s), round(350 * s)), resample=Image.BICUBIC)
    left, top = (big.size[0] - 512) // 2, (big.size[1] - 224) // 2
    want = np.array(big.crop((left, top, left + 512, top + 224)))
    np.testing.assert_array_equal(np.array(var_center_crop(img, sizes)), want)
    # random offsets: reproducible with a seeded generator, different across seeds, inside the image
    tall = Image.fromarray(rng.integers(0, 256, (300, 100, 3), dtype=np.uint8))
    a = [np.array(var_center_crop(tall, [(64, 64)], np.random.default_rng(s), random_crop=True)) for s in (0, 0, 5)]
    np.testing.assert_array_equal(a[0], a[1])
    assert a[0].shape == (64, 64, 3) and not np.array_equal(a[0], a[2])
    with pytest.raises(ValueError, match="explicit numpy Generator"):
        var_center_crop(tall, [(64, 64)], random_crop=True)


def test_round_trip_through_vqgan(special, vqgan):
    """Square and non-square images -> UniRep -> images of the crop size; batching does not change the codes."""
    rng = np.random.default_rng(0)
    square = Image.fromarray(rng.integers(0, 256, (70, 70, 3), dtype=np.uint8))
    wide = Image.fromarray(rng.integers(0, 256, (40, 100, 3), dtype=np.uint8))
    crops = crop_size_list(64)
    images = [square, wide, square.transpose(Image.FLIP_LEFT_RIGHT)]
    toks = images_to_unirep(images, vqgan, crops, special, batch_size=2)  # squares batched together
    for img, t in zip(images, toks):
        cw, ch = best_crop_size(*img.size, crops)
        assert len(t) == unirep_length(cw, ch)
        assert t[1] - special.size_base == ch // 32 and t[2] - special.size_base == cw // 32
        codes, _, _ = unirep_to_codes(t, special)
        assert codes.shape == (ch // 16, cw // 16) and codes.max() < vqgan.config.n_embed
    assert best_crop_size(*wide.size, crops) == (96, 32)
    assert len(np.unique(toks[0][3:-1])) > 4  # the random VQGAN uses several codes
    alone = images_to_unirep([square], vqgan, crops, special, batch_size=2)[0]
    np.testing.assert_array_equal(alone, toks[0])
    for t, size in [(toks[0], (64, 64)), (toks[1], (96, 32))]:
        out = unirep_to_image(t, vqgan, special)
        assert out.size == size and out.mode == "RGB"


def test_malformed_sequences_name_the_defect(special):
    good = codes_to_unirep(np.arange(2 * 4).reshape(2, 4) % 8192, special)  # 1x2 patches: 2 rows of 4 + nl
    assert good.tolist() == [8197, 8805, 8806, 4, 5, 6, 7, 8803, 8, 9, 10, 11, 8803, 8196]
    cases = {
        "image is not closed": good[:-1],
        "missing size tokens": np.array([8197, 8805, 8196]),
        "height token at position 1 is 8700": np.r_[good[:1], [8700], good[2:]],
        "width token at position 2 is 8804": np.r_[good[:2], [8804], good[3:]],
        "9 body tokens for a 1x2-patch image, expected 2 rows of 4 codes": np.r_[good[:6], good[7:]],
        r"row 0 does not end with new line 8803: token at position 7 is 8": np.r_[good[:7], [8], good[8:]],
        r"position 9 \(row 1, column 1\) is 8710, not an image token": np.r_[good[:9], [8710], good[10:]],
    }
    for msg, toks in cases.items():
        with pytest.raises(UniRepError, match=msg):
            unirep_to_codes(toks, special)
    with pytest.raises(UniRepError, match="even sides"):
        codes_to_unirep(np.zeros((3, 4), int), special)
    with pytest.raises(UniRepError, match="outside 0..8191"):
        codes_to_unirep(np.full((2, 2), 9000), special)
