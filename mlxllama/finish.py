"""When a request ends and what text each token adds: the end-of-sequence tokens, stop strings, max_tokens, the
context limit, a constraint that is done, and the streaming detokenizer. One Finisher per request, used by every
surface (stream_generate, generate, batch_generate, chat, the server), so they all report the same reasons:

  "stop"       an end-of-sequence token, a stop string (cut from the text), or a constraint that allows nothing more
  "length"     max_tokens reached, or the context is full (max_tokens is cut to the room the context leaves)
  "cancelled"  the caller cancelled (Handle.cancel(), a closed stream, a client that went away, shutdown)
  "error"      the step failed for this request (Event.error says why; the traceback is logged)
"""

from __future__ import annotations

FINISH_REASONS = ("stop", "length", "cancelled", "error")


class StopStrings:
    """Holds back text that could be the start of a stop string; cuts at the first stop string."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text that can go out now, whether a stop string was hit: then the text is cut before it)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.pending = self.pending[:cut], ""
            return out, True
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Finisher:
    """One request's end: add(token) -> (text to send, finish reason or None). tokenizer None: no text (bench)."""

    def __init__(self, tokenizer, eos: set[int], max_tokens: int, stop: list[str] | None = None,
                 constraint=None, ignore_eos: bool = False):
        self.detok = tokenizer.detokenizer() if tokenizer is not None else None
        self.eos = frozenset() if ignore_eos else frozenset(eos)
        self.max_tokens = max_tokens
        self.stops = StopStrings(list(stop or []))
        self.constraint = constraint
        self.count = 0

    def add(self, token: int) -> tuple[str, str | None]:
        self.count += 1
        detok = self.detok
        if token in self.eos:
            return self._end(detok.finalize() if detok else "", "stop")
        text = detok.add_token(token) if detok else ""
        if self.constraint is not None and self.constraint.done:
            return self._end(text + (detok.finalize() if detok else ""), "stop")
        if self.count >= self.max_tokens:
            return self._end(text + (detok.finalize() if detok else ""), "length")
        text, hit = self.stops.feed(text)
        return text, "stop" if hit else None

    def _end(self, text: str, reason: str) -> tuple[str, str]:
        text, hit = self.stops.feed(text)
        return (text, "stop") if hit else (text + self.stops.flush(), reason)
