"""ImageTokenizer API, pre/post-processing, conversion strictness, export round trip, bf16 and sharding."""
import jax
import numpy as np
import pytest
import torch
from PIL import Image

from lumina_jax import param_checkpoint
from lumina_jax.convert import vqgan as convert_vqgan
from lumina_jax.convert.__main__ import main as convert_main
from lumina_jax.convert.errors import ConversionError
from lumina_jax.image_tokenizer import ImageTokenizer, map_batched_by_shape, postprocess, preprocess, to_uint8
from lumina_jax.models.vqgan import VQGANConfig
from lumina_jax.testing.vqgan import (random_vqgan_params, tiny_vqgan_config, write_lightning_vqgan,
                                      write_vqgan_checkpoint, write_vqgan_yaml)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    d = tmp_path_factory.mktemp("vq_tok")
    ckpt, yaml_path = write_lightning_vqgan(d / "src", seed=0)
    assert convert_main(["vqgan", "--ckpt", str(ckpt), "--config", str(yaml_path), "--out", str(d / "conv")]) == 0
    return d, ckpt, yaml_path, ImageTokenizer.from_checkpoint(d / "conv")


def _images(seed, shape):
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# pre/post-processing (docs/reference.md#image-pre--and-post-processing)


def test_preprocess_maps_pixels_to_minus_one_one():
    arr = np.array([[[0, 255, 51]]], np.uint8)
    out = preprocess(Image.fromarray(arr))
    assert out.dtype == np.float32 and out.shape == (1, 1, 3)
    np.testing.assert_allclose(out[0, 0], [-1.0, 1.0, 51 / 255 * 2 - 1], atol=1e-7)
    np.testing.assert_array_equal(preprocess(arr), out)  # arrays are accepted as well


