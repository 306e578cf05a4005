"""The state builder on 8 fake CPU devices: sharded init and restore land in the rules' shardings with the
values of a one-device build, a checkpoint that does not fit the model is refused naming every bad key, and
the abstract train state describes the real one exactly (so a restore into it cannot drift)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lumina_jax import param_checkpoint
from lumina_jax import sharding as S
from lumina_jax import state
from lumina_jax.models import chameleon as C
from test_sharding import CFG


@pytest.fixture(scope="module")
def params():
    return state.init_params(CFG, jax.random.key(0))


def _same_shardings(tree, shardings):
    jax.tree.map(lambda a, s: (a.sharding == s) or pytest.fail(f"{a.sharding} != {s}"), tree, shardings)


def test_sharded_init_places_params_with_the_one_device_values(params):
    mesh = S.make_mesh("fsdp=4,tensor=2")
    sharded = state.init_params(CFG, 0, mesh, S.FSDP_RULES)
    _same_shardings(sharded, state.param_shardings(CFG, mesh, S.FSDP_RULES))
    assert len(sharded["lm_head"]["kernel"].sharding.device_set) == 8
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6), sharded, params)
    with pytest.raises(ValueError, match="both mesh and rules"):
        state.init_params(CFG, 0, mesh)


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "unscanned"])
def test_restore_params_into_shards(tmp_path, params, scan_layers):
    with param_checkpoint.atomic_directory(tmp_path / "ckpt") as d:
        param_checkpoint.save_params(d, jax.tree.map(lambda x: np.asarray(x, jnp.bfloat16), params))
    mesh = S.make_mesh("data=2,fsdp=2,tensor=2")
    cfg = CFG.replace(scan_layers=scan_layers)
    loaded = state.restore_params(tmp_path / "ckpt", cfg, mesh, S.FSDP_RULES)
    expect_sh = state.param_shardings(cfg, mesh, S.FSDP_RULES)
    expect = params if scan_layers else C.unstack_layers(params)
    assert jax.tree.structure(loaded) == jax.tree.structure(expect)
    for a, b, s in zip(jax.tree.leaves(loaded), jax.tree.leaves(expect), jax.tree.leaves(expect_sh)):
        assert a.dtype == jnp.float32 and a.sharding == s
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b).astype(jnp.bfloat16).astype(np.float32))
    S.check_replication(loaded)


def test_restore_params_names_every_mismatch(tmp_path, params):
    bad = jax.tree.map(np.asarray, params)
    del bad["norm"]
    bad["extra"] = {"w": np.zeros(3, np.float32)}
    bad["lm_head"]["kernel"] = bad["lm_head"]["kernel"][:, :100]
    with param_checkpoint.atomic_directory(tmp_path / "bad") as d:
        param_checkpoint.save_params(d, bad)
    with pytest.raises(param_checkpoint.CheckpointError) as err:
        state.restore_params(tmp_path / "bad", CFG, S.make_mesh("fsdp=8"), S.FSDP_RULES)
    msg = str(err.value)
    assert "missing keys [norm/scale]" in msg and "unexpected keys [extra/w]" in msg
    assert "lm_head/kernel [128, 100] (expected [128, 512])" in msg
    with pytest.raises(param_checkpoint.CheckpointError, match="no Orbax parameter tree"):
        state.restore_params(tmp_path / "nothing", CFG, S.make_mesh("fsdp=8"), S.FSDP_RULES)


def test_abstract_train_state_describes_the_initialised_state():
    mesh = S.make_mesh("data=2,fsdp=2,tensor=2")
    tx = optax.adamw(1e-3)
    target = state.abstract_train_state(CFG, tx, mesh, S.FSDP_RULES)
    real = state.init_train_state(CFG, tx, mesh, S.FSDP_RULES, seed=3)
    assert jax.tree.structure(target) == jax.tree.structure(real)
    for t, r in zip(jax.tree.leaves(target), jax.tree.leaves(real)):
        assert (t.shape, t.dtype, t.sharding) == (r.shape, r.dtype, r.sharding)
    # the Adam moments are sharded as their parameters; step and rng are replicated
    kernel = real["params"]["lm_head"]["kernel"].sharding
    moments = [x for path, x in jax.tree_util.tree_flatten_with_path(real["opt_state"])[0]
               if "lm_head" in jax.tree_util.keystr(path)]
    assert len(moments) == 2 and all(m.sharding == kernel for m in moments)
    assert real["step"].sharding.is_fully_replicated and int(real["step"]) == 0
    np.testing.assert_array_equal(np.asarray(real["rng"]), np.asarray(jax.random.key_data(jax.random.key(3))))
