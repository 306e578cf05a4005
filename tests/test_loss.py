"""Chunked CE + z-loss (both gradient strategies) against a full-logits PyTorch computation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lumina_jax.training.loss import chunked_loss_sums

B, T, D, V = 2, 13, 8, 50
ZW = 0.1  # large z-loss weight so its contribution is visible at fp32 tolerances


def _data(seed=0):
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((B, T, D)).astype(np.float32)
    kernel = rng.standard_normal((D, V)).astype(np.float32)
    targets = rng.integers(0, V, (B, T)).astype(np.int32)
    weights = (rng.random((B, T)) > 0.3).astype(np.float32)
    weights[1, -4:] = 0.0
    return hidden, kernel, targets, weights


def _masked_logits_fn(head, h):
    logits = jnp.einsum("btd,dv->btv", h, head["kernel"]).astype(jnp.float32)
    # image-logit style mask on ids 4..9 (never a target below)
    ids = jnp.arange(V)
    return jnp.where((ids >= 4) & (ids < 10), jnp.finfo(jnp.float32).min, logits)


def _torch_reference(hidden, kernel, targets, weights, masked):
    h = torch.tensor(hidden, requires_grad=True)
    k = torch.tensor(kernel, requires_grad=True)
    logits = h @ k
    if masked:
        logits = logits.clone()
        logits[..., 4:10] = torch.finfo(torch.float32).min
    valid = torch.tensor(weights) > 0
    tgt = torch.tensor(targets, dtype=torch.long).masked_fill(~valid, -100)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, V), tgt.reshape(-1), ignore_index=-100)
    lse = torch.logsumexp(logits, dim=-1)[valid]
    z = (lse ** 2).mean()
    loss = ce + ZW * z
    loss.backward()
    return ce.item(), z.item(), loss.item(), h.grad.numpy(), k.grad.numpy()


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("chunk", [4, 13, 64])
@pytest.mark.parametrize("masked", [False, True])
def test_chunked_loss_matches_full_logits_torch(fused, chunk, masked):
    hidden, kernel, targets, weights = _data()
    if masked:
        targets = np.where((targets >= 4) & (targets < 10), 20, targets)
        logits_fn = _masked_logits_fn
    else:
        logits_fn = lambda head, h: jnp.einsum("btd,dv->btv", h, head["kernel"])
    n = weights.sum()

    def loss(head, h):
        obj, m = chunked_loss_sums(head, h, jnp.asarray(targets), jnp.asarray(weights), logits_fn,
                                   z_loss_weight=ZW, chunk_size=chunk, fused_grad=fused)
        return obj / m["weight_sum"], m

    (val, m), (g_head, g_h) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        {"kernel": jnp.asarray(kernel)}, jnp.asarray(hidden))
    ce, z, total, gh_ref, gk_ref = _torch_reference(hidden, kernel, targets, weights, masked)
    assert float(m["weight_sum"]) == n
    np.testing.assert_allclose(float(m["ce_sum"]) / n, ce, rtol=1e-5)
    np.testing.assert_allclose(float(m["z_loss_sum"]) / n, z, rtol=1e-5)
    np.testing.assert_allclose(float(val), total, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g_h), gh_ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(g_head["kernel"]), gk_ref, rtol=1e-4, atol=1e-6)
    assert np.abs(gh_ref[1, -4:]).max() == 0 and np.abs(np.asarray(g_h)[1, -4:]).max() == 0


def test_rejects_mismatched_shapes():
    hidden, kernel, targets, weights = _data()
    with pytest.raises(ValueError, match="do not agree"):
        chunked_loss_sums({"kernel": kernel}, hidden, targets[:, :5], weights, lambda p, h: h @ p["kernel"])
