"""Continuous batching over the one forward pass (Model.forward_batch): requests join and leave a running batch
between steps, each with its own KV cache, sampling parameters and seed.

A step runs every decoding sequence's next token and, while there is room, prompt chunks of sequences that joined:
at most `prefill_chunk` prompt tokens per step while other sequences are decoding (so a joining prompt stalls the
running streams by a bounded amount), `prefill_step` when nothing else runs. A prefix cache (prefix_cache.py), when
given, supplies the KV of the longest already-seen prefix of each prompt and receives each finished sequence's KV.

The engine is driven either by its own thread (start(), used by the server) or by the caller stepping it
(batch_generate, Engine.stream_generate).

With `speculate` (speculative.SpeculativeConfig), a decoding sequence runs its own [1, k + 1] forward pass next to
the batched one: a speculative.Speculator drafts up to k tokens and verifies them exactly, so greedy output is the
plain output. Requests that ask for logprobs or OpenAI's frequency/presence penalties decode plainly in the batch,
and so do sampled requests with a seed: speculative sampling keeps the distribution but not the draws, and a seed
must give the same tokens whatever else runs.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from .errors import MlxLlamaError, UsageError
from .generate import GenerationResponse, _StopStrings, log_softmax, prefill, prompt_tokens, top_logprobs
from .prefix_cache import PrefixCache
from .sampling import Sampler, SamplingParams
from .speculative import SpeculativeConfig, SpeculativeStats, Speculator

MAX_TOP_LOGPROBS = 20


class QueueFull(MlxLlamaError):
    """The engine's waiting queue is full; try again later."""


class EngineStopped(MlxLlamaError):
    """The engine is shutting down and takes no new requests."""


@dataclass
class RequestParams:
    max_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per earlier occurrence in the completion
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token the completion already has
    logprobs: bool = False
    top_logprobs: int = 0
    constraint: object = None  # structured output (#23): a constrain.Constraint or a zero-argument factory of one

    def validate(self) -> "RequestParams":
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise UsageError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        self.sampling.validate()
        for name in ("frequency_penalty", "presence_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not -2.0 <= v <= 2.0:
                raise UsageError(f"{name} must be a number in [-2, 2], got {v!r}")
        if not isinstance(self.top_logprobs, int) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise UsageError(f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}]")
        if not all(isinstance(s, str) for s in self.stop):
            raise UsageError("stop must be a string or a list of strings")
        return self

    @property
    def needs_host_logits(self) -> bool:
        return (self.sampling.needs_host_logits or self.logprobs or self.frequency_penalty != 0.0
                or self.presence_penalty != 0.0)


@dataclass
class Event:
    """One generated token (text may be empty while a character or a stop string is pending); the last event of a
    request has finish_reason "stop", "length", "cancelled" or "error" (then `error` says why)."""
    text: str
    token: int | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    error: str | None = None
    first_token_time: float | None = None  # seconds from submit to the first token


class Handle:
    """A submitted request: iterate it for its events (or give submit an on_event callback), cancel() to stop it."""

    def __init__(self, engine: "Engine", rid: int, events: queue.Queue | None):
        self.engine, self.id, self._events = engine, rid, events
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        self.engine._wake()

    def __iter__(self) -> Iterator[Event]:
        while True:
            if self.engine.running_in_thread:
                ev = self._events.get()
            else:
                while self._events.empty():
                    if not self.engine.step() and self._events.empty():
                        raise MlxLlamaError("the engine has no work but the request did not finish")
                ev = self._events.get_nowait()
            yield ev
            if ev.finish_reason is not None:
                return


@dataclass(eq=False)
class _Seq:
    handle: Handle
    prompt: list[int]
    params: RequestParams
    max_tokens: int
    on_event: Callable[[Event], None]
    submitted: float
    sampler: Sampler = None
    cache: object = None
    fed: int = 0  # prompt tokens through the model
    cached: int = 0  # prompt tokens that came from the prefix cache
    generated: list[int] = field(default_factory=list)
    next_token: int | None = None  # sampled, not yet fed
    counts: dict = field(default_factory=dict)  # generated token -> occurrences (OpenAI's penalties)
    detok: object = None
    stops: _StopStrings = None
    first_token_time: float | None = None
    speculator: Speculator | None = None  # with the engine's speculate, from the second generated token on
    constraint: object = None  # structured output (#23): this request's own matcher

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.prompt)


