"""Speculative decoding: a drafter proposes up to k tokens, the target model scores all of them in one forward pass
(k + 1 positions for one read of the weights), and an exact verifier keeps the longest acceptable prefix plus one
token of the target's own. Rejected positions are rolled back in the KV cache (KVCache.trim). The forward pass is
the engine's (engine.py): a speculating sequence's k + 1 rows ride in the same batched pass as the other streams'
rows; this module holds the drafters, the acceptance rule and how many tokens to draft.

Drafters:
  "lookup"  prompt lookup: the continuation of the most recent earlier occurrence of the last n tokens of the prompt
            and output (n from ngram_max down to ngram_min, longest first). No second model; deterministic, so
            its draft distribution is a point mass.
  "draft"   a smaller model with the same vocabulary (checked at load), run autoregressively with its own cache.

Verification is exact. Greedy: a draft token is kept while it equals the target's argmax at its position, so the
output is the plain greedy output. Sampling: the standard rule (Leviathan et al. 2023, Chen et al. 2023): keep
draft token d with probability min(1, p(d) / q(d)); at the first rejection draw from max(p - q, 0) renormalized;
when every draft is kept draw one more token from p. p is the target's distribution after the request's logits
pipeline (logits.py: penalties, logit_bias, processors and the constraint's mask, applied at each verified position
as if the kept drafts had been emitted) and the sampler's transforms (temperature, top-k/p, min-p), so the tokens
follow exactly what plain sampling draws from. Drafts are cut where a constraint would stop accepting them.

What a seed guarantees: greedy output is the plain output exactly. A seeded sampled request draws from the same
distribution as plain sampling, but not the same draws (the random stream is consumed differently); the engine
therefore decodes seeded sampled requests plainly, so that a seed gives the tokens it gives without speculation.

How many tokens to draft (AdaptiveK) is chosen each step from the measured cost of a forward pass over r rows and
the recent acceptance rate: the k that maximizes expected tokens per second, 0 (a plain step) when no k pays.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field

import numpy as np

from .errors import UsageError
from .model import prefill

MODES = ("lookup", "draft")


@dataclass
class SpeculativeConfig:
    mode: str = "lookup"  # "lookup" or "draft"
    num_draft: int = 8  # most tokens drafted per target forward pass
    draft_model: object = None  # "draft": a Model with the target's vocabulary (load_draft checks it)
    ngram_max: int = 3  # lookup: longest n-gram matched
    ngram_min: int = 1
    adaptive: bool = True  # False: always draft num_draft tokens where the drafter has them

    def validate(self) -> "SpeculativeConfig":
        if self.mode not in MODES:
            raise UsageError(f"speculate must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("num_draft", "ngram_max", "ngram_min"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UsageError(f"{name.replace('_', '-')} must be an integer >= 1, got {v!r}")
        if self.num_draft > 64:
            raise UsageError(f"num-draft must be at most 64, got {self.num_draft}")
        if self.ngram_min > self.ngram_max:
            raise UsageError("ngram-min must not exceed ngram-max")
        if self.mode == "draft" and self.draft_model is None:
            raise UsageError("speculate='draft' needs a draft model (--draft-model)")
        if self.mode == "lookup" and self.draft_model is not None:
            raise UsageError("a draft model is only used with speculate='draft'")
        return self


@dataclass
class SpeculativeStats:
    forwards: int = 0  # target forward passes after the prefill (plain steps included)
    drafted: int = 0  # draft tokens scored by the target
    accepted: int = 0  # of those, kept
    tokens: int = 0  # tokens produced by those forward passes
    seconds: dict = field(default_factory=dict)  # rows scored -> [total seconds, forward passes]

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / self.forwards if self.forwards else 0.0


# -- drafters --------------------------------------------------------------------------------------------------

class PromptLookup:
    """The continuation of the most recent earlier occurrence of the history's last n tokens, longest n first."""

    free = True  # costs nothing next to a forward pass: can be consulted on plain steps too

    def __init__(self, ngram_max: int = 3, ngram_min: int = 1):
        self.ngram_max, self.ngram_min = ngram_max, ngram_min

    def propose(self, history: list[int], k: int, pipe=None):
        """(up to k tokens, None: a point mass, the length of the n-gram matched: 0 when none)."""
        arr = np.asarray(history, dtype=np.int64)
        L = arr.shape[0]
        for n in range(min(self.ngram_max, L - 1), self.ngram_min - 1, -1):
            tail = arr[L - n:]
            starts = np.flatnonzero(arr[: L - n] == tail[0])  # an earlier occurrence ends before the tail does
            for j in range(1, n):
                starts = starts[arr[starts + j] == tail[j]]
            if starts.size:
                s = int(starts[-1]) + n
                return [int(t) for t in arr[s: s + k]], None, n
        return [], None, 0


