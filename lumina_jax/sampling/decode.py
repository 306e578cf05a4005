"""Prefill + one jitted `lax.while_loop` over the decoder's own forward, with guidance rows in the same batch.

Rows 0..B-1 are the conditional sequences. With guidance (cfg_scale != 1) rows B..2B-1 are their
unconditional twins: while row b is outside an image its twin idles; when row b emits (or its prompt ends
inside) <racm3:break>, the twin restarts at cache slot 0 / position 0 and from then on is fed the same tokens,
so when row b holds [.., <racm3:break>, h, w, ..] its twin holds [<racm3:break>, h, w, ..] at positions 0, 1,
2, .. (the whole context of the reference's unconditional branch). All per-row decisions come from
`processors.RowState`; the KV cache is the decoder's static, preallocated per-layer cache.

Each step projects the hidden states onto the image ids only; the full-vocabulary projection (and its
processing) runs under `lax.cond` only when some row is outside an image body.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
from typing import Any, Callable, Iterator, NamedTuple, Optional, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from lumina_jax.config import ChameleonConfig
from lumina_jax.models.attention import init_cache
from lumina_jax.models.chameleon import compute_logits, decoder, lm_head_kernel, project_logits
from lumina_jax.sampling import processors


class DecodeModel(Protocol):
    """What the loop needs from a model (all methods traceable; the object must be hashable).

    `ChameleonDecodeModel` is the one implementation; the protocol lets tests drive the loop with a model
    whose logits are shifted on purpose (e.g. towards opening images).
    """

    def init_cache(self, batch: int, length: int) -> Any: ...

    def forward(self, params, tokens, positions, cache, cache_index) -> tuple[jax.Array, Any]:
        """tokens/positions (R, T) int32, cache_index (R,) -> (final hidden (R, T, D), new cache)."""

    def logits(self, params, hidden) -> jax.Array:
        """hidden (R, D) -> float32 logits over the whole vocabulary (R, V)."""

    def slice_head(self, params, vocab_slice) -> Any:
        """The output projection restricted to the static (start, stop) id range; computed once per call."""

    def slice_logits(self, head, hidden) -> jax.Array:
        """hidden (R, D) -> float32 logits (R, stop - start) through `slice_head`'s result."""


@dataclasses.dataclass(frozen=True)
class ChameleonDecodeModel:
    """`DecodeModel` of the Chameleon decoder: `Chameleon.__call__` with its per-layer KV cache.

    Parameters are the unscanned layout (`scan_layers=False`, as `Lumina.load` and `unstack_layers` give):
    the decode loop then updates one cache buffer per layer in place and slices no weights per step.
    """

    config: ChameleonConfig  # scan_layers=False (the decoder refuses a cache with scanned layers)

    def init_cache(self, batch, length):
        return init_cache(self.config, batch, length)

    def forward(self, params, tokens, positions, cache, cache_index):
        model = decoder(self.config.replace(remat_policy="none"))  # remat only matters under a gradient
        return model.apply({"params": params}, tokens, positions=positions, cache=cache, cache_index=cache_index,
                           return_hidden=True)

    def logits(self, params, hidden):
        return compute_logits(params, hidden[:, None], self.config)[:, 0].astype(jnp.float32)

    def slice_head(self, params, vocab_slice):
        return vocab_slice, lm_head_kernel(params, self.config, vocab_slice)

    def slice_logits(self, head, hidden):
        # image ids are what the loop samples here, so the model's optional image-logit mask does not apply
        vocab_slice, kernel = head
        cfg = self.config.replace(mask_image_logits=False)
        return project_logits(kernel, hidden[:, None], cfg, vocab_slice)[:, 0].astype(jnp.float32)


class DecodeInputs(NamedTuple):
    """Host-prepared inputs (see `generate.prepare_inputs`); all arrays have leading dim B (cond rows)."""

    prompt: jax.Array  # (B, P) int32, right-padded
    prompt_len: jax.Array  # (B,) int32
    uncond_prompt: jax.Array  # (B, Pu) int32: the prompt tail from an open image's <racm3:break>, else [start]
    uncond_len: jax.Array  # (B,) int32
    state: processors.RowState  # the image state at the end of each prompt
    row_keys: jax.Array  # (B,) typed PRNG keys, one per row
    forced_hw: jax.Array  # (B, 2) int32 forced (h, w) patches, -1 = free


class DecodeOutput(NamedTuple):
    tokens: jax.Array  # (B, max_new_tokens) int32 generated ids; -1 after the row stopped
    state: processors.RowState  # final per-row state (num_generated, in_image = an unfinished image, ...)
    record: Optional[dict]  # per-step logits when record=True (tests and inspection)


