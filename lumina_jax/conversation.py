"""Conversations -> (tokens, labels) with Lumina-mGPT's template and label masking.

The rules are the reference's (docs/reference.md#conversation-format-and-labels).

A conversation is a list of turns alternating human (even index) and assistant (odd index). Each message is
followed by the turn separator `<reserved08706>` (8710); roles are never rendered. `<|image|>` in a message
marks where the next image's UniRep tokens go. The bos token and every human turn (its images and its
separator included) get label -100; assistant turns, their images and their separators are supervised.

Differences from the reference: text-only items are supported (the reference's pre-tokenizer drops them);
each message is encoded on its own (the reference encodes the whole string and asserts that the pieces match,
which holds for tokenizers that split on special tokens, as Chameleon's does); mistakes raise one-line errors.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from lumina_jax.tokenizer import SpecialIds, TextTokenizer

IMAGE_PLACEHOLDER = "<|image|>"
IGNORE = -100  # label of an unsupervised token
HUMAN_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")


class ConversationError(ValueError):
    """A conversation that cannot be turned into tokens (wrong roles, placeholder count, nothing to learn)."""


def _messages(conversations: Sequence[dict], allow_open_end: bool) -> list[str | None]:
    msgs = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ConversationError(f"turn {i} must be a dict with 'from' and 'value', got {turn!r:.80}")
        role = str(turn["from"]).lower()
        expected = HUMAN_ROLES if i % 2 == 0 else ASSISTANT_ROLES
        if role not in expected:
            raise ConversationError(f"turn {i} is from {turn['from']!r}, expected one of {expected}")
        value = turn["value"]
        if value is None and not (allow_open_end and i == len(conversations) - 1 and i % 2 == 1):
            raise ConversationError(f"turn {i} has no value (only a final assistant turn may be None, at inference)")
        if value is not None and not isinstance(value, str):
            raise ConversationError(f"turn {i} value must be a string, got {type(value).__name__}")
        msgs.append(value)
    if not msgs:
        raise ConversationError("conversation has no turns")
    return msgs


def encode_conversation(conversations: Sequence[dict], tokenizer: TextTokenizer, special: SpecialIds,
                        image_tokens: Sequence[Sequence[int]] = (), training: bool = True
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, labels) int32 of one item; labels are -100 where unsupervised.

    `conversations`: [{"from": "human"|"gpt", "value": str}, ...] (the reference's JSON format).
    `image_tokens`: UniRep token ids of each image, in order of appearance. If no message contains
    `<|image|>` but images are given, `"<|image|> " * n` is prepended to the first message (as the reference).
    With `training=True`, an item with nothing supervised is an error (the reference's LabelAllZeroError).
    """
    msgs = _messages(conversations, allow_open_end=not training)
    n_img = len(image_tokens)
    n_ph = sum(m.count(IMAGE_PLACEHOLDER) for m in msgs if m is not None)
    if n_ph == 0 and n_img:
        msgs[0] = IMAGE_PLACEHOLDER + " " + (IMAGE_PLACEHOLDER + " ") * (n_img - 1) + msgs[0]
    elif n_ph != n_img:
        raise ConversationError(f"{n_ph} {IMAGE_PLACEHOLDER} placeholder(s) but {n_img} image(s)")
    tokens: list[np.ndarray] = [np.asarray([special.bos], np.int32)]
    labels: list[np.ndarray] = [np.asarray([IGNORE], np.int32)]
    next_image = 0
    for i, msg in enumerate(msgs):
        if msg is None:
            continue
        parts: list[np.ndarray] = []
        for k, segment in enumerate(msg.split(IMAGE_PLACEHOLDER)):
            if k:
                parts.append(np.asarray(image_tokens[next_image], np.int32))
                next_image += 1
            if segment:
                parts.append(np.asarray(tokenizer.encode(segment), np.int32))
        parts.append(np.asarray([special.end_of_turn], np.int32))
        piece = np.concatenate(parts)
        tokens.append(piece)
        labels.append(piece if i % 2 == 1 else np.full(piece.shape, IGNORE, np.int32))
    tok, lab = np.concatenate(tokens), np.concatenate(labels)
    if training and not (lab != IGNORE).any():
        raise ConversationError("nothing to predict: the conversation has no assistant turn")
    return tok, lab


def build_prompt(turns: Sequence[tuple[str, str | None]], tokenizer: TextTokenizer, special: SpecialIds,
                 image_tokens: Sequence[Sequence[int]] = ()) -> list[int]:
    """Inference prompt ids `[bos, ..., 8710]` from (human, assistant) turns; the last assistant is None.

    `image_tokens` are the UniRep ids of the images (e.g. from `unirep.images_to_unirep`), one per
    `<|image|>` in the turns, in order. Previous assistant answers may contain `<|image|>` for the images
    they generated. Generation continues straight after the final separator.
    """
    if not turns or turns[-1][1] is not None:
        raise ConversationError("the last turn's assistant answer must be None (it is what gets generated)")
    conv = []
    for q, a in turns:
        conv.append({"from": "human", "value": q})
        conv.append({"from": "gpt", "value": a})
    tokens, _ = encode_conversation(conv, tokenizer, special, image_tokens, training=False)
    return tokens.tolist()
