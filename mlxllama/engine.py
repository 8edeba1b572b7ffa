"""The one decode step under every path: continuous batching over the one forward pass (Model.forward_batch).
Requests join and leave a running batch between steps, each with its own KV cache, logits pipeline (logits.py),
finisher (finish.py) and seed. stream_generate, generate, batch_generate, chat, bench's decode and the server all
submit here; a single request is a batch of one stepped by the caller (no thread).

A step runs every decoding sequence's next token and, while there is room, prompt chunks of sequences that joined:
at most `prefill_chunk` prompt tokens per step while other sequences are decoding (so a joining prompt stalls the
running streams by a bounded amount), `prefill_step` when nothing else runs. A lone sequence goes through the
model's own call (Model.__call__, compiled single-token paths) rather than forward_batch. A prefix cache
(prefix_cache.py), when given, supplies the KV of the longest already-seen prefix of each prompt and receives each
finished sequence's KV, for every cache kind (cache.py's protocol).

Pipelining (lazy backends, MLX): a lone sequence whose token is chosen on the device (greedy, nothing needing the
host's logits) is stepped one ahead: the next step is queued (async_eval) on the device token before the current
one is read back, so the host waits for one integer per token and never idles the device.

Speculation (`speculate`, speculative.SpeculativeConfig): a decoding sequence's drafter proposes up to k tokens;
its token and drafts are k + 1 rows of the same forward pass as the other streams' rows, verified exactly
(speculative.verify) with the request's logits pipeline applied at each verified position, so penalties,
processors, logprobs and constraints compose with it, and rejected rows are trimmed from its cache. What a seed
guarantees: greedy requests give the plain tokens exactly with or without speculation; sampled requests with a
seed decode plainly (a seed must give the same tokens whatever else runs, and speculative sampling keeps the
distribution but not the draws); sampled requests without a seed speculate and follow the plain distribution.
A rotating cache speculates only while the step cannot wrap it (a wrapped window cannot roll back).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from .accounting import decode_bytes, weight_bytes_per_step
from .errors import MlxLlamaError, UsageError
from .finish import Finisher
from .logits import Constraint, LogitsPipeline, log_softmax, top_logprobs
from .prefix_cache import PrefixCache
from .sampling import SamplingParams
from .speculative import SpeculativeConfig, SpeculativeStats, Speculator, verify

logger = logging.getLogger(__name__)

MAX_TOP_LOGPROBS = 20


class QueueFull(MlxLlamaError):
    """The engine's waiting queue is full; try again later."""


class EngineStopped(MlxLlamaError):
    """The engine is shutting down and takes no new requests."""


@dataclass
class RequestParams:
    max_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)  # or a sampling.Sampler whose state carries on
    stop: list[str] = field(default_factory=list)
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per earlier occurrence in the completion
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token the completion already has
    logprobs: bool = False
    top_logprobs: int = 0
    logit_bias: dict[int, float] | None = None  # OpenAI's: added to those tokens' logits
    logits_processors: list = field(default_factory=list)  # (token ids so far, logits float64 [vocab]) -> logits
    constraint: Constraint | None = None  # logits.Constraint: a mask per step (structured output)
    sampler: Callable[[np.ndarray], int] | None = None  # a custom sampler over the processed logits
    ignore_eos: bool = False  # generate exactly max_tokens (bench)
    prefill_progress: Callable[[int, int], None] | None = None  # (prompt tokens done, total) as the prompt runs

    def validate(self) -> "RequestParams":
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise UsageError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        getattr(self.sampling, "p", self.sampling).validate()
        for name in ("frequency_penalty", "presence_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not -2.0 <= v <= 2.0:
                raise UsageError(f"{name} must be a number in [-2, 2], got {v!r}")
        if not isinstance(self.top_logprobs, int) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise UsageError(f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}]")
        if not all(isinstance(s, str) for s in self.stop):
            raise UsageError("stop must be a string or a list of strings")
        for t, b in (self.logit_bias or {}).items():
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not -100 <= b <= 100:
                raise UsageError(f"logit_bias values must be numbers in [-100, 100], got {b!r} for token {t}")
        return self

    def pipeline(self, prompt: list[int]) -> LogitsPipeline:
        return LogitsPipeline(self.sampling, prompt, frequency_penalty=self.frequency_penalty,
                              presence_penalty=self.presence_penalty, logit_bias=self.logit_bias,
                              processors=self.logits_processors, constraint=self.constraint, custom=self.sampler)

    @property
    def needs_host_logits(self) -> bool:
        return self.logprobs or self.pipeline([]).needs_host