# ---- progress reporting from inside the jitted loop ------------------------------------------------------
# The host callback is compiled into the loop, so a Python function passed per call would mean one compilation
# per call. Instead each call registers its function under a fresh id and passes the id into the loop as data;
# the one compiled callback looks it up, so concurrent generations each report to their own function.
PROGRESS_EVERY = 4  # steps between host callbacks
_listeners: dict[int, Callable[[int], None]] = {}
_listener_ids = itertools.count(1)


def _report(listener, done_steps):
    fn = _listeners.get(int(listener))
    if fn is not None:
        fn(int(done_steps))


@contextlib.contextmanager
def progress_listener(fn: Callable[[int], None] | None) -> Iterator[Optional[np.int32]]:
    """Registers `fn(step)` for one decode call; yields the id to pass as `decode(..., progress=...)`
    (None when `fn` is None: the loop then has no callback)."""
    if fn is None:
        yield None
        return
    key = next(_listener_ids)
    _listeners[key] = fn
    try:
        yield np.int32(key)
    finally:
        del _listeners[key]


# ---- the loop ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Step:
    """What each sampling step reads; fixed for one decode call."""

    model: DecodeModel
    params: Any
    head: Any  # model.slice_head(params, ids.image_slice)
    inputs: DecodeInputs
    settings: processors.SamplingSettings
    ids: processors.TokenIds
    size_table: Optional[jax.Array]
    record: bool | str
    batch: int  # B, the conditional rows; guided rows follow them


def choose_next(ctx: _Step, hidden: jax.Array, body: jax.Array, state: processors.RowState) -> jax.Array:
    """Each cond row's next token from the processed image-id logits `body` (B, n_img) of BODY rows and, for
    rows outside an image body, the full-vocabulary logits of `hidden` (R, D) (computed only when needed)."""
    settings, ids, B = ctx.settings, ctx.ids, ctx.batch
    keys = processors.row_keys_at(ctx.inputs.row_keys, state)
    all_body = jnp.all(state.done | (processors.phase(state) == processors.BODY))

    def fast(_):
        return processors.choose_tokens(body, None, state, keys, settings, ids)

    def general(_):
        full = ctx.model.logits(ctx.params, hidden[:B])
        table = ctx.size_table if settings.constrain_size else None
        other = processors.process_other(full, state, settings, ids, table, ctx.inputs.forced_hw)
        return processors.choose_tokens(body, other, state, keys, settings, ids)

    return jax.lax.cond(all_body, fast, general, None)


def split_guided(ctx: _Step, img: jax.Array) -> tuple[jax.Array, Optional[jax.Array]]:
    """Image-id logits of all R rows -> (cond rows, their unconditional twins or None without guidance)."""
    B = ctx.batch
    return (img[:B], img[B:]) if ctx.settings.use_guidance else (img, None)


def sample_next(ctx: _Step, hidden: jax.Array, state: processors.RowState, rec: Optional[dict]):
    """From final hidden states (R, D) of the last fed tokens: choose each cond row's next token.

    Returns (tokens, processed image-id logits of the cond rows, record)."""
    settings, B = ctx.settings, ctx.batch
    cond_img, unc_img = split_guided(ctx, ctx.model.slice_logits(ctx.head, hidden))  # (B, n_img) each
    body = processors.process_body(cond_img, unc_img, state, settings)
    tok = choose_next(ctx, hidden, body, state)
    if ctx.record:
        idx = jnp.minimum(state.num_generated, settings.max_new_tokens - 1)
        rows = jnp.arange(B)
        act = ~state.done

        def put(buf, val):
            return buf.at[idx, rows].set(jnp.where(act[:, None], val, buf[idx, rows]))

        rec = dict(rec)
        rec["cond_image"] = put(rec["cond_image"], cond_img)
        guided_img = processors.guide(cond_img, unc_img, state, settings.cfg_scale, settings.cfg_min_p)
        rec["guided_image"] = put(rec["guided_image"], guided_img)
        if unc_img is not None:
            rec["uncond_image"] = put(rec["uncond_image"], unc_img)
        if "cond_full" in rec:
            rec["cond_full"] = put(rec["cond_full"], ctx.model.logits(ctx.params, hidden[:B]))
    return tok, body, rec


