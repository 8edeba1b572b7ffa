"""Perplexity and KL divergence, scored as llama.cpp's llama-perplexity does.

The text's tokens are cut into non-overlapping windows of ctx tokens (a tail shorter than ctx is dropped); where
the tokenizer adds BOS, each window's first token is replaced by it. Each window runs from an empty cache, and only
its second half is scored: the logits at positions ctx/2 .. ctx-2 predict tokens ctx/2+1 .. ctx-1, so every scored
token has at least ctx/2 tokens of context. Perplexity = exp(mean NLL); its standard error is
ppl * sqrt(var(NLL) / (n - 1)), llama-perplexity's.

Against a base (another model on the same windows, or log-probabilities saved by --save-logits), each scored token
also gives KL(base || model) = sum_v p_base(v) (log p_base(v) - log p_model(v)); reported: mean +- standard error,
the 99th percentile, and the share of tokens where both pick the same most likely token (top-1 agreement).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import UsageError


@dataclass(frozen=True)
class KLStats:
    mean: float
    err: float
    p99: float
    median: float
    top1: float  # share of scored tokens with the same argmax
    tokens: int


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    ppl_err: float
    nll: float  # mean negative log-likelihood, nats
    tokens: int  # scored tokens
    windows: int
    ctx: int
    kl: KLStats | None = None

    def line(self) -> str:
        text = (f"PPL = {self.ppl:.4f} +/- {self.ppl_err:.5f} ({self.tokens} tokens scored in {self.windows} windows "
                f"of {self.ctx})")
        if self.kl is not None:
            k = self.kl
            text += (f"; KL = {k.mean:.6f} +/- {k.err:.6f}, p99 {k.p99:.6f}, median {k.median:.6f}; "
                     f"top-1 agreement {100 * k.top1:.2f}%")
        return text


def make_windows(tokens, ctx: int, bos_id: int | None = None) -> np.ndarray:
    """[n, ctx] non-overlapping windows; the first token of each is BOS where bos_id is given."""
    if ctx < 4 or ctx % 2:
        raise UsageError(f"--ctx must be an even number >= 4, got {ctx}")
    tokens = np.asarray(tokens, dtype=np.int64)
    n = len(tokens) // ctx
    if n == 0:
        raise UsageError(f"the text has {len(tokens)} tokens, fewer than one window of {ctx}; give a longer text "
                         "or a smaller --ctx")
    w = tokens[: n * ctx].reshape(n, ctx).copy()
    if bos_id is not None:
        w[:, 0] = bos_id
    return w


def scored_positions(ctx: int) -> slice:
    """The positions whose logits are scored (each predicts the token after it)."""
    return slice(ctx // 2, ctx - 1)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float32)
    m = x.max(axis=-1, keepdims=True)
    z = x - m
    z -= np.log(np.exp(z).sum(axis=-1, keepdims=True, dtype=np.float64)).astype(np.float32)
    return z


def model_logprobs(model, windows: np.ndarray, batch: int = 1, cache_settings=None) -> Iterator[np.ndarray]:
    """Per batch of windows: log-probabilities [b, ctx/2 - 1, vocab] at the scored positions."""
    ctx = windows.shape[1]
    pos = scored_positions(ctx)
    ops = model.ops
    for s in range(0, len(windows), batch):
        w = windows[s: s + batch]
        cache = model.make_cache(w.shape[0], max_len=ctx, settings=cache_settings)
        with ops.forward_scope(w.size):
            h = model.hidden(w, cache)
            logits = model.head(h[:, pos])
        yield log_softmax(ops.to_numpy(logits))


def nll_of(logprobs: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of each scored token, [b, ctx/2 - 1]; windows [b, ctx]."""
    ctx = windows.shape[1]
    targets = windows[:, ctx // 2 + 1:]
    return -np.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0].astype(np.float64)


def kl_of(base: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per scored token: KL(base || model) and whether the argmaxes agree."""
    b = base.astype(np.float32)
    kl = (np.exp(b) * (b - logprobs)).sum(axis=-1, dtype=np.float64)
    return np.maximum(kl, 0.0), b.argmax(axis=-1) == logprobs.argmax(axis=-1)


def summarize(nll: np.ndarray, windows: int, ctx: int, kl: np.ndarray | None = None,
              same: np.ndarray | None = None) -> PerplexityResult:
    n = nll.size
    mean = float(nll.mean())
    ppl = float(np.exp(mean))
    var = float((nll ** 2).mean() - mean ** 2)
    err = ppl * np.sqrt(max(var, 0.0) / (n - 1)) if n > 1 else float("nan")
    stats = None
    if kl is not None:
        stats = KLStats(mean=float(kl.mean()), err=float(kl.std(ddof=1) / np.sqrt(kl.size)) if kl.size > 1 else 0.0,
                        p99=float(np.percentile(kl, 99)), median=float(np.median(kl)), top1=float(same.mean()),
                        tokens=int(kl.size))
    return PerplexityResult(ppl=ppl, ppl_err=float(err), nll=mean, tokens=n, windows=windows, ctx=ctx, kl=stats)


class SavedLogits:
    """Log-probabilities at the scored positions, with the windows they belong to (an .npz; float16 log-probs)."""

    def __init__(self, path: Path):
        try:
            data = np.load(path, allow_pickle=False)
            self.windows, self.logprobs = data["windows"], data["logprobs"]
        except (OSError, ValueError, KeyError) as e:
            raise UsageError(f"{path}: not a --save-logits file ({e})") from None

    def check(self, windows: np.ndarray, path: Path) -> None:
        if self.windows.shape != windows.shape or not np.array_equal(self.windows, windows):
            raise UsageError(f"{path} was saved for other windows ({self.windows.shape[0]} of "
                             f"{self.windows.shape[1]} tokens); use the same text, tokenizer and --ctx")


def perplexity(model, tokens, ctx: int = 512, batch: int = 1, bos_id: int | None = None, cache_settings=None,
               base=None, save_logits: Path | None = None) -> PerplexityResult:
    """Perplexity of `model` over `tokens`; with base (a Model, or the path of saved logits), KL divergence too.
    save_logits writes this model's log-probabilities for a later --kl-base (written whole, then renamed)."""
    if batch < 1:
        raise UsageError(f"--batch must be at least 1, got {batch}")
    windows = make_windows(tokens, ctx, bos_id)
    saved = None
    if isinstance(base, (str, Path)):
        saved = SavedLogits(Path(base))
        saved.check(windows, Path(base))
    base_iter = model_logprobs(base, windows, batch) if base is not None and saved is None else None
    nll, kls, sames, keep = [], [], [], []
    for i, lp in enumerate(model_logprobs(model, windows, batch, cache_settings)):
        w = windows[i * batch: i * batch + lp.shape[0]]
        nll.append(nll_of(lp, w))
        if save_logits is not None:
            keep.append(lp.astype(np.float16))
        if base is not None:
            b = saved.logprobs[i * batch: i * batch + lp.shape[0]] if saved is not None else next(base_iter)
            kl, same = kl_of(b, lp)
            kls.append(kl)
            sames.append(same)
    if save_logits is not None:
        _write_npz(Path(save_logits), windows=windows, logprobs=np.concatenate(keep))
    nll_all = np.concatenate(nll).reshape(-1)
    if base is None:
        return summarize(nll_all, len(windows), ctx)
    return summarize(nll_all, len(windows), ctx, np.concatenate(kls).reshape(-1), np.concatenate(sames).reshape(-1))


def _write_npz(path: Path, **arrays) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
