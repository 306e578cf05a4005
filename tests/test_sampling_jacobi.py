"""Speculative Jacobi decoding on a tiny random Chameleon (fp32): the distribution of generated image tokens
equals the autoregressive one (chi-square against the exact joint from full forwards, and the same test
fails with an accept-always rule), greedy SJD == greedy autoregressive decoding token for token, a row's
tokens do not depend on its batch, and 8 devices give the tokens of one."""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from lumina_jax import sharding as S
from lumina_jax import state as state_lib
from lumina_jax.config import model_preset
from lumina_jax.models.chameleon import Chameleon, unstack_layers
from lumina_jax.sampling import jacobi, processors
from lumina_jax.sampling.decode import ChameleonDecodeModel, decode_jit
from lumina_jax.sampling.generate import generate_tokens, prepare_inputs, size_table_from_crops
from lumina_jax.tokenizer import SpecialIds

SPECIAL = SpecialIds.from_layout(256, 512, compact=True)  # image ids 4..259 in a 512-id vocabulary
IDS = processors.TokenIds.from_special_ids(SPECIAL, 512)
CROPS = [(64, 32), (32, 64), (32, 32), (96, 32), (64, 64)]
TABLE = size_table_from_crops(CROPS)
N_SEEDS = 4000  # rows of one batch in the distribution tests
P_MIN = 1e-4  # chi-square p-value below which the distributions are declared different


@pytest.fixture(scope="module")
def tiny():
    """(scanned config, params) for full forwards and (unscanned config, params) for decoding."""
    cfg = model_preset("tiny")
    params = state_lib.init_params(cfg, 0)
    params = jax.tree_util.tree_map_with_path(  # a sharper output layer: far from uniform, context-dependent
        lambda p, x: x * 15.0 if "lm_head" in jax.tree_util.keystr(p) else x, params)
    return cfg, params, cfg.replace(scan_layers=False), unstack_layers(params)


# ---- the exact joint of the first body tokens, from full forwards (no cache, no sampler code) ---------------

def _top_k_probs(logits, k):
    keep = np.argsort(-logits)[:k]
    out = np.zeros_like(logits, dtype=np.float64)
    z = logits[keep].astype(np.float64)
    out[keep] = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    return out


def _exact_joint(cfg, params, prompt, uncond, g, k):
    """{(x1, x2, x3): probability} of the first three image codes of an image with one latent row of two codes
    per half (x1 x2 <new line> x3): u + g (c - u) on the image ids, top-k, softmax, by enumeration."""
    fwd = jax.jit(lambda p, t: Chameleon(cfg).apply({"params": p}, t))
    img = slice(IDS.image_first, IDS.image_last)

    def dist(seqs_c, seqs_u):
        c = np.asarray(fwd(params, jnp.asarray(seqs_c)))[:, -1, img]
        u = np.asarray(fwd(params, jnp.asarray(seqs_u)))[:, -1, img] if g != 1.0 else c
        return [_top_k_probs(ui + g * (ci - ui), k) for ci, ui in zip(c, u)]

    code = lambda i: IDS.image_first + i
    p1 = dist([prompt], [uncond])[0]
    a_s = np.flatnonzero(p1)
    p2 = dict(zip(a_s, dist([prompt + [code(a)] for a in a_s], [uncond + [code(a)] for a in a_s])))
    pairs = [(a, b) for a in a_s for b in np.flatnonzero(p2[a])]
    tail = lambda a, b: [code(a), code(b), IDS.new_line]
    p3 = dict(zip(pairs, dist([prompt + tail(a, b) for a, b in pairs], [uncond + tail(a, b) for a, b in pairs])))
    return {(a, b, c): p1[a] * p2[a][b] * p3[(a, b)][c]
            for a, b in pairs for c in np.flatnonzero(p3[(a, b)])}


