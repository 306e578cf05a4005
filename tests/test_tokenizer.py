"""Text tokenizer backends, special ids by name, the image-code table, the layout rule, and the SentencePiece
trainer."""
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from lumina_jax import tokenizer_train
from lumina_jax.testing.tokenizer import chameleon_like_tokenizer_json, write_hf_tokenizer_dir, \
    write_text_tokenizer_json
from lumina_jax.tokenizer import SpecialIds, TextTokenizer, build_image_tables, image_token_name, layout_vocab_size, \
    load_tokenizer, parse_image_token_name

DEMO_TOKENIZER = Path(__file__).resolve().parents[1] / "lumina_jax" / "demo_weights" / "tokenizer" / "tok.model"

TEXTS = [
    "Generate an image of 768x768 according to the following prompt:\nA red fox in the snow.",
    "Describe the image in detail. ",
    "  leading spaces, tabs\tand unicode: café, 東京, 🦊",
    "turn one<reserved08706>turn two<reserved08706>",
    "",
]


@pytest.fixture(scope="module")
def tok_json(tmp_path_factory):
    return write_text_tokenizer_json(str(tmp_path_factory.mktemp("tok") / "text_tokenizer.json"))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return write_hf_tokenizer_dir(str(tmp_path_factory.mktemp("hf")))


def test_builder_layout_is_chameleon_like():
    d = chameleon_like_tokenizer_json()
    vocab = d["model"]["vocab"]
    assert len(vocab) == 65536 and sorted(vocab.values()) == list(range(65536))
    assert [vocab[n] for n in ("<s>", "<pad>", "</s>", "<unk>", "<eoss>", "<racm3:break>")] == [0, 1, 2, 3, 8196, 8197]
    assert vocab["IMGIMGAZ"] == 4 and vocab["IMGIMGIBJBZ"] == 8195  # code 8191 -> "IBJB"
    assert vocab["<reserved08706>"] == 8710 and vocab["<reserved08799>"] == 8803 and vocab["<reserved08800>"] == 8804
    assert chameleon_like_tokenizer_json() == d  # deterministic


def test_special_ids_from_text_tokenizer_json(tok_json):
    tok, sp = load_tokenizer(tok_json)
    assert tok.backend == "tokenizers" and tok.vocab_size == 65536
    assert (sp.bos, sp.pad, sp.eos, sp.image_start, sp.image_end, sp.end_of_turn, sp.new_line, sp.size_base) == \
        (0, 1, 2, 8197, 8196, 8710, 8803, 8804)
    assert sp.image_ids_are_offset and sp.num_image_codes == 8192
    np.testing.assert_array_equal(sp.img2bpe, np.arange(8192) + 4)
    assert sp.bpe2img.shape == (65536,)
    np.testing.assert_array_equal(sp.bpe2img[sp.img2bpe], np.arange(8192))
    assert (sp.bpe2img[:4] == -1).all() and (sp.bpe2img[8196:] == -1).all()
    assert sp.size_token(16) == 8820 and sp.max_size_patches == 128
    with pytest.raises(ValueError, match="has no size token"):
        sp.size_token(0)


def test_hf_directory_matches_transformers(hf_dir, tok_json):
    """Our tokenizers-backed encode/decode against transformers' PreTrainedTokenizerFast on the same directory."""
    from transformers import AutoTokenizer

    ours = TextTokenizer.load(hf_dir)
    theirs = AutoTokenizer.from_pretrained(hf_dir)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        assert ours.decode(ids) == text
    assert ours.encode("<reserved08706>") == [8710] and ours.token_to_id("<image>") == 8711
    sp = SpecialIds.from_tokenizer(ours)  # the renamed <reserved08707> does not matter
    assert sp.end_of_turn == 8710
    plain = TextTokenizer.load(tok_json)
    assert all(plain.encode(t) == ours.encode(t) for t in TEXTS)


def test_image_name_parsing_and_table_validation():
    assert parse_image_token_name(image_token_name(0)) == 0
    assert parse_image_token_name(image_token_name(8191)) == 8191
    with pytest.raises(ValueError, match="IMGIMGXYZ"):
        parse_image_token_name("IMGIMGXYZ")
    vocab = {image_token_name(c): 10 + c for c in range(4)}
    img2bpe, bpe2img, offset = build_image_tables(vocab)
    assert offset and img2bpe.tolist() == [10, 11, 12, 13] and bpe2img[12] == 2
    dup = dict(vocab)
    dup[image_token_name(1)[:-1] + "Y"] = 20  # code 1 again, another suffix
    with pytest.raises(ValueError, match="image code 1 appears twice"):
        build_image_tables(dup)
    with pytest.raises(ValueError, match="outside 0..3"):
        build_image_tables({**{k: v for k, v in vocab.items() if v != 13}, image_token_name(7): 13})
    shuffled = {image_token_name(c): i for c, i in zip(range(4), [11, 10, 13, 12])}
    with pytest.warns(UserWarning, match="not code"):
        img2bpe, bpe2img, offset = build_image_tables(shuffled)
    assert not offset and img2bpe.tolist() == [11, 10, 13, 12] and bpe2img[10] == 1


