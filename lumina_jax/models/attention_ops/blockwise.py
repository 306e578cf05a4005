"""Blockwise attention in plain `lax` ops: online softmax over key blocks, a custom VJP that recomputes
the scores block by block (the FlashAttention algorithm), for every backend, CPU included.

Queries are cut into blocks of `block_q` and keys into blocks of `block_k`; one (block_q, block_k) tile of
float32 scores exists at a time, so memory grows with T + S instead of T x S. The forward keeps per query
the running maximum and softmax denominator and saves only the output and the log-sum-exp; the backward
recomputes each tile's probabilities from them. A tile whose keys are all in the future of all its queries
(by slot) is skipped with `lax.cond`: causal self-attention does about half the work of the dense path,
and a decode step reads only the cache blocks written so far.

Lengths need not be multiples of the blocks: queries are padded with slot -1 (they see no key and are
dropped) and keys with the largest int32 slot (no query sees them).
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array
NEG = float(jnp.finfo(jnp.float32).min)  # the masked score, as in the dense path
FAR_SLOT = int(jnp.iinfo(jnp.int32).max)  # slot of padded keys: after every query


def _pad(x: Optional[Array], size: int, value) -> Optional[Array]:
    """Pads axis 1 of `x` up to `size` with `value`."""
    if x is None or x.shape[1] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, size - x.shape[1])
    return jnp.pad(x, widths, constant_values=value)


def _blocks(x: Optional[Array], n: int) -> Optional[Array]:
    """(B, n * b, ...) -> (n, B, b, ...): blocks first, for indexing inside the loops."""
    if x is None:
        return None
    return jnp.moveaxis(x.reshape((x.shape[0], n, x.shape[1] // n) + x.shape[2:]), 1, 0)


def _tile_mask(qs: Array, ks: Array, qseg: Optional[Array], kseg: Optional[Array]) -> Array:
    """(B, 1, 1, bq, bk) visibility of a tile: key slot <= query slot and equal segments."""
    mask = ks[:, None, :] <= qs[:, :, None]
    if qseg is not None:
        mask &= qseg[:, :, None] == kseg[:, None, :]
    return mask[:, None, None]


def _any_visible(qs: Array, ks: Array) -> Array:
    """Whether some key of the tile is at or before some query of it, in some row (a scalar)."""
    return jnp.any(jnp.min(ks, axis=1) <= jnp.max(qs, axis=1))


def _opaque_cond(pred, true_fn, false_fn, operand):
    """`lax.cond` wrapped in `jax.checkpoint`: partial evaluation (a scan over layers being differentiated)
    would otherwise split the cond and keep every tile's intermediates as residuals of the enclosing loops."""
    return jax.checkpoint(lambda p, x: jax.lax.cond(p, true_fn, false_fn, x), prevent_cse=False)(pred, operand)


def _scores(q_i: Array, k_j: Array, scale: float) -> Array:
    """q (B, bq, K, G, H), k (B, bk, K, H) -> float32 scores (B, K, G, bq, bk)."""
    return jnp.einsum("bqkgh,bskh->bkgqs", q_i, k_j, preferred_element_type=jnp.float32) * scale


def _forward(q, k, v, qs, ks, qseg, kseg, scale):
    """Blocked inputs (blocks first) -> output (nq, B, bq, K, G, H) float32, log-sum-exp (nq, B, K, G, bq)."""
    nq, B, bq, K, G, H = q.shape
    dtype = v.dtype

    def query_block(args):
        q_i, qs_i, qseg_i = args

        def key_block(carry, xs):
            k_j, v_j, ks_j, kseg_j = xs

            def tile(carry):
                m, l, acc = carry
                mask = _tile_mask(qs_i, ks_j, qseg_i, kseg_j)
                s = jnp.where(mask, _scores(q_i, k_j, scale), NEG)
                m_new = jnp.maximum(m, jnp.max(s, axis=-1))
                p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
                alpha = jnp.exp(m - m_new)
                l = alpha * l + jnp.sum(p, axis=-1)
                pv = jnp.einsum("bkgqs,bskh->bkgqh", p.astype(dtype), v_j, preferred_element_type=jnp.float32)
                return m_new, l, alpha[..., None] * acc + pv

            return _opaque_cond(_any_visible(qs_i, ks_j), tile, lambda c: c, carry), None

        init = (jnp.full((B, K, G, bq), NEG, jnp.float32), jnp.zeros((B, K, G, bq), jnp.float32),
                jnp.zeros((B, K, G, bq, H), jnp.float32))
        (m, l, acc), _ = jax.lax.scan(key_block, init, (k, v, ks, kseg))
        l = jnp.where(l == 0.0, 1.0, l)  # a query that sees no key (padding) gets output 0
        out = jnp.einsum("bkgqh->bqkgh", acc / l[..., None])
        return out, m + jnp.log(l)

    return jax.lax.map(query_block, (q, qs, qseg))


