"""The jitted decode loop on a tiny random Chameleon (fp32): cached logits vs a full forward at every step,
guidance vs a slow path that runs the model separately on the unconditional context, UniRep structure,
batch independence and reproducibility."""
import concurrent.futures

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lumina_jax.config import model_preset
from lumina_jax.models.chameleon import Chameleon, unstack_layers
from lumina_jax.sampling import processors
from lumina_jax.sampling.decode import PROGRESS_EVERY, ChameleonDecodeModel, decode_jit
from lumina_jax.sampling.generate import generate_tokens, size_table_from_crops, split_generation
from lumina_jax.state import init_params
from lumina_jax.tokenizer import SpecialIds
from lumina_jax.unirep import unirep_to_codes

# tiny vocabulary (512): image ids 4..259, then the specials (the compact layout of lumina_jax.tokenizer)
SPECIAL = SpecialIds.from_layout(256, 512, compact=True)
IDS = processors.TokenIds.from_special_ids(SPECIAL, 512)
CROPS = [(64, 32), (32, 64), (32, 32), (96, 32), (64, 64)]  # (W, H) in px: 32-px patches


@pytest.fixture(scope="module")
def tiny():
    """(config, params) of the scanned tiny model (the full-forward reference) and of its decoding layout."""
    cfg = model_preset("tiny")
    params = init_params(cfg, 0)
    # sharpen the output layer so sampling is far from uniform (more informative comparisons)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x * 40.0 if "lm_head" in jax.tree_util.keystr(p) else x, params)
    return cfg, params, cfg.replace(scan_layers=False), unstack_layers(params)


class BiasedModel(ChameleonDecodeModel):
    """The tiny Chameleon with a constant logit bias towards <racm3:break>, so rows open images by themselves."""

    def logits(self, params, hidden):
        return super().logits(params, hidden).at[:, IDS.image_start].add(START_BIAS)


START_BIAS = 30.0


def _full_logits(cfg, params, seqs):
    """Full forward (no cache) of each sequence from position 0, plus the <racm3:break> bias of BiasedModel;
    returns a list of (len, V) arrays."""
    T = max(len(s) for s in seqs)
    toks = np.zeros((len(seqs), T), np.int32)
    for i, s in enumerate(seqs):
        toks[i, :len(s)] = s
    logits = np.array(jax.jit(lambda p, t: Chameleon(cfg).apply({"params": p}, t))(params, jnp.asarray(toks)))
    logits[..., IDS.image_start] += START_BIAS
    return [logits[i, :len(s)] for i, s in enumerate(seqs)]


def test_cached_logits_and_guidance_match_full_forward(tiny):
    cfg, params, dcfg, dparams = tiny
    rng = np.random.default_rng(0)
    text = lambda n: rng.integers(300, 500, n).tolist()
    prompts = [
        [0] + text(9) + [IDS.end_of_turn, IDS.image_start],  # image opened by the prompt
        [0] + text(30) + [IDS.end_of_turn, IDS.image_start, IDS.size_base + 1, IDS.size_base + 2],  # header given
        [0] + text(4),  # text only
        [0] + text(3) + [IDS.end_of_turn],  # the model opens images itself (biased towards <racm3:break>)
    ]
    g = 3.0
    s = processors.SamplingSettings(cfg_scale=g, image_top_k=50, text_top_k=20, max_new_tokens=40)
    rows, rec = generate_tokens(BiasedModel(dcfg), dparams, prompts, seeds=[0, 1, 2, 3], settings=s, ids=IDS,
                                size_table=size_table_from_crops(CROPS), record="full")
    seqs = [p + r.tokens for p, r in zip(prompts, rows)]
    full = _full_logits(cfg, params, seqs)
    uncond_seqs, uncond_where = [], []
    n_body_steps = 0
    for b, (p, r) in enumerate(zip(prompts, rows)):
        n = len(r.tokens)
        assert n == s.max_new_tokens or r.tokens[-1] == IDS.end_of_turn
        for i in range(n):
            pos = len(p) - 1 + i  # the position whose logits chose generated token i
            np.testing.assert_allclose(rec["cond_full"][i, b], full[b][pos], atol=1e-4, rtol=1e-4,
                                       err_msg=f"row {b} step {i}")
            np.testing.assert_allclose(rec["cond_image"][i, b], full[b][pos, 4:260], atol=1e-4, rtol=1e-4)
            st = processors.prompt_state(seqs[b][:pos + 1], IDS)
            if st["in_image"] and st["header"] >= 2:
                uncond_seqs.append(seqs[b][st["image_start_index"]:pos + 1])
                uncond_where.append((b, i, pos))
    assert len(uncond_seqs) > 40, "the test should cover many guided image steps"
    assert sum(x == IDS.image_start for x in rows[3].tokens) >= 2, "row 3 should open two images itself"
    full_u = _full_logits(cfg, params, uncond_seqs)
    for u_seq, u_logits, (b, i, pos) in zip(uncond_seqs, full_u, uncond_where):
        u = u_logits[-1, 4:260]
        c = full[b][pos, 4:260]
        np.testing.assert_allclose(rec["uncond_image"][i, b], u, atol=1e-4, rtol=1e-4, err_msg=f"row {b} step {i}")
        np.testing.assert_allclose(rec["guided_image"][i, b], u + g * (c - u), atol=5e-4, rtol=1e-4)
        n_body_steps += 1
    # rows 0 and 1 generated a whole image with the forced size / table size
    for b in (0, 1):
        segs = split_generation(prompts[b][-(1 + 2 * b):] + rows[b].tokens, IDS)
        assert segs.images, f"row {b} did not finish its image: {rows[b].tokens}"