def test_preprocess_whitens_transparency_like_the_reference():
    rgba = np.array([[[100, 50, 200, 128], [10, 20, 30, 0], [7, 8, 9, 255]]], np.uint8)
    out = preprocess(Image.fromarray(rgba, "RGBA"))
    # (1 - a) * 255 + a * c with a = alpha / 255, truncated to uint8; worked out by hand:
    # a=128/255: 127 + 0.50196*(100, 50, 200) = (177.196, 152.098, 227.392); a=0: white; a=1: unchanged
    expected = np.array([[[177, 152, 227], [255, 255, 255], [7, 8, 9]]])
    np.testing.assert_allclose(out, expected / 255.0 * 2 - 1, atol=1e-6)
    opaque = Image.fromarray(np.full((2, 2, 4), 255, np.uint8), "RGBA")  # no alpha < 255 -> plain convert
    np.testing.assert_array_equal(preprocess(opaque), np.ones((2, 2, 3), np.float32))
    gray = preprocess(Image.fromarray(np.full((2, 3), 51, np.uint8), "L"))
    assert gray.shape == (2, 3, 3)
    la = Image.fromarray(np.array([[[0, 0]]], np.uint8), "LA")  # fully transparent black -> white
    np.testing.assert_array_equal(preprocess(la), np.ones((1, 1, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        preprocess(np.zeros((2, 2, 3), np.float32))


def test_postprocess_clamps_and_truncates_like_torch():
    x = np.random.default_rng(0).uniform(-1.3, 1.3, (16, 24, 3)).astype(np.float32)
    x[0, 0] = [0.0, 1.0, -1.0]  # 127.5 -> 127 (truncation, not rounding), 255, 0
    t = torch.from_numpy(x).permute(2, 0, 1)  # the reference: (clamp(x,-1,1)+1)/2, HWC, *255, astype(uint8)
    ref = (((torch.clamp(t, -1.0, 1.0) + 1.0) / 2.0).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    img = postprocess(x)
    assert img.mode == "RGB" and img.size == (24, 16)
    np.testing.assert_array_equal(np.array(img), ref)
    np.testing.assert_array_equal(np.array(img)[0, 0], [127, 255, 0])
    np.testing.assert_array_equal(to_uint8(x[None]), ref[None])


# ---------------------------------------------------------------------------------------------------
# conversion


def test_converted_checkpoint_matches_the_direct_test_helper(converted, tmp_path):
    d, _, _, tok = converted
    direct = ImageTokenizer.from_checkpoint(write_vqgan_checkpoint(tmp_path / "direct", seed=0))
    assert direct.config == tok.config
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, direct.params),
                 jax.tree.map(np.asarray, tok.params))
    assert param_checkpoint.read_json(d / "conv", "conversion.json")["dropped_keys"] == 3  # the loss.* tensors


def test_conversion_names_every_mismatch():
    cfg = tiny_vqgan_config()
    sd = convert_vqgan.state_dict_from_params(random_vqgan_params(cfg, 0), cfg)
    sd.pop("decoder.up.3.block_1.conv2.bias".replace("block_1", "block.1"))
    sd["encoder.mid.extra.weight"] = np.zeros(3, np.float32)
    sd["quant_conv.weight"] = np.zeros((32, 32, 3, 3), np.float32)
    sd["loss.discriminator.main.0.weight"] = np.zeros(3, np.float32)  # dropped by rule, never reported
    with pytest.raises(ConversionError) as e:
        convert_vqgan.params_from_state_dict(sd, cfg, source="vqgan.ckpt: state_dict")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("vqgan.ckpt: state_dict")
    assert "missing keys [decoder.up.3.block.1.conv2.bias]" in msg
    assert "unexpected keys [encoder.mid.extra.weight]" in msg
    assert "wrong shapes [quant_conv.weight [32, 32, 3, 3] (expected [32, 32, 1, 1])]" in msg
    assert "loss." not in msg


def test_attention_levels_come_from_the_checkpoint_keys(tmp_path, capsys):
    cfg = tiny_vqgan_config(ch_mult=(1, 2), resolution=32, attn_resolutions=(16,))
    ckpt, _ = write_lightning_vqgan(tmp_path / "src", cfg, seed=1)
    yaml_path = write_vqgan_yaml(tmp_path / "noattn.yaml", cfg.replace(attn_resolutions=()))
    assert convert_main(["vqgan", "--ckpt", str(ckpt), "--config", str(yaml_path), "--out", str(tmp_path / "o")]) == 0
    assert "attention at resolutions [16]" in capsys.readouterr().out
    assert VQGANConfig.from_dict(param_checkpoint.read_json(tmp_path / "o", "vqgan_config.json")).attn_resolutions == (16,)


def test_config_errors_are_one_line(tmp_path, converted, capsys):
    _, ckpt, _, _ = converted
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  params:\n    embed_dim: 32\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    for cfg_path, expected in [(bad, "missing key 'model.params.ddconfig'"), (tmp_path / "nope.yaml", "no such file"),
                               (broken, "broken.yaml")]:
        rc = convert_main(["vqgan", "--ckpt", str(ckpt), "--config", str(cfg_path), "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert rc == 1 and expected in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ValueError, match="not a multiple of norm_groups=32"):
        tiny_vqgan_config(ch=48)
    with pytest.raises(ValueError, match="norm_groups=8 has no vqgan.yaml form"):
        tiny_vqgan_config(ch=32).replace(norm_groups=8).to_yaml_dict()


def test_group_norm_with_fewer_groups_matches_torch():
    """The demo VQGAN uses 8 groups (norm_groups); checked against torch.nn.GroupNorm, fp32."""
    import jax.numpy as jnp
    import torch

    from lumina_jax.models.vqgan import GroupNorm

    rng = np.random.default_rng(0)
    x = (rng.normal(size=(2, 5, 7, 32)) * 3 + rng.normal(size=(32,))).astype(np.float32)
    scale, bias = rng.normal(size=32).astype(np.float32), rng.normal(size=32).astype(np.float32)
    for groups in (8, 32):
        ours = GroupNorm(groups=groups).apply({"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}},
                                              jnp.asarray(x))
        gn = torch.nn.GroupNorm(groups, 32, eps=1e-6)
        with torch.no_grad():
            gn.weight.copy_(torch.from_numpy(scale))
            gn.bias.copy_(torch.from_numpy(bias))
            ref = gn(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(np.asarray(ours), ref, atol=2e-5, rtol=1e-5)


def test_export_round_trip(converted, tmp_path):
    d, ckpt, _, tok = converted
    out = tmp_path / "exported.ckpt"
    assert convert_main(["vqgan-export", "--checkpoint", str(d / "conv"), "--out", str(out),
                         "--yaml-out", str(tmp_path / "exported.yaml")]) == 0
    original = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    exported = torch.load(out, map_location="cpu", weights_only=True)["state_dict"]
    assert set(exported) == {k for k in original if not k.startswith("loss.")}
    for k, v in exported.items():
        assert torch.equal(v, original[k]), k
    assert VQGANConfig.from_yaml(tmp_path / "exported.yaml") == tok.config


# ---------------------------------------------------------------------------------------------------
# the tokenizer API


def test_encode_pil_groups_sizes_and_keeps_order(converted):
    *_, tok = converted
    rng = np.random.default_rng(5)
    pixels = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), rng.integers(0, 256, (64, 96, 3), dtype=np.uint8),
              rng.integers(0, 256, (64, 64, 4), dtype=np.uint8)]
    images = [Image.fromarray(pixels[0]), Image.fromarray(pixels[1]), Image.fromarray(pixels[2], "RGBA")]
    codes = tok.encode_pil(images)
    assert [c.shape for c in codes] == [(4, 4), (4, 6), (4, 4)]
    assert all(c.dtype == np.int32 for c in codes)
    np.testing.assert_array_equal(codes[1], np.asarray(tok.encode(preprocess(images[1])[None]))[0])
    same_size = np.asarray(tok.encode(np.stack([preprocess(images[0]), preprocess(images[2])])))
    np.testing.assert_array_equal(np.stack([codes[0], codes[2]]), same_size)
    assert not np.array_equal(codes[0], codes[2])


def test_decode_to_pil(converted):
    *_, tok = converted
    codes = np.random.default_rng(6).integers(0, tok.config.n_embed, (2, 4, 6)).astype(np.int32)
    imgs = tok.decode_to_pil(codes)
    assert isinstance(imgs, list) and len(imgs) == 2
    assert all(isinstance(i, Image.Image) and i.mode == "RGB" and i.size == (96, 64) for i in imgs)
    np.testing.assert_array_equal(np.stack([np.array(i) for i in imgs]), to_uint8(np.asarray(tok.decode(codes))))


def test_bad_inputs_are_refused(converted):
    *_, tok = converted
    with pytest.raises(ValueError, match="multiples of 16, got 60x64"):
        tok.encode(np.zeros((1, 60, 64, 3), np.float32))
    with pytest.raises(ValueError, match=r"expected images \(B, H, W, 3\)"):
        tok.encode(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 64\), got \[0, 64\]"):
        tok.decode(np.array([[[0, 64]]], np.int32))
    with pytest.raises(ValueError, match="dtype must be one of"):
        ImageTokenizer(tok.config, tok.params, dtype="float16")


def test_batch_sharded_over_a_mesh_gives_the_same_codes(converted):
    *_, tok = converted
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = ImageTokenizer(tok.config, tok.params, mesh=mesh)
    x = _images(7, (4, 64, 64, 3))  # 4 rows, padded to 8 devices
    codes = sharded.encode(x)
    assert codes.shape == (4, 4, 4)
    unsharded = np.concatenate([np.asarray(tok.encode(x[:2])), np.asarray(tok.encode(x[2:]))])
    np.testing.assert_array_equal(np.asarray(codes), unsharded)


@pytest.mark.slow
def test_bfloat16_agrees_with_float32(converted):
    """bf16 convolutions (fp32 norms, softmax, code search) vs fp32 on the same weights.

    Measured here: 100% identical codes; decoded images max abs diff 0.089, mean 0.010 (outputs span +-2.6).
    Asserted with margin: >= 90% identical codes, max diff <= 0.15, mean diff <= 0.02.
    """
    *_, tok = converted
    bf16 = ImageTokenizer(tok.config, tok.params, dtype="bfloat16")
    x = _images(8, (2, 64, 64, 3))
    c32, c16 = np.asarray(tok.encode(x)), np.asarray(bf16.encode(x))
    assert c16.dtype == np.int32 and c16.shape == c32.shape
    assert np.mean(c16 == c32) >= 0.9, np.mean(c16 == c32)
    y32, y16 = np.asarray(tok.decode(c32)), np.asarray(bf16.decode(c32))
    assert y16.dtype == np.float32
    assert np.max(np.abs(y16 - y32)) <= 0.15, np.max(np.abs(y16 - y32))
    assert np.mean(np.abs(y16 - y32)) <= 0.02, np.mean(np.abs(y16 - y32))
    assert np.max(np.abs(y16 - y32)) > 0  # it really computed in bf16


def test_torch_load_path_and_bare_state_dict_give_the_same_weights(converted, tmp_path):
    d, ckpt, yaml_path, tok = converted
    assert convert_main(["vqgan", "--ckpt", str(ckpt), "--config", str(yaml_path), "--out", str(tmp_path / "t"),
                         "--torch-load"]) == 0
    sd = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    torch.save({k: v for k, v in sd.items() if not k.startswith("loss.")}, tmp_path / "bare.pt")
    assert convert_main(["vqgan", "--ckpt", str(tmp_path / "bare.pt"), "--config", str(yaml_path),
                         "--out", str(tmp_path / "b")]) == 0
    for out in ("t", "b"):
        restored = param_checkpoint.restore_params(tmp_path / out)
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, restored),
                     jax.tree.map(np.asarray, tok.params))
    with pytest.raises(ConversionError, match="no 'weights' entry"):
        convert_vqgan.read_state_dict(str(ckpt), key="weights")


def test_map_batched_by_shape_batches_equal_shapes_and_keeps_input_order():
    items = [((2, 2), i) if i % 3 else ((4, 2), i) for i in range(10)]  # 4 of shape (4, 2), 6 of (2, 2)
    batches = []

    def fn(chunk):
        batches.append([shape for shape, _ in chunk])
        return [i for _, i in chunk]

    assert map_batched_by_shape(items, lambda item: item[0], fn, max_batch=4) == list(range(10))
    assert sorted(len(b) for b in batches) == [2, 4, 4] and all(len(set(b)) == 1 for b in batches)
    assert map_batched_by_shape(items, lambda item: item[0], fn) == list(range(10))  # None: whole groups
    assert sorted(len(b) for b in batches[3:]) == [4, 6]
    with pytest.raises(ValueError):  # one result per item, or the mapping would be wrong
        map_batched_by_shape(items, lambda item: item[0], lambda chunk: [0])
