"""Speculative Jacobi decoding (SJD): several image tokens per model step, with the sampler's own distribution.

Speculative Jacobi decoding (Teng et al., arXiv 2410.01699) and its coupled drafts (MC-SJD, arXiv 2510.24211),
in the same jitted `lax.while_loop` shape as `decode.decode`. Each conditional row keeps L - 1 draft tokens
after its last accepted token, each drawn from a recorded distribution q over the image ids. One model step
feeds the L tokens [last token, drafts] (and the same L tokens to the row's unconditional twin when guidance
is on) at the row's own cache slots, and reads the target distribution p of every next token: the image-id
logits through `processors.process_body` (guidance, image top-k, temperature, top-p) and `body_probs`, the
one definition the autoregressive loop samples from too; the layout's forced tokens come from
`processors.forced_ahead`.

Verification goes left to right: draft x is accepted with probability min(1, p(x) / q(x)) (forced positions
always); at the first rejection the token is drawn from normalise(max(0, p - q)) and the step ends; when all
drafts pass, one more token is drawn from the last p. A step thus yields 1..L tokens, each distributed exactly
as autoregressive sampling would give it (speculative sampling's argument, which needs only that each draft
was drawn from its recorded q with randomness that nothing before it has seen). The cache pointer moves by
the accepted count; stale slots past it are masked by causality and overwritten by the next window.

The remaining drafts are re-drawn from this step's p at their positions (the Jacobi iteration: conditioned
on the old, partly rejected, window); positions beyond the window start from the last position's p (the
most recent guess of the model, which shares the image top-k support, unlike uniform random tokens).

Coupled drafts (the default): a draft is argmax(log q + G) with Gumbel noise G fixed per row and token index,
so a position whose q barely changed between iterations keeps its draft, and drafts settle as the window
converges (MC-SJD's observation). Uncoupled drafts draw fresh noise at every step (plain SJD).

Randomness per row: token m (1-based among the generated) uses keys folded from (row key, m - 1) with
regions 2 (acceptance uniform), 3 (residual draw) and 4 (draft noise; folded with the step when uncoupled);
the autoregressive regions 0 and 1 stay for the steps outside image bodies. Every position is verified at
most once, so no random number decides twice, and a row's tokens depend only on its prompt and seed.

Outside image bodies (text, the size tokens) a step accepts exactly the one token the autoregressive rule
(`decode.choose_next`, same keys) gives; a window never crosses the image's <eoss> nor `max_new_tokens`.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from lumina_jax.sampling import processors
from lumina_jax.sampling.decode import (DecodeInputs, DecodeModel, choose_next, sample_next, split_guided, prefill,
                                        report_progress, twin_slots)

ACCEPT, RESIDUAL, DRAFT = 2, 3, 4  # key regions (0 and 1 are the autoregressive sampler's)


@dataclasses.dataclass(frozen=True)
class JacobiSettings:
    """Speculative Jacobi decoding knobs; static under jit (the window is a shape)."""

    window: int = 16  # L: tokens fed per model step (the last accepted token + L - 1 drafts); 1..L accepted
    coupled: bool = True  # drafts share fixed per-position noise across iterations (MC-SJD); False = plain SJD

    def __post_init__(self):
        if self.window < 2:
            raise ValueError(f"jacobi window must be >= 2 (tokens per model step), got {self.window}")


class JacobiOutput(NamedTuple):
    tokens: jax.Array  # (B, max_new_tokens) int32 generated ids; -1 after the row stopped
    state: processors.RowState  # final per-row state
    accepted: jax.Array  # (B, max_new_tokens) int32 tokens accepted at each of the row's steps; 0 after it stopped
    steps: jax.Array  # (B,) int32 model steps the row took (prefill's first token counts as one)


def _keys(row_keys: jax.Array, first: jax.Array, count: int, region: int) -> jax.Array:
    """(B, count) keys of the tokens first + 1 .. first + count (0-based index first + j) in `region`."""
    def one(key, start):
        return jax.vmap(lambda j: jax.random.fold_in(jax.random.fold_in(key, start + j), region))(
            jnp.arange(count, dtype=jnp.int32))
    return jax.vmap(one)(row_keys, first)


def _draft(q: jax.Array, keys: jax.Array, step: jax.Array, coupled: bool, greedy: bool,
           image_first: int) -> jax.Array:
    """Draft tokens (B, W) drawn from q (B, W, n) by Gumbel-max with per-position keys (B, W)."""
    if greedy:
        return (jnp.argmax(q, axis=-1) + image_first).astype(jnp.int32)
    if not coupled:
        keys = jax.vmap(jax.vmap(lambda k: jax.random.fold_in(k, step)))(keys)
    noise = jax.vmap(jax.vmap(lambda k: jax.random.gumbel(k, (q.shape[-1],), jnp.float32)))(keys)
    return (jnp.argmax(jnp.log(q) + noise, axis=-1) + image_first).astype(jnp.int32)


def accepts(u: jax.Array, p_x: jax.Array, q_x: jax.Array) -> jax.Array:
    """Speculative sampling's test: accept draft x with probability min(1, p(x) / q(x)), u ~ U[0, 1)."""
    return u * q_x < p_x


