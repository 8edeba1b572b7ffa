"""Sampling on the host, in numpy: one implementation for every backend, reproducible with a seed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import UsageError


@dataclass
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    min_p: float = 0.0  # 0.0: off
    repetition_penalty: float = 1.0  # 1.0: off
    repetition_context_size: int = 20
    seed: int | None = None

    def validate(self) -> "SamplingParams":
        def num(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
                raise UsageError(f"{name.replace('_', '-')} must be a finite number, got {v!r}")
            return v

        if num("temperature") < 0:
            raise UsageError(f"temperature must be >= 0, got {self.temperature}")
        if not (0.0 < num("top_p") <= 1.0):
            raise UsageError(f"top-p must be in (0, 1], got {self.top_p}")
        if not (0.0 <= num("min_p") < 1.0):
            raise UsageError(f"min-p must be in [0, 1), got {self.min_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise UsageError(f"top-k must be an integer >= 0, got {self.top_k!r}")
        if num("repetition_penalty") <= 0:
            raise UsageError(f"repetition-penalty must be > 0, got {self.repetition_penalty}")
        if not isinstance(self.repetition_context_size, int) or self.repetition_context_size < 1:
            raise UsageError("repetition context size must be a positive integer")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise UsageError(f"seed must be a non-negative integer, got {self.seed!r}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_host_logits(self) -> bool:
        return not self.greedy or self.repetition_penalty != 1.0


def repetition_penalty(logits: np.ndarray, history: list[int], penalty: float, context_size: int) -> np.ndarray:
    """The CTRL-style repetition penalty, in place on float64 logits: each token among the last context_size of
    history has its logit divided by the penalty where positive, multiplied where negative."""
    if penalty == 1.0 or not history:
        return logits
    seen = np.unique(np.asarray(history[-context_size:], dtype=np.int64))
    seen = seen[(seen >= 0) & (seen < logits.shape[0])]
    vals = logits[seen]
    logits[seen] = np.where(vals > 0, vals / penalty, vals * penalty)
    return logits


class Sampler:
    def __init__(self, params: SamplingParams):
        self.p = params.validate()
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, history: list[int]) -> int:
        """logits: [vocab] float; history: token ids so far (for the repetition penalty)."""
        order, kept = self._kept(logits, history)
        if kept is None:
            return int(order)
        return int(order[self.rng.choice(kept.shape[0], p=kept)])

    def probs(self, logits: np.ndarray, history: list[int]) -> np.ndarray:
        """The distribution __call__ draws from, over the whole vocabulary (greedy: all mass on the argmax)."""
        order, kept = self._kept(logits, history)
        out = np.zeros(np.shape(logits)[-1], np.float64)
        if kept is None:
            out[order] = 1.0
        else:
            out[order] = kept
        return out

    def _kept(self, logits: np.ndarray, history: list[int]):
        """(argmax, None) when greedy, else (token ids by falling probability, their kept probabilities)."""
        p = self.p
        logits = repetition_penalty(np.asarray(logits, dtype=np.float64).copy(), history, p.repetition_penalty,
                                    p.repetition_context_size)
        if p.greedy:
            return int(np.argmax(logits)), None
        logits /= p.temperature
        logits -= logits.max()
        probs = np.exp(logits)
        probs /= probs.sum()
        order = np.argsort(-probs, kind="stable")
        sorted_p = probs[order]
        keep = np.ones_like(sorted_p, dtype=bool)
        if p.top_k > 0:
            keep[p.top_k:] = False
        if p.top_p < 1.0:
            cum = np.cumsum(sorted_p)
            keep &= (cum - sorted_p) < p.top_p  # keep the smallest prefix whose mass reaches top_p
        if p.min_p > 0.0:
            keep &= sorted_p >= p.min_p * sorted_p[0]
        keep[0] = True
        kept = np.where(keep, sorted_p, 0.0)
        kept /= kept.sum()
        return order, kept