def _chi_square_p(samples, joint):
    """p-value of Pearson's chi-square test of `samples` (N, 3) image codes against `joint`; cells with an
    expected count under 5 are pooled; a sample outside the joint's support gives p = 0."""
    cells = list(joint)
    index = {c: i for i, c in enumerate(cells)}
    counts = np.zeros(len(cells))
    for row in map(tuple, samples):
        if row not in index:
            return 0.0
        counts[index[row]] += 1
    expected = np.array([joint[c] for c in cells]) * len(samples)
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return float(stats.chisquare(obs, exp).pvalue)


def _first_codes(tokens):
    """(N, 3) image-code indices of body tokens 1, 2 and 4 (token 3 is the forced new line)."""
    t = np.asarray(tokens)
    assert (t[:, 2] == IDS.new_line).all()
    return t[:, [0, 1, 3]] - IDS.image_first


def _sample_jacobi(model, params, inputs, settings, window, coupled):
    # a fresh jit: the accept-always variant below must be traced again, not taken from the cache
    run = jax.jit(functools.partial(jacobi.jacobi_decode, model, settings=settings, ids=IDS,
                                    jacobi=jacobi.JacobiSettings(window, coupled), size_table=jnp.asarray(TABLE)))
    return run(params, inputs)


@pytest.fixture(scope="module")
def lossless_case(tiny):
    cfg, params, dcfg, dparams = tiny
    header = [IDS.image_start, IDS.size_base + 1, IDS.size_base + 1]  # a 32x32 image: x1 x2 nl x3 x4 nl eoss
    prompt = [0, 301, 422, 388, IDS.end_of_turn] + header
    g, k = 3.0, 4
    settings = processors.SamplingSettings(cfg_scale=g, image_top_k=k, max_new_tokens=4)
    joint = _exact_joint(cfg, params, prompt, header, g, k)
    one = prepare_inputs([prompt], [0], IDS, bucket=16)  # one row, repeated with seeds 0 .. N_SEEDS - 1
    inputs = jax.tree.map(lambda x: jnp.repeat(x, N_SEEDS, axis=0), one)
    inputs = inputs._replace(row_keys=jax.vmap(jax.random.key)(jnp.arange(N_SEEDS)))
    return ChameleonDecodeModel(dcfg), dparams, inputs, settings, joint


@pytest.mark.parametrize("window,coupled", [(3, True), (3, False)])
def test_sjd_samples_the_autoregressive_joint_distribution(lossless_case, window, coupled):
    """Chi-square of 4000 rows against the exact joint of (x1, x2, x3), with guidance 3 and top-k 4: windows
    that cross the forced new line, coupled and plain drafts."""
    model, params, inputs, settings, joint = lossless_case
    out = _sample_jacobi(model, params, inputs, settings, window, coupled)
    p = _chi_square_p(_first_codes(out.tokens), joint)
    assert p > P_MIN, f"SJD samples differ from the target distribution (chi-square p = {p:.2e})"
    # without accepted drafts every row takes 3 steps (x1 from the prefill, x2, then new line + x3)
    assert float(jnp.mean(out.steps)) < 2.95, "drafts should be accepted in some rows"


def test_autoregressive_sampler_passes_the_same_test(lossless_case):
    """The test's calibration: the autoregressive loop itself, on the same rows."""
    model, params, inputs, settings, joint = lossless_case
    out = decode_jit(model, params, inputs, settings=settings, ids=IDS, size_table=jnp.asarray(TABLE))
    assert _chi_square_p(_first_codes(out.tokens), joint) > P_MIN


def test_the_test_fails_when_every_draft_is_accepted(lossless_case, monkeypatch):
    model, params, inputs, settings, joint = lossless_case
    monkeypatch.setattr(jacobi, "accepts", lambda u, p_x, q_x: jnp.ones(u.shape, bool))
    out = _sample_jacobi(model, params, inputs, settings, 3, True)
    assert _chi_square_p(_first_codes(out.tokens), joint) < P_MIN


# ---- greedy, batch invariance, meshes ----------------------------------------------------------------------

class BiasedModel(ChameleonDecodeModel):
    """Rows open images by themselves (a constant bias towards <racm3:break>)."""

    def logits(self, params, hidden):
        return super().logits(params, hidden).at[:, IDS.image_start].add(30.0)


