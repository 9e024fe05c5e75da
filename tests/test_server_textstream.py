"""Streaming text: never a broken character, never a piece of a stop string, always the whole text in the end."""
from __future__ import annotations

import pytest

from runtime.textstream import TextStream


@pytest.fixture(scope="module")
def byte_tokenizer():
    """A byte-level BPE with no merges: one token per UTF-8 byte, so a character can span tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def _pieces(tokenizer, text: str, stop=()) -> tuple[list[str], TextStream]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer, stop)
    pieces = [stream.push([i]) for i in ids]
    if not stream.stopped:
        pieces.append(stream.finish())
    return pieces, stream


def test_multibyte_characters_are_released_whole(byte_tokenizer):
    text = "héllo 😀 wörld"
    pieces, stream = _pieces(byte_tokenizer, text)
    assert "".join(pieces) == text == stream.text
    assert all("\ufffd" not in p for p in pieces)
    assert "😀" in pieces  # held back over its four bytes, then released at once


def test_text_ends_before_the_stop_string_and_never_shows_part_of_it(byte_tokenizer):
    pieces, stream = _pieces(byte_tokenizer, "answer: 42\nEND of it", stop=("\nEND", "zzz"))
    assert stream.stopped and stream.text == "answer: 42"
    assert "".join(pieces) == "answer: 42"
    assert "\n" not in "".join(pieces)


def test_a_false_start_of_a_stop_string_is_released_later(byte_tokenizer):
    pieces, stream = _pieces(byte_tokenizer, "a\nEN b", stop=("\nEND",))
    assert not stream.stopped and "".join(pieces) == "a\nEN b"
    assert pieces[1:4] == ["", "", ""]  # "\n", "E", "N" waited to see whether "\nEND" followed


@pytest.fixture(scope="module")
def metaspace_tokenizer():
    """A SentencePiece-style tokenizer (one token per character, spaces as "▁"; decoding drops the space a
    sequence's first token carries): the case where a text's decode depends on where the sequence starts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("▁abcdefghijklmnopqrstuvwxyzàéöü,.!?\n0123456789"))
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return PreTrainedTokenizerFast(tokenizer_object=tok)


LONG = ("Streaming a long answer: héllo wörld, ça va? 😀 " * 20
        + "數據 and 🚀🚀 then plain text again, repeated until the output is long. " * 10)


def _decode_spans(tokenizer):
    """Wrap the tokenizer's decode to record how many ids each call decodes."""
    spans: list[int] = []
    decode = tokenizer.decode

    def counting(ids, **kwargs):
        spans.append(len(ids))
        return decode(ids, **kwargs)

    tokenizer.decode = counting
    return spans


def test_long_outputs_are_decoded_a_few_tokens_at_a_time_into_the_same_text():
    """With the served model's own tokenizer (byte-level BPE): the pieces add up to the full decode of the
    output, and no token makes the stream decode more than a short window (not the whole output)."""
    from transformers import AutoTokenizer

    from hub import basemodel

    tokenizer = AutoTokenizer.from_pretrained(basemodel.resolve(basemodel.DEFAULT_BASE_MODEL))
    ids = tokenizer(LONG, add_special_tokens=False)["input_ids"]
    assert len(ids) > 400
    spans = _decode_spans(tokenizer)
    stream = TextStream(tokenizer, stop=("never appears",))
    pieces = [stream.push([i]) for i in ids] + [stream.finish()]
    del tokenizer.decode
    assert "".join(pieces) == stream.text == tokenizer.decode(ids, skip_special_tokens=True)
    assert max(spans) <= 8  # an emoji spans up to 4 byte tokens; the window is those plus the tokens before


def test_incremental_decoding_keeps_a_tokenizer_that_treats_the_first_token_specially(metaspace_tokenizer):
    text = "hello wörld, this is a longer answer.\nand another line!"
    ids = metaspace_tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces, stream = _pieces(metaspace_tokenizer, text)
    assert "".join(pieces) == stream.text == metaspace_tokenizer.decode(ids)
