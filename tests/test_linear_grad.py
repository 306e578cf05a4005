"""The projections' transposed-kernel-gradient path gives the einsum's values and gradients (fp32), and a whole
model's gradients do not depend on it (remat "none" uses it, remat "full" does not)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lumina_jax.config import ChameleonConfig
from lumina_jax.models import chameleon
from lumina_jax.models.attention import _is_flat_projection, _project_with_transposed_grad, transposed_kernel_grad


@pytest.mark.parametrize("equation,x_shape,k_shape", [
    ("btd,df->btf", (2, 5, 8), (8, 6)),
    ("btd,dnh->btnh", (2, 5, 8), (8, 3, 4)),
    ("btnh,nhd->btd", (2, 5, 3, 4), (3, 4, 8)),
])
def test_values_and_gradients_match_the_einsum(equation, x_shape, k_shape):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    k = jnp.asarray(rng.normal(size=k_shape), jnp.float32)
    assert _is_flat_projection(equation, x.ndim, k.ndim)
    ref = jnp.einsum(equation, x, k)
    w = jnp.asarray(rng.normal(size=ref.shape), jnp.float32)
    np.testing.assert_allclose(np.asarray(_project_with_transposed_grad(x, k)), np.asarray(ref), rtol=1e-6, atol=1e-6)
    g_ref = jax.grad(lambda a, b: jnp.sum(jnp.einsum(equation, a, b) * w), argnums=(0, 1))(x, k)
    g = jax.jit(jax.grad(lambda a, b: jnp.sum(_project_with_transposed_grad(a, b) * w), argnums=(0, 1)))(x, k)
    for a, b in zip(g, g_ref):
        assert a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_only_flat_projections_qualify():
    assert not _is_flat_projection("btd,vd->btv", 3, 2)  # kernel's leading dim is not the input's
    assert not _is_flat_projection("bskh,btkh->bts", 4, 4)
    assert not _is_flat_projection("btd,df->bft", 3, 2)


def test_model_gradients_do_not_depend_on_the_path():
    cfg = ChameleonConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=8, dtype="float32", param_dtype="float32", remat_policy="none")
    remat = dataclasses.replace(cfg, remat_policy="full")
    assert transposed_kernel_grad(cfg) and not transposed_kernel_grad(remat)
    params = chameleon.init_params(cfg, jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 12)), jnp.int32)

    def loss(p, c):
        logits = chameleon.Chameleon(c).apply({"params": p}, tokens)
        return jnp.mean(jax.nn.log_softmax(logits.astype(jnp.float32))[..., 0])

    g_fast = jax.grad(loss)(params, cfg)
    g_plain = jax.grad(loss)(params, remat)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_fast), jax.tree.leaves(g_plain)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6, err_msg=str(path))