class DraftModel:
    """A smaller model drafting autoregressively, with its own KV cache kept in step with the accepted tokens.
    Its loop is the draft model's own (k cheap steps of a second model), not the target's decode."""

    free = False

    def __init__(self, model, max_len: int, vocab_size: int):
        self.model = model
        self.cache = model.make_cache(1, max_len=max_len)
        self.vocab_size = vocab_size  # the target's: q is laid out over it
        self.tokens: list[int] = []  # what the draft cache holds

    def propose(self, history: list[int], k: int, pipe):
        """(k drafted tokens, their draft distributions [k, V] or None when greedy, 0). pipe: the request's
        logits pipeline (its sampler's transforms and random generator shape the draws)."""
        ops = self.model.ops
        common = _common_prefix(self.tokens, history)
        if common == len(history):  # the last token must go through the model to draft from it
            common -= 1
        self.cache.trim(self.cache.offset - common)
        del self.tokens[common:]
        feed = history[common:]
        logits = prefill(self.model, np.asarray(feed, dtype=np.int64)[None, :], self.cache)
        self.tokens += feed
        out, qs = [], []
        for i in range(k):
            last = logits[:, -1, :]
            if pipe.point_mass:
                t = int(ops.to_numpy(ops.argmax(last)).reshape(-1)[0])
            else:
                q = _fit(pipe.sampler.probs(ops.to_numpy(last)[0], []), self.vocab_size)
                t = int(pipe.rng.choice(q.shape[0], p=q))
                qs.append(q)
            out.append(t)
            if i + 1 < k:
                logits = self.model(np.asarray([[t]], dtype=np.int64), self.cache, last_only=True)
                self.tokens.append(t)
        return out, (np.stack(qs) if qs else None), 0


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


def _fit(p: np.ndarray, size: int) -> np.ndarray:
    """A draft distribution over the target's vocabulary size (padded vocabularies may differ in length)."""
    if p.shape[0] == size:
        return p
    if p.shape[0] > size:
        p = p[:size]
        return p / p.sum()
    return np.concatenate([p, np.zeros(size - p.shape[0])])


def check_vocabulary(target_tok, draft_tok, target_args, draft_args, name: str = "the draft model") -> None:
    """The draft model must tokenize exactly as the target: same size, same token for every id, same specials."""
    if target_tok.vocab_size != draft_tok.vocab_size:
        raise UsageError(f"{name} has a vocabulary of {draft_tok.vocab_size} tokens, the model "
                         f"{target_tok.vocab_size}: speculative decoding needs the same vocabulary")
    for i in range(target_tok.vocab_size):
        if target_tok.id_to_token(i) != draft_tok.id_to_token(i):
            raise UsageError(f"{name}'s token {i} is {draft_tok.id_to_token(i)!r}, the model's "
                             f"{target_tok.id_to_token(i)!r}: speculative decoding needs the same vocabulary")
    if min(target_args.vocab_size, draft_args.vocab_size) < target_tok.vocab_size:
        raise UsageError(f"{name}'s embedding has fewer rows than its tokenizer has tokens")


def load_draft(ref, target_model, target_tokenizer):
    """Load a draft model onto the target's backend and check that it shares the target's vocabulary."""
    from . import hub, loaders
    from .model import Model

    args, weights, tok = loaders.load(hub.resolve(str(ref)))
    check_vocabulary(target_tokenizer, tok, target_model.args, args, name=f"draft model {ref}")
    return Model(args, weights, target_model.ops, release=True)


def check_options(speculate, num_draft: int = 8, has_draft_model: bool = False) -> None:
    """The speculate=/num_draft=/draft_model= combination, before anything is loaded."""
    if speculate is None:
        if has_draft_model:
            raise UsageError("a draft model is given but speculate is not 'draft'")
        return
    if isinstance(speculate, SpeculativeConfig):
        return
    if speculate not in MODES:
        raise UsageError(f"speculate must be one of {', '.join(MODES)}, got {speculate!r}")
    SpeculativeConfig(mode=speculate, num_draft=num_draft, draft_model=True if has_draft_model else None).validate()


def make_config(speculate, num_draft: int = 8, draft_model=None, *, target_model=None,
                target_tokenizer=None) -> SpeculativeConfig | None:
    """stream_generate's speculate=/num_draft=/draft_model= as a checked config (None: plain decoding).
    draft_model: a Model, or a reference loaded (and checked against the target's tokenizer) here."""
    check_options(speculate, num_draft, draft_model is not None)
    if speculate is None:
        return None
    if isinstance(speculate, SpeculativeConfig):
        return speculate.validate()
    if draft_model is not None and not hasattr(draft_model, "make_cache"):
        draft_model = load_draft(draft_model, target_model, target_tokenizer)
    elif draft_model is not None and target_model is not None and draft_model.ops is not target_model.ops:
        raise UsageError("the draft model must be loaded on the same backend as the model")
    return SpeculativeConfig(mode=speculate, num_draft=num_draft, draft_model=draft_model).validate()


