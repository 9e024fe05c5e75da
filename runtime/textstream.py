"""Token ids -> text, incrementally, for streaming: never a broken character, never part of a stop string.

Decoding a token at a time is wrong for byte-level tokenizers (one character can span tokens), and
decoding the whole output at every token costs O(output) per token (per stream, on the threads the
decode loop shares the GIL with). So the
new tokens are decoded with a few tokens of context before them, as vLLM's incremental detokenizer
does: the text of ids[prefix:] minus the text of ids[prefix:read], where `read` is where the text
was last complete and `prefix` the read point before that (a decoder that treats a sequence's first
token specially, e.g. SentencePiece's leading space, sees the same first token in both). Should the
longer window not extend the shorter one, the whole output is decoded instead. Only the new, settled
suffix is released: text that ends in an incomplete character, or that could still grow into a stop
string, is held back until the next tokens settle it. When a stop string appears, the text ends
right before it.
"""
from __future__ import annotations

from typing import Any, Sequence

_INCOMPLETE = "\ufffd"  # what decode() gives for the bytes of a character not yet complete


class TextStream:
    """The text of one request's generated tokens, released piece by piece."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._ids: list[int] = []
        self._text = ""
        self._complete = ""  # the text of ids[:self._read], which ended in a complete character
        self._prefix = self._read = 0  # see the module docstring
        self._released = 0
        self.stopped = False  # a stop string appeared: the text is final

    @property
    def text(self) -> str:
        """All text so far (ending before the stop string, once one appeared)."""
        return self._text

    def push(self, ids: Sequence[int]) -> str:
        """Add new tokens; return the text that is now settled and was not returned before."""
        if self.stopped:
            return ""
        self._ids.extend(ids)
        if self._tokenizer is None:
            return ""
        text = self._decode()
        cut = min((i for i in (text.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._text = text[:cut]
            return self._release(len(self._text))
        self._text = text
        return self._release(len(text) - self._held_back(text))

    def _decode(self) -> str:
        """The text of all ids so far, decoding only the tokens since the last complete text (and a few before)."""
        decode = lambda ids: self._tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        known, window = decode(self._ids[self._prefix:self._read]), decode(self._ids[self._prefix:])
        text = self._complete + window[len(known):] if window.startswith(known) else decode(self._ids)
        if not text.endswith(_INCOMPLETE):
            self._complete, self._prefix, self._read = text, self._read, len(self._ids)
        return text

    def finish(self) -> str:
        """The text not yet released (at the end of the request, nothing is held back)."""
        return self._release(len(self._text))

    def _held_back(self, text: str) -> int:
        """Characters at the end of `text` that are not settled yet."""
        if text.endswith(_INCOMPLETE):
            return len(text) - len(text.rstrip(_INCOMPLETE))
        longest = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def _release(self, upto: int) -> str:
        if upto <= self._released:
            return ""
        piece = self._text[self._released:upto]
        self._released = upto
        return piece
