"""Quantised decoding: int8 weights (qwix) and the int8 / fp8 KV cache against independent numpy references.

References: per-output-channel symmetric int8 (scale = max |w| over the contracted axes / 127.5) and per-slot,
per-head KV quantisation (scale = max |x| over the head dim / 127 or / 448 for e4m3) written here in numpy;
the model run with those numpy-dequantised weights must give the quantised model's logits (fp32 tolerance),
and the logit error against the unquantised model must stay inside the stated bounds (and not be zero, so a
skipped quantisation fails).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import ml_dtypes
import pytest

from lumina_jax import sharding as S
from lumina_jax import state
from lumina_jax.config import model_preset
from lumina_jax.models import attention_ops, quantization
from lumina_jax.models.attention import init_cache
from lumina_jax.models.chameleon import Chameleon, decoder
from lumina_jax.sampling import processors
from lumina_jax.sampling.decode import ChameleonDecodeModel
from lumina_jax.sampling.generate import generate_tokens
from lumina_jax.tokenizer import SpecialIds
from lumina_jax.training.config import TrainConfig

SPECIAL = SpecialIds.from_layout(256, 512, compact=True)
IDS = processors.TokenIds.from_special_ids(SPECIAL, 512)
# contracted axes of each projection's kernel (the scale has one entry per remaining, output, index)
CONTRACTED = {"q_proj": (0,), "k_proj": (0,), "v_proj": (0,), "o_proj": (0, 1), "gate_proj": (0,),
              "up_proj": (0,), "down_proj": (0,), "lm_head": (0,)}


def numpy_int8(w: np.ndarray, axes) -> np.ndarray:
    """Independent reference: symmetric int8 per output channel (qwix's mapping: scale = max |w| / 127.5, codes
    round(w / scale) clipped to -128..127), returned dequantised (float64)."""
    w = np.asarray(w, np.float64)
    scale = np.max(np.abs(w), axis=axes, keepdims=True) / 127.5
    scale = np.where(scale > 0, scale, 1.0)
    return np.clip(np.round(w / scale), -128, 127) * scale


def numpy_kv(x: np.ndarray, mode: str) -> np.ndarray:
    """Independent reference of the cache: each (row, slot, head) vector quantised on its own, dequantised."""
    x = np.asarray(x, np.float64)
    qmax = {"int8": 127.0, "fp8": 448.0}[mode]
    scale = np.max(np.abs(x), axis=-1, keepdims=True) / qmax
    scale = np.where(scale > 0, scale, 1.0)
    y = np.clip(x / scale, -qmax, qmax)
    y = np.round(y) if mode == "int8" else y.astype(np.float32).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    return y * scale


def dequantized_in_numpy(qparams):
    """The plain parameter tree of a quantised one: every int8 kernel as codes x scales computed in numpy."""
    def go(x):
        if not quantization.is_quantized(x):
            return x
        q = quantization.qarray(x)
        return jnp.asarray(np.asarray(q.qvalue, np.float64) * np.asarray(q.scale, np.float64), jnp.float32)
    return jax.tree.map(go, qparams, is_leaf=quantization.is_quantized)


@pytest.fixture(scope="module")
def tiny():
    cfg = model_preset("tiny", scan_layers=False)
    params = state.init_params(cfg, 0)
    params = jax.tree_util.tree_map_with_path(  # a sharper head, as the sampler tests use
        lambda p, x: x * 40.0 if "lm_head" in jax.tree_util.keystr(p) else x, params)
    qcfg = cfg.replace(weight_quant="int8")
    mesh = S.make_mesh("data=1", devices=jax.devices()[:1])
    qparams = state.quantize_sharded(jax.tree.map(np.array, params), qcfg, mesh, S.TENSOR_PARALLEL_RULES)  # donated
    return cfg, params, qcfg, qparams


def test_int8_kernels_match_the_numpy_per_channel_reference(tiny):
    cfg, params, qcfg, qparams = tiny
    checked = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(qparams, is_leaf=quantization.is_quantized)[0]:
        names = [getattr(k, "key", None) for k in path]
        if not quantization.is_quantized(leaf):
            assert names[-1] != "kernel", f"{names} was left unquantised"
            continue
        q = quantization.qarray(leaf)
        assert q.qvalue.dtype == jnp.int8
        w = np.asarray(params[names[0]]["kernel"] if len(names) == 2 else params[names[0]][names[1]][names[2]]["kernel"])
        axes = CONTRACTED[names[-2]]
        want_scale = np.max(np.abs(w), axis=axes, keepdims=True) / 127.5
        np.testing.assert_allclose(np.asarray(q.scale), want_scale, rtol=1e-6)
        ref = numpy_int8(w, axes)
        codes = np.asarray(q.qvalue, np.int64)
        ref_codes = np.round(ref / want_scale).astype(np.int64)
        # identical codes except where w / scale lies within float32 rounding (qwix multiplies by the scale's
        # reciprocal) of a half-integer: there the two roundings may pick neighbouring codes
        assert np.abs(codes - ref_codes).max() <= 1
        x = w.astype(np.float64) / want_scale
        near_tie = np.abs(np.abs(x - np.floor(x)) - 0.5) < 1e-3
        assert np.all(near_tie[codes != ref_codes]) and np.mean(codes != ref_codes) < 0.01
        got = np.asarray(quantization.dequantize(leaf, jnp.float32), np.float64)
        np.testing.assert_allclose(got, codes * np.asarray(q.scale, np.float64), rtol=1e-6)
        checked += 1
    assert checked == 7 * cfg.num_layers + 1


def _decode_logits(cfg, params, tokens, steps=4):
    """Prefill `tokens` (B, P) into a cache, then feed `steps` more tokens one at a time; float32 full logits
    of every fed position, through the sampler's model (ChameleonDecodeModel)."""
    dm = ChameleonDecodeModel(cfg)
    B, P = tokens.shape
    cache = dm.init_cache(B, P + steps)
    pos = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    fwd = jax.jit(dm.forward)
    hidden, cache = fwd(params, tokens, pos, cache, jnp.zeros((B,), jnp.int32))
    out = [jax.vmap(lambda h: dm.logits(params, h), in_axes=1, out_axes=1)(hidden)]
    rng = np.random.default_rng(1)
    for s in range(steps):
        tok = jnp.asarray(rng.integers(4, 500, (B, 1)), jnp.int32)
        idx = jnp.full((B,), P + s, jnp.int32)
        hidden, cache = fwd(params, tok, idx[:, None], cache, idx)
        out.append(dm.logits(params, hidden[:, 0])[:, None])
    return np.asarray(jnp.concatenate(out, axis=1))


