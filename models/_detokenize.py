"""Turning a stream of token ids into a stream of text pieces.

Tokens do not map to text one by one: a character can span several byte-level tokens,
and a tokenizer may drop or add a space depending on what came before. So the whole
text so far is decoded and only what is new is released; a piece ending in half a
character (U+FFFD) waits for the next token. Stop strings are cut where they begin, and
text that might be the start of a stop string is held back until it is known not to be,
so a caller never sees part of a stop string.
"""

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class TextStream:
    def __init__(self, tokenizer: Decoder, stop: Sequence[str] = ()) -> None:
        self._tokenizer = tokenizer
        self._stop = [s for s in stop if s]
        self._ids: list[int] = []
        self._sent = 0  # characters of the decoded text already released
        self.stopped = False  # a stop string was seen: generation should end

    def push(self, token: int) -> str:
        """The new text this token completes ('' while it is held back)."""
        if self.stopped:
            return ""
        self._ids.append(token)
        text = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        if text.endswith(REPLACEMENT):
            return ""  # half a character: wait for the rest
        for stop in self._stop:
            at = text.find(stop, max(0, self._sent - len(stop) + 1))
            if at != -1:
                self.stopped = True
                return self._release(text, at)
        held = max((self._partial_stop(text, s) for s in self._stop), default=0)
        return self._release(text, len(text) - held)

    def finish(self) -> str:
        """Whatever was held back, once no more tokens come."""
        if self.stopped:
            return ""
        text = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        return self._release(text, len(text))

    def _release(self, text: str, upto: int) -> str:
        piece = text[self._sent : upto] if upto > self._sent else ""
        self._sent = max(self._sent, upto)
        return piece

    @staticmethod
    def _partial_stop(text: str, stop: str) -> int:
        """How many trailing characters of ``text`` begin ``stop``."""
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if stop.startswith(text[-size:]):
                return size
        return 0