def _check_structure(prompt, row, ids=IDS):
    """Returns the (h, w) of each image; asserts a valid UniRep layout and image-free text."""
    st = processors.prompt_state(prompt, ids)
    seq = (prompt[st["image_start_index"]:] if st["in_image"] else []) + row.tokens
    segs = split_generation(seq, ids)
    sizes = []
    for img in segs.images:
        codes, h, w = unirep_to_codes(img, SPECIAL)
        assert codes.shape == (2 * h, 2 * w)
        sizes.append((h, w))
    for t in segs.text_ids:
        assert not (ids.image_first <= t < ids.image_last) and t not in (ids.image_end, ids.new_line), segs.text_ids
    return sizes, segs


@pytest.mark.parametrize("cfg_scale", [4.0, 1.0])
def test_structure_sizes_and_batch_independence(tiny, cfg_scale):
    """Valid layouts with the requested sizes; with guidance also: a row alone == in a batch; seeds."""
    _, _, cfg, params = tiny
    model = ChameleonDecodeModel(cfg)
    rng = np.random.default_rng(1)
    text = lambda n: rng.integers(300, 500, n).tolist()
    prompts = [[0] + text(n) + [IDS.end_of_turn, IDS.image_start] for n in (3, 17, 8, 40)]
    forced = [(1, 3), (2, 1), None, (1, 1)]  # (h, w) patches; non-square included; row 2 picks from the table
    s = processors.SamplingSettings(cfg_scale=cfg_scale, image_top_k=30, text_top_k=5, max_new_tokens=30)
    table = size_table_from_crops(CROPS + [(96, 32), (32, 64)])
    seeds = [11, 12, 13, 14]
    rows = generate_tokens(model, params, prompts, seeds=seeds, settings=s, ids=IDS, size_table=table, forced_hw=forced)
    for b, (p, r) in enumerate(zip(prompts, rows)):
        sizes, segs = _check_structure(p, r)
        assert len(sizes) == 1, (b, r.tokens)
        if forced[b] is not None:
            assert sizes[0] == forced[b]
        else:
            assert table[sizes[0]]
        assert r.unfinished_image is None
    if cfg_scale == 1.0:
        return
    # a row alone gives the same tokens as inside the batch; the same seed gives the same output
    alone = generate_tokens(model, params, [prompts[2]], seeds=[13], settings=s, ids=IDS, size_table=table)
    assert alone[0].tokens == rows[2].tokens
    reseeded = generate_tokens(model, params, [prompts[2]], seeds=[99], settings=s, ids=IDS, size_table=table)
    assert reseeded[0].tokens != rows[2].tokens


def test_length_limit_reports_unfinished_image(tiny):
    _, _, cfg, params = tiny
    # same settings and shapes as the single-row calls above (one compilation)
    s = processors.SamplingSettings(cfg_scale=4.0, image_top_k=30, text_top_k=5, max_new_tokens=30)
    prompt = [0, 300, IDS.end_of_turn, IDS.image_start]
    rows = generate_tokens(ChameleonDecodeModel(cfg), params, [prompt], seeds=[0], settings=s, ids=IDS,
                           size_table=size_table_from_crops(CROPS + [(96, 32), (32, 64)]), forced_hw=[(3, 3)])
    r = rows[0]
    assert r.stopped == "length" and len(r.tokens) == 30
    assert r.unfinished_image == {"h": 3, "w": 3, "body_tokens": 28}
    segs = split_generation(prompt[-1:] + r.tokens, IDS)
    assert segs.images == [] and segs.unfinished is not None and len(segs.unfinished) == 31


def test_progress_reaches_each_generations_own_callback_without_recompiling(tiny):
    """Two generations running at once report to their own callbacks; a new callback reuses the compiled loop."""
    _, _, cfg, params = tiny
    s = processors.SamplingSettings(cfg_scale=4.0, image_top_k=30, text_top_k=5, max_new_tokens=30)
    table = size_table_from_crops(CROPS + [(96, 32), (32, 64)])
    prompt = [0, 300, IDS.end_of_turn, IDS.image_start]

    def run(fn):
        return generate_tokens(ChameleonDecodeModel(cfg), params, [prompt], seeds=[0], settings=s, ids=IDS,
                               size_table=table, forced_hw=[(3, 3)], progress=fn)

    run(lambda step: None)  # compiles the loop with its progress callback
    compiled = decode_jit._cache_size()
    seen = {"a": [], "b": []}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        rows = [f.result() for f in [pool.submit(run, seen[k].append) for k in seen]]
    assert decode_jit._cache_size() == compiled
    assert rows[0][0].tokens == rows[1][0].tokens and len(rows[0][0].tokens) == 30
    # 30 tokens: the first comes from the prefill, the loop reports after tokens 4, 8, ..., 28
    expected = list(range(PROGRESS_EVERY, 30, PROGRESS_EVERY))
    assert sorted(seen["a"]) == expected and sorted(seen["b"]) == expected