TOKENS = jnp.asarray(np.random.default_rng(0).integers(4, 500, (2, 12)), jnp.int32)


def test_int8_weights_equal_the_plain_model_on_numpy_dequantised_weights(tiny):
    # with the kernels checked against numpy above: the quantised forward (qwix's einsums, the sampler's head)
    # computes exactly the unquantised model on codes x scales
    cfg, params, qcfg, qparams = tiny
    got = _decode_logits(qcfg, qparams, TOKENS)
    ref = _decode_logits(cfg, dequantized_in_numpy(qparams), TOKENS)
    np.testing.assert_allclose(got, ref, atol=1e-5 * np.abs(ref).max())


def test_int8_weights_logit_error_on_a_random_model_is_small_but_not_zero(tiny):
    cfg, params, qcfg, qparams = tiny
    base = _decode_logits(cfg, params, TOKENS)
    err = np.abs(_decode_logits(qcfg, qparams, TOKENS) - base) / base.std()
    # bounds relative to the logits' standard deviation (measured: max 0.049, mean 0.0084)
    assert err.max() <= 0.1 and err.mean() <= 0.02
    assert err.max() > 1e-3  # quantisation happened


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_kv_cache_write_read_matches_the_numpy_per_slot_per_head_reference(mode):
    cfg = model_preset("tiny", scan_layers=False, kv_cache_quant=mode)
    cache = init_cache(cfg, 2, 10)[0]
    assert cache.k.dtype == quantization.kv_storage_dtype(mode) and cache.k_scale.shape == (2, 4, cache.max_length)
    assert cache.k.shape == (2, 4, 128, 16) and cache.num_kv_heads == 4  # heads first, whole tiles of slots
    assert init_cache(cfg, 2, 129)[0].max_length == 256 and init_cache(cfg, 2, 128)[0].max_length == 128
    rng = np.random.default_rng(0)
    k = rng.normal(size=(2, 3, 4, 16)).astype(np.float32) * rng.uniform(0.1, 10, (2, 3, 4, 1)).astype(np.float32)
    v = rng.normal(size=(2, 3, 4, 16)).astype(np.float32)
    v[0, 1, 2] = 0.0  # an all-zero head vector stays zero
    index = jnp.asarray([2, 5], jnp.int32)
    got_k, got_v = jax.jit(lambda c: c.write(jnp.asarray(k), jnp.asarray(v), index).read(jnp.float32))(cache)
    got_k, got_v = np.asarray(got_k), np.asarray(got_v)
    tol = 1e-6 if mode == "int8" else 1e-6
    for b, i in enumerate([2, 5]):
        np.testing.assert_allclose(got_k[b, i:i + 3], numpy_kv(k[b], mode), rtol=tol, atol=tol)
        np.testing.assert_allclose(got_v[b, i:i + 3], numpy_kv(v[b], mode), rtol=tol, atol=tol)
        others = np.ones(cache.max_length, bool)
        others[i:i + 3] = False
        assert not got_k[b, others].any() and not got_v[b, others].any()
    # and the round trip is not the identity (the values really are stored quantised)
    assert np.abs(got_k[0, 2:5] - k[0]).max() > 1e-4