def prefill(model: DecodeModel, params, inputs: DecodeInputs, settings: processors.SamplingSettings,
            ids: processors.TokenIds, size_table, record, cache_length: int):
    """Runs every prompt (and, with guidance, its unconditional twin) through the model into a fresh cache.

    Returns (step context, final hidden state of each row's last prompt token (R, D), cache)."""
    B, Pc = inputs.prompt.shape
    if settings.use_guidance:
        Pu = inputs.uncond_prompt.shape[1]
        width = max(Pc, Pu)
        pad = lambda x: jnp.pad(x, ((0, 0), (0, width - x.shape[1])))
        tokens = jnp.concatenate([pad(inputs.prompt), pad(inputs.uncond_prompt)], axis=0)
        lens = jnp.concatenate([inputs.prompt_len, inputs.uncond_len])
    else:
        tokens, lens = inputs.prompt, inputs.prompt_len
    R, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (R, T))
    cache = model.init_cache(R, cache_length)
    ctx = _Step(model, params, model.slice_head(params, ids.image_slice), inputs, settings, ids, size_table,
                record, B)
    hidden, cache = model.forward(params, tokens, positions, cache, jnp.zeros((R,), jnp.int32))
    last = jnp.take_along_axis(hidden, (lens - 1)[:, None, None], axis=1)[:, 0]
    return ctx, last, cache


def twin_slots(state: processors.RowState, ulen: jax.Array, limit: int) -> jax.Array:
    """Cache slot where each unconditional twin takes its next tokens: 0 right after the row opened an image
    (the twin restarts from <racm3:break>), else after its own tokens; at most `limit`."""
    restart = state.in_image & (state.header == 0)  # the last token opened an image
    return jnp.minimum(jnp.where(restart, 0, ulen), limit)


def report_progress(progress: Optional[jax.Array], step: jax.Array, done: jax.Array) -> None:
    """Every PROGRESS_EVERY loop steps: the listener `progress` gets `done` (tokens sampled so far)."""
    if progress is not None:
        jax.lax.cond((step + 1) % PROGRESS_EVERY == 0, lambda: jax.debug.callback(_report, progress, done),
                     lambda: None)


def decode(model: DecodeModel, params, inputs: DecodeInputs, *, settings: processors.SamplingSettings,
           ids: processors.TokenIds, size_table: jax.Array | None = None, cache_length: int | None = None,
           record: bool | str = False, progress: Optional[jax.Array] = None) -> DecodeOutput:
    """Prefill every row, then sample until every row hit end-of-turn or `max_new_tokens` (traceable).

    `record=True` also returns, per step, the raw conditional and unconditional image-id logits and the
    guided ones (u + g(c - u) in BODY, after the `cfg_min_p` floor when set; c elsewhere); `record="full"`
    adds the full conditional logits. `progress` is an id from `progress_listener` (data, not static: a new
    listener does not recompile the loop).
    """
    B, Pc = inputs.prompt.shape
    guided = settings.use_guidance
    max_new = settings.max_new_tokens
    S = cache_length or (Pc + max_new)
    ctx, last, cache = prefill(model, params, inputs, settings, ids, size_table, record, S)

    rec = None
    if record:
        n = ids.num_image_ids
        rec = {k: jnp.full((max_new, B, n), jnp.nan, jnp.float32) for k in ("cond_image", "guided_image")}
        if guided:
            rec["uncond_image"] = jnp.full((max_new, B, n), jnp.nan, jnp.float32)
        if record == "full":
            rec["cond_full"] = jnp.full((max_new, B, ids.vocab_size), jnp.nan, jnp.float32)

    state = inputs.state
    out = jnp.full((B, max_new), -1, jnp.int32)
    rows = jnp.arange(B)

    def emit(state, out, tok):
        idx = jnp.minimum(state.num_generated, max_new - 1)
        out = out.at[rows, idx].set(jnp.where(state.done, out[rows, idx], tok))
        return processors.advance(state, tok, ids, max_new), out

    tok, _, rec = sample_next(ctx, last, state, rec)
    state, out = emit(state, out, tok)
    ulen = inputs.uncond_len

    def cond_fn(carry):
        return ~jnp.all(carry[0].done)

    def body_fn(carry):
        state, ulen, cache, out, rec, step = carry
        slot = jnp.minimum(inputs.prompt_len + state.num_generated - 1, S - 1)
        feed, pos = state.token, slot
        if guided:
            uslot = twin_slots(state, ulen, S - 1)
            ulen = jnp.where(state.done, ulen, uslot + 1)
            feed = jnp.concatenate([feed, feed])
            pos = jnp.concatenate([slot, uslot])
        hidden, cache = model.forward(params, feed[:, None], pos[:, None], cache, pos)
        tok, _, rec = sample_next(ctx, hidden[:, 0], state, rec)
        state, out = emit(state, out, tok)
        report_progress(progress, step, step + 1)
        return state, ulen, cache, out, rec, step + 1

    carry = (state, ulen, cache, out, rec, jnp.int32(1))
    state, _, _, out, rec, _ = jax.lax.while_loop(cond_fn, body_fn, carry)
    return DecodeOutput(out, state, rec)


decode_jit = jax.jit(decode, static_argnames=("model", "settings", "ids", "cache_length", "record"))
