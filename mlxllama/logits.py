"""One request's logits pipeline, the same on every path: from a step's logits row to the next token.

In order: the repetition penalty, OpenAI's frequency and presence penalties, OpenAI's logit_bias, the user's logits
processors, the constraint's mask (disallowed tokens -> -inf), then the sampler (temperature, top-k, top-p, min-p;
or a custom sampler). Logprobs report the raw model distribution (OpenAI's convention), before any of this.

When nothing needs the host's copy of the row (greedy, no penalties, bias or processors) the token is chosen on
the device (argmax); a constraint alone adds its mask there as an additive 0 / -inf array, so only one integer per
step comes back.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

import numpy as np

from .sampling import Sampler, SamplingParams, repetition_penalty

LogitsProcessor = Callable[[list, np.ndarray], np.ndarray]  # (token ids so far, logits float64 [vocab]) -> logits


class Constraint(Protocol):
    """One request's matcher state (a fresh object per request)."""

    def allowed(self) -> np.ndarray | None:
        """bool [n] mask of tokens allowed next (tokens past n are disallowed); None = any."""

    def accept(self, tokens: list[int]) -> None:
        """These tokens were emitted, in order."""

    def rollback(self, n: int) -> None:
        """Forget the last n accepted tokens (speculative rollback)."""

    def check_draft(self, tokens: list[int]) -> int:
        """How many leading tokens the matcher would accept now, without changing its state."""

    @property
    def done(self) -> bool:
        """Nothing more may follow: the finisher ends with "stop"."""


def log_softmax(row: np.ndarray) -> np.ndarray:
    """Log-probabilities of one step's logits [vocab], in float64."""
    row = np.asarray(row, dtype=np.float64)
    z = row - row.max()
    return z - np.log(np.exp(z).sum())


def top_logprobs(logprobs: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k most likely tokens as (token, logprob), most likely first."""
    best = np.argpartition(-logprobs, k - 1)[:k]
    best = best[np.argsort(-logprobs[best], kind="stable")]
    return [(int(t), float(logprobs[t])) for t in best]


def mask_row(row: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
    """row with the tokens `allowed` does not allow (and those past its length) at -inf."""
    if allowed is None:
        return row
    allowed = np.asarray(allowed, dtype=bool)
    n = min(allowed.shape[0], row.shape[0])
    out = np.full_like(row, -np.inf)
    keep = np.flatnonzero(allowed[:n])
    out[keep] = row[keep]
    return out


class LogitsPipeline:
    """prompt: the request's token ids (the repetition penalty's history starts with them); the penalties count
    only generated tokens (OpenAI's). custom: a sampler (adjusted logits [vocab]) -> token replacing the built-in
    one. advance(token) after each emitted token; rollback(n) forgets tokens advanced tentatively (speculation)."""

    def __init__(self, sampling: SamplingParams | Sampler | None = None, prompt: Sequence[int] = (), *,
                 frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
                 logit_bias: dict[int, float] | None = None, processors: Sequence[LogitsProcessor] = (),
                 constraint: Constraint | None = None, custom: Callable[[np.ndarray], int] | None = None):
        self.sampler = sampling if isinstance(sampling, Sampler) else Sampler(sampling or SamplingParams())
        self.p = self.sampler.p
        self.history = list(prompt)
        self.prompt_len = len(self.history)
        self.counts: dict[int, int] = {}
        self.frequency, self.presence = float(frequency_penalty), float(presence_penalty)
        self.bias = {int(k): float(v) for k, v in (logit_bias or {}).items()}
        self.processors = list(processors)
        self.constraint = constraint
        self.custom = custom

    @property
    def rng(self) -> np.random.Generator:
        return self.sampler.rng

    @property
    def greedy(self) -> bool:
        return self.p.greedy and self.custom is None

    @property
    def point_mass(self) -> bool:
        """The choice is deterministic given the row (greedy, or a custom sampler)."""
        return self.p.greedy or self.custom is not None

    @property
    def needs_host(self) -> bool:
        """Whether the token needs the logits row on the host (else: argmax on the device, mask included)."""
        return bool(not self.greedy or self.p.repetition_penalty != 1.0 or self.frequency or self.presence
                    or self.bias or self.processors)

    def adjust(self, row: np.ndarray) -> np.ndarray:
        """The row after penalties, bias, processors and the constraint's mask (float64)."""
        p = self.p
        row = repetition_penalty(np.array(row, dtype=np.float64), self.history, p.repetition_penalty,
                                 p.repetition_context_size)
        if self.counts and (self.frequency or self.presence):
            toks = np.fromiter(self.counts.keys(), dtype=np.int64)
            cnt = np.fromiter(self.counts.values(), dtype=np.float64)
            row[toks] -= cnt * self.frequency + self.presence
        for t, b in self.bias.items():
            if 0 <= t < row.shape[0]:
                row[t] += b
        for process in self.processors:
            row = np.asarray(process(list(self.history), row), dtype=np.float64)
        if self.constraint is not None:
            row = mask_row(row, self.constraint.allowed())
        return row

    def choose(self, row: np.ndarray) -> int:
        """The next token from a host logits row [vocab]."""
        adjusted = self.adjust(row)
        if self.custom is not None:
            return int(self.custom(adjusted))
        return self.sampler(adjusted, [])

    def probs(self, row: np.ndarray) -> np.ndarray:
        """The distribution choose() draws from (greedy: all mass on one token)."""
        return self.sampler.probs(self.adjust(row), [])

    def device_mask(self, ops, vocab: int):
        """The constraint's mask as an additive 0 / -inf backend array [vocab], or None (any token)."""
        allowed = None if self.constraint is None else self.constraint.allowed()
        if allowed is None:
            return None
        allowed = np.asarray(allowed, dtype=bool)[:vocab]
        banned = np.concatenate([np.flatnonzero(~allowed), np.arange(allowed.shape[0], vocab)])
        mask = ops.zeros((vocab,))
        if banned.size:
            mask[ops.asarray(banned)] = -np.inf
        return mask

    def advance(self, token: int) -> None:
        self.history.append(token)
        self.counts[token] = self.counts.get(token, 0) + 1
        if self.constraint is not None:
            self.constraint.accept([token])

    def rollback(self, n: int) -> None:
        for _ in range(n):
            t = self.history.pop()
            self.counts[t] -= 1
            if not self.counts[t]:
                del self.counts[t]
        if n and self.constraint is not None:
            self.constraint.rollback(n)

    def check_draft(self, drafts: list[int]) -> list[int]:
        """The drafts cut where the constraint would stop accepting them."""
        if self.constraint is None or not drafts:
            return drafts
        return drafts[: self.constraint.check_draft(list(drafts))]
