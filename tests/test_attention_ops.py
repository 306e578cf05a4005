"""The attention implementations against the dense reference, in float32, outputs and gradients of q, k, v.

The reference here is written out in the test (full score matrix, `jax.nn.softmax`), independently of
`attention_ops.dense`, which is checked against it too. Tolerance 1e-5 (absolute, on values of order 1).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lumina_jax import sharding
from lumina_jax.config import model_preset
from lumina_jax.models import attention_ops as ops
from lumina_jax.sampling import processors
from lumina_jax.sampling.decode import ChameleonDecodeModel
from lumina_jax.sampling.generate import generate_tokens, size_table_from_crops
from lumina_jax.state import init_params, init_train_state, train_state_shardings
from lumina_jax.tokenizer import SpecialIds
from lumina_jax.training import train_step as ts
from lumina_jax.training.config import LossConfig, OptimizerConfig
from lumina_jax.training.optimizer import learning_rate_schedule, make_optimizer
from lumina_jax.training.synthetic import synthetic_global_batch
from test_train_helpers import make_mesh

TOL = 1e-5


def reference(q, k, v, q_slots, k_slots, segments=None):
    """Softmax(q k^T / sqrt(H)) v per head over the visible keys, heads repeated for GQA, float32."""
    B, T, N, H = q.shape
    G = N // k.shape[2]
    k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)  # query head n uses kv head n // G
    s = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)
    visible = k_slots[:, None, :] <= q_slots[:, :, None]
    if segments is not None:
        visible &= segments[:, :, None] == segments[:, None, :]
    p = jax.nn.softmax(jnp.where(visible[:, None], s, -jnp.inf), axis=-1)
    return jnp.einsum("bnts,bsnh->btnh", p, v)


def inputs(B, T, S, N, K, H=8, seed=0):
    r = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(r.normal(size=shape) * 1.5, jnp.float32) for shape in
               ((B, T, N, H), (B, S, K, H), (B, S, K, H)))
    d_out = jnp.asarray(r.normal(size=(B, T, N, H)), jnp.float32)
    return q, k, v, d_out


def packed_segments(B, T, seed=0):
    """Rows of 1-3 segments and trailing padding (segment 0), as the data pipeline packs them."""
    r = np.random.default_rng(seed)
    seg = np.zeros((B, T), np.int32)
    for b in range(B):
        cuts = np.sort(r.choice(np.arange(1, T - 2), size=2, replace=False))
        seg[b, :cuts[0]], seg[b, cuts[0]:cuts[1]], seg[b, cuts[1]:T - 2] = 1, 2, 3
    return jnp.asarray(seg)


def value_and_grads(fn, q, k, v, d_out):
    """The output and the q, k, v cotangents of `fn` for output cotangent `d_out`, jitted as one program."""
    def run(q, k, v, d_out):
        out, pull = jax.vjp(fn, q, k, v)
        return (out,) + pull(d_out)
    return jax.jit(run)(q, k, v, d_out)


def assert_same(got, want, tol=TOL):
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tol, rtol=tol, err_msg=name)


def self_slots(B, T):
    return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))


# (name, B, T, N, K, block, packed): causal, packed, GQA G=1 and G=4, lengths that are no multiple of the block
SELF_CASES = [
    ("causal-mha", 2, 32, 4, 4, 8, False),
    ("packed-mha", 2, 32, 4, 4, 8, True),
    ("causal-gqa4", 2, 32, 8, 2, 8, False),
    ("packed-gqa4-odd", 2, 37, 8, 2, 8, True),
    ("packed-mha-odd-one-block", 1, 29, 4, 4, 64, True),
    ("causal-mqa-odd", 3, 21, 4, 1, 5, False),
]


@pytest.mark.parametrize("name,B,T,N,K,block,packed", SELF_CASES, ids=[c[0] for c in SELF_CASES])
def test_blockwise_equals_dense_for_self_attention(name, B, T, N, K, block, packed):
    q, k, v, d_out = inputs(B, T, T, N, K)
    seg = packed_segments(B, T) if packed else None
    slots = self_slots(B, T)
    want = value_and_grads(lambda q, k, v: reference(q, k, v, slots, slots, seg), q, k, v, d_out)
    dense = value_and_grads(lambda q, k, v: ops.attention(q, k, v, impl="dense", segment_ids=seg), q, k, v, d_out)
    blockwise = value_and_grads(lambda q, k, v: ops.attention(q, k, v, impl="blockwise", segment_ids=seg, block=block),
                                q, k, v, d_out)
    assert_same(dense, want)
    assert_same(blockwise, want)


CACHE_CASES = [("decode-step", 1, 4, (0, 7, 39)), ("decode-at-block-start", 1, 4, (16,)),
               ("gqa-chunk", 5, 2, (0, 7, 35)), ("prefill-odd", 19, 4, (0, 7, 21))]


@pytest.mark.parametrize("name,T,K,cache_index", CACHE_CASES, ids=[c[0] for c in CACHE_CASES])
def test_blockwise_equals_dense_in_the_cache_case(name, T, K, cache_index):
    """Queries at slots cache_index[b] + t against S cache slots, rows at different cache indices."""
    B, S, N = len(cache_index), 40, 4
    q, k, v, d_out = inputs(B, T, S, N, K, seed=1)
    q_slots = jnp.asarray(cache_index, jnp.int32)[:, None] + jnp.arange(T, dtype=jnp.int32)
    k_slots = self_slots(B, S)
    want = value_and_grads(lambda q, k, v: reference(q, k, v, q_slots, k_slots), q, k, v, d_out)
    for impl in ("dense", "blockwise", "splash", "cudnn", "auto"):  # kernels and auto hand over to dense/blockwise
        got = value_and_grads(lambda q, k, v: ops.attention(q, k, v, impl=impl, q_slots=q_slots, k_slots=k_slots,
                                                            block=8), q, k, v, d_out)
        assert_same(got, want)


def test_blockwise_skips_future_tiles_and_keeps_memory_linear():
    """The compiled blockwise gradient holds no (T, T) array; dense does."""
    B, T, N, H = 1, 512, 2, 8
    q, k, v, d_out = inputs(B, T, T, N, N, H)

    def temp_bytes(impl):
        f = jax.jit(lambda q, k, v, d: value_and_grads(
            lambda q, k, v: ops.attention(q, k, v, impl=impl, block=64), q, k, v, d))
        return f.lower(q, k, v, d_out).compile().memory_analysis().temp_size_in_bytes

    scores = B * N * T * T * 4
    assert temp_bytes("dense") >= scores
    assert temp_bytes("blockwise") < scores / 4


def test_splash_kernel_in_interpret_mode_equals_dense():
    """JAX's splash kernel run by the Pallas interpreter on CPU: causal, packed, GQA, a padded length."""
    B, T, N, K, H = 2, 200, 4, 2, 128  # padded to 256 inside, kernel blocks of 128
    q, k, v, d_out = inputs(B, T, T, N, K, H, seed=2)
    seg = packed_segments(B, T, seed=2)
    slots = self_slots(B, T)
    want = value_and_grads(lambda q, k, v: reference(q, k, v, slots, slots, seg), q, k, v, d_out)
    got = value_and_grads(lambda q, k, v: ops.splash_attention(q, k, v, seg, block=128, interpret=True), q, k, v, d_out)
    assert_same(got, want, tol=2e-5)


