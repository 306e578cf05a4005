"""Token-level generation: prompts (id lists) in; generated ids, text-with-placeholders and images out.

    special = SpecialIds.from_tokenizer(text_tokenizer)
    ids = TokenIds.from_special_ids(special, config.vocab_size)
    rows = generate_tokens(model, params, [prompt_ids, ...], seeds=[0, 1], settings=SamplingSettings(...),
                           ids=ids, size_table=size_table_from_crops(crop_size_list(512)))
    parts = split_generation(rows[0].tokens, ids)   # text ids with one placeholder per image, image tokens
    images = decode_images([p for r in rows for p in split_generation(r.tokens, ids).images], image_tokenizer,
                           special)

Prompts of different lengths share one batch (right-padded; each row's cache index starts at its own length).
A row's randomness depends only on its seed and its own step count, never on the rest of the batch.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lumina_jax.image_tokenizer import map_batched_by_shape
from lumina_jax.sampling import processors
from lumina_jax.sampling.decode import DecodeInputs, DecodeModel, decode_jit, progress_listener
from lumina_jax.sampling.jacobi import JacobiSettings, jacobi_jit
from lumina_jax.unirep import UniRepError, unirep_to_codes

PROMPT_BUCKET = 64  # prompt lengths are padded to a multiple of this, so similar prompts share one compilation


def size_table_from_crops(crop_sizes: Sequence[tuple[int, int]], patch: int = 32) -> np.ndarray:
    """Square bool table `t[h, w]` (32-px patches) of the (W, H) crop sizes."""
    n = max(max(w, h) // patch for w, h in crop_sizes) + 1
    t = np.zeros((n, n), bool)
    for w, h in crop_sizes:
        if w % patch or h % patch:
            raise ValueError(f"crop size {w}x{h} is not a multiple of {patch} px")
        t[h // patch, w // patch] = True
    return t


def prepare_inputs(prompts: Sequence[Sequence[int]], seeds: Sequence[int], ids: processors.TokenIds,
                   forced_hw: Sequence[Optional[tuple[int, int]]] | None = None,
                   bucket: int = PROMPT_BUCKET) -> DecodeInputs:
    """Right-padded prompt arrays, the unconditional prompts, the per-row state and keys (host side).

    The unconditional prompt of a row is the tail of its prompt from an open image's <racm3:break> (a prompt
    may end inside an image header, e.g. with the size tokens already fed), else just [<racm3:break>].
    `forced_hw` gives (h, w) in 32-px patches per row (or None) for size tokens still to be sampled.
    """
    B = len(prompts)
    if B == 0:
        raise ValueError("no prompts given")
    if len(seeds) != B:
        raise ValueError(f"{len(seeds)} seeds for {B} prompts")
    lens = [len(p) for p in prompts]
    if min(lens) == 0:
        raise ValueError(f"prompt {lens.index(0)} is empty (it needs at least the bos token)")
    width = -(-max(lens) // bucket) * bucket
    prompt = np.zeros((B, width), np.int32)
    tails, states = [], []
    for b, p in enumerate(prompts):
        prompt[b, :len(p)] = p
        st = processors.prompt_state(p, ids)
        states.append(st)
        tails.append(list(p[st["image_start_index"]:]) if st["in_image"] else [ids.image_start])
    uw = -(-max(len(t) for t in tails) // bucket) * bucket
    uncond = np.zeros((B, uw), np.int32)
    for b, t in enumerate(tails):
        uncond[b, :len(t)] = t
    state = processors.initial_state([p[-1] for p in prompts], [s["in_image"] for s in states],
                                     [s["header"] for s in states], [s["h"] for s in states],
                                     [s["w"] for s in states], [s["body"] for s in states])
    keys = jnp.stack([jax.random.key(int(s)) for s in seeds])
    forced = np.full((B, 2), -1, np.int32)
    for b, f in enumerate(forced_hw or [None] * B):
        if f is not None:
            forced[b] = f
    return DecodeInputs(jnp.asarray(prompt), jnp.asarray(lens, jnp.int32), jnp.asarray(uncond),
                        jnp.asarray([len(t) for t in tails], jnp.int32), state, keys, jnp.asarray(forced))


@dataclasses.dataclass
class RowTokens:
    """What one row generated."""

    tokens: list[int]  # generated ids (the final end-of-turn included when it was sampled)
    stopped: str  # "end_of_turn" or "length"
    unfinished_image: Optional[dict]  # {"h", "w", "body_tokens"} when the length limit cut an image, else None
    accepted: Optional[list[int]] = None  # speculative Jacobi decoding: tokens accepted at each model step
    steps: int = 0  # model steps that produced the tokens (the prefill's included; = len(tokens) without SJD)


def generate_tokens(model: DecodeModel, params: Any, prompts: Sequence[Sequence[int]], *, seeds: Sequence[int],
                    settings: processors.SamplingSettings, ids: processors.TokenIds,
                    size_table: np.ndarray | None = None,
                    forced_hw: Sequence[Optional[tuple[int, int]]] | None = None,
                    progress: Callable[[int], None] | None = None, record: bool | str = False,
                    input_sharding: Any = None, jacobi: JacobiSettings | None = None):
    """Runs prefill + the decode loop for a batch of prompts; returns a list of `RowTokens`.

    `jacobi` runs speculative Jacobi decoding (`lumina_jax.sampling.jacobi`) instead of one token per step:
    the same distribution, fewer model steps; each row then reports its tokens accepted per step.

    `progress(step)` is called from the loop every few steps with the number of tokens sampled so far (e.g. a
    tqdm update); generations running at the same time each report to their own function. With `record`,
    returns `(rows, record_dict)` (see `decode.decode`). `input_sharding` (optional) places the inputs.
    """
    if settings.constrain_size and size_table is None:
        raise ValueError("constrain_size=True needs a size_table (see size_table_from_crops)")
    inputs = prepare_inputs(prompts, seeds, ids, forced_hw)
    table = np.asarray(size_table if size_table is not None else np.ones((1, 1), bool), bool)
    forced = [f for f in (forced_hw or []) if f is not None]
    if forced:  # a forced size is always allowed; the table grows to hold it (its shape bounds the size slice)
        n = max(table.shape[0], max(max(f) for f in forced) + 1)
        table = np.pad(table, ((0, n - table.shape[0]), (0, n - table.shape[1])))
        for h, w in forced:
            table[h, w] = True
    table = jnp.asarray(table)
    if input_sharding is not None:
        inputs = jax.device_put(inputs, input_sharding)
        table = jax.device_put(table, input_sharding)
    if jacobi is not None and record:
        raise ValueError("record is not available with speculative Jacobi decoding")
    with progress_listener(progress) as listener:
        if jacobi is None:
            out = decode_jit(model, params, inputs, settings=settings, ids=ids, size_table=table, record=record,
                             progress=listener)
        else:
            out = jacobi_jit(model, params, inputs, settings=settings, ids=ids, jacobi=jacobi, size_table=table,
                             progress=listener)
        out = jax.block_until_ready(out)
    toks = np.asarray(out.tokens)
    st = jax.tree.map(np.asarray, out.state)
    accepted = np.asarray(out.accepted) if jacobi is not None else None
    rows = []
    for b in range(len(prompts)):
        n = int(st.num_generated[b])
        t = toks[b, :n].tolist()
        stopped = "end_of_turn" if n and t[-1] == ids.end_of_turn else "length"
        unfinished = None
        if bool(st.in_image[b]):
            unfinished = {"h": int(st.h[b]) if st.header[b] >= 1 else None,
                          "w": int(st.w[b]) if st.header[b] >= 2 else None, "body_tokens": int(st.body[b])}
        per_step = None if accepted is None else accepted[b][:int(out.steps[b])].tolist()
        rows.append(RowTokens(t, stopped, unfinished, per_step, len(t) if per_step is None else len(per_step)))
    if record:
        return rows, jax.tree.map(np.asarray, out.record)
    return rows


@dataclasses.dataclass
class Segments:
    """A generated sequence split into text and images (docs/reference.md#stopping-and-output)."""

    text_ids: list[int]  # text ids, with `placeholder` where each closed image was, end-of-turn dropped
    images: list[list[int]]  # UniRep tokens of each closed image, <racm3:break> .. <eoss>
    unfinished: Optional[list[int]]  # tokens of an image still open at the end (reported, not dropped silently)


def split_generation(tokens: Sequence[int], ids: processors.TokenIds, placeholder: int = -1,
                     drop_end_of_turn: bool = True) -> Segments:
    """Scans left to right: each <racm3:break> .. <eoss> span becomes one image and one placeholder."""
    toks = list(tokens)
    if drop_end_of_turn and toks and toks[-1] == ids.end_of_turn:
        toks = toks[:-1]
    text, images, i = [], [], 0
    while i < len(toks):
        if toks[i] == ids.image_start:
            try:
                j = toks.index(ids.image_end, i + 1)
            except ValueError:
                return Segments(text, images, toks[i:])
            images.append(toks[i:j + 1])
            text.append(placeholder)
            i = j + 1
        else:
            text.append(toks[i])
            i += 1
    return Segments(text, images, None)


def decode_images(image_tokens: Sequence[Sequence[int]], image_tokenizer, special, max_batch: int = 16) -> list:
    """UniRep token lists -> PIL images, one VQGAN batch per latent size (input order kept).

    An image with a broken layout gives a `UniRepError` string in its place instead of an image.
    """
    out: list[Any] = [None] * len(image_tokens)
    valid, grids = [], []
    for i, t in enumerate(image_tokens):
        try:
            grids.append(unirep_to_codes(t, special)[0])
            valid.append(i)
        except UniRepError as e:
            out[i] = f"invalid image: {e}"
    decode = lambda chunk: image_tokenizer.decode_to_pil(np.stack(chunk))
    for i, im in zip(valid, map_batched_by_shape(grids, lambda c: c.shape, decode, max_batch)):
        out[i] = im
    return out