@dataclass
class Event:
    """One generated token (text may be empty while a character or a stop string is pending); the last event of a
    request has finish_reason "stop", "length", "cancelled" or "error" (then `error` says why): finish.py."""
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
    exception: Exception | None = field(default=None, repr=False, compare=False)  # what `error` describes


def raise_for(ev: Event, where: str = "") -> None:
    """Raise a failed request's error: the library's own exception as it was raised (a DistributedError stays one),
    anything else as an MlxLlamaError naming its type, after `where`."""
    if ev.error:
        if isinstance(ev.exception, MlxLlamaError):
            raise ev.exception
        raise MlxLlamaError(where + ev.error)


class Handle:
    """A submitted request: iterate it for its events (or give submit an on_event callback), cancel() to stop it.
    poll() returns the events that arrived so far without stepping or waiting."""

    def __init__(self, engine: "Engine", rid: int, events: queue.SimpleQueue | None):
        self.engine, self.id, self._events = engine, rid, events
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        self.engine._wake()

    def poll(self) -> list[Event]:
        out = []
        while self._events is not None and not self._events.empty():
            out.append(self._events.get_nowait())
        return out

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
    pipe: LogitsPipeline = None
    fin: Finisher = None
    cache: object = None
    fed: int = 0  # prompt tokens through the model
    cached: int = 0  # prompt tokens that came from the prefix cache
    generated: list[int] = field(default_factory=list)
    next_token: int | None = None  # chosen and sent, not yet fed
    pending: object = None  # a token chosen on the device, not yet read back (pipelining)
    first_token_time: float | None = None
    speculator: Speculator | None = None
    done: bool = False  # its last event went out

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
    batch_sizes: dict = field(default_factory=dict)  # sequences in a step -> steps (replaced when a key is added)
    decode_tps: float = 0.0  # tokens per second over the last steps that decoded
    achieved_gbps: float = 0.0  # weights + KV read per decode step over its time, over the last steps
    running: int = 0
    waiting: int = 0


@dataclass
class GenerationResponse:
    text: str  # the text added by this step (may be empty while a UTF-8 character or stop string is pending)
    token: int
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    finish_reason: str | None  # None while generating, then one of finish.FINISH_REASONS
    prompt_time: float = 0.0  # seconds from the start until the first token was sampled
    # With logprobs=: the chosen token's log-probability under the model (raw logits, before temperature,
    # penalties and processors, as OpenAI's API reports it), and the top ones as (token, logprob), most likely first.
    logprobs: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    cached_tokens: int = 0  # prompt tokens whose KV came from a prefix cache (an engine kept across calls)


def prompt_tokens(tokenizer, prompt, chat: bool | None = None, system: str | None = None) -> list[int]:
    """A str (optionally wrapped in the chat template), a messages list, or token ids used as given."""
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
        messages = list(prompt)
        if system:
            messages = [{"role": "system", "content": system}] + messages
        return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))  # no double BOS
    if isinstance(prompt, (list, tuple, np.ndarray)):
        ids = [int(t) for t in prompt]
        if not ids:
            raise UsageError("the prompt is empty")
        if any(t < 0 or t >= tokenizer.vocab_size for t in ids):
            raise UsageError(f"prompt token ids must be in [0, {tokenizer.vocab_size})")
        return ids
    if not isinstance(prompt, str):
        raise UsageError("prompt must be a str, a list of token ids or a list of messages, not "
                         f"{type(prompt).__name__}")
    if prompt == "":
        raise UsageError("the prompt is empty")
    if chat:
        return prompt_tokens(tokenizer, [{"role": "user", "content": prompt}], system=system)
    return tokenizer.encode(prompt)