def test_splash_under_a_mesh_runs_per_device_on_batch_and_head_shards():
    """Inside `sharding_context`, the kernel is shard_mapped over the batch (data, fsdp) and heads (tensor)."""
    B, T, N, K, H = 4, 128, 4, 2, 128
    q, k, v, d_out = inputs(B, T, T, N, K, H, seed=3)
    seg = packed_segments(B, T, seed=3)
    slots = self_slots(B, T)
    want = value_and_grads(lambda q, k, v: reference(q, k, v, slots, slots, seg), q, k, v, d_out)
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    splash = lambda q, k, v: ops.splash_attention(q, k, v, seg, block=128, interpret=True)
    with sharding.sharding_context(mesh, sharding.FSDP_RULES):
        jaxpr = str(jax.make_jaxpr(lambda q, k, v: splash(q, k, v))(q, k, v))
        got = value_and_grads(splash, q, k, v, d_out)
    assert "shard_map" in jaxpr and "('data', 'fsdp')" in jaxpr and "'tensor'" in jaxpr
    assert_same(got, want, tol=2e-5)


def test_cudnn_wrapper_builds_the_causal_packed_call():
    """The cuDNN call's arguments (causal flag, packed-segment mask, GQA layout) through XLA's path on CPU."""
    B, T, N, K = 2, 24, 8, 2
    q, k, v, d_out = inputs(B, T, T, N, K, seed=4)
    seg = packed_segments(B, T, seed=4)
    slots = self_slots(B, T)
    want = value_and_grads(lambda q, k, v: reference(q, k, v, slots, slots, seg), q, k, v, d_out)
    got = value_and_grads(functools.partial(ops.cudnn_attention, segments=seg, implementation="xla"), q, k, v, d_out)
    assert_same(got, want)


