"""KV-cache decoding equals the full forward: prefill + one-token steps, ragged prompts, row restarts.

The reference is the full forward of the scanned model (the training layout); the cached path is the one
decoding runs: unscanned layers (`unstack_layers`) on a per-layer cache from `init_cache`."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lumina_jax.config import model_preset
from lumina_jax.models import chameleon as C
from lumina_jax.state import init_params

TINY = model_preset("tiny")
TINY_GQA_SWIN = model_preset("tiny-gqa-swin")
ATOL = 1e-4  # fp32; the cached and full paths sum the same terms in a different order and length


def random_params(cfg, seed):
    """Random parameters with std 0.1 kernels and non-trivial norm scales and biases."""
    params = init_params(cfg, jax.random.key(seed))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(seed + 1000), len(leaves))
    out = []
    for (path, x), k in zip(leaves, keys):
        name = path[-1].key
        if name == "scale":
            x = 1.0 + 0.2 * jax.random.normal(k, x.shape, x.dtype)
        elif name == "bias":
            x = 0.2 * jax.random.normal(k, x.shape, x.dtype)
        else:
            x = x * 5.0
        out.append(x)
    return jax.tree_util.tree_unflatten(treedef, out)


@functools.lru_cache(maxsize=None)
def full_forward(cfg):
    return jax.jit(lambda p, t: C.Chameleon(cfg).apply({"params": p}, t))


@functools.lru_cache(maxsize=None)
def cached_forward(cfg):
    """(unstacked params, tokens (B, T), cache, cache_index (B,), positions (B, T)) -> (logits, new_cache)."""
    def f(p, t, cache, idx, pos):
        return C.Chameleon(cfg).apply({"params": p}, t, positions=pos, cache=cache, cache_index=idx)
    return jax.jit(f)


def decoding(cfg):
    return cfg.replace(scan_layers=False)


def stacked_keys(cache):
    return np.stack([np.asarray(layer.k) for layer in cache])


def tokens_for(cfg, shape, seed):
    return jax.random.randint(jax.random.key(seed), shape, 0, cfg.vocab_size, dtype=jnp.int32)


@pytest.mark.parametrize("cfg", [TINY, TINY_GQA_SWIN], ids=["mha", "gqa-swin"])
def test_prefill_then_steps_match_full_forward(cfg):
    params = random_params(cfg, 0)
    B, T, P, S = 2, 9, 4, 12  # batch, total tokens, prompt length, cache slots
    tokens = tokens_for(cfg, (B, T), 1)
    full = np.asarray(full_forward(cfg)(params, tokens))
    dcfg, dparams = decoding(cfg), C.unstack_layers(params)
    cache = C.init_cache(dcfg, B, S)
    assert len(cache) == cfg.num_layers
    assert all(layer.k.shape == (B, S, cfg.num_kv_heads, cfg.head_dim) for layer in cache)  # slots before heads
    assert cache[0].k.dtype == jnp.float32  # compute dtype of the tiny config
    step = cached_forward(dcfg)
    # positions=None: they default to cache_index + arange(T).
    logits, cache = step(dparams, tokens[:, :P], cache, jnp.zeros((B,), jnp.int32), None)
    np.testing.assert_allclose(np.asarray(logits), full[:, :P], atol=ATOL, rtol=ATOL)
    for t in range(P, T):
        idx = jnp.full((B,), t, jnp.int32)
        logits, cache = step(dparams, tokens[:, t : t + 1], cache, idx, None)
        np.testing.assert_allclose(np.asarray(logits[:, 0]), full[:, t], atol=ATOL, rtol=ATOL, err_msg=f"step {t}")
    # Slots past the last written one are still zero: the cache was written exactly where asked.
    k = stacked_keys(cache)  # (L, B, S, K, H)
    assert np.all(k[:, :, T:] == 0) and np.any(k[:, :, T - 1] != 0)


def test_ragged_prompts_and_row_restart():
    """Right-padded prefill of prompts of lengths 3 and 5, per-row cache_index, then a restart of row 1.

    Row 1 is restarted mid-way at slot 0 / position 0 with a new sequence (as the unconditional guidance
    row is at an image start) while row 0 keeps decoding; both must match their own full forwards.
    """
    cfg = TINY
    params = random_params(cfg, 4)
    S = 16
    seq0 = tokens_for(cfg, (1, 10), 5)
    seq1 = tokens_for(cfg, (1, 8), 6)
    fresh = tokens_for(cfg, (1, 5), 7)  # row 1's sequence after the restart
    # One full forward of all three sequences right-padded to 10 (causal: padding does not touch them).
    pad_to = lambda x: jnp.pad(x, ((0, 0), (0, 10 - x.shape[1])))
    ref0, ref1, ref_fresh = np.asarray(full_forward(cfg)(params, jnp.concatenate([seq0, pad_to(seq1), pad_to(fresh)])))
    cfg, params = decoding(cfg), C.unstack_layers(params)
    lengths = [3, 5]
    pad = 99  # anything: padded slots are overwritten later and masked by slot causality until then
    prompt = jnp.array([list(seq0[0, :3]) + [pad, pad], list(seq1[0, :5])], jnp.int32)
    step = cached_forward(cfg)
    cache = C.init_cache(cfg, 2, S)
    pos = jnp.broadcast_to(jnp.arange(5, dtype=jnp.int32), (2, 5))
    logits, cache = step(params, prompt, cache, jnp.zeros((2,), jnp.int32), pos)
    # Each row's last real prompt token predicts its next token.
    np.testing.assert_allclose(np.asarray(logits[0, 2]), ref0[2], atol=ATOL, rtol=ATOL)
    np.testing.assert_allclose(np.asarray(logits[1, 4]), ref1[4], atol=ATOL, rtol=ATOL)

    idx = np.array(lengths, np.int32)
    # Three steps with both rows on their own sequences.
    for _ in range(3):
        toks = jnp.array([[seq0[0, idx[0]]], [seq1[0, idx[1]]]], jnp.int32)
        logits, cache = step(params, toks, cache, jnp.asarray(idx), jnp.asarray(idx)[:, None])
        np.testing.assert_allclose(np.asarray(logits[0, 0]), ref0[idx[0]], atol=ATOL, rtol=ATOL)
        np.testing.assert_allclose(np.asarray(logits[1, 0]), ref1[idx[1]], atol=ATOL, rtol=ATOL)
        idx += 1
    # Restart row 1 at slot 0, position 0; row 0 continues where it was.
    idx[1] = 0
    for _ in range(4):
        toks = jnp.array([[seq0[0, idx[0]]], [fresh[0, idx[1]]]], jnp.int32)
        logits, cache = step(params, toks, cache, jnp.asarray(idx), jnp.asarray(idx)[:, None])
        np.testing.assert_allclose(np.asarray(logits[0, 0]), ref0[idx[0]], atol=ATOL, rtol=ATOL)
        np.testing.assert_allclose(np.asarray(logits[1, 0]), ref_fresh[idx[1]], atol=ATOL, rtol=ATOL)
        idx += 1


def test_several_tokens_per_row_at_each_rows_own_slots():
    """Calls that feed T > 1 tokens per row at different per-row slots (as a verifier of drafted tokens would)
    give each row the logits of its own full forward."""
    cfg = TINY
    params = random_params(cfg, 8)
    seqs = tokens_for(cfg, (2, 16), 9)
    full = np.asarray(full_forward(cfg)(params, seqs))
    cfg, params = decoding(cfg), C.unstack_layers(params)
    step = cached_forward(cfg)
    cache = C.init_cache(cfg, 2, 16)
    _, cache = step(params, seqs[:, :6], cache, jnp.zeros((2,), jnp.int32), None)  # row 1 keeps only 4 of these
    idx = np.array([6, 4], np.int32)
    for n in (3, 2, 3):
        toks = jnp.stack([seqs[b, idx[b]:idx[b] + n] for b in range(2)])
        logits, cache = step(params, toks, cache, jnp.asarray(idx), None)
        for b in range(2):
            np.testing.assert_allclose(np.asarray(logits[b]), full[b, idx[b]:idx[b] + n], atol=ATOL, rtol=ATOL,
                                       err_msg=f"row {b} slots {idx[b]}..{idx[b] + n - 1}")
        idx += n


def test_bf16_cache_and_errors():
    cfg = decoding(TINY.replace(dtype="bfloat16"))
    cache = C.init_cache(cfg, 2, 8)
    assert all(layer.k.dtype == jnp.bfloat16 and layer.v.dtype == jnp.bfloat16 for layer in cache)
    assert C.init_cache(cfg, 2, 8, dtype="float32")[0].k.dtype == jnp.float32
    params = C.unstack_layers(random_params(TINY, 0))
    model = C.Chameleon(cfg)
    tokens = jnp.zeros((2, 3), jnp.int32)
    apply = lambda t, model=model, p=params, **kw: jax.eval_shape(lambda p: model.apply({"params": p}, t, **kw), p)
    logits, new = apply(tokens, cache=cache)
    assert len(new) == len(cache) and logits.dtype == jnp.float32
    assert new[0].k.dtype == jnp.bfloat16 and new[0].k.shape == cache[0].k.shape
    with pytest.raises(ValueError, match="batch=3"):
        apply(jnp.zeros((3, 1), jnp.int32), cache=cache)
    with pytest.raises(ValueError, match="segment_ids"):
        apply(tokens, cache=cache, segment_ids=jnp.ones((2, 3), jnp.int32))
    with pytest.raises(ValueError, match="tuple of 2 per-layer KVCaches"):
        apply(tokens, cache=cache[:1])
    # The scanned (training) layout refuses a cache and says how to get the decoding layout.
    with pytest.raises(ValueError, match="unscanned layers.*unstack_layers"):
        apply(tokens, model=C.Chameleon(TINY), p=random_params(TINY, 0), cache=C.init_cache(TINY, 2, 8))


@pytest.mark.parametrize("kv_quant", ["none", "int8"])
def test_dense_cache_step_ignores_stale_slots_and_equals_attention_over_the_written_cache(kv_quant):
    # A dense cache step attends the cache as it was (slots before cache_index) plus the new tokens as stored;
    # blockwise attends the written cache. Stale entries at and beyond cache_index (a rejected SJD draft)
    # must be invisible to both, and both must write the same cache.
    from lumina_jax.models.attention import Attention, init_cache

    base = model_preset("tiny", scan_layers=False, kv_cache_quant=kv_quant)
    B, S, T = 2, 24, 3
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(B, T, base.hidden_size)).astype(np.float32))
    index = jnp.asarray([5, 11], jnp.int32)
    positions = index[:, None] + jnp.arange(T, dtype=jnp.int32)
    cache = init_cache(base, B, S)[0]
    junk = rng.normal(size=(B, S, base.num_kv_heads, base.head_dim)).astype(np.float32) * 3
    cache = cache.write(jnp.asarray(junk), jnp.asarray(-junk), jnp.zeros((B,), jnp.int32))  # every slot filled
    params = Attention(base).init(jax.random.PRNGKey(0), x, positions, None, cache, index)
    outs = {}
    for impl in ("dense", "blockwise"):
        cfg = base.replace(attention_impl=impl, attention_block=8)
        outs[impl] = Attention(cfg).apply(params, x, positions, None, cache, index)
    (out_d, cache_d), (out_b, cache_b) = outs["dense"], outs["blockwise"]
    np.testing.assert_allclose(np.asarray(out_d), np.asarray(out_b), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(cache_d), jax.tree.leaves(cache_b)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the stale slots matter to neither: other junk there gives the same output
    other = jnp.asarray(junk[:, : T + 2] * -2)  # slots index .. index + T + 1, all at or after cache_index
    cache2 = cache.write(other, other, index)
    out_d2, _ = Attention(base.replace(attention_impl="dense")).apply(params, x, positions, None, cache2, index)
    np.testing.assert_allclose(np.asarray(out_d2), np.asarray(out_d), rtol=1e-6, atol=1e-6)