def _prompts(seed):
    rng = np.random.default_rng(seed)
    text = lambda n: rng.integers(300, 500, n).tolist()
    return [
        [0] + text(9) + [IDS.end_of_turn, IDS.image_start],  # image opened, size sampled from the table
        [0] + text(30) + [IDS.end_of_turn, IDS.image_start, IDS.size_base + 2, IDS.size_base + 2],  # header given
        [0] + text(3) + [IDS.end_of_turn],  # the model opens images itself
    ]


@pytest.mark.parametrize("cfg_scale", [3.0, 1.0])
def test_greedy_sjd_equals_greedy_autoregressive_decoding(tiny, cfg_scale):
    _, _, cfg, params = tiny
    s = processors.SamplingSettings(cfg_scale=cfg_scale, image_top_k=50, text_top_k=20, temperature=0.0,
                                    max_new_tokens=60)
    prompts = _prompts(0)
    kw = dict(seeds=[0, 1, 2], settings=s, ids=IDS, size_table=TABLE)
    ar = generate_tokens(BiasedModel(cfg), params, prompts, **kw)
    assert sum(IDS.image_end in r.tokens for r in ar) >= 2, "the rows should finish images"
    for window in (4, 16):
        sjd = generate_tokens(BiasedModel(cfg), params, prompts, jacobi=jacobi.JacobiSettings(window), **kw)
        for b, (a, j) in enumerate(zip(ar, sjd)):
            assert j.tokens == a.tokens, f"window {window}, row {b}"
            assert sum(j.accepted) == len(j.tokens) and all(1 <= c <= window for c in j.accepted)
        assert max(max(r.accepted) for r in sjd) > 2, "greedy drafts should often be accepted"


def test_row_alone_equals_row_in_batch_and_seeds_differ(tiny):
    _, _, cfg, params = tiny
    s = processors.SamplingSettings(cfg_scale=3.0, image_top_k=30, text_top_k=5, max_new_tokens=60)
    prompts = _prompts(1)
    forced = [(1, 2), None, None]
    j = jacobi.JacobiSettings(8)
    kw = dict(settings=s, ids=IDS, size_table=TABLE, jacobi=j)
    rows = generate_tokens(BiasedModel(cfg), params, prompts, seeds=[5, 6, 7], forced_hw=forced, **kw)
    assert len({tuple(r.accepted) for r in rows}) == 3, "the rows should take different steps"
    for b in range(3):
        alone = generate_tokens(BiasedModel(cfg), params, [prompts[b]], seeds=[5 + b], forced_hw=[forced[b]], **kw)
        assert alone[0].tokens == rows[b].tokens and alone[0].accepted == rows[b].accepted, f"row {b}"
    again = generate_tokens(BiasedModel(cfg), params, [prompts[1]], seeds=[99], forced_hw=[None], **kw)
    assert again[0].tokens != rows[1].tokens


def test_sjd_on_8_devices_gives_the_tokens_of_one(tiny):
    _, _, cfg, params = tiny
    s = processors.SamplingSettings(cfg_scale=3.0, image_top_k=30, text_top_k=5, max_new_tokens=60)
    prompts = _prompts(2) + _prompts(3)[:1]
    kw = dict(seeds=[0, 1, 2, 3], settings=s, ids=IDS, size_table=TABLE, forced_hw=[None, None, None, (2, 1)],
              jacobi=jacobi.JacobiSettings(8))
    one = generate_tokens(ChameleonDecodeModel(cfg), params, prompts, **kw)
    mesh = S.make_mesh("data=2,tensor=4")
    rules = S.TENSOR_PARALLEL_RULES
    placed = jax.device_put(params, state_lib.param_shardings(cfg, mesh, rules))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    with S.sharding_context(mesh, rules):
        many = generate_tokens(ChameleonDecodeModel(cfg), placed, prompts, input_sharding=replicated, **kw)
    for b, (a, m) in enumerate(zip(one, many)):
        assert m.tokens == a.tokens and m.accepted == a.accepted, f"row {b}"


def test_window_setting_is_checked():
    with pytest.raises(ValueError, match="window must be >= 2"):
        jacobi.JacobiSettings(1)
