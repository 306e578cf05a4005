"""HBM traffic of a compiled TPU program (`lumina_jax.aot.hbm_traffic`).

Checked on a hand-written HLO module whose traffic is worked out here by hand (an async copy into on-chip
memory, a fusion reading it, an in-place dynamic-update-slice in a counted while loop), and on programs compiled
for a v5e chip: a weight-streaming matrix product must read its weight about once, and an int8 weight about half
as many bytes, while XLA's own cost analysis counts more.
"""
import jax
import jax.numpy as jnp
import pytest

from lumina_jax.aot.hbm_traffic import hbm_bytes, parse_arrays
from lumina_jax.aot.topology import parse_topology, topology_devices

TILE = "T(8,128)(2,1)"
MODULE = """HloModule m

%fused_dot (a: bf16[8,256], b: bf16[256,1024]) -> bf16[8,1024] {
  %a = bf16[8,256]{1,0:TILE} parameter(0)
  %b = bf16[256,1024]{1,0:TILE S(1)} parameter(1)
  ROOT %d = bf16[8,1024]{1,0:TILE} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_dus (p0: bf16[64,128], p1: bf16[8,128], p2: s32[]) -> bf16[64,128] {
  %p0 = bf16[64,128]{1,0:TILE} parameter(0)
  %p1 = bf16[8,128]{1,0:TILE S(1)} parameter(1)
  %p2 = s32[]{:T(128)} parameter(2)
  %c0 = s32[]{:T(128)} constant(0)
  ROOT %dus = bf16[64,128]{1,0:TILE} dynamic-update-slice(%p0, %p1, %p2, %c0)
}

%body (bp: (s32[], bf16[64,128], bf16[8,128])) -> (s32[], bf16[64,128], bf16[8,128]) {
  %bp = (s32[]{:T(128)}, bf16[64,128]{1,0:TILE}, bf16[8,128]{1,0:TILE S(1)}) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%bp), index=0
  %buf = bf16[64,128]{1,0:TILE} get-tuple-element(%bp), index=1
  %upd = bf16[8,128]{1,0:TILE S(1)} get-tuple-element(%bp), index=2
  %one = s32[]{:T(128)} constant(1)
  %next = s32[]{:T(128)} add(%i, %one)
  %f = bf16[64,128]{1,0:TILE} fusion(%buf, %upd, %i), kind=kLoop, calls=%fused_dus
  ROOT %t = (s32[]{:T(128)}, bf16[64,128]{1,0:TILE}, bf16[8,128]{1,0:TILE S(1)}) tuple(%next, %f, %upd)
}

%cond (cp: (s32[], bf16[64,128], bf16[8,128])) -> pred[] {
  %cp = (s32[]{:T(128)}, bf16[64,128]{1,0:TILE}, bf16[8,128]{1,0:TILE S(1)}) parameter(0)
  %ci = s32[]{:T(128)} get-tuple-element(%cp), index=0
  %n = s32[]{:T(128)} constant(8)
  ROOT %lt = pred[]{:T(512)} compare(%ci, %n), direction=LT
}

ENTRY %main (w: bf16[256,1024], x: bf16[8,250], buf: bf16[64,128], upd: bf16[8,128]) -> (bf16[8,1024], bf16[64,128]) {
  %w = bf16[256,1024]{1,0:TILE} parameter(0)
  %x = bf16[8,250]{1,0:TILE} parameter(1)
  %buf0 = bf16[64,128]{1,0:TILE} parameter(2)
  %upd0 = bf16[8,128]{1,0:TILE S(1)} parameter(3)
  %cs = (bf16[256,1024]{1,0:TILE S(1)}, bf16[256,1024]{1,0:TILE}, u32[]{:S(2)}) copy-start(%w)
  %cd = bf16[256,1024]{1,0:TILE S(1)} copy-done(%cs)
  %xp = bf16[8,256]{1,0:TILE} pad(%x, %zero), padding=0_0x0_6
  %dot = bf16[8,1024]{1,0:TILE} fusion(%xp, %cd), kind=kOutput, calls=%fused_dot
  %z = s32[]{:T(128)} constant(0)
  %init = (s32[]{:T(128)}, bf16[64,128]{1,0:TILE}, bf16[8,128]{1,0:TILE S(1)}) tuple(%z, %buf0, %upd0)
  %loop = (s32[]{:T(128)}, bf16[64,128]{1,0:TILE}, bf16[8,128]{1,0:TILE S(1)}) while(%init), condition=%cond, body=%body
  %out = bf16[64,128]{1,0:TILE} get-tuple-element(%loop), index=1
  ROOT %r = (bf16[8,1024]{1,0:TILE}, bf16[64,128]{1,0:TILE}) tuple(%dot, %out)
}
""".replace("TILE S(1)", TILE + "S(1)").replace("TILE", TILE)