def _verify(p, q, drafts, forced, u, residual_keys, greedy, image_first):
    """One window's verification.

    p (B, L, n): target of the token after each fed token; q (B, L-1, n) and drafts (B, L-1): the drafts of
    tokens 2..L of the window's output; forced (B, L): forced tokens of the L output tokens (-1 free).
    Returns (tokens (B, L), count (B,)): the first `count` entries are the step's tokens (1..L).
    """
    B, L, n = p.shape
    rel = jnp.clip(drafts - image_first, 0, n - 1)[..., None]
    p_x = jnp.take_along_axis(p[:, :L - 1], rel, axis=-1)[..., 0]
    q_x = jnp.take_along_axis(q, rel, axis=-1)[..., 0]
    ok = (forced[:, :L - 1] >= 0) | accepts(u, p_x, q_x)
    k = jnp.sum(jnp.cumprod(ok, axis=1), axis=1)  # drafts accepted before the first rejection
    rows = jnp.arange(B)
    target = p[rows, k]  # the target at the first rejected draft, or after the last draft
    q_pad = jnp.concatenate([q, jnp.zeros((B, 1, n), q.dtype)], axis=1)  # nothing was drafted after the window
    residual = jnp.maximum(target - q_pad[rows, k], 0.0)
    residual = jnp.where(jnp.sum(residual, axis=-1, keepdims=True) > 0, residual, target)  # p == q: rounding only
    if greedy:
        r = jnp.argmax(residual, axis=-1)
    else:
        noise = jax.vmap(lambda key: jax.random.gumbel(key, (n,), jnp.float32))(residual_keys[rows, k])
        r = jnp.argmax(jnp.log(residual) + noise, axis=-1)
    r = (r + image_first).astype(jnp.int32)
    r = jnp.where(forced[rows, k] >= 0, forced[rows, k], r)
    j = jnp.arange(L)[None, :]
    padded = jnp.concatenate([drafts, drafts[:, :1]], axis=1)
    tokens = jnp.where(j < k[:, None], padded, r[:, None])
    return tokens, k + 1


