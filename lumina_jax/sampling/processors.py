"""Per-row decoding state and the three logits processors of the reference, as pure jnp functions.

Every decision the reference makes with Python state on a batch-1 processor object (docs/reference.md,
"Guidance", "Structure rules", "Interleaved top-k") is a function of per-row counters here, so one jitted loop
can drive a batch whose rows are at different stages:

  phase TEXT    outside an image: text top-k; image ids and the end-of-image id are masked (see below)
  phase SIZE_H  after <racm3:break>: the height token; image top-k; optionally limited to the crop list
  phase SIZE_W  the width token; image top-k; limited to widths valid with the sampled height
  phase BODY    rows of image ids: guidance u + g(c - u), new line / end of image forced by the counter t,
                only image ids allowed, image top-k

Logits of rows in BODY are handled on the 8192 image ids only (`process_body`); the other phases need the
full vocabulary (`process_other`). The two share one sampling rule (`choose_tokens`), with Gumbel noise drawn
per region from the row's own key, so a row samples the same token whichever of the two paths its batch took.

Differences from the reference:
- batched and stateless (docs/reference.md#batch-1-processors); guidance uses the unconditional row of the
  same batch instead of a separate forward (docs/reference.md#separate-unconditional-pass);
- size tokens may be constrained to the crop list or forced (docs/reference.md#unconstrained-size-tokens;
  `constrain_size=False` reproduces the reference's unconstrained sampling);
- outside images, image ids and <eoss> are masked (the reference leaves them allowed; a trained model never
  picks them, a random one does);
- optional top-p after top-k and temperature; temperature 0 means greedy;
- optional plausibility floor for guidance (`cfg_min_p`, off by default): guided rows keep only the image
  codes whose conditional probability is at least `cfg_min_p` times that of the conditional top code, so
  u + g(c - u) cannot promote a code that both branches find unlikely (with a sharp unconditional branch
  such codes get the largest c - u). The rule is the adaptive plausibility constraint of contrastive
  decoding (Li et al., 2023).
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lumina_jax.validation import check_float, check_int

TEXT, SIZE_H, SIZE_W, BODY = 0, 1, 2, 3
NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class TokenIds:
    """The token ids the sampler acts on: a hashable view (static under jit) of the tokenizer's `SpecialIds`,
    built with `from_special_ids`; `lumina_jax.tokenizer` is the one table of special ids."""

    image_start: int  # <racm3:break>
    image_end: int  # <eoss>
    new_line: int  # UniRep end of row
    size_base: int  # size token id = size_base + patches of 32 px
    end_of_turn: int  # stops generation
    image_first: int  # first image-code id (inclusive)
    image_last: int  # last image-code id (exclusive)
    vocab_size: int  # logits width (the decoder's vocab_size)

    def __post_init__(self):
        if not 0 <= self.image_first < self.image_last <= self.vocab_size:
            raise ValueError(f"TokenIds: image id range [{self.image_first}, {self.image_last}) outside the vocabulary")
        for name in ("image_start", "image_end", "new_line", "size_base", "end_of_turn"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"TokenIds: {name}={getattr(self, name)} is outside the decoder's vocabulary of "
                                 f"{self.vocab_size} ids")

    @property
    def num_image_ids(self) -> int:
        return self.image_last - self.image_first

    @property
    def image_slice(self) -> tuple[int, int]:
        return (self.image_first, self.image_last)

    @classmethod
    def from_special_ids(cls, special, vocab_size: int) -> "TokenIds":
        """From the tokenizer's `SpecialIds` (attributes named as in lumina_jax.tokenizer)."""
        img = np.asarray(special.img2bpe)
        first, last = int(img.min()), int(img.max()) + 1
        if last - first != img.size:
            raise ValueError(f"image token ids are not one contiguous range: {first}..{last - 1} for {img.size} codes")
        return cls(image_start=int(special.image_start), image_end=int(special.image_end),
                   new_line=int(special.new_line), size_base=int(special.size_base),
                   end_of_turn=int(special.end_of_turn), image_first=first, image_last=last, vocab_size=vocab_size)


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """Sampling knobs; static under jit (top-k sizes are shapes)."""

    cfg_scale: float = 4.0  # classifier-free guidance g; 1.0 = off (then no unconditional rows are run)
    cfg_min_p: float = 0.0  # guided rows: keep codes with p_cond >= cfg_min_p * max p_cond; 0 = off (reference)
    image_top_k: int = 2000  # top-k inside images, size tokens included; 0 = off
    text_top_k: int = 10  # top-k outside images; 0 = off
    temperature: float = 1.0  # softmax temperature; 0 = greedy (argmax)
    top_p: float = 1.0  # nucleus mass after top-k and temperature; 1.0 = off (beyond the reference)
    max_new_tokens: int = 8192  # generation length limit per row
    constrain_size: bool = True  # size tokens only from the size table (crop list); False = as the reference
    mask_image_ids_in_text: bool = True  # forbid image ids and <eoss> outside images (reference: allowed)

    def __post_init__(self):
        for name in ("cfg_scale", "cfg_min_p", "temperature", "top_p"):  # NaN passes every comparison below
            check_float(name, getattr(self, name))
        for name in ("image_top_k", "text_top_k", "max_new_tokens"):
            check_int(name, getattr(self, name))
        if self.image_top_k < 0 or self.text_top_k < 0:
            raise ValueError(f"top-k must be >= 0, got image_top_k={self.image_top_k} text_top_k={self.text_top_k}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.cfg_scale <= 0:
            raise ValueError(f"cfg_scale must be > 0, got {self.cfg_scale}")
        if not 0.0 <= self.cfg_min_p < 1.0:
            raise ValueError(f"cfg_min_p must be in [0, 1), got {self.cfg_min_p}")

    @property
    def use_guidance(self) -> bool:
        return self.cfg_scale != 1.0


class RowState(NamedTuple):
    """Per-row decoding state; every field is a (B,) array."""

    token: jax.Array  # int32: the last sampled token (fed to the model next)
    in_image: jax.Array  # bool: between <racm3:break> and <eoss>
    header: jax.Array  # int32: tokens after <racm3:break> so far, saturating at 2 (0: next is h, 1: w, 2: body)
    h: jax.Array  # int32: height in 32-px patches (size token - size_base)
    w: jax.Array  # int32: width in 32-px patches
    body: jax.Array  # int32: body tokens so far (image ids and new lines), the reference's t
    num_generated: jax.Array  # int32: tokens sampled so far
    num_images: jax.Array  # int32: images closed so far
    done: jax.Array  # bool: end-of-turn sampled or length limit reached


def initial_state(token, in_image, header, h, w, body) -> RowState:
    as_i = lambda x: jnp.asarray(x, jnp.int32)
    z = jnp.zeros_like(as_i(token))
    return RowState(as_i(token), jnp.asarray(in_image, bool), as_i(header), as_i(h), as_i(w), as_i(body),
                    z, z, jnp.zeros(z.shape, bool))


def prompt_state(tokens, ids: TokenIds) -> dict:
    """The image state at the end of a prompt (Python ints), plus where its open image starts (or None)."""
    in_image, header, h, w, body, start = False, 0, 0, 0, 0, None
    for i, t in enumerate(tokens):
        t = int(t)
        if not in_image:
            if t == ids.image_start:
                in_image, header, h, w, body, start = True, 0, 0, 0, 0, i
            continue
        if header == 0:
            h, header = t - ids.size_base, 1
        elif header == 1:
            w, header = t - ids.size_base, 2
        else:
            body += 1
            if t == ids.image_end:
                in_image, start = False, None
    return dict(in_image=in_image, header=header, h=h, w=w, body=body, image_start_index=start)


def phase(state: RowState) -> jax.Array:
    return jnp.where(state.in_image, jnp.minimum(state.header, 2) + 1, TEXT).astype(jnp.int32)


def forced_token(state: RowState, ids: TokenIds) -> jax.Array:
    """The token the layout forces for BODY rows (new line or <eoss>), else -1 (docs/reference.md#structure-rules)."""
    width, height = 2 * state.w + 1, 2 * state.h  # latent row incl. new line, latent rows
    nxt = state.body + 1
    # jnp.remainder by a non-positive width (only for nonsense sizes in unconstrained mode) is guarded.
    row_end = jnp.where(width > 0, jnp.remainder(nxt, jnp.maximum(width, 1)) == 0, False)
    image_end = nxt == width * height + 1
    body = phase(state) == BODY
    tok = jnp.where(row_end, ids.new_line, jnp.where(image_end, ids.image_end, -1))
    return jnp.where(body, tok, -1).astype(jnp.int32)


def forced_ahead(state: RowState, ids: TokenIds, count: int) -> jax.Array:
    """(B, count): the token the layout forces at each of a row's next `count` tokens (-1 = free), assuming
    every one of them stays in the image body (each body token moves the counter t by one)."""
    at = lambda j: forced_token(state._replace(body=state.body + j), ids)
    return jax.vmap(at, out_axes=1)(jnp.arange(count, dtype=jnp.int32))


def body_tokens_left(state: RowState) -> jax.Array:
    """(B,) tokens of the open image still to come for BODY rows, <eoss> included."""
    width, height = 2 * state.w + 1, 2 * state.h
    return jnp.maximum(width * height + 1 - state.body, 0)


def advance(state: RowState, token: jax.Array, ids: TokenIds, max_new_tokens: int) -> RowState:
    """The state after each active row appended `token`; done rows are left unchanged."""
    active = ~state.done
    token = token.astype(jnp.int32)
    ph = phase(state)
    starts = (ph == TEXT) & (token == ids.image_start)
    ends = (ph == BODY) & (token == ids.image_end)
    h = jnp.where(ph == SIZE_H, token - ids.size_base, state.h)
    w = jnp.where(ph == SIZE_W, token - ids.size_base, state.w)
    body = jnp.where(starts, 0, jnp.where(ph == BODY, state.body + 1, state.body))
    header = jnp.where(starts, 0, jnp.where(state.in_image, jnp.minimum(state.header + 1, 2), state.header))
    in_image = (state.in_image & ~ends) | starts
    num_generated = state.num_generated + 1
    done = (token == ids.end_of_turn) | (num_generated >= max_new_tokens)
    new = RowState(token, in_image, header, h, w, body, num_generated, state.num_images + ends.astype(jnp.int32), done)
    return jax.tree.map(lambda n, o: jnp.where(active, n, o), new, state)


# --------------------------------------------------------------------------------------------------------
# logits processing


def _order_keys(x: jax.Array) -> jax.Array:
    """float32 -> uint32 keys with the same order (negative floats have their magnitude bits flipped)."""
    x = x.astype(jnp.float32)
    x = jnp.where(x == 0, jnp.float32(0), x)  # -0.0 and +0.0 compare equal, so give them one key
    i = jax.lax.bitcast_convert_type(x, jnp.int32)
    i = jnp.where(i < 0, i ^ jnp.int32(0x7FFFFFFF), i)
    return jax.lax.bitcast_convert_type(i, jnp.uint32) ^ jnp.uint32(0x80000000)


def kth_largest_key(x: jax.Array, k: int) -> jax.Array:
    """Order key (see `_order_keys`) of the k-th largest entry of each row, shape (..., 1).

    Exact, by fixing the key's 32 bits from the top: 32 compare-and-count passes over the row, much cheaper
    on CPU than `lax.top_k` (a full sort) for k in the thousands or a 65,536-wide row.
    """
    keys = _order_keys(x)

    def fix_bit(i, ans):
        cand = ans | jax.lax.shift_left(jnp.uint32(1), (31 - i).astype(jnp.uint32))
        ok = jnp.sum(keys >= cand, axis=-1, keepdims=True, dtype=jnp.int32) >= k
        return jnp.where(ok, cand, ans)

    return jax.lax.fori_loop(0, 32, fix_bit, jnp.zeros(x.shape[:-1] + (1,), jnp.uint32))


def _top_k_mask(x: jax.Array, k: int) -> jax.Array:
    """Sets entries below the k-th largest of each row to -inf; ties at the threshold are kept (as the reference)."""
    if k <= 0 or k >= x.shape[-1]:
        return x
    return jnp.where(_order_keys(x) < kth_largest_key(x, k), NEG_INF, x)


def _top_p_mask(x: jax.Array, p: float) -> jax.Array:
    """Keeps the most probable entries whose mass before them is < p (always at least one)."""
    if p >= 1.0:
        return x
    order = jnp.sort(x, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(order, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.where(mass_before < p, order, jnp.inf)
    thr = jnp.min(kept, axis=-1, keepdims=True)
    return jnp.where(x < thr, NEG_INF, x)


def _temperature(x: jax.Array, t: float) -> jax.Array:
    return x if t in (0.0, 1.0) else x / t


def guide(cond: jax.Array, uncond: jax.Array | None, state: RowState, cfg_scale: float,
          min_p: float = 0.0) -> jax.Array:
    """u + g (c - u) for BODY rows (the size tokens exist), c elsewhere (docs/reference.md#guidance).

    With `min_p` > 0 the guided rows keep only the entries where softmax(c) >= min_p * max softmax(c), i.e.
    c >= max(c) + log(min_p); the others become NEG_INF.
    """
    if uncond is None or cfg_scale == 1.0:
        return cond
    on = (phase(state) == BODY)[:, None]
    guided = uncond + cfg_scale * (cond - uncond)
    if min_p > 0.0:
        plausible = cond >= jnp.max(cond, axis=-1, keepdims=True) + math.log(min_p)
        guided = jnp.where(plausible, guided, NEG_INF)
    return jnp.where(on, guided, cond)


def process_body(cond_img: jax.Array, uncond_img: jax.Array | None, state: RowState,
                 s: SamplingSettings) -> jax.Array:
    """Processed logits over the image ids for BODY rows (guidance, image top-k, temperature, top-p).

    Forced steps are not reflected here; `choose_tokens` overrides them.
    """
    x = guide(cond_img.astype(jnp.float32), None if uncond_img is None else uncond_img.astype(jnp.float32),
              state, s.cfg_scale, s.cfg_min_p)
    x = _top_k_mask(x, s.image_top_k)
    return _top_p_mask(_temperature(x, s.temperature), s.top_p)


def body_probs(body_logits: jax.Array, s: SamplingSettings) -> jax.Array:
    """The distribution `choose_tokens` samples BODY rows from, as probabilities over the image ids: the
    softmax of `process_body`'s logits, or all mass on the first largest one when greedy (temperature 0)."""
    if s.temperature == 0.0:
        return jax.nn.one_hot(jnp.argmax(body_logits, axis=-1), body_logits.shape[-1], dtype=jnp.float32)
    return jax.nn.softmax(body_logits.astype(jnp.float32), axis=-1)


def size_allowed(state: RowState, ids: TokenIds, size_table: jax.Array | None, forced_hw: jax.Array | None,
                 width: int, offset: int = 0) -> jax.Array:
    """(B, width) bool: which of the ids offset..offset+width-1 may be sampled at the size steps.

    `size_table[h, w]` (bool, patches of 32 px) lists valid sizes; `forced_hw` (B, 2) is (h, w) or -1.
    Rows not at a size step get all True.
    """
    ph = phase(state)
    n = jnp.arange(width, dtype=jnp.int32)[None, :] + offset - ids.size_base  # candidate patch count
    ok = jnp.ones((state.token.shape[0], width), bool)
    if size_table is not None:
        tbl = jnp.asarray(size_table, bool)
        in_range = (n >= 0) & (n < tbl.shape[0]) & (n < tbl.shape[1])
        nc = jnp.clip(n, 0, min(tbl.shape) - 1)
        ok_h = in_range & jnp.any(tbl, axis=1)[nc]
        hc = jnp.clip(state.h, 0, tbl.shape[0] - 1)[:, None]
        ok_w = in_range & tbl[hc, nc] & (state.h >= 0)[:, None] & (state.h < tbl.shape[0])[:, None]
        ok = jnp.where((ph == SIZE_H)[:, None], ok_h, jnp.where((ph == SIZE_W)[:, None], ok_w, ok))
    if forced_hw is not None:
        fh, fw = forced_hw[:, 0:1], forced_hw[:, 1:2]
        ok = jnp.where(((ph == SIZE_H)[:, None]) & (fh >= 0), n == fh, ok)
        ok = jnp.where(((ph == SIZE_W)[:, None]) & (fw >= 0), n == fw, ok)
    return ok


def process_other(cond_full: jax.Array, state: RowState, s: SamplingSettings, ids: TokenIds,
                  size_table: jax.Array | None = None, forced_hw: jax.Array | None = None) -> jax.Array:
    """Processed full-vocabulary logits for TEXT and SIZE rows (masks, top-k by phase, temperature, top-p)."""
    x = cond_full.astype(jnp.float32)
    ph = phase(state)[:, None]
    vocab = jnp.arange(x.shape[-1])[None, :]
    if s.mask_image_ids_in_text:
        banned = ((vocab >= ids.image_first) & (vocab < ids.image_last)) | (vocab == ids.image_end)
        x = jnp.where((ph == TEXT) & banned, NEG_INF, x)
    sizing = (ph == SIZE_H) | (ph == SIZE_W)
    table = size_table if s.constrain_size else None
    if table is not None or forced_hw is not None:
        x = jnp.where(sizing & ~size_allowed(state, ids, table, forced_hw, x.shape[-1]), NEG_INF, x)
    text = _top_k_mask(x, s.text_top_k)
    if table is not None:
        # every allowed size id lies in size_base..size_base+n, so top-k over that slice equals the full one
        lo = ids.size_base
        hi = min(lo + max(table.shape), x.shape[-1])
        sl = x[:, lo:hi]
        k = s.image_top_k if s.image_top_k < sl.shape[-1] else 0
        sized = jnp.full_like(x, NEG_INF).at[:, lo:hi].set(_top_k_mask(sl, k))
    else:
        sized = _top_k_mask(x, s.image_top_k)
    x = jnp.where(sizing, sized, text)
    return _top_p_mask(_temperature(x, s.temperature), s.top_p)


def row_keys_at(row_keys: jax.Array, state: RowState) -> jax.Array:
    """Each row's key for its next sample: fold_in(row key, tokens the row generated so far)."""
    return jax.vmap(jax.random.fold_in)(row_keys, state.num_generated)


def _noise(keys: jax.Array, region: int, width: int) -> jax.Array:
    return jax.vmap(lambda k: jax.random.gumbel(jax.random.fold_in(k, region), (width,), jnp.float32))(keys)


def choose_tokens(body_logits: jax.Array, other_logits: jax.Array | None, state: RowState, keys: jax.Array,
                  s: SamplingSettings, ids: TokenIds) -> jax.Array:
    """Samples one token per row: Gumbel-max over the processed logits, with forced tokens applied.

    Noise for the image ids comes from fold_in(key, 0), for the remaining ids from fold_in(key, 1), so
    the token of a BODY row does not depend on whether `other_logits` was computed for its batch.
    `other_logits` may be None when no row is in TEXT or SIZE phase.
    """
    greedy = s.temperature == 0.0
    img = body_logits if greedy else body_logits + _noise(keys, 0, ids.num_image_ids)
    tok = (jnp.argmax(img, axis=-1) + ids.image_first).astype(jnp.int32)
    forced = forced_token(state, ids)
    tok = jnp.where(forced >= 0, forced, tok)
    if other_logits is not None:
        if greedy:
            full = other_logits
        else:
            rest = _noise(keys, 1, ids.vocab_size - ids.num_image_ids)
            a, b = ids.image_first, ids.image_last
            full = other_logits + jnp.concatenate(
                [rest[:, :a], _noise(keys, 0, ids.num_image_ids), rest[:, a:]], axis=-1)
        other = jnp.argmax(full, axis=-1).astype(jnp.int32)
        tok = jnp.where(phase(state) == BODY, tok, other)
    return tok