def _error_text(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"


class Engine:
    def __init__(self, model, tokenizer, max_batch: int = 8, max_queue: int = 64, prefill_chunk: int = 32,
                 prefill_step: int = 512, prefix_cache: PrefixCache | None = None,
                 make_cache: Callable[[int], object] | None = None, ctx: int | None = None,
                 speculate: SpeculativeConfig | None = None):
        """make_cache(max_len) -> a fresh cache for one sequence (default: model.make_cache(1, max_len)), of any
        kind (cache.py's protocol); the prefix cache holds whatever kind it is. ctx: most tokens per sequence,
        prompt and reply (default and at most: the model's context). speculate: speculative decoding for every
        request that allows it. tokenizer None: events carry no text (bench)."""
        model_ctx = model.args.max_position_embeddings
        ctx = model_ctx if ctx is None else ctx
        for name, v in (("max_batch", max_batch), ("max_queue", max_queue), ("prefill_chunk", prefill_chunk),
                        ("prefill_step", prefill_step), ("ctx", ctx)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UsageError(f"{name.replace('_', '-')} must be an integer >= 1, got {v!r}")
        if ctx > model_ctx:
            raise UsageError(f"--ctx {ctx} is more than the model's context ({model_ctx})")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.prefill_chunk, self.prefill_step = prefill_chunk, prefill_step
        self.prefix_cache = prefix_cache
        self.make_cache = make_cache or (lambda n: model.make_cache(1, max_len=n))
        eos = model.args.eos_token_id
        self.eos = (set(tokenizer.eos_ids) if tokenizer is not None else set()) | (
            {eos} if isinstance(eos, int) else set(eos or ()))
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
        self._weight_bytes_per_step = weight_bytes_per_step(model)
        self._recent: deque = deque(maxlen=16)  # (decode tokens, bytes read, seconds) of recent steps
        self._recent_total = [0, 0.0, 0.0]

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
               on_event: Callable[[Event], None] | None = None, cache=None) -> Handle:
        """Queue a request (token ids). Raises UsageError for bad input, QueueFull, EngineStopped.
        cache: a cache that already holds the first cache.offset tokens of ids (bench's untimed context); they
        are not run again."""
        params = params or RequestParams()
        ids = [int(t) for t in ids]
        self.check(ids, params)
        events = None
        if on_event is None:
            events = queue.SimpleQueue()
            on_event = events.put
        with self._lock:
            if self._draining or self._stopping:
                raise EngineStopped("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting already; try again shortly")
            handle = Handle(self, next(self._ids), events)
            self._waiting.append(_Seq(handle, ids, params, min(params.max_tokens, self.ctx - len(ids)), on_event,
                                      time.perf_counter(), cache=cache))
            self.stats.waiting = len(self._waiting)
            self._work.notify()
        return handle

    def stream_generate(self, prompt, max_tokens: int = 256, *, sampling: SamplingParams | None = None,
                        stop: list[str] | str | None = None, chat: bool | None = None,
                        system: str | None = None) -> Iterator[GenerationResponse]:
        """One request through this engine, stepped here, in generate.stream_generate's shape (the chat loop's hook:
        an engine kept across turns makes each turn prefill only what its prefix cache does not hold)."""
        ids = prompt_tokens(self.tokenizer, prompt, chat=chat, system=system)
        params = RequestParams(max_tokens=max_tokens, sampling=sampling or SamplingParams(),
                               stop=[stop] if isinstance(stop, str) else list(stop or []))
        yield from responses(self, ids, params)

    # -- the thread --------------------------------------------------------------------------------------------

    @property
    def running_in_thread(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def draining(self) -> bool:
        """shutdown() was called: no new requests are taken."""
        return self._draining or self._stopping

    def kv_bytes_running(self) -> int:
        """Bytes held by the running sequences' KV caches (their buffers, used or not)."""
        return sum(int(s.cache.nbytes) for s in list(self._running) if s.cache is not None)

    @property
    def active(self) -> int:
        """Sequences holding a KV cache now."""
        return len(self._running)

    @property
    def prefilling(self) -> int:
        """Running sequences whose prompt is not all through the model yet."""
        return sum(s.prefilling for s in self._running)

    def warm_up(self, tokens: int = 10) -> float:
        """Before start(), as llama-server's warm-up run: one sequence, then two side by side, `tokens` tokens each,
        on a throwaway engine over this one's model, cache kind, context and speculation, so that what a first
        request would compile is compiled now (on the numpy backend numba compiles the one-row and the multi-row
        steps at their first use: 10-20 s each on a new machine, holding the GIL), and the numpy backend's timed
        step options (threads, prefetch: 8 steps) are tried before requests pay for it. Nothing reaches this engine's
        prefix cache, stats or counters. Returns the seconds it took; a failed run is logged, not raised (the same
        error then answers the requests that meet it)."""
        start = time.perf_counter()
        if self.ctx < 2:  # no prompt fits with a token after it
            return 0.0
        sibling = Engine(self.model, None, max_batch=2, max_queue=2, ctx=self.ctx, make_cache=self.make_cache,
                         speculate=self.speculate)
        params = RequestParams(max_tokens=tokens, ignore_eos=True)
        ids = list(range(1, min(4, self.ctx)))
        for batch in (1, 2):
            handles = [sibling.submit(ids, params) for _ in range(batch)]
            for _ in range(8 * (tokens + 2)):  # a prefill step and a step per token are enough
                if not sibling.step():
                    break
            for ev in (ev for h in handles for ev in h.poll()):
                if ev.error:
                    logger.warning("the warm-up run failed: %s", ev.error)
                    return time.perf_counter() - start
        return time.perf_counter() - start

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
                logger.error("engine step failed: %s", _error_text(e))
                logger.debug("engine step failed", exc_info=True)
                for s in list(self._running):
                    self._finish(s, "error", error=_error_text(e), exception=e)
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
        """Run one step; False when there was nothing to do."""
        self._drop_cancelled()
        self._admit()
        if not self._running:
            return False
        t0 = time.perf_counter()
        kv_read = sum(s.cache.stored * s.cache.bytes_per_position for s in self._running if not s.prefilling)
        lone = self._running[0] if len(self._running) == 1 and not self._waiting else None
        if lone is not None and lone.pending is not None and self._wants_forward(lone):
            decoded = self._lookahead(lone)
        else:
            self._resolve_pending()
            decoded = self._batched() if self._running else 0
        self._account(decoded, kv_read, time.perf_counter() - t0)
        return True

    def _wants_forward(self, s: _Seq) -> bool:
        """The token waiting to be read back is not the request's last (max_tokens)."""
        return len(s.generated) + 1 < s.max_tokens

    def _lookahead(self, s: _Seq) -> int:
        """The pipelined step of a lone on-device sequence: queue the next token, then read back this one."""
        ops = self.model.ops
        y = s.pending
        try:
            s.pending = ops.argmax(self.model(ops.asarray(y).reshape(1, 1), s.cache, last_only=True)[:, -1, :])
            ops.async_eval(s.pending)
            token = int(ops.to_numpy(y).reshape(-1)[0])
        except Exception as e:  # noqa: BLE001  (one failing step must not take the engine down)
            self._fail([s], e)
            return 0
        self._emit(s, token, None, None)
        self._count_step(1)
        return 1

    def _resolve_pending(self) -> None:
        for s in [s for s in self._running if s.pending is not None]:
            y, s.pending = s.pending, None
            self._emit(s, int(self.model.ops.to_numpy(y).reshape(-1)[0]), None, None)

    def _batched(self) -> int:
        """One forward pass over every running sequence's rows: prompt chunks, decode tokens, speculative rows."""
        decoding = [s for s in self._running if not s.prefilling]
        budget = self.prefill_chunk if decoding else self.prefill_step
        batch, chunks, rows, plans = [], [], [], []
        for s in list(self._running):
            if s.prefilling:
                if budget <= 0:
                    continue
                n = min(len(s.prompt) - s.fed, budget)
                budget -= n
                chunk, plan = s.prompt[s.fed: s.fed + n], None
                if s.fed == s.cached and s.params.prefill_progress is not None:
                    s.params.prefill_progress(s.fed, len(s.prompt))
            else:
                plan = self._plan(s)
                if s not in self._running:
                    continue
                chunk = [s.next_token] + (plan[0] if plan is not None else [])
            batch.append(s)
            chunks.append(chunk)
            plans.append(plan)
            rows.append(len(chunk) if not s.prefilling else int(s.fed + len(chunk) == len(s.prompt)))
        if not batch:
            return 0
        t0 = time.perf_counter()
        try:
            logits = self._forward(batch, chunks, rows)
        except Exception as e:  # noqa: BLE001  (one failing step must not take the engine down)
            self._fail(batch, e)
            return 0
        self._count_step(len(batch))
        return self._take(batch, chunks, rows, plans, logits, time.perf_counter() - t0)

    def _forward(self, batch: list[_Seq], chunks: list, rows: list[int]):
        """Logits of each sequence's last rows[i] positions, [sum(rows), vocab] (None when all are 0)."""
        model, ops = self.model, self.model.ops
        if len(batch) == 1:  # the model's own call: its compiled single-token path, any model (distributed too)
            cache, r = batch[0].cache, rows[0]
            tokens = np.asarray([chunks[0]], dtype=np.int64)
            if r == 0:
                model.fill(tokens, cache)
                ops.eval(*cache.state())
                return None
            out = model(tokens, cache, last_only=r == 1)[0]
            return out if r == 1 or r == len(chunks[0]) else out[len(chunks[0]) - r:]
        logits = model.forward_batch(chunks, [s.cache for s in batch], rows)
        if logits is None:
            ops.eval(*[a for s in batch for a in s.cache.state()])
        return logits

    def _take(self, batch, chunks, rows, plans, logits, seconds: float) -> int:
        """Choose each sequence's tokens from its rows of the logits; returns the decode tokens produced."""
        ops = self.model.ops
        host = argmax = None
        deciding = [(s, plan) for s, r, plan in zip(batch, rows, plans) if r]
        if any(s.params.logprobs or s.pipe.needs_host or (plan is not None and s.pipe.constraint is not None)
               for s, plan in deciding):  # verifying drafts under a constraint masks each position on the host
            host = ops.to_numpy(logits).astype(np.float64)
        lone = len(self._running) == 1 and not self._waiting and ops.lazy
        if deciding and not lone and any(not s.pipe.needs_host for s, _ in deciding):
            argmax = ops.to_numpy(ops.argmax(logits)).reshape(-1)
        produced, at = 0, 0
        for s, chunk, r, plan in zip(batch, chunks, rows, plans):
            was_prefilling = s.prefilling
            if was_prefilling:
                s.fed += len(chunk)
                if s.params.prefill_progress is not None:
                    s.params.prefill_progress(min(s.fed, len(s.prompt) - 1), len(s.prompt))
            if not r:
                continue
            span = slice(at, at + r)
            at += r
            try:
                if plan is not None:
                    produced += self._verified(s, plan, logits[span], host, argmax, span, seconds, len(batch))
                else:
                    produced += not was_prefilling
                    self._choose(s, logits[span], None if host is None else host[span.start],
                                 None if argmax is None else argmax[span.start], lone and not self._speculates(s))
            except Exception as e:  # noqa: BLE001
                self._fail([s], e)
        return produced

    def _choose(self, s: _Seq, row, host_row, argmax, lone: bool) -> None:
        """The next token from one row: on the device where nothing needs the host's copy."""
        ops, pipe = self.model.ops, s.pipe
        if not pipe.needs_host:
            if pipe.constraint is not None:  # the mask added on the device: one integer comes back
                mask = pipe.device_mask(ops, self.model.args.vocab_size)
                token = int(ops.to_numpy(ops.argmax(row if mask is None else row + mask)).reshape(-1)[0])
            elif argmax is not None:
                token = int(argmax)
            else:
                y = ops.argmax(row)
                if lone and host_row is None:  # read back next step, after the following one is queued
                    s.pending = y
                    ops.async_eval(y)
                    return
                token = int(ops.to_numpy(y).reshape(-1)[0])
            lp = log_softmax(host_row) if s.params.logprobs else None
        else:
            lp = log_softmax(host_row) if s.params.logprobs else None
            token = pipe.choose(host_row)
        self._emit(s, token, *self._logprobs(s, lp, token))

    def _logprobs(self, s: _Seq, lp, token: int):
        if lp is None:
            return None, None
        return float(lp[token]), (top_logprobs(lp, s.params.top_logprobs) if s.params.top_logprobs else None)

    # -- speculation ---------------------------------------------------------------------------------------------

    def _speculates(self, s: _Seq) -> bool:
        p = s.params.sampling  # a live Sampler (generate_step): the caller owns its random state
        seeded = isinstance(p, SamplingParams) and p.seed is not None and not p.greedy
        return self.speculate is not None and not seeded

    def _plan(self, s: _Seq):
        """This step's drafts for a decoding sequence, or None (a plain row)."""
        if not self._speculates(s):
            return None
        try:
            if s.speculator is None:
                s.speculator = Speculator(self.model, self.speculate, s.cache.max_len, self.spec_stats)
            plan = s.speculator.plan(s.pipe, s.max_tokens - len(s.generated) - 1)
        except Exception as e:  # noqa: BLE001
            self._fail([s], e)
            return None
        if plan[0] and not s.cache.can_trim_after(len(plan[0]) + 1):
            plan = ([], None, plan[2], None)
        return plan

    def _verified(self, s: _Seq, plan, rows, host, argmax, span, seconds: float, batch: int) -> int:
        """Verify a speculating sequence's rows (its token and drafts; a plain row when it drafted nothing)."""
        drafts, q = plan[0], plan[1]
        pipe, ops = s.pipe, self.model.ops
        if host is None and pipe.needs_host is False and pipe.constraint is None:
            target = argmax[span] if argmax is not None else ops.to_numpy(ops.argmax(rows)).reshape(-1)
            kept, y = verify(drafts, q, pipe, argmax=target)
        else:
            kept, y = verify(drafts, q, pipe, rows=host[span])
        if len(drafts) > kept:
            s.cache.trim(len(drafts) - kept)
        new = drafts[:kept] + [y]
        s.speculator.done(plan, new, seconds if batch == 1 else None)
        for i, token in enumerate(new):
            lp = log_softmax(host[span.start + i]) if s.params.logprobs else None
            self._emit(s, token, *self._logprobs(s, lp, token))
            if s not in self._running:
                return i + 1
        return len(new)

    # -- tokens out -----------------------------------------------------------------------------------------------

    def _emit(self, s: _Seq, token: int, logprob, top) -> None:
        if s.first_token_time is None:
            s.first_token_time = time.perf_counter() - s.submitted
        s.generated.append(token)
        s.pipe.advance(token)
        text, finish = s.fin.add(token)
        self.stats.completion_tokens += 1
        ev = Event(text, token, finish, len(s.prompt), len(s.generated), s.cached, logprob, top,
                   first_token_time=s.first_token_time)
        if finish:
            self._finish(s, finish, ev)
        else:
            s.next_token = token
            self._send(s, ev)

    def _count_step(self, size: int) -> None:
        st = self.stats
        st.steps += 1
        if size in st.batch_sizes:
            st.batch_sizes[size] += 1
        else:  # a new key: a new dict, so that a reader iterating the old one (/metrics) never sees it change size
            st.batch_sizes = {**st.batch_sizes, size: 1}

    def _account(self, decoded: int, kv_read: float, seconds: float) -> None:
        """decode tokens per second and bytes read per second (accounting.py) over the recent decode steps."""
        if not decoded:
            return
        recent, total = self._recent, self._recent_total
        if len(recent) == recent.maxlen:  # running sums over the window, not a sum per step
            total[:] = [a - b for a, b in zip(total, recent[0])]
        entry = (decoded, decode_bytes(self._weight_bytes_per_step, kv_read), seconds)
        recent.append(entry)
        total[:] = [a + b for a, b in zip(total, entry)]
        n, b, t = total
        if t > 0:
            self.stats.decode_tps, self.stats.achieved_gbps = n / t, b / t / 1e9

    def _fail(self, seqs: list[_Seq], e: Exception) -> None:
        logger.error("a step failed for %d request(s): %s", len(seqs), _error_text(e))
        logger.debug("the step's traceback", exc_info=True)
        for s in seqs:
            if not s.done:
                self._finish(s, "error", error=_error_text(e), exception=e)

    def _send(self, s: _Seq, ev: Event) -> None:
        try:
            s.on_event(ev)
        except Exception:  # noqa: BLE001  (a receiver that went away: stop generating for it)
            logger.debug("request %d: its receiver failed; cancelling it", s.handle.id, exc_info=True)
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
                self._fail([s], e)
                continue
            self._running.append(s)
        self.stats.running = len(self._running)

    def _setup(self, s: _Seq) -> None:
        c = s.params.constraint
        if callable(c) and not hasattr(c, "allowed"):  # a factory: each request gets its own matcher
            s.params.constraint = c()
        s.pipe = s.params.pipeline(s.prompt)
        s.fin = Finisher(self.tokenizer, self.eos, s.max_tokens, s.params.stop, s.params.constraint,
                         s.params.ignore_eos)
        self.stats.prompt_tokens += len(s.prompt)
        if s.cache is not None:  # given, holding the prompt's first tokens
            s.fed = s.cached = min(s.cache.offset, len(s.prompt) - 1)
            s.cache.trim(s.cache.offset - s.fed)
            return
        s.cache = self.make_cache(min(self.ctx, len(s.prompt) + s.max_tokens))
        if self.prefix_cache is not None:
            m, kv = self.prefix_cache.lookup(s.prompt[:-1])  # the last prompt token is run to get its logits
            if m:
                s.cache.load_prefix(kv, m)
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

    def _finish(self, s: _Seq, reason: str, ev: Event | None = None, error: str | None = None,
                exception: Exception | None = None) -> None:
        s.done = True
        if s in self._running:
            self._running.remove(s)
            self.stats.running = len(self._running)
        self.stats.requests[reason] = self.stats.requests.get(reason, 0) + 1
        if s.cache is not None and self.prefix_cache is not None and reason in ("stop", "length", "cancelled"):
            self._store_prefix(s)
        s.cache = s.pending = None  # the sequence's KV goes now
        if ev is None:
            ev = Event("", None, reason, len(s.prompt), len(s.generated), s.cached, error=error,
                       first_token_time=s.first_token_time, exception=exception)
        self._send(s, ev)

    def _store_prefix(self, s: _Seq) -> None:
        # prompt and generated tokens fed so far (the last chosen token is not; a speculative pass may have fed
        # tokens past a stop; a rotating window holds only its first positions intact until it wraps)
        n = s.cache.prefix_length(min(s.cache.offset, len(s.prompt) + len(s.generated)))
        if not n:
            return
        try:
            self.prefix_cache.store((s.prompt + s.generated)[:n], s.cache.prefix(n))
        except Exception as e:  # noqa: BLE001  (a full memory must not fail the request)
            logger.warning("the prefix cache could not store %d tokens: %s", n, _error_text(e))
            logger.debug("prefix cache store failed", exc_info=True)

    def _cancel_all(self, reason: str) -> None:
        for s in list(self._running):
            self._finish(s, reason)
        with self._lock:
            left = list(self._waiting)
            self._waiting.clear()
        for s in left:
            self._finish(s, reason)


def responses(engine: Engine, ids: list[int], params: RequestParams) -> Iterator[GenerationResponse]:
    """Submit one request to an engine stepped here (or running in its thread); a GenerationResponse per event.
    Closing the generator early cancels the request (its KV still goes to the engine's prefix cache)."""
    start = time.perf_counter()
    handle = engine.submit(ids, params)
    first, done = None, False
    try:
        for ev in handle:
            done = ev.finish_reason is not None
            raise_for(ev)
            now = time.perf_counter()
            first = first or now
            yield response(engine, ev, len(ids), first - start, now - first)
    finally:
        if not done and not engine.running_in_thread:
            handle.cancel()
            engine.step()  # drops it: its KV goes to the prefix cache now


def response(engine: Engine, ev: Event, n_prompt: int, prompt_time: float,
             gen_time: float) -> GenerationResponse:
    n = ev.completion_tokens
    return GenerationResponse(
        text=ev.text, token=ev.token if ev.token is not None else -1, prompt_tokens=n_prompt,
        prompt_tps=(n_prompt - ev.cached_tokens) / prompt_time if prompt_time > 0 else float("inf"),
        generation_tokens=n, generation_tps=(n - 1) / gen_time if n > 1 and gen_time > 0 else 0.0,
        peak_memory=engine.model.ops.peak_memory() / 1e9, finish_reason=ev.finish_reason, prompt_time=prompt_time,
        logprobs=ev.logprob, top_logprobs=ev.top_logprobs, cached_tokens=ev.cached_tokens)
