"""The Chameleon decoder: parity with Hugging Face transformers, scan/remat equivalence, packing, dtypes."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lumina_jax.config import model_preset
from lumina_jax.models import chameleon as C
from lumina_jax.state import init_params

TINY = model_preset("tiny")  # MHA, pre-norm, q/k-norm with 1 row
TINY_GQA_SWIN = model_preset("tiny-gqa-swin")  # 4 query heads over 2 kv heads, swin-norm, 2 rows


@functools.lru_cache(maxsize=None)
def random_params(cfg, seed):
    """Random parameters with non-trivial norm scales and biases (init gives ones and zeros)."""
    params = init_params(cfg, jax.random.key(seed))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(seed + 1000), len(leaves))
    out = []
    for (path, x), k in zip(leaves, keys):
        names = [p.key for p in path]
        if names[-1] == "scale":
            x = 1.0 + 0.2 * jax.random.normal(k, x.shape, x.dtype)
        elif names[-1] == "bias":
            x = 0.2 * jax.random.normal(k, x.shape, x.dtype)
        else:
            x = x * 5.0  # std 0.1: makes attention non-uniform so masking mistakes show
        out.append(x)
    return jax.tree_util.tree_unflatten(treedef, out)


def random_tokens(cfg, shape, seed):
    return jax.random.randint(jax.random.key(seed), shape, 0, cfg.vocab_size, dtype=jnp.int32)


@functools.lru_cache(maxsize=None)
def _jitted_forward(cfg, return_hidden):
    model = C.Chameleon(cfg)
    return jax.jit(lambda p, t, pos, seg: model.apply(
        {"params": p}, t, positions=pos, segment_ids=seg, return_hidden=return_hidden))


def forward(cfg, params, tokens, positions=None, segment_ids=None, return_hidden=False):
    """Jitted forward, compiled once per (config, return_hidden, shapes)."""
    return _jitted_forward(cfg, return_hidden)(params, tokens, positions, segment_ids)


SHAPE = (2, 8)  # one token shape for most tests, so compiled forwards are reused


# ---------------------------------------------------------------------------------------------------------
# Parity with an independent implementation: transformers' ChameleonModel in float32.


def _hf_model(cfg, params):
    from transformers import ChameleonConfig as HFConfig
    from transformers import ChameleonModel

    hf_cfg = HFConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
        swin_norm=cfg.swin_norm, max_position_embeddings=64, attention_bias=False, vocabulary_map={"<image>": 3},
        vq_config=dict(embed_dim=8, num_embeddings=16, base_channels=32, channel_multiplier=[1], num_res_blocks=1,
                       latent_channels=8, attn_resolutions=[]),
    )
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = ChameleonModel(hf_cfg).eval().float()
    D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    t = lambda a: torch.from_numpy(np.asarray(a, np.float32).copy())
    sd = {"embed_tokens.weight": t(params["embed_tokens"]["embedding"]), "norm.weight": t(params["norm"]["scale"])}
    for i in range(cfg.num_layers):
        lp = jax.tree.map(lambda x: np.asarray(x[i]), params["layers"])
        a, m = lp["self_attn"], lp["mlp"]
        pre = f"layers.{i}."
        sd[pre + "self_attn.q_proj.weight"] = t(a["q_proj"]["kernel"].reshape(D, N * H).T)
        sd[pre + "self_attn.k_proj.weight"] = t(a["k_proj"]["kernel"].reshape(D, K * H).T)
        sd[pre + "self_attn.v_proj.weight"] = t(a["v_proj"]["kernel"].reshape(D, K * H).T)
        sd[pre + "self_attn.o_proj.weight"] = t(a["o_proj"]["kernel"].reshape(N * H, D).T)
        # HF stores one q/k-norm row per head: expand our rows (row i serves heads i*N/r..).
        for name, heads in (("q_norm", N), ("k_norm", K)):
            for ours, theirs in (("scale", "weight"), ("bias", "bias")):
                rows = a[name][ours]
                sd[pre + f"self_attn.{name}.{theirs}"] = t(np.repeat(rows, heads // rows.shape[0], axis=0))
        sd[pre + "mlp.gate_proj.weight"] = t(m["gate_proj"]["kernel"].T)
        sd[pre + "mlp.up_proj.weight"] = t(m["up_proj"]["kernel"].T)
        sd[pre + "mlp.down_proj.weight"] = t(m["down_proj"]["kernel"].T)
        sd[pre + "input_layernorm.weight"] = t(lp["input_layernorm"]["scale"])
        sd[pre + "post_attention_layernorm.weight"] = t(lp["post_attention_layernorm"]["scale"])
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.startswith("vqmodel.") for k in missing), (missing, unexpected)
    return model


@pytest.mark.parametrize("cfg", [TINY, TINY_GQA_SWIN], ids=["mha-prenorm", "gqa-swin"])
def test_matches_transformers_fp32(cfg):
    params = random_params(cfg, 0)
    tokens = random_tokens(cfg, SHAPE, 1)
    hf = _hf_model(cfg, params)
    with torch.no_grad():
        hidden_ref = hf(input_ids=torch.from_numpy(np.array(tokens)).long()).last_hidden_state.numpy()
    logits_ref = hidden_ref @ np.asarray(params["lm_head"]["kernel"])
    hidden = forward(cfg, params, tokens, return_hidden=True)
    logits = forward(cfg, params, tokens)
    assert logits.dtype == jnp.float32 and logits.shape == SHAPE + (cfg.vocab_size,)
    np.testing.assert_allclose(np.asarray(hidden), hidden_ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(logits), logits_ref, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# Structure: scan vs unscanned, remat, packing, q/k-norm rows.


@pytest.mark.parametrize("cfg", [TINY, TINY_GQA_SWIN], ids=["mha-prenorm", "gqa-swin"])
def test_scanned_equals_unscanned(cfg):
    params = random_params(cfg, 2)
    tokens = random_tokens(cfg, SHAPE, 3)
    unscanned = C.unstack_layers(params)
    assert "layers" not in unscanned and set(unscanned) >= {"layers_0", "layers_1"}
    ref = forward(cfg, params, tokens)
    out = forward(cfg.replace(scan_layers=False), unscanned, tokens)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)
    restacked = C.stack_layers(unscanned)
    jax.tree.map(np.testing.assert_array_equal, restacked, params)
    # The unscanned model's own init produces the unscanned tree with the same shapes.
    own = init_params(cfg.replace(scan_layers=False), jax.random.key(0))
    assert jax.tree.map(np.shape, own) == jax.tree.map(np.shape, unscanned)


def test_stack_layers_rejects_gaps():
    params = C.unstack_layers(random_params(TINY, 0))
    del params["layers_0"]
    with pytest.raises(ValueError, match="consecutive"):
        C.stack_layers(params)


@pytest.mark.slow
def test_remat_policies_same_loss_and_grads():
    cfg = TINY
    params = random_params(cfg, 4)
    tokens = random_tokens(cfg, SHAPE, 5)

    def loss_and_grad(c):
        def f(p):
            logits = C.Chameleon(c).apply({"params": p}, tokens)
            return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])
        return jax.jit(jax.value_and_grad(f))(params)

    assert set(C.REMAT_POLICIES) >= {"none", "full", "dots", "dots_no_batch", "save_qkv_out"}
    l0, g0 = loss_and_grad(cfg)
    for policy in ["full", "dots_no_batch", "save_qkv_out"]:
        l1, g1 = loss_and_grad(cfg.replace(remat_policy=policy))
        np.testing.assert_allclose(l1, l0, rtol=1e-6, err_msg=policy)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5, err_msg=policy), g1, g0)


def test_unknown_remat_policy_is_named():
    with pytest.raises(ValueError, match="remat_policy='bogus'"):
        init_params(TINY.replace(remat_policy="bogus"), jax.random.key(0))


@pytest.mark.parametrize("cfg", [TINY, TINY_GQA_SWIN], ids=["mha-prenorm", "gqa-swin"])
def test_packed_sequences_equal_separate_forwards(cfg):
    params = random_params(cfg, 6)
    a = random_tokens(cfg, (3,), 7)
    b = random_tokens(cfg, (4,), 8)
    pad = jnp.zeros((1,), jnp.int32)
    # Separate forwards: each example right-padded to 8 (causal, so the padding does not touch it).
    separate = forward(cfg, params, jnp.stack([jnp.concatenate([a, jnp.zeros(5, jnp.int32)]),
                                              jnp.concatenate([b, jnp.zeros(4, jnp.int32)])]))
    # Packed: row 0 = [a b pad], row 1 = [b a pad], positions restart at 0 per example.
    packed = jnp.stack([jnp.concatenate([a, b, pad]), jnp.concatenate([b, a, pad])])
    segment_ids = jnp.array([[1] * 3 + [2] * 4 + [0], [1] * 4 + [2] * 3 + [0]], jnp.int32)
    positions = jnp.array([[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 2, 3, 0, 1, 2, 0]], jnp.int32)
    out = np.asarray(forward(cfg, params, packed, positions, segment_ids))
    sep = np.asarray(separate)
    tol = dict(atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out[0, :3], sep[0, :3], **tol)
    np.testing.assert_allclose(out[0, 3:7], sep[1, :4], **tol)
    np.testing.assert_allclose(out[1, :4], sep[1, :4], **tol)
    np.testing.assert_allclose(out[1, 4:7], sep[0, :3], **tol)
    # Without segment ids the second example sees the first, so the outputs must differ.
    leaky = np.asarray(forward(cfg, params, packed, positions))
    assert np.max(np.abs(leaky[0, 3:7] - sep[1, :4])) > 1e-3


def _with_norm_rows(params, cfg, q_rows, k_rows):
    """Same params with q/k-norm rows expanded to `q_rows` / `k_rows` by repeating (must divide evenly)."""
    def expand(x, rows):  # x (L, r, Dh) -> (L, rows, Dh)
        return jnp.repeat(x, rows // x.shape[1], axis=1)
    p = jax.tree.map(lambda x: x, params)
    attn = dict(p["layers"]["self_attn"])
    attn["q_norm"] = {k: expand(v, q_rows) for k, v in attn["q_norm"].items()}
    attn["k_norm"] = {k: expand(v, k_rows) for k, v in attn["k_norm"].items()}
    p["layers"] = dict(p["layers"], self_attn=attn)
    return p, cfg.replace(q_norm_rows=q_rows, k_norm_rows=k_rows)


@pytest.mark.parametrize("rows", [1, 2])
def test_qk_norm_rows_expand_to_heads(rows):
    """rows=r stores one row per group of N/r heads: the same as rows=N with each row repeated N/r times."""
    cfg = TINY.replace(num_kv_heads=2, q_norm_rows=rows, k_norm_rows=min(rows, 2))
    params = random_params(cfg, 9)
    assert params["layers"]["self_attn"]["q_norm"]["scale"].shape == (cfg.num_layers, rows, cfg.head_dim)
    tokens = random_tokens(cfg, SHAPE, 10)
    ref = forward(cfg, params, tokens)
    full, full_cfg = _with_norm_rows(params, cfg, cfg.num_heads, cfg.num_kv_heads)
    assert full["layers"]["self_attn"]["q_norm"]["bias"].shape == (cfg.num_layers, cfg.num_heads, cfg.head_dim)
    out = forward(full_cfg, full, tokens)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)
    # Changing the parameters of a single head (rows=H) must change the output: rows are really per head.
    q = full["layers"]["self_attn"]["q_norm"]
    q_changed = dict(q, bias=q["bias"].at[:, -1].add(1.0))
    full["layers"]["self_attn"] = dict(full["layers"]["self_attn"], q_norm=q_changed)
    changed = forward(full_cfg, full, tokens)
    assert np.max(np.abs(np.asarray(changed) - np.asarray(ref))) > 1e-3


# ---------------------------------------------------------------------------------------------------------
# Output head, logits options, dropout, dtype policy.


def test_compute_logits_full_and_sliced():
    cfg = TINY.replace(mask_image_logits=True)
    params = random_params(cfg, 11)
    tokens = random_tokens(cfg, SHAPE, 12)
    logits = forward(cfg, params, tokens)
    hidden = forward(cfg, params, tokens, return_hidden=True)
    assert hidden.shape == SHAPE + (cfg.hidden_size,)
    full = C.compute_logits(params, hidden, cfg)
    np.testing.assert_allclose(np.asarray(full), np.asarray(logits), atol=1e-6)
    # Image ids [4, 260) are masked to float32 min, the rest untouched.
    lo = jnp.finfo(jnp.float32).min
    assert np.all(np.asarray(logits[..., 4:260]) == lo)
    assert np.all(np.asarray(logits[..., :4]) > lo) and np.all(np.asarray(logits[..., 260:]) > lo)
    unmasked = forward(cfg.replace(mask_image_logits=False), params, tokens)
    np.testing.assert_allclose(np.asarray(unmasked[..., 260:]), np.asarray(logits[..., 260:]), atol=1e-6)
    # A slice straddling the image range equals the same columns of the full logits, mask included.
    part = C.compute_logits(params, hidden, cfg, vocab_slice=(200, 300))
    np.testing.assert_allclose(np.asarray(part), np.asarray(full[..., 200:300]), atol=1e-5)
    img = C.compute_logits(params, hidden, cfg.replace(mask_image_logits=False), vocab_slice=(4, 260))
    np.testing.assert_allclose(np.asarray(img), np.asarray(unmasked[..., 4:260]), atol=1e-5)
    with pytest.raises(ValueError, match="vocab_slice"):
        C.compute_logits(params, hidden, cfg, vocab_slice=(10, 10_000))


def test_residual_dropout():
    cfg = TINY.replace(dropout=0.3)
    params = random_params(cfg, 13)
    tokens = random_tokens(cfg, SHAPE, 14)
    model = C.Chameleon(cfg)
    run = jax.jit(lambda p, t, k: model.apply({"params": p}, t, deterministic=False, rngs={"dropout": k}))
    a = run(params, tokens, jax.random.key(0))
    b = run(params, tokens, jax.random.key(0))
    c = run(params, tokens, jax.random.key(1))
    ref = forward(cfg, params, tokens)  # deterministic=True: dropout off
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.max(np.abs(np.asarray(a) - np.asarray(c))) > 1e-3
    assert np.max(np.abs(np.asarray(a) - np.asarray(ref))) > 1e-3
    zero = jax.jit(lambda p, t, k: C.Chameleon(cfg.replace(dropout=0.0)).apply(
        {"params": p}, t, deterministic=False, rngs={"dropout": k}))(params, tokens, jax.random.key(0))
    np.testing.assert_allclose(np.asarray(zero), np.asarray(ref), atol=1e-6)


@pytest.mark.parametrize("cfg", [TINY, TINY_GQA_SWIN], ids=["mha-prenorm", "gqa-swin"])
def test_bf16_compute_close_to_fp32(cfg):
    """bf16 compute with fp32 parameters and fp32 logits stays close to the fp32 model.

    Tolerance: bf16 keeps 8 significant bits (relative rounding 2**-9 ~ 2e-3 per operation). Activations
    pass through ~10 rounded operations per layer (projections, norms, RoPE, residual adds) in 2 layers,
    and the errors of independent roundings add roughly in quadrature, so we expect a relative error of
    the logits of order 1e-2; we allow 3e-2 of the fp32 logits' RMS and require the top-1 token to agree
    almost everywhere (ties within that error may flip).
    """
    params = random_params(cfg, 15)
    tokens = random_tokens(cfg, (4, 16), 16)
    ref = np.asarray(forward(cfg, params, tokens))
    bcfg = cfg.replace(dtype="bfloat16")
    out = forward(bcfg, params, tokens)
    assert out.dtype == jnp.float32  # logits_dtype default
    hidden = jax.eval_shape(lambda p, t: C.Chameleon(bcfg).apply({"params": p}, t, return_hidden=True), params, tokens)
    assert hidden.dtype == jnp.bfloat16
    out = np.asarray(out)
    rel = np.sqrt(np.mean((out - ref) ** 2)) / np.sqrt(np.mean(ref**2))
    print(f"bf16 compute: relative RMS error {rel:.2e}, top-1 agreement {np.mean(out.argmax(-1) == ref.argmax(-1)):.3f}")
    assert rel < 3e-2, rel
    assert np.mean(out.argmax(-1) == ref.argmax(-1)) > 0.9
    # bf16 parameters too: still within the same tolerance.
    pcfg = bcfg.replace(param_dtype="bfloat16")
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    out16 = np.asarray(forward(pcfg, p16, tokens))
    rel16 = np.sqrt(np.mean((out16 - ref) ** 2)) / np.sqrt(np.mean(ref**2))
    print(f"bf16 params + compute: relative RMS error {rel16:.2e}")
    assert rel16 < 3e-2, rel16


def test_param_tree_matches_design():
    """Names, shapes and logical axes of the parameter tree as in docs/design.md."""
    cfg = model_preset("34b", num_layers=2)  # GQA shapes; evaluated abstractly, nothing is allocated
    boxed = jax.eval_shape(C.Chameleon(cfg).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    import flax.linen as nn

    shapes = nn.unbox(boxed)
    axes = nn.get_partition_spec(boxed)
    L, D, N, K, H, F, V = 2, 8192, 64, 8, 128, 22016, 65536
    expect = {
        ("embed_tokens", "embedding"): ((V, D), ("vocab", "embed")),
        ("layers", "self_attn", "q_proj", "kernel"): ((L, D, N, H), ("layers", "embed", "heads", "kv")),
        ("layers", "self_attn", "k_proj", "kernel"): ((L, D, K, H), ("layers", "embed", "kv_heads", "kv")),
        ("layers", "self_attn", "v_proj", "kernel"): ((L, D, K, H), ("layers", "embed", "kv_heads", "kv")),
        ("layers", "self_attn", "o_proj", "kernel"): ((L, N, H, D), ("layers", "heads", "kv", "embed")),
        ("layers", "self_attn", "q_norm", "scale"): ((L, 4, H), ("layers", "norm_rows", "kv")),
        ("layers", "self_attn", "k_norm", "bias"): ((L, 4, H), ("layers", "norm_rows", "kv")),
        ("layers", "mlp", "gate_proj", "kernel"): ((L, D, F), ("layers", "embed", "mlp")),
        ("layers", "mlp", "up_proj", "kernel"): ((L, D, F), ("layers", "embed", "mlp")),
        ("layers", "mlp", "down_proj", "kernel"): ((L, F, D), ("layers", "mlp", "embed")),
        ("layers", "input_layernorm", "scale"): ((L, D), ("layers", "norm")),
        ("layers", "post_attention_layernorm", "scale"): ((L, D), ("layers", "norm")),
        ("norm", "scale"): ((D,), ("norm",)),
        ("lm_head", "kernel"): ((D, V), ("embed", "vocab")),
    }
    flat_shapes = {tuple(p.key for p in k): v.shape for k, v in jax.tree_util.tree_flatten_with_path(shapes)[0]}
    flat_axes = {tuple(p.key for p in k): tuple(v) for k, v in jax.tree_util.tree_flatten_with_path(
        axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]}
    assert set(flat_shapes) == set(expect) | {("layers", "self_attn", "q_norm", "bias"),
                                                ("layers", "self_attn", "k_norm", "scale")}
    for key, (shape, ax) in expect.items():
        assert flat_shapes[key] == shape, key
        assert flat_axes[key] == ax, key


def test_bad_inputs_named():
    params = random_params(TINY, 0)
    with pytest.raises(ValueError, match="tokens must be"):
        C.Chameleon(TINY).apply({"params": params}, jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="cache_index"):
        C.Chameleon(TINY).apply({"params": params}, jnp.zeros((1, 3), jnp.int32), cache_index=jnp.zeros(1, jnp.int32))


@pytest.mark.parametrize("override,needle", [
    (dict(dtype="bf16"), "dtype='bf16'"), (dict(num_heads=0), "num_heads=0"), (dict(head_dim=15), "head_dim=15"),
    (dict(num_kv_heads=3), "num_kv_heads=3"), (dict(q_norm_rows=3), "q_norm_rows=3"), (dict(dropout=1.0), "dropout"),
])
def test_config_errors_name_the_field(override, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        model_preset("tiny", **override)