@pytest.mark.parametrize("mode,bound", [("int8", 0.05), ("fp8", 0.25)])  # measured 0.018 and 0.096
def test_kv_cache_logit_error_on_a_random_model(tiny, mode, bound):
    cfg, params, _, _ = tiny
    base = _decode_logits(cfg, params, TOKENS)
    err = np.abs(_decode_logits(cfg.replace(kv_cache_quant=mode), params, TOKENS) - base) / base.std()
    assert err.max() <= bound  # relative to the logits' standard deviation
    assert err.max() > 1e-4  # the cache really was quantised


def test_sharded_generation_equals_one_device_with_int8_weights_and_cache(tiny):
    cfg, params, _, _ = tiny
    qcfg = cfg.replace(weight_quant="int8", kv_cache_quant="int8")
    settings = processors.SamplingSettings(cfg_scale=3.0, image_top_k=50, max_new_tokens=12, constrain_size=False)
    prompts = [[0, 7, 9, 11], [0, 5, 6, 7, 8, 20, 30]]
    kw = dict(seeds=[3, 4], settings=settings, ids=IDS, record=True)
    results = []
    for spec, rules in (("data=1", S.TENSOR_PARALLEL_RULES), ("data=2,tensor=4", S.TENSOR_PARALLEL_RULES),
                        ("fsdp=2,tensor=4", S.FSDP_RULES)):
        devices = jax.devices()[:1] if spec == "data=1" else None
        mesh = S.make_mesh(spec, devices=devices)
        placed = jax.device_put(jax.tree.map(np.array, params), state.param_shardings(cfg, mesh, rules))
        qparams = state.quantize_sharded(placed, qcfg, mesh, rules)
        if spec != "data=1":
            spec_q = quantization.qarray(qparams["layers_0"]["self_attn"]["q_proj"]["kernel"]).qvalue.sharding.spec
            assert "tensor" in jax.tree.leaves(tuple(spec_q))
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        with S.sharding_context(mesh, rules):
            rows, rec = generate_tokens(ChameleonDecodeModel(qcfg), qparams, prompts, input_sharding=replicated, **kw)
        results.append(([r.tokens for r in rows], np.asarray(rec["guided_image"])))
    for tokens, guided in results[1:]:
        assert tokens == results[0][0]
        np.testing.assert_allclose(np.nan_to_num(guided), np.nan_to_num(results[0][1]), atol=1e-4)


