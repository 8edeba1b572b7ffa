"""Streaming detokenization: text from token ids one at a time, never half a UTF-8 character."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .core import Tokenizer





class StreamingDetokenizer:
    """Text from a stream of token ids, one token at a time.

    Each step decodes a short window of ids that starts at a token already emitted (so sentencepiece's
    leading-space rule applies as in a full decode) and emits the part of its text not emitted yet. Trailing
    U+FFFD is an unfinished UTF-8 character: it is held back until the tokens that complete it arrive.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._start = 0  # the window is ids[_start:]
        self._read = 0  # ids[:_read] ended on a character boundary when last seen
        self._done = 0  # characters of the window's text already emitted
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def _emit(self, new: str) -> str:
        self.text += new
        return new

    def add_token(self, token_id: int) -> str:
        self._ids.append(token_id)
        window = self._decode(self._ids[self._start :])
        complete = window.rstrip("\ufffd")
        new = complete[self._done :]
        self._done = max(self._done, len(complete))
        if len(complete) == len(window):
            # a character boundary: restart the window at the previous boundary, whose text is all emitted
            self._start, self._read = self._read, len(self._ids)
            self._done = len(self._decode(self._ids[self._start : self._read]))
        return self._emit(new)

    def finalize(self) -> str:
        new = self._decode(self._ids[self._start :])[self._done :]
        self._start = self._read = len(self._ids)
        self._done = 0
        return self._emit(new)