@dataclass
class EngineStats:
    requests: dict = field(default_factory=lambda: {"stop": 0, "length": 0, "cancelled": 0, "error": 0})
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    steps: int = 0
    batch_sizes: dict = field(default_factory=dict)  # sequences in a step -> steps
    decode_tps: float = 0.0  # tokens per second over the last steps that decoded
    achieved_gbps: float = 0.0  # weights + KV read per decode step over its time, over the last steps
    running: int = 0
    waiting: int = 0


class Engine:
    def __init__(self, model, tokenizer, max_batch: int = 8, max_queue: int = 64, prefill_chunk: int = 32,
                 prefill_step: int = 512, prefix_cache: PrefixCache | None = None,
                 make_cache: Callable[[int], object] | None = None, ctx: int | None = None,
                 speculate: SpeculativeConfig | None = None):
        """make_cache(max_len) -> a fresh cache for one sequence (default: model.make_cache(1, max_len)); the
        prefix cache works with caches whose prefix(n) is not None (cache.KVCache). ctx: most tokens per sequence,
        prompt and reply (default and at most: the model's context). speculate: speculative decoding for every
        request that allows it; the caches must roll back (trim), so not a rotating window."""
        model_ctx = model.args.max_position_embeddings
        ctx = model_ctx if ctx is None else ctx
        for name, v in (("max_batch", max_batch), ("max_queue", max_queue), ("prefill_chunk", prefill_chunk),
                        ("prefill_step", prefill_step), ("ctx", ctx)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UsageError(f"{name.replace('_', '-')} must be an integer >= 1, got {v!r}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.prefill_chunk, self.prefill_step = prefill_chunk, prefill_step
        self.prefix_cache = prefix_cache
        self.make_cache = make_cache or (lambda n: model.make_cache(1, max_len=n))
        self.eos = set(tokenizer.eos_ids) | set(model.args.eos_token_id)
        if ctx > model_ctx:
            raise UsageError(f"--ctx {ctx} is more than the model's context ({model_ctx})")
        self.ctx = ctx
        self.stats = EngineStats()
        self.speculate = speculate.validate() if speculate is not None else None
        self.spec_stats = SpeculativeStats()
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._draining = False
        a = model.args
        self._kv_bytes_per_token = 2 * a.num_hidden_layers * a.num_key_value_heads * a.head_dim * model.ops.kv_bytes
        self._weight_bytes_per_step = model.resident_nbytes
        if not a.tie_word_embeddings:
            self._weight_bytes_per_step -= int(model.embed.nbytes)  # only the tokens' columns are read
        self._recent: deque = deque(maxlen=16)  # (decode tokens, bytes read, seconds) of recent steps

    # -- requests ---------------------------------------------------------------------------------------------

    def check(self, ids: list[int], params: RequestParams) -> None:
        params.validate()
        if not ids:
            raise UsageError("the prompt is empty")
        if max(ids) >= self.model.args.vocab_size or min(ids) < 0:
            raise UsageError(f"prompt token ids must be in [0, {self.model.args.vocab_size})")
        if len(ids) >= self.ctx:
            raise UsageError(f"the prompt has {len(ids)} tokens but the model's context is {self.ctx}; shorten it")

    def submit(self, ids: list[int], params: RequestParams | None = None,
               on_event: Callable[[Event], None] | None = None) -> Handle:
        """Queue a request (token ids). Raises UsageError for bad input, QueueFull, EngineStopped."""
        params = params or RequestParams()
        ids = [int(t) for t in ids]
        self.check(ids, params)
        events = None
        if on_event is None:
            events = queue.Queue()
            on_event = events.put
        with self._lock:
            if self._draining or self._stopping:
                raise EngineStopped("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting already; try again shortly")
            handle = Handle(self, next(self._ids), events)
            self._waiting.append(_Seq(handle, ids, params, min(params.max_tokens, self.ctx - len(ids)), on_event,
                                      time.perf_counter()))
            self.stats.waiting = len(self._waiting)
            self._work.notify()
        return handle

    def stream_generate(self, prompt, max_tokens: int = 256, *, sampling: SamplingParams | None = None,
                        stop: list[str] | str | None = None, chat: bool | None = None,
                        system: str | None = None) -> Iterator[GenerationResponse]:
        """generate.stream_generate's shape, through this engine (and its prefix cache). For `mlxllama chat`:
        an Engine(model, tok, max_batch=1, prefix_cache=PrefixCache(bytes)) kept across turns makes each turn
        prefill only what the previous turn did not already compute."""
        ids = prompt_tokens(self.tokenizer, prompt, chat=chat, system=system)
        params = RequestParams(max_tokens=max_tokens, sampling=sampling or SamplingParams(),
                               stop=[stop] if isinstance(stop, str) else list(stop or []))
        start = time.perf_counter()
        handle = self.submit(ids, params)
        first = None
        try:
            for ev in handle:
                if ev.error:
                    raise MlxLlamaError(ev.error)
                now = time.perf_counter()
                first = first or now
                prompt_time = first - start
                n = ev.completion_tokens
                gen_time = now - first
                yield GenerationResponse(
                    text=ev.text, token=ev.token if ev.token is not None else -1, prompt_tokens=len(ids),
                    prompt_tps=(len(ids) - ev.cached_tokens) / prompt_time if prompt_time > 0 else float("inf"),
                    generation_tokens=n, generation_tps=(n - 1) / gen_time if n > 1 and gen_time > 0 else 0.0,
                    peak_memory=self.model.ops.peak_memory() / 1e9,
                    finish_reason=ev.finish_reason if ev.finish_reason != "cancelled" else "interrupted",
                    prompt_time=prompt_time, cached_tokens=ev.cached_tokens)
        finally:
            if not self.running_in_thread:
                handle.cancel()
                self._drop_cancelled()

    # -- the thread --------------------------------------------------------------------------------------------

    @property
    def running_in_thread(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="mlxllama-engine", daemon=True)
        self._thread.start()
        return self

    def _wake(self) -> None:
        with self._lock:
            self._work.notify()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._waiting and not self._running:
                    self._work.wait()
                if self._stopping:
                    break
            try:
                self.step()
            except Exception as e:  # noqa: BLE001  (a bug in one step fails its requests, not the thread)
                for s in list(self._running):
                    self._finish(s, "error", error=f"{type(e).__name__}: {e}")
        self._cancel_all("cancelled")

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop taking requests, let the running and waiting ones finish for up to `timeout` seconds, then cancel
        whatever is left and stop the thread."""
        with self._lock:
            self._draining = True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.running_in_thread and (self._running or self._waiting):
            time.sleep(0.05)
        with self._lock:
            self._stopping = True
            self._work.notify()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, timeout))
        self._cancel_all("cancelled")

    # -- one step ------------------------------------------------------------------------------------------------

    def step(self) -> bool:
        """Run one batched step; False when there was nothing to do."""
        self._drop_cancelled()
        self._admit()
        if not self._running:
            return False
        decoding = [s for s in self._running if not s.prefilling]
        ctx = sum(s.cache.offset for s in decoding)  # KV read by this step's decoding sequences
        t0 = time.perf_counter()
        speculating, joined = self._plan([s for s in decoding if self._speculates(s)])
        own_pass = [s for s, _ in speculating]
        budget = self.prefill_chunk if decoding else self.prefill_step
        batch, chunks = [], []
        for s in self._running:
            if s in own_pass:
                continue
            if s.prefilling:
                if budget <= 0:
                    continue
                n = min(len(s.prompt) - s.fed, budget)
                budget -= n
                chunks.append(s.prompt[s.fed: s.fed + n])
            else:
                chunks.append([s.next_token])
            batch.append(s)
        produced = self._speculate(speculating)
        if batch:
            try:
                logits = self.model.forward_batch(chunks, [s.cache for s in batch])
                self.model.ops.eval(logits)
            except Exception as e:  # noqa: BLE001  (one failing step must not take the engine down)
                for s in batch:
                    self._finish(s, "error", error=f"{type(e).__name__}: {e}")
                return True
        sampling = []
        for s, chunk in zip(batch, chunks):
            if s.prefilling:
                s.fed += len(chunk)
                if not s.prefilling:
                    sampling.append(s)
            else:
                sampling.append(s)
        if sampling:
            self._sample(logits, batch, sampling)
        for s, plan in joined:  # speculative sequences that drafted nothing took a plain step in the batch
            if s in self._running:
                s.speculator.took(s.generated[-1], plan)
        dt = time.perf_counter() - t0
        st = self.stats
        st.steps += 1
        size = len(batch) + len(own_pass)
        st.batch_sizes[size] = st.batch_sizes.get(size, 0) + 1
        if decoding:
            passes = len(own_pass) + (len(batch) > 0)  # each forward pass reads the weights once
            tokens = len(decoding) - len(own_pass) + produced
            self._recent.append((tokens, passes * self._weight_bytes_per_step + ctx * self._kv_bytes_per_token, dt))
            n, b, t = (sum(x) for x in zip(*self._recent))
            st.decode_tps, st.achieved_gbps = n / t, b / t / 1e9
        return True

    def _speculates(self, s: _Seq) -> bool:
        p = s.params
        seeded = p.sampling.seed is not None and not p.sampling.greedy
        return (self.speculate is not None and not s.prefilling and not seeded and not p.logprobs
                and p.frequency_penalty == 0.0 and p.presence_penalty == 0.0 and s.constraint is None)

    def _plan(self, seqs: list[_Seq]) -> tuple[list, list]:
        """Each speculative sequence's drafts for this step: ([(seq, plan)] with drafts, each to run its own
        [1, k + 1] pass; [(seq, plan)] without, to take a plain step in the batch)."""
        own, joined = [], []
        for s in seqs:
            try:
                if s.speculator is None:  # the cache holds the prompt; the first token is s.next_token
                    s.speculator = Speculator(self.model, self.speculate, s.sampler, s.prompt + s.generated,
                                              s.cache.max_len, prefill, self.spec_stats)
                plan = s.speculator.plan(s.max_tokens - len(s.generated) - 1)
            except Exception as e:  # noqa: BLE001
                self._finish(s, "error", error=f"{type(e).__name__}: {e}")
                continue
            (own if plan[0] else joined).append((s, plan))
        return own, joined

    def _speculate(self, seqs: list) -> int:
        """One speculative forward pass per (sequence, plan); returns the tokens they produced."""
        produced = 0
        for s, plan in seqs:
            try:
                new = s.speculator.step(s.cache, s.max_tokens - len(s.generated) - 1, plan)
            except Exception as e:  # noqa: BLE001
                self._finish(s, "error", error=f"{type(e).__name__}: {e}")
                continue
            for token in new:
                produced += 1
                self._emit(s, token, None, None)
                if s not in self._running:  # finished (end of sequence, a stop string, max_tokens)
                    break
        return produced

    def _sample(self, logits, batch: list[_Seq], sampling: list[_Seq]) -> None:
        ops = self.model.ops
        row = {id(s): i for i, s in enumerate(batch)}
        argmax = None
        masks = {id(s): s.constraint.allowed() for s in sampling if s.constraint is not None}  # (#23)
        if any(not s.params.needs_host_logits for s in sampling):
            device = logits
            if any(id(s) in masks and not s.params.needs_host_logits for s in sampling):  # (#23) mask on the device
                keep = np.ones((len(batch), logits.shape[-1]), dtype=np.int32)
                for s in sampling:
                    if id(s) in masks:
                        keep[row[id(s)]] = _fit(masks[id(s)], keep.shape[1])
                device = logits - ops.asarray(1 - keep) * 1e30
            argmax = ops.to_numpy(ops.argmax(device)).reshape(-1)
        for s in sampling:
            try:
                i = row[id(s)]
                if not s.params.needs_host_logits:
                    self._emit(s, int(argmax[i]), None, None)
                    continue
                host = np.asarray(ops.to_numpy(logits[i]), dtype=np.float64)
                lp = top = None
                if s.params.logprobs:
                    logp = log_softmax(host)
                adjusted = host
                if s.counts and (s.params.frequency_penalty or s.params.presence_penalty):
                    adjusted = host.copy()
                    toks = np.fromiter(s.counts.keys(), dtype=np.int64)
                    cnt = np.fromiter(s.counts.values(), dtype=np.float64)
                    adjusted[toks] -= cnt * s.params.frequency_penalty + s.params.presence_penalty
                if id(s) in masks:  # (#23)
                    adjusted = np.where(_fit(masks[id(s)], adjusted.shape[0]), adjusted, -np.inf)
                token = s.sampler(adjusted, s.prompt + s.generated)
                if s.params.logprobs:
                    lp = float(logp[token])
                    if s.params.top_logprobs:
                        top = top_logprobs(logp, s.params.top_logprobs)
                self._emit(s, token, lp, top)
            except Exception as e:  # noqa: BLE001
                self._finish(s, "error", error=f"{type(e).__name__}: {e}")

    def _emit(self, s: _Seq, token: int, logprob, top) -> None:
        if s.first_token_time is None:
            s.first_token_time = time.perf_counter() - s.submitted
        s.generated.append(token)
        s.counts[token] = s.counts.get(token, 0) + 1
        finish = None
        if s.constraint is not None:  # (#23)
            s.constraint.accept([token])
        if token in self.eos:
            finish, text = "stop", s.detok.finalize()
        else:
            text = s.detok.add_token(token)
            if len(s.generated) >= s.max_tokens or (s.constraint is not None and s.constraint.done):
                finish = "stop" if s.constraint is not None and s.constraint.done else "length"
                text += s.detok.finalize()
        text, hit = s.stops.feed(text)
        if hit:
            finish = "stop"
        elif finish:
            text += s.stops.flush()
        self.stats.completion_tokens += 1
        ev = Event(text, token, finish, len(s.prompt), len(s.generated), s.cached, logprob, top,
                   first_token_time=s.first_token_time)
        if finish:
            self._finish(s, finish, ev)
        else:
            s.next_token = token
            self._send(s, ev)

    def _send(self, s: _Seq, ev: Event) -> None:
        try:
            s.on_event(ev)
        except Exception:  # noqa: BLE001  (a receiver that went away: stop generating for it)
            s.handle.cancelled = True

    # -- joining and leaving -------------------------------------------------------------------------------------

    def _admit(self) -> None:
        while len(self._running) < self.max_batch:
            with self._lock:
                if not self._waiting:
                    break
                s = self._waiting.popleft()
                self.stats.waiting = len(self._waiting)
            if s.handle.cancelled:
                self._finish(s, "cancelled")
                continue
            try:
                self._setup(s)
            except Exception as e:  # noqa: BLE001
                self._finish(s, "error", error=f"{type(e).__name__}: {e}")
                continue
            self._running.append(s)
        self.stats.running = len(self._running)

    def _setup(self, s: _Seq) -> None:
        s.sampler = Sampler(s.params.sampling)
        s.detok = self.tokenizer.detokenizer()
        s.stops = _StopStrings(s.params.stop)
        c = s.params.constraint  # (#23)
        s.constraint = c() if callable(c) and not hasattr(c, "allowed") else c
        s.cache = self.make_cache(min(self.ctx, len(s.prompt) + s.max_tokens))
        self.stats.prompt_tokens += len(s.prompt)
        if self.prefix_cache is not None and getattr(s.cache, "prefix", None) is not None:
            m, kv = self.prefix_cache.lookup(s.prompt[:-1])  # the last prompt token is run to get its logits
            if m:
                for layer, (k, v) in enumerate(kv):
                    s.cache.update(layer, k, v)
                s.cache.advance(m)
                s.fed = s.cached = m
                self.stats.cached_tokens += m

    def _drop_cancelled(self) -> None:
        for s in [s for s in self._running if s.handle.cancelled]:
            self._finish(s, "cancelled")
        with self._lock:
            gone = [s for s in self._waiting if s.handle.cancelled]
            for s in gone:
                self._waiting.remove(s)
        for s in gone:
            self._finish(s, "cancelled")

    def _finish(self, s: _Seq, reason: str, ev: Event | None = None, error: str | None = None) -> None:
        if s in self._running:
            self._running.remove(s)
            self.stats.running = len(self._running)
        self.stats.requests[reason] = self.stats.requests.get(reason, 0) + 1
        if s.cache is not None and self.prefix_cache is not None and getattr(s.cache, "prefix", None) and reason in (
                "stop", "length", "cancelled"):
            # prompt and generated tokens fed so far (the last sampled token is not; a speculative pass may have fed
            # tokens past a stop)
            n = min(s.cache.offset, len(s.prompt) + len(s.generated))
            if n:
                try:
                    self.prefix_cache.store((s.prompt + s.generated)[:n], s.cache.prefix(n))
                except Exception:  # noqa: BLE001  (a full memory must not fail the request)
                    pass
        s.cache = None  # the sequence's KV goes now
        if ev is None:
            ev = Event("", None, reason, len(s.prompt), len(s.generated), s.cached, error=error,
                       first_token_time=s.first_token_time)
        self._send(s, ev)

    def _cancel_all(self, reason: str) -> None:
        for s in list(self._running):
            self._finish(s, reason)
        with self._lock:
            left = list(self._waiting)
            self._waiting.clear()
        for s in left:
            self._finish(s, reason)

    @property
    def active(self) -> int:
        """Sequences holding a KV cache now."""
        return len(self._running)


def _fit(mask: np.ndarray, n: int) -> np.ndarray:
    """A constraint's mask cut or padded (disallowed) to n tokens (#23)."""
    return mask[:n] if mask.size >= n else np.concatenate([mask, np.zeros(n - mask.size, dtype=bool)])


@dataclass
class BatchResponse:
    texts: list[str]
    finish_reasons: list[str]
    prompt_tokens: list[int]
    generation_tokens: list[int]
    seconds: float

    @property
    def generation_tps(self) -> float:
        return sum(self.generation_tokens) / self.seconds if self.seconds > 0 else 0.0


def batch_generate(model, tokenizer, prompts: list, max_tokens: int = 256, *, sampling=None,
                   stop: list[str] | str | None = None, chat: bool | None = None, system: str | None = None,
                   max_batch: int = 16, prefill_chunk: int = 64, prefix_cache_bytes: int = 0) -> BatchResponse:
    """Generate for several prompts at once on one Engine: each prompt a str, a messages list or token ids.
    sampling: one SamplingParams for all, or one per prompt (each with its own seed). Returns texts in order."""
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise UsageError("prompts must be a non-empty list")
    per = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * len(prompts)
    if len(per) != len(prompts):
        raise UsageError(f"{len(per)} sampling settings for {len(prompts)} prompts")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=len(prompts), prefill_chunk=prefill_chunk,
                    prefix_cache=PrefixCache(prefix_cache_bytes) if prefix_cache_bytes else None)
    ids = [prompt_tokens(tokenizer, p, chat=chat, system=system) for p in prompts]
    start = time.perf_counter()
    handles = [engine.submit(i, RequestParams(max_tokens=max_tokens, sampling=sp or SamplingParams(), stop=stops))
               for i, sp in zip(ids, per)]
    texts = [[] for _ in prompts]
    finish: list = [None] * len(prompts)
    gen = [0] * len(prompts)

    def collect():
        for j, h in enumerate(handles):
            while not h._events.empty():
                ev = h._events.get_nowait()
                texts[j].append(ev.text)
                gen[j] = ev.completion_tokens
                if ev.finish_reason:
                    if ev.error:
                        raise MlxLlamaError(f"prompt {j}: {ev.error}")
                    finish[j] = ev.finish_reason

    while engine.step():
        collect()
    collect()
    return BatchResponse(["".join(t) for t in texts], finish, [len(i) for i in ids], gen,
                         time.perf_counter() - start)