def test_auto_picks_by_backend_and_bad_names_fail_in_one_line():
    assert ops.resolve_impl("auto", "tpu") == "splash"
    assert ops.resolve_impl("auto", "gpu", jnp.bfloat16) == "cudnn"
    assert ops.resolve_impl("auto", "gpu", jnp.float32) == "blockwise"  # cuDNN takes 16-bit inputs only
    assert ops.resolve_impl("auto", "cpu") == ops.AUTO_BY_PLATFORM["cpu"]
    assert ops.resolve_impl("blockwise", "tpu") == "blockwise"
    with pytest.raises(ValueError, match="attention_impl='flash'.*known"):
        ops.resolve_impl("flash")
    q, _, _, _ = inputs(1, 24, 24, 2, 2)
    traced = lambda impl, block: str(jax.make_jaxpr(lambda q: ops.attention(q, q, q, impl=impl, block=block))(q))
    if ops.resolve_impl("auto") == "blockwise":  # auto: dense while the scores fit in one block, blockwise beyond
        assert "scan" not in traced("auto", 24) and "scan" in traced("auto", 8)
    assert "scan" in traced("blockwise", 24) and "scan" not in traced("dense", 8)
    # the cache case under auto or a kernel: dense for a decode step or a short prompt against a long cache (a
    # blockwise pass would copy the cache into blocks), blockwise once T x S exceeds CACHE_DENSE_MAX_SCORES
    S = 2428
    k = jnp.zeros((1, S, 2, 8))

    def cached(impl, T):
        q = jnp.zeros((1, T, 2, 8))
        slots = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (1, T)), jnp.arange(S, dtype=jnp.int32)[None]
        return str(jax.make_jaxpr(lambda q: ops.attention(q, k, k, impl=impl, q_slots=slots[0], k_slots=slots[1],
                                                         block=128))(q))

    assert ops.CACHE_DENSE_MAX_SCORES // S >= 64  # a 64-token prompt against a 768x768 image's cache
    for impl in ("auto", "splash"):
        assert "scan" not in cached(impl, 1) and "scan" not in cached(impl, 64)
        assert "scan" in cached(impl, ops.CACHE_DENSE_MAX_SCORES // S + 1)
    assert "scan" in cached("blockwise", 1)  # asked for by name, blockwise stays blockwise
    q, k, v, _ = inputs(1, 4, 6, 2, 2)
    with pytest.raises(ValueError, match="self-attention"):
        ops.attention(q, k, v, impl="dense")


# --- the implementations inside the model: a train step and a generation ------------------------------------


def _train_step_results(impl):
    """Gradients, metrics and updated parameters of one tiny train step (packed rows, accumulation 2)."""
    cfg = model_preset("tiny", attention_impl=impl, attention_block=16, z_loss_weight=1e-3)
    ocfg = OptimizerConfig(lr=1e-3, min_lr=1e-4, warmup_steps=0, eps=1e-3)
    ctx = ts.StepContext(cfg, LossConfig(chunk_size=8), make_optimizer(ocfg, 10), learning_rate_schedule(ocfg, 10),
                         2, make_mesh("fsdp=2"), sharding.FSDP_RULES)
    shardings = train_state_shardings(cfg, ctx.tx, ctx.mesh, sharding.FSDP_RULES)
    state = init_train_state(cfg, ctx.tx, ctx.mesh, sharding.FSDP_RULES, seed=0)
    batch = ts.global_batch(ctx, synthetic_global_batch(0, 0, 4, 40, cfg.vocab_size))  # 40 tokens: 3 blocks of 16
    with sharding.sharding_context(ctx.mesh, ctx.rules):
        grads, _ = jax.jit(ts.make_grad_fn(ctx))(state["params"], batch, jnp.int32(0), state["rng"])
    state, metrics = ts.jit_train_step(ctx, shardings)(state, batch)
    return jax.device_get((grads, metrics, state["params"]))


def test_train_step_is_the_same_with_dense_and_blockwise_attention():
    """fp32: loss and gradient norm within 1e-5 (relative), gradients and updated parameters within 1e-5
    relative to each leaf's largest entry."""
    (g_d, m_d, p_d), (g_b, m_b, p_b) = _train_step_results("dense"), _train_step_results("blockwise")
    for name in ("loss", "ce", "grad_norm"):
        np.testing.assert_allclose(m_b[name], m_d[name], rtol=1e-5, err_msg=name)
    for tree_d, tree_b in ((g_d, g_b), (p_d, p_b)):
        for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(tree_d)[0], jax.tree.leaves(tree_b)):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max(), err_msg=jax.tree_util.keystr(path))


