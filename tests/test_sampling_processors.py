"""The per-row state machine and logits processors against a per-step Python re-implementation of the
reference processors (docs/reference.md: guidance, structure rules, interleaved top-k), on fake logits, with rows at different stages in one batch."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lumina_jax.sampling import processors
from lumina_jax.tokenizer import SpecialIds

# A small vocabulary with the same structure as Chameleon's (contiguous image ids, specials after them).
IDS = processors.TokenIds.from_special_ids(SpecialIds.from_layout(256, 400, compact=True), 400)
NEG = -np.inf


# ---- the reference, one sequence at a time (InterleavedTopK, MultiModal, CFG of inference_solver.py) ----

def ref_scores(seq, cond, uncond, cfg, image_k, text_k, temperature, ids=IDS):
    """Processed scores for the next token of `seq` (list of ids), as the reference computes them."""
    scores = np.array(cond, np.float64)
    n_start, n_end = seq.count(ids.image_start), seq.count(ids.image_end)
    inside = n_start == n_end + 1
    if inside:
        s = len(seq) - 1 - seq[::-1].index(ids.image_start)
        new = len(seq[s + 1:])
        if new >= 2:
            # CFG
            if cfg != 1.0:
                u = np.array(uncond, np.float64)
                scores = u + cfg * (scores - u)
            # MultiModal
            h, w = seq[s + 1] - ids.size_base, seq[s + 2] - ids.size_base
            t = len(seq[s + 3:])
            W, H = 2 * w, 2 * h
            if (t + 1) % (W + 1) == 0:
                scores = np.full_like(scores, NEG)
                scores[ids.new_line] = 0
            elif t + 1 == (W + 1) * H + 1:
                scores = np.full_like(scores, NEG)
                scores[ids.image_end] = 0
            else:
                keep = np.zeros_like(scores, bool)
                keep[ids.image_first:ids.image_last] = True
                scores = np.where(keep, scores, NEG)
    # InterleavedTopK
    k = image_k if inside else text_k
    thr = np.sort(scores)[::-1][k - 1]
    scores = np.where(scores < thr, NEG, scores)
    if temperature != 1.0:
        scores = scores / temperature
    return scores


def scores_full(body_logits, other_logits, state, ids=IDS):
    """Our processed scores as one (B, V) array, as the reference's processors return them: the image-id part
    of BODY rows from `process_body`, 0 at the forced id and -inf elsewhere on forced steps, `process_other`
    for the other phases (the selection `choose_tokens` makes)."""
    B, V = other_logits.shape
    body = jnp.full((B, V), NEG).at[:, ids.image_first:ids.image_last].set(body_logits)
    forced = processors.forced_token(state, ids)
    only = jnp.where(jnp.arange(V)[None, :] == forced[:, None], 0.0, NEG)
    body = jnp.where((forced >= 0)[:, None], only, body)
    return jnp.where((processors.phase(state) == processors.BODY)[:, None], body, other_logits)


def plan_bias(seq, rng, plan, ids=IDS):
    """A bump on the token the scripted row wants next (so rows walk through text, images and sizes)."""
    want = plan(seq, rng)
    b = np.zeros(ids.vocab_size)
    b[want] = 30.0
    return b


def make_plan(h, w, text_before, text_after):
    def plan(seq, rng):
        n_start = seq.count(IDS.image_start)
        if n_start == 0:
            return int(rng.integers(IDS.image_last + 10, IDS.vocab_size)) if text_before > 0 and \
                len(seq) < text_before else IDS.image_start
        if seq.count(IDS.image_end) < n_start:
            s = len(seq) - 1 - seq[::-1].index(IDS.image_start)
            new = len(seq) - s - 1
            if new == 0:
                return IDS.size_base + h
            if new == 1:
                return IDS.size_base + w
            return int(rng.integers(IDS.image_first, IDS.image_last))
        e = len(seq) - 1 - seq[::-1].index(IDS.image_end)
        return IDS.end_of_turn if len(seq) - e > text_after else int(rng.integers(IDS.image_last + 10, IDS.vocab_size))
    return plan


@pytest.mark.parametrize("cfg,image_k,text_k,temperature", [(3.0, 40, 5, 1.0), (1.0, 300, 1, 0.7)])
def test_batched_processors_match_reference(cfg, image_k, text_k, temperature):
    rng = np.random.default_rng(0)
    plans = [make_plan(1, 2, 3, 2), make_plan(2, 1, 0, 1), make_plan(1, 1, 7, 3), make_plan(2, 3, 1, 1)]
    B = len(plans)
    seqs = [[int(rng.integers(300, 400)) for _ in range(2 + b)] for b in range(B)]
    s = processors.SamplingSettings(cfg_scale=cfg, image_top_k=image_k, text_top_k=text_k, temperature=temperature,
                           max_new_tokens=200, constrain_size=False, mask_image_ids_in_text=False)
    st = [processors.prompt_state(x, IDS) for x in seqs]
    state = processors.initial_state([x[-1] for x in seqs], [d["in_image"] for d in st], [d["header"] for d in st],
                            [d["h"] for d in st], [d["w"] for d in st], [d["body"] for d in st])
    process_body = jax.jit(lambda c, u, st: processors.process_body(c, u, st, s))
    process_other = jax.jit(lambda c, st: processors.process_other(c, st, s, IDS))
    assemble = jax.jit(scores_full)
    advance = jax.jit(lambda st, t: processors.advance(st, t, IDS, s.max_new_tokens))
    phases_seen = set()
    for step in range(60):
        cond = rng.normal(size=(B, IDS.vocab_size)) * 3
        cond += np.stack([plan_bias(seqs[b], rng, plans[b]) for b in range(B)])
        uncond = rng.normal(size=(B, IDS.vocab_size)) * 3
        # ties at the top-k threshold must be kept
        cond[:, 10:14] = cond[:, 9:10]
        img = slice(IDS.image_first, IDS.image_last)
        body = process_body(jnp.asarray(cond[:, img], jnp.float32), jnp.asarray(uncond[:, img], jnp.float32), state)
        other = process_other(jnp.asarray(cond, jnp.float32), state)
        ours = np.asarray(assemble(body, other, state))
        phases_seen |= set(np.asarray(processors.phase(state)).tolist())
        nxt = []
        for b in range(B):
            if bool(state.done[b]):
                nxt.append(0)
                continue
            ref = ref_scores(seqs[b], cond[b], uncond[b], cfg, image_k, text_k, temperature)
            np.testing.assert_array_equal(np.isfinite(ours[b]), np.isfinite(ref), err_msg=f"step {step} row {b}")
            fin = np.isfinite(ref)
            np.testing.assert_allclose(ours[b][fin], ref[fin], rtol=1e-5, atol=1e-4)
            t = int(np.argmax(np.where(fin, ref, NEG) + rng.gumbel(size=ref.shape) * 0.1))
            nxt.append(t)
            seqs[b].append(t)
        state = advance(state, jnp.asarray(nxt, jnp.int32))
        for b in range(B):
            if not bool(state.done[b]):
                d = processors.prompt_state(seqs[b], IDS)
                assert bool(state.in_image[b]) == d["in_image"]
                if d["in_image"]:
                    assert (int(state.header[b]), int(state.body[b])) == (min(d["header"], 2), d["body"])
    assert phases_seen == {processors.TEXT, processors.SIZE_H, processors.SIZE_W, processors.BODY}
    assert all(bool(d) for d in np.asarray(state.done)), "every scripted row should have reached end-of-turn"
    for b, seq in enumerate(seqs):
        assert seq[-1] == IDS.end_of_turn
        assert int(state.num_images[b]) == seq.count(IDS.image_end) == 1


def _state_at(seq):
    d = processors.prompt_state(seq, IDS)
    return processors.initial_state([seq[-1]], [d["in_image"]], [d["header"]], [d["h"]], [d["w"]], [d["body"]])


def test_forced_new_line_and_end_of_image():
    # h=1, w=2: latent 2 rows x 4 ids; new lines after 4 ids, end after 2 rows (docs/reference.md#structure-rules)
    seq = [300, IDS.image_start, IDS.size_base + 1, IDS.size_base + 2]
    forced = []
    for t in range(11):
        st = _state_at(seq)
        f = int(processors.forced_token(st, IDS)[0])
        forced.append(f)
        seq.append(f if f >= 0 else 7)
    assert forced == [-1] * 4 + [IDS.new_line] + [-1] * 4 + [IDS.new_line, IDS.image_end]
    st = _state_at(seq)
    assert not bool(st.in_image[0])


def test_size_tokens_constrained_to_table_and_forced():
    table = np.zeros((5, 5), bool)
    table[1, 3] = table[2, 2] = table[3, 1] = table[2, 4] = True
    s = processors.SamplingSettings(image_top_k=100, constrain_size=True, max_new_tokens=10)
    cond = jnp.zeros((3, IDS.vocab_size))
    # row 0 at the height step, row 1 at the width step with h=2, row 2 at the width step with h=3
    seqs = [[1, IDS.image_start], [1, IDS.image_start, IDS.size_base + 2], [1, IDS.image_start, IDS.size_base + 3]]
    sts = [processors.prompt_state(x, IDS) for x in seqs]
    state = processors.initial_state([x[-1] for x in seqs], [d["in_image"] for d in sts], [d["header"] for d in sts],
                            [d["h"] for d in sts], [d["w"] for d in sts], [d["body"] for d in sts])
    out = np.asarray(processors.process_other(cond, state, s, IDS, jnp.asarray(table)))
    allowed = [set((np.flatnonzero(np.isfinite(o)) - IDS.size_base).tolist()) for o in out]
    assert allowed == [{1, 2, 3}, {2, 4}, {1}]
    forced = jnp.asarray([[2, -1], [-1, 4], [-1, -1]], jnp.int32)
    out = np.asarray(processors.process_other(cond, state, s, IDS, jnp.asarray(table), forced))
    allowed = [set((np.flatnonzero(np.isfinite(o)) - IDS.size_base).tolist()) for o in out]
    assert allowed == [{2}, {4}, {1}]
    # without the constraint, anything passes top-k at the size steps (the reference behaviour)
    s_free = processors.SamplingSettings(image_top_k=100, constrain_size=False, mask_image_ids_in_text=False,
                                         max_new_tokens=10)
    out = np.asarray(processors.process_other(cond, state, s_free, IDS, jnp.asarray(table)))
    assert np.isfinite(out).all()


def test_text_rows_never_allow_image_ids():
    s = processors.SamplingSettings(text_top_k=0, max_new_tokens=10)
    state = _state_at([1, 2, 3])
    cond = jnp.asarray(np.random.default_rng(1).normal(size=(1, IDS.vocab_size)) + 
                       np.where(np.arange(IDS.vocab_size) < IDS.image_last, 50.0, 0.0), jnp.float32)
    out = np.asarray(processors.process_other(cond, state, s, IDS))[0]
    assert not np.isfinite(out[IDS.image_first:IDS.image_last]).any() and not np.isfinite(out[IDS.image_end])
    assert np.isfinite(out[IDS.image_last + 1:]).all()


def test_top_p_matches_sorted_cumulative_rule():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 50)).astype(np.float32) * 2
    for p in (0.3, 0.9):
        ours = np.asarray(processors._top_p_mask(jnp.asarray(x), p))
        for b in range(3):
            order = np.argsort(-x[b])
            probs = np.exp(x[b][order] - x[b].max())
            probs /= probs.sum()
            n_keep = int(np.searchsorted(np.cumsum(probs), p) + 1)  # smallest prefix with mass >= p
            assert set(np.flatnonzero(np.isfinite(ours[b]))) == set(order[:n_keep].tolist())


def test_choose_tokens_same_for_body_rows_on_either_path():
    """A BODY row picks the same token whether or not the full-vocabulary branch ran for its batch."""
    rng = np.random.default_rng(3)
    s = processors.SamplingSettings(cfg_scale=2.0, image_top_k=20, max_new_tokens=10)
    seqs = [[1, IDS.image_start, IDS.size_base + 2, IDS.size_base + 2, 5], [1, 300]]
    sts = [processors.prompt_state(x, IDS) for x in seqs]
    state = processors.initial_state([x[-1] for x in seqs], [d["in_image"] for d in sts], [d["header"] for d in sts],
                            [d["h"] for d in sts], [d["w"] for d in sts], [d["body"] for d in sts])
    keys = jax.random.split(jax.random.key(0), 2)
    cond = jnp.asarray(rng.normal(size=(2, IDS.vocab_size)), jnp.float32)
    unc = jnp.asarray(rng.normal(size=(2, IDS.num_image_ids)), jnp.float32)
    body = processors.process_body(cond[:, 4:260], unc, state, s)
    other = processors.process_other(cond, state, s, IDS)
    fast = jax.jit(lambda keys: processors.choose_tokens(body, None, state, keys, s, IDS))
    general = jax.jit(lambda keys: processors.choose_tokens(body, other, state, keys, s, IDS))
    for seed in range(20):
        keys = jax.random.split(jax.random.key(seed), 2)
        a, b = fast(keys), general(keys)
        assert int(a[0]) == int(b[0])
        assert np.isfinite(np.asarray(scores_full(body, other, state))[1, int(b[1])])
        assert IDS.image_first <= int(a[0]) < IDS.image_last


@pytest.mark.parametrize("k", [1, 7, 100, 255])
def test_top_k_mask_equals_sort_threshold(k):
    rng = np.random.default_rng(k)
    x = rng.normal(size=(4, 256)).astype(np.float32) * 5
    x[0, :50] = -np.inf
    x[1, 10:20] = x[1, 5]  # ties
    x[2] = np.round(x[2])  # many ties, zeros of both signs
    x[2, :5] = -0.0
    x[2, 5:9] = 0.0
    x[3, :200] = -np.inf  # fewer finite entries than some k
    ours = np.asarray(processors._top_k_mask(jnp.asarray(x), k))
    thr = np.sort(x, axis=-1)[:, ::-1][:, k - 1:k]
    ref = np.where(x < thr, -np.inf, x)
    np.testing.assert_array_equal(ours, ref)


def test_cfg_min_p_keeps_only_codes_plausible_under_the_conditional_branch():
    """Guided BODY rows keep the codes with softmax(c) >= min_p * max softmax(c), computed here in float64
    probabilities; other rows and min_p = 0 are the plain reference rule."""
    rng = np.random.default_rng(4)
    seqs = [[1, IDS.image_start, IDS.size_base + 2, IDS.size_base + 2, 5],  # BODY
            [1, IDS.image_start, IDS.size_base + 1, IDS.size_base + 2, 7, 9],  # BODY
            [1, IDS.image_start, IDS.size_base + 2]]  # SIZE_W: guidance not applied yet
    sts = [processors.prompt_state(x, IDS) for x in seqs]
    state = processors.initial_state([x[-1] for x in seqs], [d["in_image"] for d in sts], [d["header"] for d in sts],
                            [d["h"] for d in sts], [d["w"] for d in sts], [d["body"] for d in sts])
    c = (rng.normal(size=(3, IDS.num_image_ids)) * 3).astype(np.float32)
    u = (rng.normal(size=(3, IDS.num_image_ids)) * 3).astype(np.float32)
    g, min_p = 3.0, 0.05
    ours = np.asarray(processors.guide(jnp.asarray(c), jnp.asarray(u), state, g, min_p))
    plain = np.asarray(processors.guide(jnp.asarray(c), jnp.asarray(u), state, g))
    for b in range(2):
        p = np.exp(c[b].astype(np.float64) - c[b].max())
        p /= p.sum()
        keep = p >= min_p * p.max()
        assert 1 <= keep.sum() < IDS.num_image_ids
        np.testing.assert_allclose(ours[b][keep], (u[b] + g * (c[b] - u[b]))[keep], rtol=1e-6, atol=1e-5)
        assert np.all(ours[b][~keep] == -np.inf)
        np.testing.assert_allclose(plain[b], u[b] + g * (c[b] - u[b]), rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(ours[2], c[2])  # not a BODY row: the conditional logits as they are
    # through process_body (top-k, temperature) the kept set can only shrink; sampled codes stay plausible
    s = processors.SamplingSettings(cfg_scale=g, cfg_min_p=min_p, image_top_k=20, temperature=0.7, max_new_tokens=10)
    body = np.asarray(processors.process_body(jnp.asarray(c), jnp.asarray(u), state, s))
    for b in range(2):
        assert set(np.flatnonzero(np.isfinite(body[b]))) <= set(np.flatnonzero(np.isfinite(ours[b])))


@pytest.mark.parametrize("bad", [-0.1, 1.0, 2.0])
def test_cfg_min_p_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match="cfg_min_p"):
        processors.SamplingSettings(cfg_min_p=bad)


def test_forced_ahead_and_tokens_left_follow_the_layout_token_by_token():
    """forced_ahead(state, n)[j] == the forced token after feeding j more body tokens one by one; the count of
    body tokens left ends exactly at <eoss>."""
    h, w = 2, 3  # latent 4 rows of 6 codes + new line: 28 tokens, then <eoss>
    starts = [0, 5, 6, 20, 27]
    state = processors.initial_state([IDS.image_first] * 5, [True] * 5, [2] * 5, [h] * 5, [w] * 5, starts)
    n = 12
    ahead = np.asarray(processors.forced_ahead(state, IDS, n))
    left = np.asarray(processors.body_tokens_left(state))
    for b, start in enumerate(starts):
        assert left[b] == 4 * 7 + 1 - start
        st = jax.tree.map(lambda x: x[b:b + 1], state)
        for j in range(min(n, left[b])):
            expected = int(processors.forced_token(st, IDS)[0])
            assert ahead[b, j] == expected, (b, j)
            tok = expected if expected >= 0 else IDS.image_first
            st = processors.advance(st, jnp.asarray([tok]), IDS, 100)
        if left[b] <= n:
            assert ahead[b, left[b] - 1] == IDS.image_end