def test_missing_special_token_is_named(tmp_path):
    d = chameleon_like_tokenizer_json()
    d["model"]["vocab"]["<racm3:brk>"] = d["model"]["vocab"].pop("<racm3:break>")
    d["added_tokens"] = [a for a in d["added_tokens"] if a["content"] != "<racm3:break>"]
    p = tmp_path / "t.json"
    p.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"'<racm3:break>' \(image_start\) is not in the vocabulary"):
        load_tokenizer(str(p))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TextTokenizer.load(str(tmp_path / "nope.json"))
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor tokenizer.model"):
        TextTokenizer.load(str(tmp_path))


def test_sentencepiece_training_keeps_chameleon_ids(tmp_path):
    rng = np.random.default_rng(0)
    words = "the a cat dog sits on mat red fox snow image photo generate according prompt sky sun".split()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words, 10)) for _ in range(500)))
    assert tokenizer_train.main(["--input", str(corpus), "--out-prefix", str(tmp_path / "spm" / "tok"),
                                 "--text-vocab-size", "300"]) == 0
    tok, sp = load_tokenizer(str(tmp_path / "spm" / "tok.model"))
    assert tok.backend == "sentencepiece"
    assert (sp.bos, sp.pad, sp.eos, sp.image_start, sp.image_end, sp.end_of_turn, sp.new_line, sp.size_base) == \
        (0, 1, 2, 8197, 8196, 8710, 8803, 8804)
    assert sp.image_ids_are_offset and sp.num_image_codes == 8192
    assert tok.vocab_size < 9000 + 300 + 1
    for text in ["the red fox sits on the mat", "unseen wörds ✓ 123"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text  # byte fallback: nothing is lost
        assert all(i >= 9000 or i == 3 for i in ids) and 3 not in ids
    assert tok.encode("the red fox") == tok.encode("the red") + tok.encode(" fox")  # no dummy prefix
    assert tok.encode("a<reserved08706>") == tok.encode("a") + [8710]


def assert_same_ids(a: SpecialIds, b: SpecialIds, skip=()):
    for f in dataclasses.fields(SpecialIds):
        if f.name in skip:
            continue
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray):
            np.testing.assert_array_equal(x, y, err_msg=f.name)
        else:
            assert x == y, f.name


def test_layout_rule_gives_the_ids_real_vocabularies_have(tok_json):
    """`SpecialIds.from_layout` (ids placed by rule) against name lookups in real files: Chameleon's layout with
    8192 codes, and the shipped demo tokenizer (written by tokenizer_train) with 512 codes."""
    assert_same_ids(SpecialIds.from_layout(8192, 65536), load_tokenizer(tok_json)[1])
    demo_tok, demo = load_tokenizer(str(DEMO_TOKENIZER))
    assert demo.num_image_codes == 512
    # the demo vocabulary holds fewer reserved names, so fewer size tokens than the rule's MAX_SIZE_PATCHES
    assert_same_ids(SpecialIds.from_layout(512, demo_tok.vocab_size), demo, skip=("max_size_patches",))


def test_compact_layout_and_range_checks():
    sp = SpecialIds.from_layout(256, 400, compact=True)  # the tiny test models' layout
    assert (sp.image_token_start, sp.image_token_end, sp.image_end, sp.image_start, sp.end_of_turn, sp.new_line,
            sp.size_base) == (4, 260, 260, 261, 262, 263, 264)
    assert layout_vocab_size(256, compact=True) == 264 + 128 + 1
    with pytest.raises(ValueError, match="vocabulary of 512 ids cannot hold 256 image codes in the Chameleon layout"):
        SpecialIds.from_layout(256, 512)
    sp.check_image_range(4, 260, "config.json")
    with pytest.raises(ValueError, match=r"config.json: image_token_start/end = \[4, 300\) .* ids \[4, 260\)"):
        sp.check_image_range(4, 300, "config.json")
