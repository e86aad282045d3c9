"""Tokenizer against transformers' AutoTokenizer (SmolLM2), and streaming detokenisation."""
from __future__ import annotations

import io
import json

import pytest

from pumice.runtime.tokenizer import StreamDecoder, Tokenizer, TokenizerError

SAMPLES = [
    "Hello world",
    " leading space and trailing space ",
    "Multiple\n\nnew lines\n\n\n  and   spaces\t tabs",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "Unicode: café naïve façade — “quotes” ‘single’ …",
    "CJK: 日本語のテキストと中文文本，한국어 텍스트.",
    "Emoji: 😀👍🏽🇫🇷 👨‍👩‍👧‍👦 done",
    "Code: def f(x):\n    return x ** 2  # square\n",
    "",
]


def smollm2_tokenizer(smollm2_dir) -> Tokenizer:
    config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    return Tokenizer.from_blob("hf_tokenizers", (smollm2_dir / "tokenizer.json").read_bytes(), config, {})


@pytest.fixture(scope="module")
def tokenizers_pair(smollm2_dir):
    from transformers import AutoTokenizer
    return smollm2_tokenizer(smollm2_dir), AutoTokenizer.from_pretrained(smollm2_dir)


def test_encode_matches_transformers(tokenizers_pair, english_text):
    ours, reference = tokenizers_pair
    for text in SAMPLES + [english_text[:20000]]:
        for add_special in (True, False):
            assert ours.encode(text, add_special) == reference(text, add_special_tokens=add_special)["input_ids"]


def test_decode_matches_transformers(tokenizers_pair, english_text):
    ours, reference = tokenizers_pair
    for text in SAMPLES + [english_text[:5000]]:
        ids = reference(text)["input_ids"]
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)


def test_special_token_facts(tokenizers_pair):
    ours, reference = tokenizers_pair
    assert ours.bos_token == reference.bos_token and ours.bos_token_id == reference.bos_token_id
    assert ours.eos_token_ids == [reference.eos_token_id]
    assert reference.eos_token_id in ours.special_token_ids


def test_explicit_add_bos_token_rebuilds_the_post_processor(smollm2_dir):
    from transformers import AutoTokenizer
    config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    config["add_bos_token"] = True
    ours = Tokenizer.from_blob("hf_tokenizers", (smollm2_dir / "tokenizer.json").read_bytes(), config, {})
    reference = AutoTokenizer.from_pretrained(smollm2_dir, add_bos_token=True)
    for text in SAMPLES[:3]:
        assert ours.encode(text) == reference(text)["input_ids"]
        assert ours.encode(text)[0] == ours.bos_token_id
        assert ours.encode(text, add_special_tokens=False) == reference(text, add_special_tokens=False)["input_ids"]


def test_bad_tokenizers_are_clear_errors():
    with pytest.raises(TokenizerError, match="unknown tokenizer type"):
        Tokenizer.from_blob("wordpiece", b"{}")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_blob("hf_tokenizers", b"not json")
    with pytest.raises(TokenizerError, match="tokenizer.model"):
        Tokenizer.from_blob("sentencepiece", b"not a protobuf")


def stream(tokenizer: Tokenizer, ids, context=(), skip_special_tokens=True) -> list[str]:
    decoder = StreamDecoder(tokenizer, context, skip_special_tokens)
    pieces = [decoder.add(i) for i in ids]
    pieces.append(decoder.flush())
    return pieces


@pytest.mark.parametrize("text", SAMPLES[:-1] + ["🇫🇷🇩🇪😀", "末尾の絵文字😀"])
def test_stream_decoder_yields_complete_text_equal_to_decode(tokenizers_pair, text):
    ours, _ = tokenizers_pair
    ids = ours.encode(text)
    pieces = stream(ours, ids)
    assert "".join(pieces) == ours.decode(ids)
    assert not any("\ufffd" in piece for piece in pieces)


def test_stream_decoder_with_prompt_context_emits_only_new_text(tokenizers_pair):
    ours, _ = tokenizers_pair
    prompt = ours.encode("The weather today is")
    completion = ours.encode(" sunny, 晴れ 😀 and warm.")
    pieces = stream(ours, completion, context=prompt)
    assert "".join(pieces) == ours.decode(prompt + completion)[len(ours.decode(prompt)):]


def test_stream_decoder_flush_releases_an_incomplete_character(tokenizers_pair):
    ours, _ = tokenizers_pair
    ids = ours.encode("😀")
    assert len(ids) > 1  # byte-level pieces of one character
    decoder = StreamDecoder(ours)
    assert [decoder.add(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert decoder.flush() == ours.decode(ids[:-1])  # the replacement character, at the very end


# -- SentencePiece


@pytest.fixture(scope="module")
def sentencepiece_model(english_text) -> bytes:
    import sentencepiece
    model = io.BytesIO()
    lines = [line for line in english_text.splitlines() if line.strip()][:4000]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines + ["日本語のテキスト 😀 café"]), model_writer=model, vocab_size=800,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, minloglevel=2)
    return model.getvalue()


def test_sentencepiece_encode_decode_matches_the_library(sentencepiece_model):
    import sentencepiece
    processor = sentencepiece.SentencePieceProcessor(model_proto=sentencepiece_model)
    ours = Tokenizer.from_blob("sentencepiece", sentencepiece_model, {"bos_token": "<s>", "eos_token": "</s>"}, {})
    assert ours.bos_token_id == processor.bos_id() and ours.eos_token_ids == [processor.eos_id()]
    for text in SAMPLES[:3] + SAMPLES[4:8]:
        ids = ours.encode(text)
        assert ids == [processor.bos_id()] + processor.encode(text)
        assert ours.encode(text, add_special_tokens=False) == processor.encode(text)
        assert ours.decode(ids) == processor.decode(processor.encode(text))
    # Special tokens written in the text are matched, and skipped on decode when asked.
    ids = ours.encode("</s>Hello", add_special_tokens=False)
    assert ids[0] == processor.eos_id() and ours.decode(ids) == "Hello"
    assert ours.decode(ids, skip_special_tokens=False) == "</s>Hello"
    no_bos = Tokenizer.from_blob("sentencepiece", sentencepiece_model, {"add_bos_token": False}, {})
    assert no_bos.encode("Hello") == processor.encode("Hello")


def test_sentencepiece_stream_keeps_leading_spaces_and_whole_characters(sentencepiece_model):
    ours = Tokenizer.from_blob("sentencepiece", sentencepiece_model, {}, {})
    prompt = ours.encode("The answer is")
    completion = ours.encode("The answer is forty two 😀 日本", add_special_tokens=False)[len(prompt) - 1:]
    pieces = stream(ours, completion, context=prompt)
    full = ours.decode(prompt + completion)
    assert "".join(pieces) == full[len(ours.decode(prompt)):]
    assert "".join(pieces).startswith(" ")
    assert not any("\ufffd" in piece for piece in pieces)