def test_init_of_a_quantised_config_gives_the_quantised_layout():
    cfg = model_preset("tiny", scan_layers=False, weight_quant="int8", dtype="bfloat16", param_dtype="bfloat16")
    shapes = state.param_shapes(cfg)
    q = quantization.qarray(shapes["layers_1"]["self_attn"]["o_proj"]["kernel"])
    assert q.qvalue.dtype == jnp.int8 and q.qvalue.shape == (4, 16, 64) and q.scale.shape == (1, 1, 64)
    assert q.scale.dtype == jnp.bfloat16  # scales in the compute dtype
    assert shapes["embed_tokens"]["embedding"].dtype == jnp.bfloat16  # the embedding stays as it was
    p = state.init_params(cfg, 0)
    out = decoder(cfg).apply({"params": p}, jnp.zeros((1, 3), jnp.int32))
    assert out.shape == (1, 3, 512) and bool(jnp.all(jnp.isfinite(out)))


def test_training_refuses_quantised_models():
    base = TrainConfig()
    for field in ("weight_quant", "kv_cache_quant"):
        with pytest.raises(ValueError, match=f"model.{field}='int8': quantisation is for inference only"):
            dataclasses.replace(base, model=base.model.replace(**{field: "int8"}))


def test_unsupported_kv_storage_is_refused_in_one_line(monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("UNIMPLEMENTED: F8E4M3FN is not supported\nmore detail")

    monkeypatch.setattr(quantization, "quantize_heads", broken)
    with pytest.raises(ValueError) as e:
        quantization.check_kv_backend("fp8")
    msg = str(e.value)
    assert "\n" not in msg and "kv_cache_quant='fp8'" in msg and "float8_e4m3fn" in msg
    quantization.check_kv_backend("none")


def test_unquantised_chameleon_is_untouched_by_the_quantisation_path():
    cfg = model_preset("tiny", scan_layers=False)
    assert type(decoder(cfg)) is Chameleon


@pytest.mark.parametrize("mode", ["int8", "fp8"])
@pytest.mark.parametrize("impl,T", [("dense", 1), ("auto", 1), ("auto", 20), ("blockwise", 3)])
def test_attention_over_a_quantised_cache_equals_attention_over_its_numpy_dequantisation(mode, impl, T):
    # dense folds the (B, K, S) scales into the scores and probabilities; blockwise (long prompts under auto)
    # dequantises first: both must equal plain dense attention over the numpy-dequantised keys and values
    cfg = model_preset("tiny", scan_layers=False, kv_cache_quant=mode)
    B, S, K, G, H = 2, 128, cfg.num_kv_heads, 2, cfg.head_dim  # a whole number of cache tiles
    rng = np.random.default_rng(1)
    k = rng.normal(size=(B, S, K, H)).astype(np.float32) * rng.uniform(0.1, 5, (B, S, K, 1)).astype(np.float32)
    v = rng.normal(size=(B, S, K, H)).astype(np.float32)
    q = jnp.asarray(rng.normal(size=(B, T, K * G, H)).astype(np.float32))
    cache = init_cache(cfg, B, S)[0].write(jnp.asarray(k), jnp.asarray(v), jnp.zeros((B,), jnp.int32))
    kq, vq, ks, vs = cache.read_scaled(jnp.float32)
    assert ks.shape == (B, K, S) and kq.dtype == jnp.float32
    q_slots = jnp.asarray([[30 + t for t in range(T)], [5 + t for t in range(T)]], jnp.int32)
    k_slots = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    got = attention_ops.attention(q, kq, vq, impl=impl, q_slots=q_slots, k_slots=k_slots, k_scale=ks, v_scale=vs,
                                  block=16)
    ref_k = np.stack([numpy_kv(k[b], mode) for b in range(B)]).astype(np.float32)
    ref_v = np.stack([numpy_kv(v[b], mode) for b in range(B)]).astype(np.float32)
    ref = attention_ops.dense_attention(q, jnp.asarray(ref_k), jnp.asarray(ref_v), q_slots, k_slots)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_attention_scales_must_come_in_pairs_and_only_with_a_cache():
    q = jnp.zeros((1, 1, 4, 8))
    k = jnp.zeros((1, 4, 2, 8))
    slots = jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="both k_scale and v_scale"):
        attention_ops.attention(q, k, k, q_slots=slots[0], k_slots=slots[1], k_scale=jnp.ones((1, 2, 4)))
    with pytest.raises(ValueError, match="KV-cache case"):
        attention_ops.attention(q, k, k, k_scale=jnp.ones((1, 2, 4)), v_scale=jnp.ones((1, 2, 4)))