# -- how many tokens to draft -----------------------------------------------------------------------------------

class AdaptiveK:
    """Chooses k, the tokens to draft, as the k maximizing E(k) / T(k): E(k) = 1 + a + ... + a^k tokens expected
    per target forward at acceptance rate a, T(k) = time of a forward over k + 1 rows + k draft tokens' time.
    Drafting is chosen only when it promises `margin` times a plain step's rate.
    Costs are moving averages of measured times per row count, kept per model across requests (forward_costs;
    unmeasured counts interpolated, at first a guess of 10% more per row); the acceptance rate is a decaying count
    of kept and rejected drafts, kept per bucket (lookup: the length of the n-gram matched, whose drafts are right
    far more often when longer). A drafter that costs nothing (lookup) is scored on plain steps too, so speculation
    resumes when drafts start matching again; a costly one is retried now and then, less often each time it still
    does not pay."""

    margin = 1.1  # drafting must promise this much over a plain step: a wrong guess costs more than it saves

    def __init__(self, k_max: int, adaptive: bool = True, free: bool = True, cost: dict | None = None):
        self.k_max, self.adaptive, self.free = k_max, adaptive, free
        self.counts: dict[int, list[float]] = {}  # bucket -> [kept, missed]
        self.cost: dict[int, float] = {} if cost is None else cost  # rows -> seconds per forward
        self.draft_cost = 0.0  # seconds per drafted token
        self.probe_interval, self.countdown = 8, 8

    def acceptance(self, bucket: int = 0) -> float:
        kept, missed = self.counts.get(bucket, (1.0, 1.0))  # prior: a = 0.5
        return kept / (kept + missed)

    def forward_cost(self, rows: int) -> float:
        c = self.cost
        if rows in c:
            return c[rows]
        base = c.get(1) or (min(c.values()) if c else 1.0)
        below = [r for r in c if r < rows]
        above = [r for r in c if r > rows]
        if below and above:
            lo, hi = max(below), min(above)
            return c[lo] + (c[hi] - c[lo]) * (rows - lo) / (hi - lo)
        if below:
            lo = max(below)
            return c[lo] + 0.1 * base * (rows - lo)
        if above:
            hi = min(above)
            return max(base, c[hi] - 0.1 * base * (hi - rows))
        return base * (1 + 0.1 * (rows - 1))

    def choose(self, bucket: int = 0, available: int | None = None) -> int:
        """k for the next step, at most `available` (the drafts the drafter has)."""
        k_max = self.k_max if available is None else min(self.k_max, available)
        if not self.adaptive or k_max == 0:
            return k_max
        a = min(self.acceptance(bucket), 0.999)
        best, best_rate = 0, self.margin / self.forward_cost(1)
        expected = 1.0
        for k in range(1, k_max + 1):
            expected += a ** k
            rate = expected / (self.forward_cost(k + 1) + k * self.draft_cost)
            if rate > best_rate:
                best, best_rate = k, rate
        if best == 0 and not self.free:
            self.countdown -= 1
            if self.countdown <= 0:
                self.probe_interval = min(2 * self.probe_interval, 128)
                self.countdown = self.probe_interval
                return min(2, k_max)
        elif best:
            self.probe_interval = 8
        return best

    def record_forward(self, rows: int, seconds: float) -> None:
        prev = self.cost.get(rows)
        self.cost[rows] = seconds if prev is None else 0.7 * prev + 0.3 * seconds

    def record_draft_time(self, tokens: int, seconds: float) -> None:
        if tokens:
            self.draft_cost = 0.7 * self.draft_cost + 0.3 * seconds / tokens if self.draft_cost else seconds / tokens

    def record_drafts(self, drafted: int, accepted: int, bucket: int = 0) -> None:
        """A round of `drafted` tokens of which the first `accepted` were kept."""
        if drafted == 0:
            return
        c = self.counts.setdefault(bucket, [1.0, 1.0])
        decay = 0.85 ** drafted
        c[0] = decay * c[0] + accepted
        c[1] = decay * c[1] + (1 if accepted < drafted else 0)


# -- the acceptance rule ----------------------------------------------------------------------------------------

