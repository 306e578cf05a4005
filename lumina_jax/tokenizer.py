"""Text tokenizer (tokenizers JSON, Hugging Face directory or SentencePiece) and the special ids of the vocabulary.

`TextTokenizer.load(path)` picks the backend from the path: a `.json` file (Chameleon's `text_tokenizer.json`,
loaded with `tokenizers`), a directory holding `tokenizer.json` (a Hugging Face tokenizer directory such as
Lumina-mGPT's) or a `.model` file (SentencePiece). `SpecialIds.from_tokenizer(tok)` looks every special id up
by name once and builds the image-code <-> token-id tables from the vocabulary's `IMGIMG` names.

SentencePiece models trained by `lumina_jax.tokenizer_train` add no dummy prefix, so a conversation encoded
message by message equals the whole; a foreign model that adds one (e.g. Llama's) puts a prefix space on
every message, where the reference strips it from all but the first (`encode_wo_prefix_space`).

Differences from the reference: the ids are looked up once and cached (the reference rebuilds the 65k-entry
vocabulary dict on every `token2id` call); the image-code table is validated instead of assumed.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Sequence

import numpy as np
import sentencepiece as spm
from tokenizers import Tokenizer

IMAGE_NAME_PREFIX = "IMGIMG"
NAMES = {  # role -> vocabulary name: the one table of special tokens (ids come from a vocabulary or the layout below)
    "bos": "<s>",
    "pad": "<pad>",
    "eos": "</s>",
    "image_end": "<eoss>",
    "image_start": "<racm3:break>",
    "end_of_turn": "<reserved08706>",
    "new_line": "<reserved08799>",
    "size_base": "<reserved08800>",
}
SIZE_RESERVED_BASE = 8800  # size token for n patches is `<reserved{8800+n:05d}>`
MAX_SIZE_PATCHES = 128  # size tokens checked up to this many 32-px patches (4096 px)

# Chameleon's vocabulary layout, which `tokenizer_train` also writes for any number n of image codes:
# LAYOUT_HEAD at ids 0..3, the n image codes from id 4 (code c at c + 4), LAYOUT_AFTER_IMAGES, then
# `<reservedNNNNN>` for NNNNN = FIRST_RESERVED, FIRST_RESERVED + 1, ... (with n = 8192: at id NNNNN + 4).
LAYOUT_HEAD = ("<s>", "<pad>", "</s>", "<unk>")
LAYOUT_AFTER_IMAGES = ("<eoss>", "<racm3:break>")
FIRST_RESERVED = 8194


class TextTokenizer:
    """Text <-> ids with one of three backends; `encode` adds no special tokens (no bos)."""

    def __init__(self, backend: str, impl, source: str):
        self.backend = backend  # "tokenizers" or "sentencepiece"
        self._impl = impl
        self.source = source
        if backend == "tokenizers":
            self._vocab = dict(impl.get_vocab(with_added_tokens=True))
        else:
            self._vocab = {impl.id_to_piece(i): i for i in range(impl.get_piece_size())}
        self._inv = {i: n for n, i in self._vocab.items()}

    @classmethod
    def load(cls, path: str) -> "TextTokenizer":
        """Load from a `tokenizers` JSON file, a Hugging Face tokenizer directory or a SentencePiece `.model`."""
        path = os.fspath(path)
        if os.path.isdir(path):
            json_path = os.path.join(path, "tokenizer.json")
            spm_path = os.path.join(path, "tokenizer.model")
            if os.path.exists(json_path):
                return cls._from_json(json_path, source=path)
            if os.path.exists(spm_path):
                return cls._from_sentencepiece(spm_path)
            raise FileNotFoundError(f"{path}: tokenizer directory has neither tokenizer.json nor tokenizer.model")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: tokenizer file does not exist")
        if path.endswith(".model"):
            return cls._from_sentencepiece(path)
        return cls._from_json(path, source=path)

    @classmethod
    def _from_json(cls, path: str, source: str) -> "TextTokenizer":
        try:
            impl = Tokenizer.from_file(path)
        except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception subclasses
            raise ValueError(f"{path}: not a readable tokenizers JSON file ({e})") from None
        return cls("tokenizers", impl, source)

    @classmethod
    def _from_sentencepiece(cls, path: str) -> "TextTokenizer":
        impl = spm.SentencePieceProcessor()
        try:
            impl.Load(path)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path}: not a readable SentencePiece model ({e})") from None
        return cls("sentencepiece", impl, path)

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    @property
    def vocab(self) -> dict[str, int]:
        """name -> id (built once; do not mutate)."""
        return self._vocab

    def token_to_id(self, name: str) -> int | None:
        return self._vocab.get(name)

    def id_to_token(self, i: int) -> str | None:
        return self._inv.get(int(i))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without bos/eos. Special names in the text (e.g. `<reserved08706>`) map to their ids."""
        if self.backend == "tokenizers":
            return self._impl.encode(text, add_special_tokens=False).ids
        return list(self._impl.EncodeAsIds(text))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special tokens are kept (as the reference's `tokenizer.decode`)."""
        ids = [int(i) for i in ids]
        if self.backend == "tokenizers":
            return self._impl.decode(ids, skip_special_tokens=False)
        return self._impl.DecodeIds(ids)


def image_token_name(code: int) -> str:
    """Vocabulary name of image code `code`: digits written as letters A..J, framed by IMGIMG ... Z."""
    return IMAGE_NAME_PREFIX + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def parse_image_token_name(name: str) -> int:
    """Image code of a vocabulary name `IMGIMG<letters A..J>Z` (letters are digits 0..9; the last char is dropped)."""
    body = name[len(IMAGE_NAME_PREFIX):-1]
    if not name.startswith(IMAGE_NAME_PREFIX) or not body or any(not ("A" <= c <= "J") for c in body):
        raise ValueError(f"image token name {name!r} is not IMGIMG<letters A..J><suffix>")
    return int("".join(str(ord(c) - ord("A")) for c in body))


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """Special token ids and the image-code tables: looked up once by name in a vocabulary (`from_vocab`), or
    placed by the layout rule for a model without a tokenizer (`from_layout`); see docs/reference.md#special-ids.

    `img2bpe[code]` is the token id of image code `code`; `bpe2img[id]` is the code of token `id` or -1.
    `image_ids_are_offset` says whether the table is the expected `id = code + image_token_start` layout.
    """

    bos: int
    pad: int | None
    eos: int
    image_start: int  # <racm3:break> (8197)
    image_end: int  # <eoss> (8196)
    end_of_turn: int  # <reserved08706> (8710): turn separator and generation stop token
    new_line: int  # <reserved08799> (8803): end of every UniRep row
    size_base: int  # <reserved08800> (8804): size token of n patches is size_base + n
    max_size_patches: int  # largest n whose size token exists at size_base + n
    img2bpe: np.ndarray  # (num_codes,) int32
    bpe2img: np.ndarray  # (vocab_size,) int32, -1 for non-image ids
    image_ids_are_offset: bool

    @property
    def num_image_codes(self) -> int:
        return int(self.img2bpe.shape[0])

    @property
    def image_token_start(self) -> int:
        return int(self.img2bpe.min())

    @property
    def image_token_end(self) -> int:
        """One past the largest image token id."""
        return int(self.img2bpe.max()) + 1

    def size_token(self, patches: int) -> int:
        if not 1 <= patches <= self.max_size_patches:
            raise ValueError(f"size of {patches} patches has no size token (1..{self.max_size_patches})")
        return self.size_base + patches

    def check_image_range(self, image_token_start: int, image_token_end: int, source: str) -> None:
        """Raises ValueError unless [start, end) is exactly this vocabulary's image-token range."""
        if (image_token_start, image_token_end) != (self.image_token_start, self.image_token_end):
            raise ValueError(f"{source}: image_token_start/end = [{image_token_start}, {image_token_end}) but the "
                             f"tokenizer's image tokens are ids [{self.image_token_start}, {self.image_token_end})")

    @classmethod
    def from_layout(cls, num_image_codes: int, vocab_size: int, compact: bool = False) -> "SpecialIds":
        """The ids of a vocabulary of `vocab_size` laid out as Chameleon's (see `layout_ids`), for models
        without a tokenizer file (the aot tool, tests). Chameleon's own: `from_layout(8192, 65536)`."""
        need = layout_vocab_size(num_image_codes, compact)
        if num_image_codes < 1 or vocab_size < need:
            raise ValueError(f"a vocabulary of {vocab_size} ids cannot hold {num_image_codes} image codes in the "
                             f"{'compact' if compact else 'Chameleon'} layout (it needs at least {need})")
        ids = layout_ids(num_image_codes, compact)
        img2bpe = (np.arange(num_image_codes) + len(LAYOUT_HEAD)).astype(np.int32)
        bpe2img = np.full(vocab_size, -1, np.int32)
        bpe2img[img2bpe] = np.arange(num_image_codes)
        return cls(bos=ids["bos"], pad=ids["pad"], eos=ids["eos"], image_start=ids["image_start"],
                   image_end=ids["image_end"], end_of_turn=ids["end_of_turn"], new_line=ids["new_line"],
                   size_base=ids["size_base"], max_size_patches=MAX_SIZE_PATCHES, img2bpe=img2bpe, bpe2img=bpe2img,
                   image_ids_are_offset=True)

    @classmethod
    def from_tokenizer(cls, tok: TextTokenizer) -> "SpecialIds":
        return cls.from_vocab(tok.vocab, source=tok.source)

    @classmethod
    def from_vocab(cls, vocab: dict[str, int], source: str = "vocabulary") -> "SpecialIds":
        ids = {}
        for role, name in NAMES.items():
            if name not in vocab:
                if role == "pad":
                    ids[role] = None
                    continue
                raise ValueError(f"{source}: special token {name!r} ({role}) is not in the vocabulary")
            ids[role] = int(vocab[name])
        max_n = 0
        for n in range(1, MAX_SIZE_PATCHES + 1):
            name = f"<reserved{SIZE_RESERVED_BASE + n:05d}>"
            if name not in vocab:
                break
            if vocab[name] != ids["size_base"] + n:
                raise ValueError(f"{source}: size token {name!r} has id {vocab[name]}, expected {ids['size_base'] + n}")
            max_n = n
        img2bpe, bpe2img, offset = build_image_tables(vocab, source)
        return cls(bos=ids["bos"], pad=ids["pad"], eos=ids["eos"], image_start=ids["image_start"],
                   image_end=ids["image_end"], end_of_turn=ids["end_of_turn"], new_line=ids["new_line"],
                   size_base=ids["size_base"], max_size_patches=max_n, img2bpe=img2bpe, bpe2img=bpe2img,
                   image_ids_are_offset=offset)


def _reserved_number(name: str) -> int:
    return int(name[len("<reserved"):-1])


def layout_ids(num_image_codes: int, compact: bool = False) -> dict[str, int]:
    """Role -> id of every role in `NAMES` for a vocabulary laid out as Chameleon's with `num_image_codes` codes.

    `compact=True` keeps only the reserved names the sampler uses (end of turn, new line, the size tokens),
    packed right after `<racm3:break>`: the layout of the tiny test models, whose vocabularies are too small
    for the reserved block.
    """
    first = len(LAYOUT_HEAD) + num_image_codes + len(LAYOUT_AFTER_IMAGES)  # id of the first reserved name
    packed = sorted({_reserved_number(n) for n in NAMES.values() if n.startswith("<reserved")})
    ids = {}
    for role, name in NAMES.items():
        if name in LAYOUT_HEAD:
            ids[role] = LAYOUT_HEAD.index(name)
        elif name in LAYOUT_AFTER_IMAGES:
            ids[role] = len(LAYOUT_HEAD) + num_image_codes + LAYOUT_AFTER_IMAGES.index(name)
        elif compact:
            ids[role] = first + packed.index(_reserved_number(name))
        else:
            ids[role] = first + _reserved_number(name) - FIRST_RESERVED
    return ids


def layout_vocab_size(num_image_codes: int, compact: bool = False) -> int:
    """The smallest vocabulary that holds the layout's special ids and all MAX_SIZE_PATCHES size tokens."""
    return layout_ids(num_image_codes, compact)["size_base"] + MAX_SIZE_PATCHES + 1


def build_image_tables(vocab: dict[str, int], source: str = "vocabulary") -> tuple[np.ndarray, np.ndarray, bool]:
    """(img2bpe, bpe2img, is_offset) from the `IMGIMG` names, checking that codes are exactly 0..n-1 once each."""
    entries = sorted((i, n) for n, i in vocab.items() if n.startswith(IMAGE_NAME_PREFIX))
    if not entries:
        raise ValueError(f"{source}: no IMGIMG image tokens in the vocabulary")
    codes = np.array([parse_image_token_name(n) for _, n in entries], np.int64)
    bpe = np.array([i for i, _ in entries], np.int64)
    n = len(entries)
    seen = np.zeros(n, bool)
    for c, (i, name) in zip(codes, entries):
        if c >= n:
            raise ValueError(f"{source}: image token {name!r} (id {i}) has code {c}, outside 0..{n - 1}")
        if seen[c]:
            raise ValueError(f"{source}: image code {c} appears twice (second time as {name!r}, id {i})")
        seen[c] = True
    img2bpe = np.empty(n, np.int32)
    img2bpe[codes] = bpe
    vocab_size = max(max(vocab.values()) + 1, int(bpe.max()) + 1)
    bpe2img = np.full(vocab_size, -1, np.int32)
    bpe2img[bpe] = codes
    offset = bool(np.array_equal(img2bpe, np.arange(n) + img2bpe[0]))
    if not offset:
        warnings.warn(f"{source}: image token ids are not code + {int(img2bpe[0])}; using the table from the names")
    return img2bpe, bpe2img, offset


def load_tokenizer(path: str) -> tuple[TextTokenizer, SpecialIds]:
    """Convenience: the tokenizer at `path` and its special ids."""
    tok = TextTokenizer.load(path)
    return tok, SpecialIds.from_tokenizer(tok)


def vocab_from_json(path: str) -> dict[str, int]:
    """name -> id of a tokenizers JSON file, read without building the tokenizer (model vocab plus added tokens)."""
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    vocab = dict(d["model"]["vocab"])
    vocab.update({a["content"]: a["id"] for a in d.get("added_tokens", [])})
    return vocab


if __name__ == "__main__":  # `python -m lumina_jax.tokenizer train ...` is the SentencePiece trainer
    import sys

    from lumina_jax.tokenizer_train import main

    if sys.argv[1:2] == ["train"]:
        sys.argv.pop(1)
    sys.exit(main())
