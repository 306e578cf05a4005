"""A Chameleon-like `text_tokenizer.json` for tests: the real special names at the real ids, tiny BPE text part.

Layout (docs/reference.md#special-ids): `<s>` 0, `<pad>` 1, `</s>` 2, `<unk>` 3, `IMGIMG<letters>Z` at 4..8195 (code c at c+4),
`<eoss>` 8196, `<racm3:break>` 8197, `<reservedNNNNN>` at NNNNN+4 for ids 8198..`RESERVED_END-1`, then the
256 byte-level symbols and a few hundred BPE merges learned (deterministically) from a fixed English text,
then filler `<reservedNNNNN>` entries up to 65,536. Building it takes well under a second.
"""
from __future__ import annotations

import collections
import json
import os

from tokenizers import pre_tokenizers

from lumina_jax.tokenizer import image_token_name

VOCAB_SIZE = 65536
NUM_IMAGE_CODES = 8192
RESERVED_END = 9000  # ids 8198..8999 are `<reservedNNNNN>` added tokens (covers all size tokens up to 8804+195)
NUM_MERGES = 400

_CORPUS = """
Generate an image of 512x512 according to the following prompt: A photo of a red fox sitting in the snow,
looking at the camera. The sun is setting behind the mountains and the sky is orange and purple.
Describe the image in detail. The image shows a small wooden house next to a lake with a boat.
Depth estimation. Semantic segmentation. Surface normal estimation. Human pose estimation. Detect: the cat.
There is a dog on the left and a person on the right, they are walking together along the beach at noon.
Generate an image according to the provided image, and according to the following caption: a city at night.
What is in this picture? It is a bowl of fruit: apples, oranges, bananas and grapes on a white table.
The quick brown fox jumps over the lazy dog. Hello world! How are you today? I am fine, thank you.
"""


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte -> printable character table used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _learn_merges(num_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE on the fixed corpus; ties broken by the pair itself, so the result is deterministic."""

    words = collections.Counter(
        w for w, _ in pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(" ".join(_CORPUS.split()))
    )
    seqs = {w: list(w) for w in words}
    merges = []
    for _ in range(num_merges):
        pairs = collections.Counter()
        for w, c in words.items():
            s = seqs[w]
            for a, b in zip(s, s[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w in words:
            s, out, i = seqs[w], [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    return merges


def _added(i: int, content: str) -> dict:
    return {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


def chameleon_like_tokenizer_json(num_merges: int = NUM_MERGES) -> dict:
    """The tokenizer as a `tokenizers` JSON dict (see the module docstring for the id layout)."""
    vocab: dict[str, int] = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    added = [_added(i, n) for n, i in vocab.items()]
    for code in range(NUM_IMAGE_CODES):
        vocab[image_token_name(code)] = code + 4
    vocab["<eoss>"] = 8196
    vocab["<racm3:break>"] = 8197
    added += [_added(8196, "<eoss>"), _added(8197, "<racm3:break>")]
    for i in range(8198, RESERVED_END):
        name = f"<reserved{i - 4:05d}>"
        vocab[name] = i
        added.append(_added(i, name))
    for ch in sorted(bytes_to_unicode().values()):
        vocab[ch] = len(vocab)
    merges = _learn_merges(num_merges)
    for a, b in merges:
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
    while len(vocab) < VOCAB_SIZE:
        vocab[f"<reserved{len(vocab) - 4:05d}>"] = len(vocab)
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": byte_level, "post_processor": None, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": [[a, b] for a, b in merges]},
    }


def write_text_tokenizer_json(path: str) -> str:
    """Write a Chameleon-like `text_tokenizer.json` to `path` and return the path."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(chameleon_like_tokenizer_json(), f, ensure_ascii=False)
    return path


def write_hf_tokenizer_dir(directory: str) -> str:
    """Write a Hugging Face tokenizer directory as the HF converter does (`<reserved08707>` renamed `<image>`)."""
    os.makedirs(directory, exist_ok=True)
    tok = chameleon_like_tokenizer_json()
    vocab = tok["model"]["vocab"]
    vocab["<image>"] = vocab.pop("<reserved08707>")
    for a in tok["added_tokens"]:
        if a["content"] == "<reserved08707>":
            a["content"] = "<image>"
    with open(os.path.join(directory, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tok, f, ensure_ascii=False)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "pad_token": "<pad>", "sep_token": "<reserved08706>",
              "add_bos_token": False, "add_eos_token": False, "model_max_length": 4096}
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return directory
