"""Meshes and sharding on 8 fake CPU devices: same logits on every mesh, real sharding, the replication check."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from lumina_jax import sharding as S
from lumina_jax import state
from lumina_jax.config import ChameleonConfig
from lumina_jax.models import chameleon as C

# Heads, kv heads, MLP width and vocabulary divisible by 8 so every mesh below can shard them.
CFG = ChameleonConfig(
    vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=8, num_kv_heads=8,
    head_dim=16, q_norm_rows=1, k_norm_rows=1, image_token_start=4, image_token_end=260,
    param_dtype="float32", dtype="float32",
)
MESHES = [("data=8", "fsdp"), ("fsdp=8", "fsdp"), ("tensor=8", "fsdp"), ("data=2,fsdp=2,tensor=2", "fsdp"),
          ("data=2,fsdp=2,tensor=2", "tensor")]
BIG = 4096  # parameters with at least this many elements must be sharded on fsdp / tensor meshes


def test_parse_mesh_spec():
    assert S.parse_mesh_spec("data=2,fsdp=2,tensor=2") == {"data": 2, "fsdp": 2, "tensor": 2}
    assert S.parse_mesh_spec("tensor=2, fsdp=-1", num_devices=8) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert S.parse_mesh_spec({"data": 8}) == {"data": 8, "fsdp": 1, "tensor": 1}
    for bad, match in [
        ("data=2,model=4", "'model=4'"), ("data=two", "'two'"), ("data=2,data=4", "given twice"),
        ("data=-1,fsdp=-1", "only one axis"), ("data=0", "data=0"), ("tensor", "'tensor'"),
    ]:
        with pytest.raises(ValueError, match=match):
            S.parse_mesh_spec(bad, num_devices=8)
    with pytest.raises(ValueError, match="uses 4 devices but 8"):
        S.parse_mesh_spec("data=4", num_devices=8)
    with pytest.raises(ValueError, match="do not divide"):
        S.parse_mesh_spec("data=3,fsdp=-1", num_devices=8)
    mesh = S.make_mesh("data=2,fsdp=-1")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_multislice_mesh_spans_slices_with_the_data_axis():
    devices = jax.devices()
    mesh = S.make_mesh("fsdp=2,tensor=2", devices, num_slices=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    # without a slice_index (CPU) the slices are consecutive halves of the devices: data index i is slice i
    assert {d.id for d in mesh.devices[0].flat} == {d.id for d in devices[:4]}
    assert {d.id for d in mesh.devices[1].flat} == {d.id for d in devices[4:]}
    assert dict(S.make_mesh("data=2,fsdp=-1", devices, num_slices=2).shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    with pytest.raises(ValueError, match="num_slices=3 does not divide the 8 devices"):
        S.make_mesh("fsdp=-1", devices, num_slices=3)
    with pytest.raises(ValueError, match="uses 8 devices but 4 are available"):
        S.make_mesh("fsdp=8", devices, num_slices=2)  # the spec describes one slice


def test_rule_set_names_the_setting_and_the_known_sets():
    assert S.rule_set("tensor") is S.TENSOR_PARALLEL_RULES
    with pytest.raises(ValueError, match=r"parallel.rules='tp' is unknown; known: \['fsdp', 'tensor'\]"):
        S.rule_set("tp", "parallel.rules")


@pytest.fixture(scope="module")
def reference():
    params = state.init_params(CFG, jax.random.key(0))
    # q/k LayerNorm makes attention scores O(1) whatever the kernel scale, so init scale suffices here.
    tokens = jax.random.randint(jax.random.key(1), (8, 12), 0, CFG.vocab_size, dtype=jnp.int32)
    one = jax.devices()[:1]
    logits = jax.jit(lambda p, t: C.Chameleon(CFG).apply({"params": p}, t))(
        jax.device_put(params, one[0]), jax.device_put(tokens, one[0])
    )
    return params, tokens, np.asarray(logits)


@pytest.mark.parametrize("spec,rules_name", MESHES, ids=[f"{m}-{r}" for m, r in MESHES])
def test_same_logits_on_every_mesh(spec, rules_name, reference):
    params, tokens, ref = reference
    mesh = S.make_mesh(spec)
    rules = S.RULE_SETS[rules_name]
    shardings = state.param_shardings(CFG, mesh, rules)
    sharded = jax.device_put(params, shardings)
    batch = S.batch_sharding(mesh, rules)
    model = C.Chameleon(CFG)
    with S.sharding_context(mesh, rules):
        fwd = jax.jit(lambda p, t: model.apply({"params": p}, t), in_shardings=(shardings, batch))
        logits = fwd(sharded, jax.device_put(tokens, batch))
    np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-5, rtol=1e-5)
    # The batch is split over data x fsdp, the vocabulary over tensor.
    sizes = S.parse_mesh_spec(spec)
    assert logits.sharding.shard_shape(logits.shape) == (
        8 // (sizes["data"] * sizes["fsdp"]), 12, CFG.vocab_size // sizes["tensor"]
    )
    flat = traverse_util.flatten_dict(sharded, sep="/")
    if sizes["fsdp"] * sizes["tensor"] > 1:
        for name, arr in flat.items():
            if arr.size < BIG:
                continue
            assert not arr.sharding.is_fully_replicated, name
            assert np.prod(arr.sharding.shard_shape(arr.shape)) < arr.size, name
        assert S.check_replication(sharded) <= 0.05
    else:  # pure data parallel: the model is replicated by design, and the check says so
        with pytest.raises(ValueError, match="fully replicated"):
            S.check_replication(sharded)


def test_fsdp_and_tensor_rule_placements():
    mesh = S.make_mesh("data=2,fsdp=2,tensor=2")
    fsdp = state.param_shardings(CFG, mesh, S.FSDP_RULES)
    tp = state.param_shardings(CFG, mesh, S.TENSOR_PARALLEL_RULES)
    P = jax.sharding.PartitionSpec
    q = lambda t: t["layers"]["self_attn"]["q_proj"]["kernel"].spec
    assert q(fsdp) == P(None, "fsdp", "tensor", None)
    assert q(tp) == P(None, None, ("tensor", "fsdp"), None)
    assert fsdp["lm_head"]["kernel"].spec == P("fsdp", "tensor")
    assert tp["layers"]["mlp"]["down_proj"]["kernel"].spec == P(None, ("tensor", "fsdp"), None)
    # A mesh axis that does not divide a dimension is dropped for it (kv heads 8 over tensor=16 would not fit).
    odd = CFG.replace(num_kv_heads=2, k_norm_rows=1)
    k = state.param_shardings(odd, S.make_mesh("tensor=4,fsdp=2"), S.FSDP_RULES)
    assert k["layers"]["self_attn"]["k_proj"]["kernel"].spec == P(None, "fsdp", None, None)


def test_replication_check_catches_replicated_big_param(reference):
    params, _, _ = reference
    mesh = S.make_mesh("fsdp=8")
    shardings = state.param_shardings(CFG, mesh, S.FSDP_RULES)
    assert S.check_replication(jax.device_put(params, shardings)) < 0.01  # only norms are replicated
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shardings["lm_head"]["kernel"] = replicated
    with pytest.raises(ValueError, match=r"lm_head.*\(128, 512\)"):
        S.check_replication(shardings, shapes=params)
    # Same from arrays; with a looser limit it passes and reports the fraction.
    placed = jax.device_put(params, shardings)
    frac = S.check_replication(placed, max_replicated_fraction=0.5)
    total = sum(x.size for x in jax.tree.leaves(params))
    assert frac >= 128 * 512 / total


def test_cache_sharding_and_decode_on_mesh(reference):
    params, tokens, ref = reference
    cfg = CFG.replace(scan_layers=False)  # decoding runs unscanned layers on a per-layer cache
    mesh = S.make_mesh("data=2,fsdp=2,tensor=2")
    rules = S.FSDP_RULES
    shardings = state.param_shardings(cfg, mesh, rules)
    cache_sh = S.cache_shardings(cfg, mesh, rules)
    model = C.Chameleon(cfg)
    params = jax.device_put(C.unstack_layers(params), shardings)
    with S.sharding_context(mesh, rules):
        cache = jax.jit(lambda: C.init_cache(cfg, 8, 16), out_shardings=cache_sh)()
        step = jax.jit(lambda p, t, c, i: model.apply({"params": p}, t, cache=c, cache_index=i),
                       in_shardings=(shardings, None, cache_sh, None), out_shardings=(None, cache_sh))
        logits, cache = step(params, tokens[:, :11], cache, jnp.zeros(8, jnp.int32))
        last, cache = step(params, tokens[:, 11:], cache, jnp.full(8, 11, jnp.int32))
    assert len(cache) == cfg.num_layers
    for layer in cache:
        assert layer.k.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor", None)
    np.testing.assert_allclose(np.asarray(logits), ref[:, :11], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(last[:, 0]), ref[:, 11], atol=1e-5, rtol=1e-5)


def test_initialize_distributed_reads_environment(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    S.initialize_distributed()
    assert calls[-1] == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2}
    S.initialize_distributed("host:1", 2, 1)  # explicit values win
    assert calls[-1] == {"coordinator_address": "host:1", "num_processes": 2, "process_id": 1}
    monkeypatch.setenv("JAX_PROCESS_ID", "x")
    with pytest.raises(ValueError, match="JAX_PROCESS_ID"):
        S.initialize_distributed()
    with pytest.raises(ValueError, match="process_id=5"):
        S.initialize_distributed("host:1", 2, 5)


def test_bf16_compute_on_mesh_close_to_fp32(reference):
    """bf16 compute on a data=2,fsdp=2,tensor=2 mesh against the fp32 single-device logits.

    Same bound as tests/test_model.py (relative RMS error 3e-2: 8-bit bf16 mantissas, ~10 roundings per
    layer adding in quadrature give ~1e-2); sharding only changes the summation order, far below that.
    """
    params, tokens, ref = reference
    cfg = CFG.replace(dtype="bfloat16")
    mesh = S.make_mesh("data=2,fsdp=2,tensor=2")
    rules = S.FSDP_RULES
    shardings = state.param_shardings(cfg, mesh, rules)
    model = C.Chameleon(cfg)
    with S.sharding_context(mesh, rules):
        fwd = jax.jit(lambda p, t: model.apply({"params": p}, t),
                      in_shardings=(shardings, S.batch_sharding(mesh, rules)))
        out = np.asarray(fwd(jax.device_put(params, shardings), tokens))
    rel = np.sqrt(np.mean((out - ref) ** 2)) / np.sqrt(np.mean(ref**2))
    assert out.dtype == np.float32 and 0 < rel < 3e-2, rel
