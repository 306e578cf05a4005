"""Parity of the Flax decoder with transformers' ChameleonForConditionalGeneration through our converter.

Each case builds a tiny random transformers model, saves it with `save_pretrained` (optionally rewritten
into Lumina's q/k-norm file layout and config fields), converts it with `python -m lumina_jax.convert
chameleon` (in-process `main`), restores the Orbax checkpoint and compares, in fp32 on batch 2 x length
128: the logits of every non-image id and the final (normed) hidden states, max abs diff <= 1e-4.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lumina_jax import param_checkpoint
from lumina_jax.config import ChameleonConfig
from lumina_jax.convert.__main__ import main as convert_main
from lumina_jax.models.chameleon import Chameleon, unstack_layers

transformers = pytest.importorskip("transformers")

VOCAB, IMG_START, IMG_END = 512, 4, 260
BATCH, LENGTH = 2, 128
TOL = 1e-4  # fp32 on both sides, highest matmul precision: differences are summation-order rounding only


def vocabulary_map(vocab_size=VOCAB, start=IMG_START, end=IMG_END) -> dict[str, int]:
    """Text names for every id, IMGIMG<code as letters>Z names for the image ids (transformers' convention)."""
    names = {f"<tok{i}>": i for i in range(vocab_size) if not start <= i < end}
    names.update({"IMGIMG" + "".join("ABCDEFGHIJ"[int(c)] for c in str(i - start)) + "Z": i for i in range(start, end)})
    return names


def build_hf_model(seed, *, hidden, heads, kv_heads, layers=2, swin=False, qk_rows=None, rope_theta=10000.0):
    """A random transformers Chameleon; q/k-norm rows equal within groups of heads when `qk_rows` is set."""
    torch.manual_seed(seed)
    cfg = transformers.ChameleonConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden + 48, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, swin_norm=swin, vocabulary_map=vocabulary_map(),
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta}, initializer_range=0.05,
        model_parallel_size=qk_rows or 1,
        vq_config=dict(base_channels=32, channel_multiplier=[1, 2], num_embeddings=64, embed_dim=32,
                       latent_channels=32, resolution=32),
    )
    model = transformers.ChameleonForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("layernorm.weight", "model.norm.weight")):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "_norm." in name:  # q_norm / k_norm weight (rows, Dh) and bias
                base = 1.0 if name.endswith("weight") else 0.0
                rows = p.shape[0] if qk_rows is None else qk_rows
                group = torch.randn(rows, p.shape[1]) * 0.5 + base
                p.copy_(group.repeat_interleave(p.shape[0] // rows, dim=0))
    return model


def to_lumina_layout(directory, rows: int, rope_theta: float):
    """Rewrites a save_pretrained directory as Lumina writes it: q/k-norm with `rows` rows and Lumina's
    transformers-4.44 style config (top-level rope_theta, XLLMX architecture, mask/dropout/z-loss fields)."""
    path = directory / "model.safetensors"
    tensors = load_file(path)
    for key in list(tensors):
        if "_norm." in key:
            t = tensors[key]
            group = t.shape[0] // rows
            assert torch.equal(t, t[::group].repeat_interleave(group, dim=0)), key  # rows equal within groups
            tensors[key] = t[::group].contiguous()
    save_file(tensors, path, metadata={"format": "pt"})
    cfg = json.loads((directory / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg.update(rope_theta=rope_theta, rope_scaling=None, architectures=["ChameleonXLLMXForConditionalGeneration"],
               model_parallel_size=rows, mask_image_logits=False, dropout=0.05, z_loss_weight=1e-5,
               transformers_version="4.44.0")
    (directory / "config.json").write_text(json.dumps(cfg))


def convert(tmp_path, model, *, lumina_rows=None, rope_theta=10000.0, name="ckpt"):
    src = tmp_path / f"{name}-hf"
    model.save_pretrained(src)
    if lumina_rows is not None:
        to_lumina_layout(src, lumina_rows, rope_theta)
    out = tmp_path / name
    assert convert_main(["chameleon", str(src), str(out), "--compute-dtype", "float32", "--no-progress"]) == 0
    cfg = ChameleonConfig.from_dict(param_checkpoint.read_json(out, "config.json"))
    return cfg, param_checkpoint.restore_params(out)


def hf_forward(model, tokens):
    """transformers' logits (image columns masked) and final normed hidden states."""
    ids = torch.from_numpy(tokens).long()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        hidden = model.model(input_ids=ids).last_hidden_state
    return logits.float().numpy(), hidden.float().numpy()


def jax_forward(cfg, params, tokens, scan=True):
    cfg = cfg.replace(scan_layers=scan)
    if not scan:
        params = unstack_layers(params)
    model = Chameleon(cfg)
    fwd = jax.jit(lambda p, t: (model.apply({"params": p}, t), model.apply({"params": p}, t, return_hidden=True)))
    logits, hidden = fwd(params, jnp.asarray(tokens))
    return np.asarray(logits, np.float32), np.asarray(hidden, np.float32)


def tokens_for(seed):
    return np.random.default_rng(seed).integers(0, VOCAB, size=(BATCH, LENGTH), dtype=np.int32)


TEXT_IDS = np.array([i for i in range(VOCAB) if not IMG_START <= i < IMG_END])


def assert_parity(hf_model, cfg, params, tokens, scan=True):
    ref_logits, ref_hidden = hf_forward(hf_model, tokens)
    logits, hidden = jax_forward(cfg, params, tokens, scan=scan)
    assert logits.shape == (BATCH, LENGTH, VOCAB)
    d_logits = np.abs(logits[..., TEXT_IDS] - ref_logits[..., TEXT_IDS]).max()
    d_hidden = np.abs(hidden - ref_hidden).max()
    assert d_logits <= TOL and d_hidden <= TOL, (d_logits, d_hidden)
    assert np.abs(ref_logits[..., TEXT_IDS]).max() > 0.05  # logits are not trivially tiny
    return logits, ref_logits


def test_mha_prenorm_scanned_and_unscanned(tmp_path):
    """(a) MHA pre-norm, transformers q/k-norm layout (one row per head); (d) scanned and unscanned layers."""
    hf = build_hf_model(0, hidden=64, heads=4, kv_heads=4)
    cfg, params = convert(tmp_path, hf)
    assert (cfg.q_norm_rows, cfg.k_norm_rows, cfg.swin_norm, cfg.mask_image_logits) == (4, 4, False, True)
    tokens = tokens_for(0)
    logits, ref = assert_parity(hf, cfg, params, tokens, scan=True)
    # transformers masks image logits; so does the converted config (mask_image_logits from the source).
    assert (logits[..., IMG_START:IMG_END] == np.finfo(np.float32).min).all()
    assert_parity(hf, cfg, params, tokens, scan=False)


def test_gqa_swin_norm_scanned_and_unscanned(tmp_path):
    """(b) GQA (8 query heads, 2 kv heads) with swin-norm blocks; (d) scanned and unscanned layers."""
    hf = build_hf_model(1, hidden=128, heads=8, kv_heads=2, layers=3, swin=True)
    cfg, params = convert(tmp_path, hf)
    assert (cfg.num_kv_heads, cfg.swin_norm, cfg.num_layers) == (2, True, 3)
    tokens = tokens_for(1)
    assert_parity(hf, cfg, params, tokens, scan=True)
    assert_parity(hf, cfg, params, tokens, scan=False)


@pytest.mark.parametrize("rows,heads,kv_heads,swin", [(1, 4, 4, False), (4, 16, 8, True)])
def test_lumina_qk_norm_rows(tmp_path, rows, heads, kv_heads, swin):
    """(c) Lumina files: q/k-norm with 1 row (7B) or 4 rows shared by groups of heads (34B-like: 16 query
    heads, 8 kv heads, so 4 query heads and 2 kv heads per row), transformers-4.44 style config."""
    theta = 5000.0  # a non-default base, read from the top-level rope_theta of the Lumina config
    hf = build_hf_model(2 + rows, hidden=128, heads=heads, kv_heads=kv_heads, swin=swin, qk_rows=rows, rope_theta=theta)
    cfg, params = convert(tmp_path, hf, lumina_rows=rows, rope_theta=theta)
    assert (cfg.q_norm_rows, cfg.k_norm_rows, cfg.rope_theta) == (rows, rows, theta)
    assert params["layers"]["self_attn"]["q_norm"]["scale"].shape == (2, rows, 128 // heads)
    assert cfg.mask_image_logits is False and cfg.dropout == 0.05 and cfg.z_loss_weight == 1e-5
    tokens = tokens_for(rows)
    logits, ref = assert_parity(hf, cfg, params, tokens)
    assert np.isfinite(logits[..., IMG_START:IMG_END]).all()  # Lumina: image logits left unmasked
    if rows > 1:
        # Negative control: assigning the shared rows to the wrong head groups must break parity.
        bad = jax.tree.map(lambda x: x, params)
        for norm in ("q_norm", "k_norm"):
            for leaf in ("scale", "bias"):
                bad["layers"]["self_attn"][norm][leaf] = params["layers"]["self_attn"][norm][leaf][:, ::-1]
        bad_logits, _ = jax_forward(cfg, bad, tokens)
        assert np.abs(bad_logits[..., TEXT_IDS] - ref[..., TEXT_IDS]).max() > 100 * TOL


def test_bf16_compute_close_to_fp32(tmp_path):
    """bf16 activations/matmuls (fp32 parameters, fp32 softmax and norms) vs the fp32 transformers model.

    Tolerance: bf16 keeps 8 significant bits, so every rounded activation carries a relative error up to
    2^-9; over 2 layers (about a dozen roundings on each path to the logits) the errors add up to a few
    percent of the logit scale. We require max |diff| <= 4% of max |logit|, and no more than 3x the error of
    transformers' own bf16 forward (bf16 weights and activations) against its fp32 forward.
    """
    hf = build_hf_model(7, hidden=128, heads=8, kv_heads=4, swin=False)
    cfg, params = convert(tmp_path, hf)
    tokens = tokens_for(7)
    ref_logits, _ = hf_forward(hf, tokens)
    logits, _ = jax_forward(cfg.replace(dtype="bfloat16"), params, tokens)
    ours = np.abs(logits[..., TEXT_IDS] - ref_logits[..., TEXT_IDS]).max()
    torch_bf16, _ = hf_forward(hf.to(torch.bfloat16), tokens)
    theirs = np.abs(torch_bf16[..., TEXT_IDS] - ref_logits[..., TEXT_IDS]).max()
    scale = np.abs(ref_logits[..., TEXT_IDS]).max()
    assert ours <= 0.04 * scale, (ours, scale)
    assert ours <= 3 * theirs, (ours, theirs)
    assert ours > TOL  # the bf16 path really ran in bf16