def verify(drafts: list[int], q, pipe, rows=None, argmax=None) -> tuple[int, int]:
    """The target's view of n drafts: host logits rows [n + 1, V] at the last token and each draft, or (greedy with
    nothing needing the host) their argmax [n + 1]. pipe: the request's logits.LogitsPipeline, whose penalties,
    processors and constraint apply at each verified position as if the kept drafts had been emitted. Returns
    (kept drafts, the next token); the pipeline is left as it was."""
    n = len(drafts)
    if argmax is not None:
        a = 0
        while a < n and drafts[a] == int(argmax[a]):
            a += 1
        return a, int(argmax[a])
    advanced = 0
    try:
        for i, d in enumerate(drafts):
            if pipe.point_mass:  # greedy (maybe penalized) or a custom sampler: kept while it picks the draft
                t = pipe.choose(rows[i])
                if t != d:
                    return i, t
            else:
                p = pipe.probs(rows[i])
                qd = 1.0 if q is None else float(q[i][d])
                if not (qd > 0 and pipe.rng.random() * qd < p[d]):  # kept with probability min(1, p(d) / q(d))
                    return i, _residual(p, d, None if q is None else q[i], pipe.rng)
            pipe.advance(d)
            advanced += 1
        return n, pipe.choose(rows[n])
    finally:
        pipe.rollback(advanced)


def _residual(p: np.ndarray, d: int, q, rng) -> int:
    """A draw from max(p - q, 0) renormalized, after draft d was rejected (q None: a point mass on d)."""
    if q is None:
        residual = p.copy()
        residual[d] = 0.0
    else:
        residual = np.maximum(p - q, 0.0)
    total = residual.sum()
    residual = residual / total if total > 0 else p
    return int(rng.choice(residual.shape[0], p=residual))


def make_drafter(config: SpeculativeConfig, model, max_len: int):
    if config.mode == "lookup":
        return PromptLookup(config.ngram_max, config.ngram_min)
    return DraftModel(config.draft_model, max_len, model.args.vocab_size)


_COSTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def forward_costs(model) -> dict[int, float]:
    """The model's measured seconds per forward pass by row count, shared by every request's AdaptiveK: a new
    request starts from what earlier ones measured instead of a guess (a fresh table where the model cannot be
    weakly referenced)."""
    try:
        return _COSTS.setdefault(model, {})
    except TypeError:
        return {}


class Speculator:
    """One sequence's drafting state, for the engine's step: plan(room) drafts for the next forward pass (none: a
    plain step); after the pass, done(plan, new, seconds) records what was kept. The verification rows run in the
    engine's batched forward pass, next to the other sequences' rows; verify() above decides."""

    def __init__(self, model, config: SpeculativeConfig, max_len: int, stats: SpeculativeStats | None = None):
        self.model, self.config = model, config
        self.stats = stats if stats is not None else SpeculativeStats()
        self.drafter = make_drafter(config, model, max_len)
        self.policy = AdaptiveK(config.num_draft, config.adaptive, free=self.drafter.free,
                                cost=forward_costs(model))

    def plan(self, pipe, room: int) -> tuple:
        """(drafts, q, bucket, watch) for the next forward pass over pipe.history; no drafts: a plain step.
        room: tokens still wanted after the next one."""
        policy, drafter, history = self.policy, self.drafter, pipe.history
        drafts, q, bucket, watch = [], None, 0, None
        if drafter.free:  # propose first: how good the match is decides k
            found, q, bucket = drafter.propose(history, min(self.config.num_draft, max(room, 1)), pipe)
            found = pipe.check_draft(found)
            k = policy.choose(bucket, min(len(found), room))
            drafts = found[:k]
            if not drafts and found:
                watch = found[0]  # scored against the token the plain step picks
        else:
            k = min(policy.choose(), room)
            if k > 0:
                t0 = time.perf_counter()
                drafts, q, bucket = drafter.propose(history, k, pipe)
                policy.record_draft_time(len(drafts), time.perf_counter() - t0)
                cut = pipe.check_draft(drafts)
                drafts, q = cut, (None if q is None else q[: len(cut)])
        return drafts, q, bucket, watch

    def done(self, plan: tuple, new: list[int], seconds: float | None) -> None:
        """The forward pass of `plan` produced `new` (kept drafts + one); seconds: its time where it ran alone."""
        drafts, _, bucket, watch = plan
        if drafts:
            kept = len(new) - 1
            self.policy.record_drafts(len(drafts), kept, bucket)
            self.stats.drafted += len(drafts)
            self.stats.accepted += kept
        elif watch is not None:
            self.policy.record_drafts(1, int(watch == new[0]), bucket)
        if seconds is not None:
            self.policy.record_forward(len(drafts) + 1, seconds)
            spent = self.stats.seconds.setdefault(len(drafts) + 1, [0.0, 0])
            spent[0] += seconds
            spent[1] += 1
        self.stats.forwards += 1
        self.stats.tokens += len(new)
