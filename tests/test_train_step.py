"""The jitted train step: sharded == single device, accumulation == whole batch, per-shard dropout noise."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lumina_jax import sharding
from lumina_jax.config import model_preset
from lumina_jax.models.chameleon import Chameleon
from lumina_jax.state import init_params, init_train_state, train_state_shardings
from lumina_jax.training import train_step as ts
from lumina_jax.training.config import LossConfig, OptimizerConfig
from lumina_jax.training.optimizer import learning_rate_schedule, make_optimizer
from lumina_jax.training.synthetic import synthetic_global_batch
from test_train_helpers import RULES, make_mesh

SEQ = 32


def _ctx(mesh_spec, *, accum=1, dropout=0.0, chunk=8, fused=True, eps=1e-8):
    cfg = model_preset("tiny", dropout=dropout, z_loss_weight=1e-3)
    ocfg = OptimizerConfig(lr=1e-3, min_lr=1e-4, warmup_steps=0, eps=eps)
    return ts.StepContext(cfg, LossConfig(chunk_size=chunk, fused_grad=fused), make_optimizer(ocfg, 10),
                          learning_rate_schedule(ocfg, 10), accum, make_mesh(mesh_spec), RULES)


@functools.lru_cache(maxsize=None)
def _one_step(mesh_spec):
    """Two steps (dropout on, accumulation 2); returns host copies of params and both metrics."""
    ctx = _ctx(mesh_spec, accum=2, dropout=0.1, eps=1e-3)
    sh = train_state_shardings(ctx.model_config, ctx.tx, ctx.mesh, RULES)
    state = init_train_state(ctx.model_config, ctx.tx, ctx.mesh, RULES, seed=0)
    step = ts.jit_train_step(ctx, sh)
    batch = ts.global_batch(ctx, synthetic_global_batch(0, 0, 16, SEQ, ctx.model_config.vocab_size))
    state, m1 = step(state, batch)
    state, m2 = step(state, batch)
    return jax.device_get(state["params"]), jax.device_get(m1), jax.device_get(m2), state


@pytest.mark.parametrize("mesh_spec", ["fsdp=8", "data=2,fsdp=2,tensor=2"])
def test_sharded_step_equals_single_device(mesh_spec):
    p1, a1, b1, _ = _one_step("fsdp=1")
    p8, a8, b8, state = _one_step(mesh_spec)
    assert len(state["params"]["lm_head"]["kernel"].sharding.device_set) == 8
    for name in ("loss", "ce", "z_loss", "grad_norm", "supervised_tokens"):
        np.testing.assert_allclose(a8[name], a1[name], rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(b8[name], b1[name], rtol=1e-5, err_msg=name)
    # the second step's loss depends on the first update; the updates themselves agree closely
    assert b1["loss"] < a1["loss"]
    for path, x, y in zip(jax.tree_util.tree_flatten_with_path(p1)[0], jax.tree.leaves(p1), jax.tree.leaves(p8)):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=2e-7, err_msg=jax.tree_util.keystr(path[0]))


def test_grad_accumulation_equals_whole_batch():
    batch_np = synthetic_global_batch(1, 0, 8, SEQ, 512)
    results = {}
    for k in (1, 4):
        ctx = _ctx("fsdp=1", accum=k)
        params = init_params(ctx.model_config, 3, ctx.mesh, RULES)
        with sharding.sharding_context(ctx.mesh, ctx.rules):
            grads = jax.jit(ts.make_grad_fn(ctx))(params, ts.global_batch(ctx, batch_np), jnp.int32(0),
                                                  jax.random.key_data(jax.random.key(0)))
        results[k] = jax.device_get(grads)
    (g1, s1), (g4, s4) = results[1], results[4]
    for name in s1:
        np.testing.assert_allclose(s4[name], s1[name], rtol=1e-5, err_msg=name)
    for path, a, b in zip(jax.tree_util.tree_flatten_with_path(g1)[0], jax.tree.leaves(g1), jax.tree.leaves(g4)):
        scale = np.abs(a).max()
        assert scale > 0
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * scale, err_msg=jax.tree_util.keystr(path[0]))


def test_dropout_noise_differs_per_data_shard_but_not_per_mesh():
    cfg = model_preset("tiny", dropout=0.2)
    model = Chameleon(cfg)
    params = Chameleon(cfg.replace(dropout=0.0)).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    half = synthetic_global_batch(2, 0, 4, 16, cfg.vocab_size)
    tokens = np.concatenate([half["inputs"], half["inputs"]])  # data shard 0 and 1 see identical rows
    key = ts.dropout_key(jax.random.key_data(jax.random.key(5)), jnp.int32(7), 0)
    outs = {}
    for spec in ("fsdp=1", "data=2,fsdp=2,tensor=2"):
        mesh = make_mesh(spec)
        bsh = sharding.batch_sharding(mesh, RULES)
        with sharding.sharding_context(mesh, RULES):
            fn = jax.jit(lambda p, t, k: model.apply(p, t, deterministic=False, return_hidden=True,
                                                     rngs={"dropout": k}), in_shardings=(None, bsh, None))
            outs[spec] = np.asarray(fn({"params": params}, tokens, key))
    a, b = outs["fsdp=1"], outs["data=2,fsdp=2,tensor=2"]
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    # identical examples on the two data shards get different dropout masks
    assert not np.allclose(a[:4], a[4:], atol=1e-3)
    same = Chameleon(cfg).apply({"params": params}, tokens, deterministic=True, return_hidden=True)
    np.testing.assert_allclose(np.asarray(same[:4]), np.asarray(same[4:]), rtol=1e-6)
