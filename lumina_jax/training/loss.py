"""Token-weighted cross-entropy + z-loss from hidden states, chunked over the sequence.

The (B, T, V) logits are never materialised: the output layer and the loss run over chunks of
`chunk_size` positions inside a `lax.scan`. Two gradient strategies:

- `fused_grad=True` (default): a `custom_vjp` whose forward pass already computes, per chunk, the
  gradient of the loss w.r.t. the logits and pulls it back through the output layer, so the backward
  pass is a scalar multiply. Per chunk this is one forward matmul and two backward matmuls, with no
  recomputation and no logits kept alive (the "fused linear cross-entropy" scheme).
- `fused_grad=False`: plain autodiff of a rematerialised chunk loop (recomputes each chunk's logits).

Both return *sums* over supervised tokens; the caller divides once by the global supervised-token count
(the reference averages per micro-batch and rank: docs/reference.md#loss-averaged-per-micro-batch).

z-loss per token is logsumexp(logits)^2 (Lumina's `z_loss`, docs/reference.md#loss-and-z-loss), weighted like
the CE.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

LogitsFn = Callable[[Any, jax.Array], jax.Array]  # (head_params, hidden (B, c, D)) -> logits (B, c, V)


def _to_chunks(x: jax.Array, chunk: int) -> jax.Array:
    """(B, T, ...) -> (T // chunk, B, chunk, ...)."""
    b, t = x.shape[:2]
    x = x.reshape((b, t // chunk, chunk) + x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _from_chunks(x: jax.Array) -> jax.Array:
    n, b, c = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape((b, n * c) + x.shape[3:])


def _pad_to_multiple(hidden, targets, weights, chunk):
    t = hidden.shape[1]
    pad = (-t) % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        weights = jnp.pad(weights, ((0, 0), (0, pad)))
    return hidden, targets, weights, pad


def _chunk_stats(logits, targets, weights):
    """fp32 per-token lse and target logit (softmax statistics always in fp32)."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return logits, lse, target_logit


def _sums(lse, target_logit, weights):
    ce = jnp.sum((lse - target_logit) * weights)
    z = jnp.sum(jnp.square(lse) * weights)
    return ce, z


def _chunked_autodiff(logits_fn, z_loss_weight, chunk, head, hidden, targets, weights):
    @jax.checkpoint
    def body(carry, xs):
        h, t, w = xs
        _, lse, tl = _chunk_stats(logits_fn(head, h), t, w)
        ce, z = _sums(lse, tl, w)
        return (carry[0] + ce, carry[1] + z), None

    xs = (_to_chunks(hidden, chunk), _to_chunks(targets, chunk), _to_chunks(weights, chunk))
    (ce, z), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)), xs)
    return ce + z_loss_weight * z, (ce, z)


def _fused_forward(logits_fn, z_loss_weight, chunk, head, hidden, targets, weights):
    """Loss sums plus d(objective)/d(head) and d(objective)/d(hidden), computed chunk by chunk."""
    b, c, d = hidden.shape[0], chunk, hidden.shape[-1]

    def body(carry, xs):
        ce_acc, z_acc, dhead_acc = carry
        h, h_t, t, w = xs
        # Two vjps of the same (linear) output layer: the logits and d/dhidden from the chunk as (B, c, D),
        # d/dhead from the chunk as (D, B*c), laid out so by the transpose outside the loop (the forward
        # product of the second vjp is unused and removed by XLA). Each dot then reads its small operand
        # in the layout XLA:CPU's fast matmul wants; from (B, c, D) alone the head gradient's dot contracts
        # the major dimension and runs in the slower generic kernel.
        logits, vjp_hidden = jax.vjp(lambda x: logits_fn(head, x), h)
        _, vjp_head = jax.vjp(lambda hd: logits_fn(hd, h_t.T.reshape(b, c, d)), head)
        logits32 = logits.astype(jnp.float32)
        # one exp pass serves both the logsumexp and the softmax
        m = jax.lax.stop_gradient(jnp.max(logits32, axis=-1, keepdims=True))
        e = jnp.exp(logits32 - m)
        s = jnp.sum(e, axis=-1, keepdims=True)
        lse = (m + jnp.log(s))[..., 0]
        tl = jnp.take_along_axis(logits32, t[..., None], axis=-1)[..., 0]
        ce, z = _sums(lse, tl, w)
        # d/dlogits of w * (lse - logit_t) + zw * w * lse^2  =  w * (p - onehot_t) + 2 zw w lse p
        scale = (w * (1.0 + 2.0 * z_loss_weight * lse))[..., None] / s
        is_target = jax.lax.broadcasted_iota(jnp.int32, logits32.shape, logits32.ndim - 1) == t[..., None]
        dlogits = e * scale - jnp.where(is_target, w[..., None], 0.0)
        dlogits = dlogits.astype(logits.dtype)
        (dh,), (dhead,) = vjp_hidden(dlogits), vjp_head(dlogits)
        dhead_acc = jax.tree.map(lambda a, g: a + g.astype(a.dtype), dhead_acc, dhead)
        return (ce_acc + ce, z_acc + z, dhead_acc), dh

    zeros_head = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), head)
    hidden_t = jnp.swapaxes(_to_chunks(hidden, chunk).reshape(-1, b * c, d), 1, 2)  # (n, D, B*c)
    xs = (_to_chunks(hidden, chunk), hidden_t, _to_chunks(targets, chunk), _to_chunks(weights, chunk))
    init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros_head)
    (ce, z, dhead), dh = jax.lax.scan(body, init, xs)
    dhead = jax.tree.map(lambda g, x: g.astype(x.dtype), dhead, head)
    return (ce + z_loss_weight * z, (ce, z)), (dhead, _from_chunks(dh).astype(hidden.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _chunked_fused(logits_fn, z_loss_weight, chunk, head, hidden, targets, weights):
    out, _ = _fused_forward(logits_fn, z_loss_weight, chunk, head, hidden, targets, weights)
    return out


def _chunked_fused_fwd(logits_fn, z_loss_weight, chunk, head, hidden, targets, weights):
    out, grads = _fused_forward(logits_fn, z_loss_weight, chunk, head, hidden, targets, weights)
    return out, (grads, targets, weights)


def _chunked_fused_bwd(logits_fn, z_loss_weight, chunk, res, cotangents):
    (dhead, dh), targets, weights = res
    g_objective, _ = cotangents  # the (ce, z) metric outputs are wrapped in stop_gradient by the caller
    dhead = jax.tree.map(lambda x: (g_objective * x).astype(x.dtype), dhead)
    dh = (g_objective * dh).astype(dh.dtype)
    # targets are integers (float0 cotangent); weights are data, not trained
    d_targets = jnp.zeros(targets.shape, jax.dtypes.float0)
    return dhead, dh, d_targets, jnp.zeros_like(weights)


_chunked_fused.defvjp(_chunked_fused_fwd, _chunked_fused_bwd)


def chunked_loss_sums(
    head_params: Any,
    hidden: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    logits_fn: LogitsFn,
    *,
    z_loss_weight: float = 0.0,
    chunk_size: int = 1024,
    fused_grad: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns (objective_sum, {"ce_sum", "z_loss_sum", "weight_sum"}).

    objective_sum = sum_t w_t * (CE_t + z_loss_weight * lse_t^2) is differentiable w.r.t. `head_params`
    and `hidden` (B, T, D); the metric sums are not (stop_gradient). `targets` (B, T) int, `weights` (B, T)
    float. `logits_fn(head_params, hidden_chunk)` applies the output layer to a (B, c, D) chunk.
    """
    if hidden.ndim != 3 or targets.shape != hidden.shape[:2] or weights.shape != hidden.shape[:2]:
        raise ValueError(f"chunked_loss_sums: hidden {hidden.shape}, targets {targets.shape}, weights "
                         f"{weights.shape} do not agree on (B, T)")
    weights = weights.astype(jnp.float32)
    targets = targets.astype(jnp.int32)
    chunk = min(int(chunk_size), hidden.shape[1])
    hidden, targets, weights, _ = _pad_to_multiple(hidden, targets, weights, chunk)
    if fused_grad:
        objective, (ce, z) = _chunked_fused(logits_fn, float(z_loss_weight), chunk, head_params, hidden,
                                            targets, weights)
    else:
        objective, (ce, z) = _chunked_autodiff(logits_fn, float(z_loss_weight), chunk, head_params, hidden,
                                               targets, weights)
    metrics = {
        "ce_sum": jax.lax.stop_gradient(ce),
        "z_loss_sum": jax.lax.stop_gradient(z),
        "weight_sum": jnp.sum(weights),
    }
    return objective, metrics