def test_array_sizes_include_tile_padding_and_memory_space():
    (a,) = parse_arrays("f32[16,2428,8]{2,1,0:T(8,128)S(1)}")
    assert a.nbytes == 16 * 2432 * 128 * 4 and a.space == 1  # (2428, 8) padded to (2432, 128)
    (b,) = parse_arrays("bf16[4096,688]{0,1:T(8,128)(2,1)}")  # dim 0 most minor: 688 major, padded to 8s
    assert b.nbytes == 4096 * 688 * 2 and b.space == 0
    assert [x.nbytes for x in parse_arrays("(s8[3,5]{1,0:T(8,128)(4,1)}, f32[7])")] == [8 * 128, 28]
    assert parse_arrays("f8e4m3fn[10]")[0].nbytes == 10


def test_hand_written_module_counts_hbm_accesses_only():
    got, unknown = hbm_bytes(MODULE)
    copy_in = 256 * 1024 * 2  # the async copy reads the weight from HBM once; its on-chip copy is free to read
    pad = 8 * 256 * 2 + 8 * 256 * 2 + 0  # the pad reads x (8x250 padded to 8x256 by the tile) and writes 8x256
    dot = 8 * 256 * 2 + 8 * 1024 * 2  # the fusion reads the padded x from HBM and writes its result
    per_iteration = (4 + 4 + 4) + 4 + 8 * 128 * 2  # add; the fusion's index; the update written in place
    assert unknown == 0
    assert got == copy_in + pad + dot + 8 * per_iteration


def test_unrecognised_trip_count_is_counted_once_and_reported():
    got, unknown = hbm_bytes(MODULE.replace("direction=LT", "direction=NE"))
    assert unknown == 1
    assert got == hbm_bytes(MODULE)[0] - 7 * ((4 + 4 + 4) + 4 + 8 * 128 * 2)


@pytest.fixture(scope="module")
def v5e_chip():
    return topology_devices(parse_topology("v5e:2x2"))[0]


def _compiled(fn, *shapes, device):
    sharding = jax.sharding.SingleDeviceSharding(device)
    args = [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in shapes]
    return jax.jit(fn).lower(*args).compile()


def test_compiled_matrix_product_reads_its_weight_once_and_int8_half(v5e_chip):
    D, F = 4096, 8192
    bf16 = _compiled(lambda x, w: x @ w, ((16, D), jnp.bfloat16), ((D, F), jnp.bfloat16), device=v5e_chip)
    int8 = _compiled(lambda x, w, s: (x @ w.astype(jnp.bfloat16)) * s, ((16, D), jnp.bfloat16), ((D, F), jnp.int8),
                     ((F,), jnp.bfloat16), device=v5e_chip)
    weight = D * F * 2
    b, ub = hbm_bytes(bf16.as_text())
    i, ui = hbm_bytes(int8.as_text())
    assert ub == ui == 0
    assert weight <= b <= 1.05 * weight
    assert weight / 2 <= i <= 0.55 * b
    # XLA's count includes the on-chip side of every copy, so it is never below the HBM traffic
    assert bf16.cost_analysis()["bytes accessed"] >= b and int8.cost_analysis()["bytes accessed"] >= i
