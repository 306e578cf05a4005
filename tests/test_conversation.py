"""Conversation template and label masks (docs/reference.md#conversation-format-and-labels), placeholders, multi-turn, text-only, inference prompts."""
import numpy as np
import pytest

from lumina_jax.conversation import IGNORE, ConversationError, build_prompt, encode_conversation
from lumina_jax.testing.tokenizer import write_text_tokenizer_json
from lumina_jax.tokenizer import load_tokenizer
from lumina_jax.unirep import codes_to_unirep


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(write_text_tokenizer_json(str(tmp_path_factory.mktemp("tok") / "t.json")))


def conv(*msgs):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": m} for i, m in enumerate(msgs)]


def test_t2i_item_matches_spec_example(tok):
    tokenizer, sp = tok
    img = codes_to_unirep(np.arange(8).reshape(2, 4), sp)  # 1x2 patches: [8197, 8805, 8806, c*4, 8803, c*4, 8803, 8196]
    prompt = "Generate an image of 64x32 according to the following prompt:\nA red fox"
    tokens, labels = encode_conversation(conv(prompt, "<|image|>"), tokenizer, sp, [img])
    p = tokenizer.encode(prompt)
    assert tokens.tolist() == [0, *p, 8710, 8197, 8805, 8806, 4, 5, 6, 7, 8803, 8, 9, 10, 11, 8803, 8196, 8710]
    assert labels.tolist() == [IGNORE] * (1 + len(p) + 1) + tokens[len(p) + 2:].tolist()


def test_two_turn_label_masks(tok):
    """Human turns (with their separators and images) and bos masked; assistant turns and separators kept."""
    tokenizer, sp = tok
    img = codes_to_unirep(np.zeros((2, 2), int), sp)
    msgs = ["Describe the image. <|image|>", "A fox.", "And the sky?", "It is orange."]
    tokens, labels = encode_conversation(conv(*msgs), tokenizer, sp, [img])
    h1 = tokenizer.encode("Describe the image. ") + img.tolist() + [8710]
    a1 = tokenizer.encode("A fox.") + [8710]
    h2 = tokenizer.encode("And the sky?") + [8710]
    a2 = tokenizer.encode("It is orange.") + [8710]
    assert tokens.tolist() == [0] + h1 + a1 + h2 + a2
    assert labels.tolist() == [IGNORE] * (1 + len(h1)) + a1 + [IGNORE] * len(h2) + a2
    # the reference tokenizes the whole conversation string and asserts the pieces agree: so do we
    text = "".join(m + "<reserved08706>" for m in ["A fox.", "And the sky?", "It is orange."])
    assert tokens[1 + len(h1):].tolist() == tokenizer.encode(text)


def test_placeholders_several_images_and_implicit_prefix(tok):
    tokenizer, sp = tok
    a, b = (codes_to_unirep(np.full((2, 2), c), sp) for c in (1, 2))
    tokens, labels = encode_conversation(conv("<|image|> then <|image|> compare", "same"), tokenizer, sp, [a, b])
    expected = [0, *a, *tokenizer.encode(" then "), *b, *tokenizer.encode(" compare"), 8710]
    assert tokens.tolist()[:len(expected)] == expected
    # no placeholder: "<|image|> " * n is prepended to the first human message (reference behaviour)
    t2, _ = encode_conversation(conv("compare", "same"), tokenizer, sp, [a, b])
    assert t2.tolist() == [0, *a, *tokenizer.encode(" "), *b, *tokenizer.encode(" compare"), 8710,
                           *tokenizer.encode("same"), 8710]
    with pytest.raises(ConversationError, match="2 <\\|image\\|> placeholder\\(s\\) but 1 image"):
        encode_conversation(conv("<|image|><|image|>", "x"), tokenizer, sp, [a])


def test_text_only_and_errors(tok):
    tokenizer, sp = tok
    tokens, labels = encode_conversation(conv("hello", "hi there"), tokenizer, sp)
    assert (labels != IGNORE).sum() == len(tokenizer.encode("hi there")) + 1
    with pytest.raises(ConversationError, match="turn 1 is from 'human'"):
        encode_conversation([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], tokenizer, sp)
    with pytest.raises(ConversationError, match="nothing to predict"):
        encode_conversation(conv("only a question"), tokenizer, sp)
    with pytest.raises(ConversationError, match="only a final assistant turn may be None"):
        encode_conversation(conv("q", None), tokenizer, sp)


def test_inference_prompt(tok):
    tokenizer, sp = tok
    img = codes_to_unirep(np.zeros((2, 2), int), sp)
    ids = build_prompt([("Describe. <|image|>", "A fox. <|image|>"), ("Again", None)], tokenizer, sp, [img, img])
    assert ids[0] == 0 and ids[-1] == 8710 and ids.count(8197) == 2
    assert ids == [0, *tokenizer.encode("Describe. "), *img, 8710, *tokenizer.encode("A fox. "), *img, 8710,
                   *tokenizer.encode("Again"), 8710]
    with pytest.raises(ConversationError, match="must be None"):
        build_prompt([("q", "a")], tokenizer, sp)
