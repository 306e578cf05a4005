"""Train a SentencePiece text tokenizer with Chameleon's special-id layout (for new, smaller vocabularies).

    python -m lumina_jax.tokenizer_train --input corpus.txt --out-prefix DIR/tok --text-vocab-size 4000

The model's ids 0..3 are `<s>`, `<pad>`, `</s>`, `<unk>`; then the image codes `IMGIMG...Z` (code c at c+4),
`<eoss>`, `<racm3:break>` and `<reservedNNNNN>` at NNNNN+4, exactly as in Chameleon's vocabulary
(docs/reference.md#special-ids), so `SpecialIds` finds the same ids; the learned text pieces follow. Byte fallback is on, so any text encodes.
Pieces are encoded without a dummy prefix space, so a conversation encoded turn by turn equals the whole.
"""
from __future__ import annotations

import argparse
import os
import sys

from lumina_jax.tokenizer import image_token_name


def special_symbols(num_image_codes: int, reserved_end: int) -> list[str]:
    """User-defined symbols in id order from id 4: image codes, `<eoss>`, `<racm3:break>`, reserved names."""
    syms = [image_token_name(c) for c in range(num_image_codes)] + ["<eoss>", "<racm3:break>"]
    # Reserved names keep their meaning (`<reserved08706>` = end of turn, 088xx = sizes); with 8192 codes
    # they also land at their Chameleon ids (NNNNN + 4).
    syms += [f"<reserved{n:05d}>" for n in range(8194, reserved_end - 4)]
    return syms


def train(input_files: list[str], out_prefix: str, text_vocab_size: int, num_image_codes: int = 8192,
          reserved_end: int = 9000, model_type: str = "bpe", seed: int = 0, character_coverage: float = 1.0,
          input_sentence_size: int = 0) -> str:
    """Train and write `<out_prefix>.model` / `.vocab`; return the model path."""
    import sentencepiece as spm

    for p in input_files:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p}: training corpus file does not exist")
    syms = special_symbols(num_image_codes, reserved_end)
    spm.set_random_generator_seed(seed)
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    spm.SentencePieceTrainer.Train(
        input=input_files, model_prefix=out_prefix, model_type=model_type,
        vocab_size=4 + len(syms) + text_vocab_size,
        bos_id=0, pad_id=1, eos_id=2, unk_id=3,
        bos_piece="<s>", pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        user_defined_symbols=syms, byte_fallback=True, add_dummy_prefix=False,
        remove_extra_whitespaces=False, normalization_rule_name="identity", split_digits=True,
        character_coverage=character_coverage, input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True, hard_vocab_limit=False, minloglevel=2,
    )
    return out_prefix + ".model"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lumina_jax.tokenizer_train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="plain-text corpus file(s), one sentence per line")
    p.add_argument("--out-prefix", required=True, help="output path prefix; writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--text-vocab-size", type=int, default=8000,
                   help="number of learned text pieces (byte pieces included) on top of the special block")
    p.add_argument("--num-image-codes", type=int, default=8192, help="VQGAN codebook size (IMGIMG names)")
    p.add_argument("--reserved-end", type=int, default=9000,
                   help="reserved names <reserved08194>..<reserved{RESERVED_END-5}> (must cover 08800 + max patches)")
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"], help="SentencePiece model type")
    p.add_argument("--seed", type=int, default=0, help="seed of SentencePiece's sentence sampling")
    p.add_argument("--character-coverage", type=float, default=1.0, help="share of characters kept as pieces")
    p.add_argument("--input-sentence-size", type=int, default=0,
                   help="sample at most this many sentences (0 = all)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    path = train(args.input, args.out_prefix, args.text_vocab_size, args.num_image_codes, args.reserved_end,
                 args.model_type, args.seed, args.character_coverage, args.input_sentence_size)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