def jacobi_decode(model: DecodeModel, params, inputs: DecodeInputs, *, settings: processors.SamplingSettings,
                  ids: processors.TokenIds, jacobi: JacobiSettings, size_table: jax.Array | None = None,
                  cache_length: int | None = None, progress: Optional[jax.Array] = None) -> JacobiOutput:
    """Prefill every row, then speculative Jacobi steps until every row is done (traceable).

    Same inputs, settings and stopping rules as `decode.decode`; the output also says how many tokens each
    row accepted at each of its steps.
    """
    B, Pc = inputs.prompt.shape
    L, guided, max_new = jacobi.window, settings.use_guidance, settings.max_new_tokens
    greedy = settings.temperature == 0.0
    first = ids.image_first
    S = cache_length or (Pc + max_new + L)
    ctx, last, cache = prefill(model, params, inputs, settings, ids, size_table, False, S)
    rows = jnp.arange(B)

    state = inputs.state
    tok, body, _ = sample_next(ctx, last, state, None)
    out = jnp.full((B, max_new), -1, jnp.int32).at[:, 0].set(tok)
    state = processors.advance(state, tok, ids, max_new)
    accepted = jnp.zeros((B, max_new), jnp.int32).at[:, 0].set(1)
    steps = jnp.ones((B,), jnp.int32)
    # first drafts: every position starts from the prefill's p
    q = jnp.broadcast_to(processors.body_probs(body, settings)[:, None], (B, L - 1, ids.num_image_ids))
    drafts = _draft(q, _keys(inputs.row_keys, state.num_generated, L - 1, DRAFT), jnp.int32(0), jacobi.coupled,
                    greedy, first)

    def cond_fn(carry):
        return ~jnp.all(carry[0].done)

    def body_fn(carry):
        state, ulen, cache, out, accepted, steps, q, drafts, step = carry
        n = state.num_generated
        forced = processors.forced_ahead(state, ids, L)  # (B, L): the L tokens after the fed last token
        drafts = jnp.where(forced[:, :L - 1] >= 0, forced[:, :L - 1], drafts)
        window = jnp.concatenate([state.token[:, None], drafts], axis=1)  # (B, L)
        slot = jnp.minimum(inputs.prompt_len + n - 1, S - L)
        feed, start = window, slot
        if guided:
            uslot = twin_slots(state, ulen, S - L)
            feed = jnp.concatenate([window, window])
            start = jnp.concatenate([slot, uslot])
        pos = start[:, None] + jnp.arange(L, dtype=jnp.int32)
        hidden, cache = model.forward(params, feed, pos, cache, start)  # (R, L, D)
        R, _, D = hidden.shape
        img = model.slice_logits(ctx.head, hidden.reshape(R * L, D)).reshape(R, L, -1)
        cond, unc = (None if x is None else x.reshape(B * L, -1) for x in split_guided(ctx, img))
        per_pos = jax.tree.map(lambda x: jnp.repeat(x, L, axis=0), state)  # guidance applies in BODY
        logits = processors.process_body(cond, unc, per_pos, settings)  # (B * L, n)
        p = processors.body_probs(logits, settings).reshape(B, L, -1)

        # the autoregressive token for rows outside an image body; verification for the rest
        ar_tok = choose_next(ctx, hidden[:, 0], logits.reshape(B, L, -1)[:, 0], state)
        u = jax.vmap(jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32)))(
            _keys(inputs.row_keys, n, L - 1, ACCEPT))
        residual_keys = _keys(inputs.row_keys, n, L, RESIDUAL)
        sjd_tok, count = _verify(p, q, drafts, forced, u, residual_keys, greedy, first)
        in_body = processors.phase(state) == processors.BODY
        toks = jnp.where(in_body[:, None], sjd_tok, ar_tok[:, None])
        limit = jnp.minimum(max_new - n, jnp.where(in_body, processors.body_tokens_left(state), 1))
        count = jnp.where(state.done, 0, jnp.minimum(jnp.where(in_body, count, 1), limit))

        j = jnp.arange(L, dtype=jnp.int32)
        idx = jnp.where(j[None, :] < count[:, None], n[:, None] + j[None, :], max_new)  # max_new: dropped
        out = out.at[rows[:, None], idx].set(toks, mode="drop")

        def take(i, st):
            new = processors.advance(st, toks[:, i], ids, max_new)
            return jax.tree.map(lambda a, b: jnp.where(i < count, a, b), new, st)

        new_state = jax.lax.fori_loop(0, L, take, state)
        active = count > 0
        if guided:
            ulen = jnp.where(active, uslot + count, ulen)
        accepted = accepted.at[rows, jnp.where(active, steps, max_new)].set(count, mode="drop")
        steps = steps + active.astype(jnp.int32)

        # next drafts: token n' + j (j = 1..L-1) was predicted by this step's output count + j - 1
        src = jnp.minimum(count[:, None] + j[None, :L - 1], L - 1)
        q_new = jnp.take_along_axis(p, src[..., None], axis=1)
        d_new = _draft(q_new, _keys(inputs.row_keys, new_state.num_generated, L - 1, DRAFT), step,
                       jacobi.coupled, greedy, first)
        report_progress(progress, step, jnp.max(new_state.num_generated))
        return new_state, ulen, cache, out, accepted, steps, q_new, d_new, step + 1

    carry = (state, inputs.uncond_len, cache, out, accepted, steps, q, drafts, jnp.int32(1))
    state, _, _, out, accepted, steps, _, _, _ = jax.lax.while_loop(cond_fn, body_fn, carry)
    return JacobiOutput(out, state, accepted, steps)


jacobi_jit = jax.jit(jacobi_decode, static_argnames=("model", "settings", "ids", "jacobi", "cache_length"))
