"""Train a SentencePiece text tokenizer with Chameleon's special-id layout (for new, smaller vocabularies).

    python -m lumina_jax.tokenizer_train --input corpus.txt --out-prefix DIR/tok --text-vocab-size 4000

The model's ids 0..3 are `<s>`, `<pad>`, `</s>`, `<unk>`; then the image codes `IMGIMG...Z` (code c at c+4),
`<eoss>`, `<racm3:break>` and `<reservedNNNNN>` at NNNNN+4, exactly as in Chameleon's vocabulary
(docs/reference.md#special-ids), so `SpecialIds` finds the same ids; the learned text pieces follow. Byte fallback is on, so any text encodes.
Pieces are encoded without a dummy prefix space, so a conversation encoded turn by turn equals the whole.
"""
from __future__ import annotations

import argparse
import codecs
import os
import shutil
import sys
import tempfile

import sentencepiece as spm

from lumina_jax.tokenizer import image_token_name
from lumina_jax.validation import SEED_MAX, float_flag, int_flag

MIN_RESERVED_END = 8806  # <reserved08800> (the size base) and one size token must exist


def special_symbols(num_image_codes: int, reserved_end: int) -> list[str]:
    """User-defined symbols in id order from id 4: image codes, `<eoss>`, `<racm3:break>`, reserved names."""
    syms = [image_token_name(c) for c in range(num_image_codes)] + ["<eoss>", "<racm3:break>"]
    # Reserved names keep their meaning (`<reserved08706>` = end of turn, 088xx = sizes); with 8192 codes
    # they also land at their Chameleon ids (NNNNN + 4).
    syms += [f"<reserved{n:05d}>" for n in range(8194, reserved_end - 4)]
    return syms


class TokenizerTrainError(Exception):
    """A problem with the corpus, the output or SentencePiece's training; printed as one line, exit status 1."""


def check_corpus(path: str) -> None:
    """The corpus must be a non-empty UTF-8 text file (read in blocks; its first bad byte is named)."""
    if not os.path.isfile(path):
        raise TokenizerTrainError(f"--input {path}: {'is a directory' if os.path.isdir(path) else 'no such file'}")
    decoder = codecs.getincrementaldecoder("utf-8")()
    has_text, offset = False, 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            try:
                text = decoder.decode(block)
            except UnicodeDecodeError as e:
                raise TokenizerTrainError(f"--input {path}: not UTF-8 text (byte {block[e.start]:#04x} at offset "
                                          f"{offset + e.start})") from None
            if "\x00" in text:
                raise TokenizerTrainError(f"--input {path}: holds NUL bytes (a binary file, not text)")
            has_text = has_text or bool(text.strip())
            offset += len(block)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise TokenizerTrainError(f"--input {path}: ends inside a UTF-8 character (truncated?)") from None
    if not has_text:
        raise TokenizerTrainError(f"--input {path}: no text to learn from (empty or only whitespace)")


def train(input_files: list[str], out_prefix: str, text_vocab_size: int, num_image_codes: int = 8192,
          reserved_end: int = 9000, model_type: str = "bpe", seed: int = 0, character_coverage: float = 1.0,
          input_sentence_size: int = 0) -> str:
    """Train and write `<out_prefix>.model` / `.vocab`; return the model path.

    Both files are trained under a temporary prefix beside the output and renamed at the end, so a failed
    or killed run leaves neither; existing output files are never replaced.
    """
    for p in input_files:
        check_corpus(p)
    out_dir = os.path.dirname(os.path.abspath(out_prefix))
    outputs = [out_prefix + ".model", out_prefix + ".vocab"]
    for path in outputs:
        if os.path.lexists(path):
            raise TokenizerTrainError(f"--out-prefix {out_prefix}: {path} already exists (choose another prefix, or "
                                      "move it away first)")
        if os.path.abspath(path) in map(os.path.abspath, input_files):
            raise TokenizerTrainError(f"--out-prefix {out_prefix}: {path} is an input")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise TokenizerTrainError(f"--out-prefix {out_prefix}: cannot create {out_dir} ({e.strerror})") from None
    syms = special_symbols(num_image_codes, reserved_end)
    spm.set_random_generator_seed(seed)
    tmp_dir = tempfile.mkdtemp(prefix=".tokenizer_train-", dir=out_dir)
    tmp_prefix = os.path.join(tmp_dir, "tok")
    linked: list[str] = []
    try:
        spm.SentencePieceTrainer.Train(
            input=input_files, model_prefix=tmp_prefix, model_type=model_type,
            vocab_size=4 + len(syms) + text_vocab_size,
            bos_id=0, pad_id=1, eos_id=2, unk_id=3,
            bos_piece="<s>", pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
            user_defined_symbols=syms, byte_fallback=True, add_dummy_prefix=False,
            remove_extra_whitespaces=False, normalization_rule_name="identity", split_digits=True,
            character_coverage=character_coverage, input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True, hard_vocab_limit=False, minloglevel=2,
        )
        for suffix, path in zip((".model", ".vocab"), outputs):
            os.link(tmp_prefix + suffix, path)  # fails rather than replace a file created meanwhile
            linked.append(path)
    except (RuntimeError, OSError) as e:
        for path in linked:
            os.unlink(path)
        last = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        raise TokenizerTrainError(f"SentencePiece training on {', '.join(input_files)} failed: "
                                  f"{last.rsplit('] ', 1)[-1]}") from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_prefix + ".model"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lumina_jax.tokenizer_train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="plain-text UTF-8 corpus file(s), one sentence per line")
    p.add_argument("--out-prefix", required=True,
                   help="output path prefix; writes PREFIX.model and PREFIX.vocab (neither may exist)")
    p.add_argument("--text-vocab-size", type=int_flag(1, 2**20), default=8000,
                   help="number of learned text pieces (byte pieces included) on top of the special block")
    p.add_argument("--num-image-codes", type=int_flag(1, 2**20), default=8192,
                   help="VQGAN codebook size (IMGIMG names)")
    p.add_argument("--reserved-end", type=int_flag(MIN_RESERVED_END, 2**20), default=9000,
                   help="reserved names <reserved08194>..<reserved{RESERVED_END-5}> (must cover 08800 + max patches; "
                        f">= {MIN_RESERVED_END})")
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"], help="SentencePiece model type")
    p.add_argument("--seed", type=int_flag(0, SEED_MAX), default=0, help="seed of SentencePiece's sentence sampling")
    p.add_argument("--character-coverage", type=float_flag(0.98, 1.0), default=1.0,
                   help="share of characters kept as pieces (SentencePiece accepts 0.98..1)")
    p.add_argument("--input-sentence-size", type=int_flag(0), default=0,
                   help="sample at most this many sentences (0 = all)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        path = train(args.input, args.out_prefix, args.text_vocab_size, args.num_image_codes, args.reserved_end,
                     args.model_type, args.seed, args.character_coverage, args.input_sentence_size)
    except TokenizerTrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