def test_generation_is_the_same_with_dense_and_blockwise_attention():
    """The cached prefill and decode loop with guidance: the same tokens, and logits within 1e-4."""
    ids = processors.TokenIds.from_special_ids(SpecialIds.from_layout(256, 512, compact=True), 512)
    cfg = model_preset("tiny", scan_layers=False)  # the decoder's layout: one cache buffer per layer
    params = jax.tree_util.tree_map_with_path(  # a sharp output layer: sampling far from uniform
        lambda p, x: x * 40.0 if "lm_head" in jax.tree_util.keystr(p) else x, init_params(cfg, 0))
    r = np.random.default_rng(0)
    prompts = [[0] + r.integers(300, 500, n).tolist() + [ids.end_of_turn, ids.image_start] for n in (5, 23)]
    settings = processors.SamplingSettings(cfg_scale=3.0, image_top_k=50, text_top_k=20, max_new_tokens=24)
    out = {}
    for impl in ("dense", "blockwise"):
        model = ChameleonDecodeModel(cfg.replace(attention_impl=impl, attention_block=16))
        out[impl] = generate_tokens(model, params, prompts, seeds=[0, 1], settings=settings, ids=ids,
                                    size_table=size_table_from_crops([(64, 64), (32, 64)]), forced_hw=[(2, 2), None],
                                    record="full")
    (rows_d, rec_d), (rows_b, rec_b) = out["dense"], out["blockwise"]
    assert [row.tokens for row in rows_b] == [row.tokens for row in rows_d]
    for key in ("cond_full", "guided_image"):
        np.testing.assert_allclose(rec_b[key], rec_d[key], atol=1e-4, rtol=1e-4, err_msg=key)
