"""Parity of the Flax VQGAN with taming-transformers 0.0.1 and with transformers' ChameleonVQVAE (fp32, CPU).

Random weights are written as a Lightning-style vqgan.ckpt, converted with our CLI, and loaded into the
PyTorch modules straight from the file with torch.load (strict=True), so the two sides share nothing but
the file.
"""
import numpy as np
import pytest
import torch

from lumina_jax.convert.__main__ import main as convert_main
from lumina_jax.image_tokenizer import ImageTokenizer
from lumina_jax.testing.vqgan import tiny_vqgan_config, write_lightning_vqgan

taming_model = pytest.importorskip("taming.modules.diffusionmodules.model")
taming_quantize = pytest.importorskip("taming.modules.vqvae.quantize")

TOL = 1e-4  # max abs diff in fp32 (encoder features, decoder output)
TIE_RTOL = 1e-5  # a flipped code is accepted only if its distance equals the best one to this relative tolerance


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """torch's CPU kernels run several times slower when their threads compete with XLA's on 2 cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _images(seed, shape):
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def _converted(tmp_path_factory, config, name):
    d = tmp_path_factory.mktemp(name)
    ckpt, yaml_path = write_lightning_vqgan(d / "src", config, seed=0)
    assert convert_main(["vqgan", "--ckpt", str(ckpt), "--config", str(yaml_path), "--out", str(d / "conv")]) == 0
    sd = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    return d / "conv", sd


class TamingVQModel(torch.nn.Module):
    """The taming VQModel minus Lightning and loss: the reference forward passes."""

    def __init__(self, cfg):
        super().__init__()
        dd = dict(double_z=cfg.double_z, z_channels=cfg.z_channels, resolution=cfg.resolution, in_channels=cfg.in_channels,
                  out_ch=cfg.out_ch, ch=cfg.ch, ch_mult=list(cfg.ch_mult), num_res_blocks=cfg.num_res_blocks,
                  attn_resolutions=list(cfg.attn_resolutions), dropout=0.0)
        self.encoder = taming_model.Encoder(**dd)
        self.decoder = taming_model.Decoder(**dd)
        self.quantize = taming_quantize.VectorQuantizer(cfg.n_embed, cfg.embed_dim, beta=0.25)
        self.quant_conv = torch.nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = torch.nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    @torch.no_grad()
    def encode(self, x_nhwc):
        x = torch.from_numpy(x_nhwc).permute(0, 3, 1, 2)
        feats = self.encoder(x)
        z = self.quant_conv(feats)
        _, _, (_, _, idx) = self.quantize(z)
        b, _, h, w = z.shape
        return (feats.permute(0, 2, 3, 1).numpy(), z.permute(0, 2, 3, 1).numpy(), idx.reshape(b, h, w).numpy())

    @torch.no_grad()
    def decode(self, codes):
        b, h, w = codes.shape
        zq = self.quantize.get_codebook_entry(torch.from_numpy(codes.reshape(-1)).long(), (b, h, w, self.quantize.e_dim))
        return self.decoder(self.post_quant_conv(zq)).permute(0, 2, 3, 1).numpy()


def assert_codes_match(ours, ref, latents, codebook):
    """Codes equal; where they differ the two candidates must be a tie of the fp32 distance (float64 check)."""
    diff = np.argwhere(ours != ref)
    z = latents.astype(np.float64)
    e = codebook.astype(np.float64)
    for idx in diff:
        zi = z[tuple(idx)]
        d_ours = np.sum((zi - e[ours[tuple(idx)]]) ** 2)
        d_ref = np.sum((zi - e[ref[tuple(idx)]]) ** 2)
        assert abs(d_ours - d_ref) <= TIE_RTOL * max(d_ref, 1e-12), (
            f"code at {tuple(idx)} differs: ours {ours[tuple(idx)]} (d={d_ours}) vs ref {ref[tuple(idx)]} (d={d_ref})")
    assert len(diff) <= max(1, ours.size // 100), f"{len(diff)} of {ours.size} codes differ"


@pytest.fixture(scope="module")
def chameleon_layout(tmp_path_factory):
    cfg = tiny_vqgan_config()  # ch_mult 1,1,2,2,4, two res blocks, mid attention; width 32
    ckpt_dir, sd = _converted(tmp_path_factory, cfg, "vq_parity")
    ref = TamingVQModel(cfg)
    missing, unexpected = ref.load_state_dict({k: v for k, v in sd.items() if not k.startswith("loss.")}, strict=True)
    assert not missing and not unexpected
    ref.eval()
    return cfg, ImageTokenizer.from_checkpoint(ckpt_dir), ref, sd


@pytest.mark.parametrize("shape", [(2, 64, 64, 3), (1, 64, 96, 3)], ids=["square", "non_square"])
def test_encoder_and_codes_match_taming(chameleon_layout, shape):
    cfg, tok, ref, sd = chameleon_layout
    x = _images(1, shape)
    feats_ref, z_ref, codes_ref = ref.encode(x)
    feats, z, codes = (np.asarray(a) for a in tok.encode_with_features(x))
    assert feats.shape == feats_ref.shape == (shape[0], shape[1] // 16, shape[2] // 16, cfg.z_channels)
    np.testing.assert_allclose(feats, feats_ref, atol=TOL, rtol=0)
    np.testing.assert_allclose(z, z_ref, atol=TOL, rtol=0)
    assert codes.dtype == np.int32 and codes.shape == codes_ref.shape
    assert len(np.unique(codes_ref)) >= 8, "random weights collapsed onto too few codes to test anything"
    assert_codes_match(codes, codes_ref, z_ref, sd["quantize.embedding.weight"].numpy())


def test_decoder_matches_taming(chameleon_layout):
    cfg, tok, ref, _ = chameleon_layout
    shape = (2, 4, 6)  # non-square latent grid -> 64x96 images
    codes = np.random.default_rng(2).integers(0, cfg.n_embed, shape).astype(np.int32)
    out = np.asarray(tok.decode(codes))
    out_ref = ref.decode(codes)
    assert out.shape == out_ref.shape == (shape[0], 16 * shape[1], 16 * shape[2], 3)
    assert out.dtype == np.float32
    assert np.abs(out_ref).max() > 0.1  # a real signal, not all zeros
    np.testing.assert_allclose(out, out_ref, atol=TOL, rtol=0)


def test_per_level_attention_matches_taming(tmp_path_factory):
    """A layout with AttnBlocks inside levels (attn_resolutions), taken from the keys by the converter."""
    cfg = tiny_vqgan_config(ch_mult=(1, 2), resolution=32, attn_resolutions=(16,), n_embed=32)
    ckpt_dir, sd = _converted(tmp_path_factory, cfg, "vq_attn")
    assert any(k.startswith("encoder.down.1.attn.0.") for k in sd) and any(k.startswith("decoder.up.1.attn.2.") for k in sd)
    ref = TamingVQModel(cfg)
    ref.load_state_dict({k: v for k, v in sd.items() if not k.startswith("loss.")}, strict=True)
    tok = ImageTokenizer.from_checkpoint(ckpt_dir)
    assert tok.config.attn_resolutions == (16,)
    x = _images(3, (2, 16, 24, 3))
    feats_ref, z_ref, codes_ref = ref.encode(x)
    feats, _, codes = (np.asarray(a) for a in tok.encode_with_features(x))
    np.testing.assert_allclose(feats, feats_ref, atol=TOL, rtol=0)
    assert_codes_match(codes, codes_ref, z_ref, sd["quantize.embedding.weight"].numpy())
    np.testing.assert_allclose(np.asarray(tok.decode(codes_ref)), ref.decode(codes_ref), atol=TOL, rtol=0)


def test_encoder_and_codes_match_transformers_chameleon_vqvae(chameleon_layout):
    from transformers import ChameleonVQVAE, ChameleonVQVAEConfig

    cfg, tok, _, sd = chameleon_layout
    hf_cfg = ChameleonVQVAEConfig(embed_dim=cfg.embed_dim, num_embeddings=cfg.n_embed, double_latent=False,
                                  latent_channels=cfg.z_channels, resolution=cfg.resolution, in_channels=3,
                                  base_channels=cfg.ch, channel_multiplier=list(cfg.ch_mult),
                                  num_res_blocks=cfg.num_res_blocks, attn_resolutions=None, dropout=0.0)
    hf = ChameleonVQVAE(hf_cfg).eval()
    # the HF model has no decoder (its converter skips every decoder key)
    hf_sd = {k: v for k, v in sd.items() if not k.startswith(("decoder.", "loss."))}
    missing, unexpected = hf.load_state_dict(hf_sd, strict=True)
    assert not missing and not unexpected
    for shape in [(2, 64, 64, 3), (1, 64, 96, 3)]:
        x = _images(4, shape)
        with torch.no_grad():
            out = hf.encode(torch.from_numpy(x).permute(0, 3, 1, 2), return_dict=True)
            z_ref = hf.quant_conv(out.last_hidden_state).permute(0, 2, 3, 1).numpy()
        feats_ref = out.last_hidden_state.permute(0, 2, 3, 1).numpy()
        codes_ref = out.image_tokens.reshape(shape[0], shape[1] // 16, shape[2] // 16).numpy()
        feats, _, codes = (np.asarray(a) for a in tok.encode_with_features(x))
        np.testing.assert_allclose(feats, feats_ref, atol=TOL, rtol=0)
        assert_codes_match(codes, codes_ref, z_ref, sd["quantize.embedding.weight"].numpy())