def _backward(q, k, v, qs, ks, qseg, kseg, out, lse, d_out, scale):
    """Blocked residuals and output cotangent -> float32 (dq, dk, dv) in blocked layout."""
    dtype = v.dtype
    # D_i = sum_h dO * O: the softmax-backward term shared by every key of query i
    delta = jnp.einsum("nbqkgh,nbqkgh->nbkgq", d_out.astype(jnp.float32), out.astype(jnp.float32))

    def key_block(dq, xs):
        k_j, v_j, ks_j, kseg_j = xs

        def query_block(carry, xs):
            q_i, do_i, lse_i, delta_i, qs_i, qseg_i = xs

            def tile(carry):
                dk_j, dv_j = carry
                mask = _tile_mask(qs_i, ks_j, qseg_i, kseg_j)
                p = jnp.where(mask, jnp.exp(_scores(q_i, k_j, scale) - lse_i[..., None]), 0.0)
                dv_j = dv_j + jnp.einsum("bkgqs,bqkgh->bskh", p.astype(dtype), do_i,
                                         preferred_element_type=jnp.float32)
                dp = jnp.einsum("bqkgh,bskh->bkgqs", do_i, v_j, preferred_element_type=jnp.float32)
                ds = (p * (dp - delta_i[..., None]) * scale).astype(dtype)
                dk_j = dk_j + jnp.einsum("bkgqs,bqkgh->bskh", ds, q_i, preferred_element_type=jnp.float32)
                dq_i = jnp.einsum("bkgqs,bskh->bqkgh", ds, k_j, preferred_element_type=jnp.float32)
                return (dk_j, dv_j), dq_i

            def skip(carry):
                return carry, jnp.zeros(q_i.shape, jnp.float32)

            return _opaque_cond(_any_visible(qs_i, ks_j), tile, skip, carry)

        zeros = jnp.zeros(k_j.shape, jnp.float32)
        (dk_j, dv_j), dq_blocks = jax.lax.scan(query_block, (zeros, zeros), (q, d_out, lse, delta, qs, qseg))
        return dq + dq_blocks, (dk_j, dv_j)

    dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(q.shape, jnp.float32), (k, v, ks, kseg))
    return dq, dk, dv


def _query_blocks(x: Optional[Array], n: int, b: int, kv_heads: int, pad) -> Optional[Array]:
    """(B, T, ...) query-side array -> (n, B, b, ...) blocks, heads split as (K, G) for (B, T, N, H)."""
    if x is None:
        return None
    x = _pad(x, n * b, pad)
    if x.ndim == 4:
        x = x.reshape(x.shape[:2] + (kv_heads, x.shape[2] // kv_heads, x.shape[3]))
    return _blocks(x, n)


def _prepare(q, k, v, q_slots, k_slots, q_segments, k_segments, block_q, block_k):
    """Block counts and sizes, the query-side blocker, and the blocked key-side arrays."""
    T, S, K = q.shape[1], k.shape[1], k.shape[2]
    bq, bk = min(block_q, T), min(block_k, S)
    nq, nk = -(-T // bq), -(-S // bk)
    by_query = lambda x, pad=0: _query_blocks(x, nq, bq, K, pad)
    keys = [_blocks(_pad(x, nk * bk, pad), nk)
            for x, pad in ((k, 0), (v, 0), (k_slots, FAR_SLOT), (k_segments, 0))]
    return by_query, keys


def _unblock(x: Array, length: int) -> Array:
    """(n, B, b, ...) -> (B, length, ...)."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape((x.shape[0], x.shape[1] * x.shape[2]) + x.shape[3:])[:, :length]


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _blockwise(q, k, v, q_slots, k_slots, q_segments, k_segments, block_q, block_k):
    return _blockwise_fwd(q, k, v, q_slots, k_slots, q_segments, k_segments, block_q, block_k)[0]


def _blockwise_fwd(q, k, v, q_slots, k_slots, q_segments, k_segments, block_q, block_k):
    B, T, N, H = q.shape
    by_query, (kb, vb, ksb, ksegb) = _prepare(q, k, v, q_slots, k_slots, q_segments, k_segments, block_q, block_k)
    out, lse = _forward(by_query(q), kb, vb, by_query(q_slots, -1), ksb, by_query(q_segments), ksegb,
                        1.0 / H ** 0.5)
    out = _unblock(out, T).reshape(B, T, N, H).astype(q.dtype)
    return out, (q, k, v, q_slots, k_slots, q_segments, k_segments, out, lse)


def _blockwise_bwd(block_q, block_k, residuals, d_out):
    q, k, v, q_slots, k_slots, q_segments, k_segments, out, lse = residuals
    B, T, N, H = q.shape
    S = k.shape[1]
    by_query, (kb, vb, ksb, ksegb) = _prepare(q, k, v, q_slots, k_slots, q_segments, k_segments, block_q, block_k)
    dq, dk, dv = _backward(by_query(q), kb, vb, by_query(q_slots, -1), ksb, by_query(q_segments), ksegb,
                           by_query(out), lse, by_query(d_out), 1.0 / H ** 0.5)
    dq = _unblock(dq, T).reshape(B, T, N, H).astype(q.dtype)
    return dq, _unblock(dk, S).astype(k.dtype), _unblock(dv, S).astype(v.dtype), None, None, None, None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def blockwise_attention(
    q: Array, k: Array, v: Array, q_slots: Array, k_slots: Array,
    q_segments: Optional[Array] = None, k_segments: Optional[Array] = None,
    *, block_q: int = 512, block_k: int = 512,
) -> Array:
    """q (B, T, N, H), k and v (B, S, K, H) -> (B, T, N, H) in q's dtype; see `attention_ops.attention`.

    Equal to `dense_attention` up to float rounding (the softmax is regrouped by blocks), with gradients
    for q, k and v; slots and segment ids are integer inputs without gradients.
    """
    if block_q < 1 or block_k < 1:
        raise ValueError(f"blockwise attention: block_q={block_q} and block_k={block_k} must be >= 1")
    return _blockwise(q, k, v, q_slots, k_slots, q_segments, k_segments, int(block_q), int(block_k))
