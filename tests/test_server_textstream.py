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
