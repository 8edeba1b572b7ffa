"""An OpenAI-compatible HTTP server: a thin shell over the Engine (mlxllama/engine.py), which runs in its own thread.

Routes: POST /v1/chat/completions, POST /v1/completions (stream or not), GET /v1/models, /health, /metrics.
Errors are OpenAI's JSON, {"error": {"message", "type", "param", "code"}}, for every status: 400 for bad input
(bodies that do not parse included), 401 without the API key, 404 for an unknown route or model, 405 for a wrong
method, 413 for a body over the limit, 429 (with Retry-After) on a full queue, 503 while shutting down.
A request that leaves some sampling value out gets the server's default (the model's generation_config.json, else
llama.cpp's, or serve's --temp/--top-p/--top-k/--min-p); one that leaves max_tokens out gets --max-tokens.
A client that goes away, streaming or not, cancels its request: the engine frees the sequence at its next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re
import signal
import socket
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import Engine, EngineStopped, Event, QueueFull, RequestParams
from ..errors import UsageError
from ..sampling import SamplingParams
from ..sampling_defaults import LLAMA_CPP_DEFAULTS
from . import structured
from .http import USAGE_KEY, BodyLimit, Gate, error_body
from .http import error_response as _error
from .metrics import CONTENT_TYPE, Metrics
from .schemas import ChatCompletionRequest, CompletionRequest

logger = logging.getLogger(__name__)
DEFAULT_MAX_TOKENS = 2048


@dataclass
class ServeConfig:
    """What `mlxllama serve` passes on; new options go here and in cli/serve.py."""
    model: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    backend: str = "auto"
    revision: str | None = None
    numpy_weights: str | None = None
    model_id: str | None = None  # the name /v1/models reports (default: the file's stem or the folder's name)
    any_model: bool = False  # answer requests for any model name (as llama-server does), not only ours
    max_batch: int = 8
    max_queue: int = 64
    prefill_chunk: int = 32
    prefix_cache_bytes: int = 512 << 20
    api_key: str | None = None
    max_body_bytes: int = 8 << 20
    shutdown_timeout: float = 30.0
    ctx: int | None = None  # most tokens per sequence (default: the model's context)
    kv_bits: int | None = None  # the KV cache of each sequence: cache.CacheSettings
    kv_group_size: int = 64
    max_kv_size: int | None = None
    kv_dtype: str | None = None  # "float16": a float cache kept as float16
    speculate: str | None = None  # "lookup" or "draft" (draft_model: a reference with the model's vocabulary)
    num_draft: int = 8
    draft_model: str | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS  # for requests that give none (capped by the context)
    # for requests that leave them out (temperature, top_p, top_k, min_p, repetition_penalty): run() fills in what
    # is None or missing from the model's generation_config.json, else llama.cpp's defaults
    sampling: dict | None = None
    access_log: bool = True
    parallel: str | None = None  # "tensor" or "pipeline": rank 0 serves, the model spread over mlx.launch's ranks
    warmup: bool = True  # Engine.warm_up before the first request (single-process serving)
    engine_options: dict[str, Any] = field(default_factory=dict)  # more Engine keyword arguments

    @property
    def cache_settings(self):
        from ..cache import CacheSettings

        return CacheSettings(kv_bits=self.kv_bits, kv_group_size=self.kv_group_size, max_kv_size=self.max_kv_size,
                             kv_dtype=self.kv_dtype)


def accepted_names(model_id: str, config: ServeConfig, path: Path | None = None) -> set[str]:
    """The model names a request may give: the served id, the reference given at launch (-m default, a repo id, a
    path) and the resolved path, its name and stem."""
    names = {model_id}
    if config.model:
        names.add(str(config.model))
    if path is not None:
        names |= {str(path), path.name, path.stem}
    return names


def create_app(engine: Engine, model_id: str, config: ServeConfig | None = None,
               names: set[str] | None = None) -> FastAPI:
    """The FastAPI app over a started engine; the app's shutdown shuts the engine down. names: the model names
    requests may give (default: model_id and the launch reference)."""
    config = config or ServeConfig()
    names = names or accepted_names(model_id, config)
    defaults = dict(LLAMA_CPP_DEFAULTS, **{k: v for k, v in (config.sampling or {}).items() if v is not None})
    stats = Metrics(engine)
    reqs = _Requests(engine, model_id, config, names, defaults)

    @asynccontextmanager
    async def lifespan(app):
        trimmer = asyncio.ensure_future(_trim_after_requests(engine))
        yield
        trimmer.cancel()
        await run_in_threadpool(engine.shutdown, config.shutdown_timeout)

    app = FastAPI(title="mlxllama", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.model_names = names
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    app.add_middleware(Gate, api_key=config.api_key, count=stats.count, access_log=config.access_log)
    _error_handlers(app)

    @app.get("/health")
    async def health():
        if engine.draining or not engine.running_in_thread:
            return _error(503, "shutting down", type_="server_error")
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": int(START),
                                            "owned_by": "mlxllama", "context_length": engine.ctx,
                                            "defaults": dict(defaults, max_tokens=min(config.max_tokens,
                                                                                      engine.ctx))}]}

    @app.get("/metrics")
    async def metrics_route():
        return Response(stats.render(), media_type=CONTENT_TYPE)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        tok = engine.tokenizer
        if tok.chat_template is None:
            return _error(400, "this model has no chat template; use /v1/completions", code="no_chat_template")
        try:
            text, plan = await run_in_threadpool(structured.prepare_chat, body, tok, engine.model.args.vocab_size)
            ids = await run_in_threadpool(tok.encode, text)
        except UsageError as e:
            return _error(400, str(e), param="messages")
        max_tokens = body.max_completion_tokens or body.max_tokens
        top = body.top_logprobs or 0
        return await reqs.generate(request, body, ids, max_tokens, body.logprobs, top, chat=True, plan=plan)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        p = body.prompt
        if isinstance(p, str):
            ids = await run_in_threadpool(engine.tokenizer.encode, p)
        else:
            ids = list(p)
            if any(t < 0 or t >= engine.model.args.vocab_size for t in ids):
                return _error(400, f"prompt token ids must be in [0, {engine.model.args.vocab_size})",
                              param="prompt")
        lp = body.logprobs
        constraint = await run_in_threadpool(structured.completion_constraint, body, engine.tokenizer,
                                             engine.model.args.vocab_size)
        return await reqs.generate(request, body, ids, body.max_tokens, lp is not None, lp or 0, chat=False,
                                   plan=structured.Plan(constraint=constraint))

    return app


@dataclass
class _Requests:
    """What the two generation routes share: the checks, a request's parameters, submission and the reply."""
    engine: Engine
    model_id: str
    config: ServeConfig
    names: set
    defaults: dict

    def params(self, body, max_tokens: int | None, logprobs: bool, top_logprobs: int, constraint) -> RequestParams:
        def pick(name):
            v = getattr(body, name)
            return self.defaults[name] if v is None else v

        sampling = SamplingParams(temperature=pick("temperature"), top_p=pick("top_p"), top_k=pick("top_k"),
                                  min_p=pick("min_p"), repetition_penalty=pick("repetition_penalty"),
                                  seed=body.seed)
        return RequestParams(max_tokens=max_tokens or self.config.max_tokens, stop=body.stops, sampling=sampling,
                             frequency_penalty=body.frequency_penalty, presence_penalty=body.presence_penalty,
                             logprobs=logprobs, top_logprobs=top_logprobs, constraint=constraint,
                             logit_bias=body.token_bias)

    def refusal(self, body, ids: list[int], chat: bool):
        """The error response for a request the engine cannot take as it is, or None."""
        if body.model is not None and body.model not in self.names and not self.config.any_model:
            return _error(404, f"the model {body.model[:200]!r} does not exist here; this server serves "
                               f"{self.model_id!r}", param="model", code="model_not_found")
        if not ids:
            return _error(400, "the prompt is empty", param="messages" if chat else "prompt")
        ctx = self.engine.ctx
        if len(ids) >= ctx:
            return _error(400, f"the prompt has {len(ids)} tokens but the context is {ctx} tokens",
                          param="messages" if chat else "prompt", code="context_length_exceeded")
        return None

    async def generate(self, request: Request, body, ids: list[int], max_tokens: int | None, logprobs: bool,
                       top_logprobs: int, chat: bool, plan: structured.Plan | None = None):
        bad = self.refusal(body, ids, chat)
        if bad is not None:
            return bad
        engine = self.engine
        params = self.params(body, max_tokens, logprobs, top_logprobs, plan.constraint if plan else None)
        params.max_tokens = min(params.max_tokens, engine.ctx - len(ids))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        try:
            handle = engine.submit(ids, params, on_event=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        except QueueFull as e:
            return _error(429, str(e), type_="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
        except EngineStopped as e:
            return _error(503, str(e), type_="server_error", code="shutting_down")
        except UsageError as e:
            return _error(400, str(e))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        shape = _Shape(rid, int(time.time()), self.model_id, chat, engine.tokenizer)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            sse = _sse(events, handle, shape, include_usage, request.scope, plan if chat else None)
            return _Stream(sse, handle, media_type="text/event-stream",
                           headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _reply(request, events, handle, shape, logprobs, plan if chat else None)


async def _reply(request: Request, events: asyncio.Queue, handle, shape: _Shape, logprobs: bool, plan):
    """The non-streamed response of one submitted request (a client that goes away cancels it)."""
    text, lps, last = [], [], None
    try:
        async for ev in _until_finished(events, request):
            text.append(ev.text)
            if ev.token is not None and ev.logprob is not None:
                lps.append(ev)
            last = ev
    finally:
        if last is None or last.finish_reason is None:
            handle.cancel()  # the client went away, or this task was cancelled: free the sequence now
    if last is None or last.finish_reason is None:
        return Response(status_code=499)
    _record_usage(request.scope, last)
    if last.finish_reason in ("error", "cancelled"):
        if last.finish_reason == "error":
            logger.error("request %s failed in the engine: %s", shape.rid, last.error)
        return _error(503 if last.finish_reason == "cancelled" else 500,
                      last.error or "the request was cancelled: the server is shutting down", type_="server_error")
    out = shape.full("".join(text), last, lps if logprobs else None)
    if plan is not None:
        choice = out["choices"][0]
        choice["message"], choice["finish_reason"] = structured.message("".join(text), plan, choice["finish_reason"])
    return out


def _error_handlers(app: FastAPI) -> None:
    """OpenAI's error body for everything FastAPI and Starlette answer themselves."""

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":
            why = (first.get("ctx") or {}).get("error") or first.get("msg", "")
            return _error(400, f"the body is not valid JSON: {why}", code="invalid_json")
        message, param = validation_message(first, errs)
        return _error(400, message, param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        headers = getattr(exc, "headers", None)
        if exc.status_code == 400:  # FastAPI's "There was an error parsing the body": bad UTF-8, deep nesting
            return _error(400, "the body could not be parsed: it must be a JSON object in UTF-8, nested at most "
                               "a few hundred levels", code="invalid_json")
        if exc.status_code == 404:
            return _error(404, f"no route {request.method} {request.url.path[:200]}; this server has "
                               "/v1/chat/completions, /v1/completions, /v1/models, /health and /metrics",
                          code="not_found")
        if exc.status_code == 405:
            return _error(405, f"{request.method} is not allowed on {request.url.path[:200]}",
                          code="method_not_allowed", headers=headers)
        kind = "server_error" if exc.status_code >= 500 else "invalid_request_error"
        return _error(exc.status_code, str(exc.detail), type_=kind, headers=headers)

    @app.exception_handler(UsageError)
    async def usage(request: Request, exc: UsageError):
        return _error(400, str(exc))


def validation_message(err: dict, others: list | None = None) -> tuple[str, str | None]:
    """(message, param) for pydantic's first error: our own validators' text without pydantic's "Value error, "
    and the field they name (schemas.FieldError); for a value that fits no member of a union, the types it may
    have; else pydantic's message after the field's path."""
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, Exception):
        return str(cause), getattr(cause, "param", None) or (".".join(loc) or None)
    if err.get("type") == "model_attributes_type" and not loc:
        return "the body must be a JSON object (Content-Type: application/json)", None
    if loc and _UNION_TAG.search(loc[-1]):  # ('stop', 'str'), ('stop', 'list[str]'): the union's members
        param = ".".join(loc[:-1])
        tags = [str(e["loc"][-1]) for e in (others or [err]) if [str(p) for p in e.get("loc", ())
                                                                 if p != "body"][:-1] == loc[:-1]]
        return f"{param}: expected {' or '.join(dict.fromkeys(tags))}", param
    msg = str(err.get("msg", "invalid request"))
    param = ".".join(loc) or None
    return (f"{param}: {msg}" if param else msg), param


_UNION_TAG = re.compile(r"^(str|int|float|bool|dict|list\[.*\])$")


def _record_usage(scope: dict, ev: Event) -> None:
    scope[USAGE_KEY] = {"prompt": ev.prompt_tokens, "completion": ev.completion_tokens, "finish": ev.finish_reason}


async def _until_finished(events: asyncio.Queue, request: Request):
    """The events of one request until its last, or until the client disconnects (then it stops early)."""
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        while True:
            get = asyncio.ensure_future(events.get())
            done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
            if get not in done:
                get.cancel()
                return
            ev = get.result()
            yield ev
            if ev.finish_reason is not None:
                return
    finally:
        gone.cancel()


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone: the body is read, so the next ASGI message is http.disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _Stream(StreamingResponse):
    """A StreamingResponse that cancels its request however the response ends: a client that goes away before
    the stream's generator has started would otherwise leave the sequence running."""

    def __init__(self, content, handle, **kw):
        super().__init__(content, **kw)
        self.handle = handle

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.handle.cancel()  # a no-op for a finished request


START = time.time()


async def _trim_after_requests(engine: Engine, every: float = 2.0) -> None:
    """Every few seconds in which requests finished, hand the C heap's free pages back to the OS: the KV buffers of
    finished sequences otherwise stay resident in malloc's arenas (glibc keeps freed blocks under its mmap
    threshold, which rises to the size of the last freed buffer), and RSS would hold the largest batch ever run."""
    seen = None
    while True:
        await asyncio.sleep(every)
        done = sum(engine.stats.requests.values())
        if done != seen:
            seen = done
            await run_in_threadpool(release_free_memory)


def release_free_memory() -> None:
    """glibc's malloc_trim(0); a no-op where the C library has none (macOS, musl)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        logger.debug("no C library to trim", exc_info=True)
        return None


class _Shape:
    """OpenAI's response objects for one request."""

    def __init__(self, rid: str, created: int, model: str, chat: bool, tokenizer):
        self.rid, self.created, self.model, self.chat, self.tok = rid, created, model, chat, tokenizer

    def usage(self, ev: Event) -> dict:
        return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
                "total_tokens": ev.prompt_tokens + ev.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": ev.cached_tokens}}

    def _piece(self, t: int) -> str:
        return self.tok.decode([t])

    def logprobs(self, evs: list[Event]):
        if self.chat:
            def entry(t, lp):
                s = self._piece(t)
                return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

            return {"content": [dict(entry(e.token, e.logprob),
                                     top_logprobs=[entry(t, lp) for t, lp in (e.top_logprobs or [])])
                                for e in evs]}
        pieces = [self._piece(e.token) for e in evs]
        offsets, o = [], 0
        for s in pieces:
            offsets.append(o)
            o += len(s)
        return {"tokens": pieces, "token_logprobs": [e.logprob for e in evs],
                "top_logprobs": [{self._piece(t): lp for t, lp in (e.top_logprobs or [])} for e in evs],
                "text_offset": offsets}

    def full(self, text: str, last: Event, lps: list[Event] | None) -> dict:
        finish = "stop" if last.finish_reason == "stop" else "length"
        lp = self.logprobs(lps) if lps is not None else None
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                      "finish_reason": finish}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}
            obj = "text_completion"
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model, "choices": [choice],
                "usage": self.usage(last)}

    def chunk(self, text: str | None, finish: str | None, ev: Event | None = None, first: bool = False,
              with_logprobs: bool = False) -> dict:
        lp = self.logprobs([ev]) if with_logprobs and ev is not None and ev.logprob is not None else None
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": lp, "finish_reason": finish}
            obj = "text_completion"
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model, "choices": [choice]}

    def usage_chunk(self, ev: Event) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model, "choices": [],
                "usage": self.usage(ev)}


def _data(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _sse(events: asyncio.Queue, handle, shape: _Shape, include_usage: bool, scope: dict, plan=None):
    """The SSE stream of one request. A client that goes away cancels the generator here (Starlette cancels the
    response task), and the finally clause cancels the sequence: the engine frees it at its next step."""
    done = False
    split = structured.StreamSplitter(plan) if plan is not None and not plan.passthrough else None
    try:
        if shape.chat:
            yield _data(shape.chunk(None, None, first=True))
        while True:
            ev: Event = await events.get()
            if ev.finish_reason is not None:
                _record_usage(scope, ev)
            if ev.finish_reason in ("error", "cancelled"):
                done = True
                if ev.finish_reason == "error":
                    logger.error("request %s failed in the engine: %s", shape.rid, ev.error)
                yield _data(error_body(ev.error or "the request was cancelled: the server is shutting down",
                                       "server_error"))
                break
            with_lp = ev.logprob is not None
            if split is not None:  # structured output (#23): reasoning, content and tool-call deltas
                for delta in split.feed(ev.text):
                    yield _data(structured.chunk(shape, delta))
            elif ev.text or with_lp:
                yield _data(shape.chunk(ev.text, None, ev, with_logprobs=with_lp))
            if ev.finish_reason is not None:
                done = True
                finish = "stop" if ev.finish_reason == "stop" else "length"
                if split is not None:
                    deltas, finish = split.close(finish)
                    for delta in deltas:
                        yield _data(structured.chunk(shape, delta))
                yield _data(shape.chunk(None, finish))
                if include_usage:
                    yield _data(shape.usage_chunk(ev))
                break
        yield "data: [DONE]\n\n"
    finally:
        if not done:
            handle.cancel()


def make_engine(model, tokenizer, config: ServeConfig) -> Engine:
    """The engine `mlxllama serve` runs (not started): each sequence's KV cache as config asks, after the fit check
    for max_batch sequences at the full context (memory.DoesNotFit, one line, where they would not fit). The prefix
    cache holds any cache kind (a rotating window that has wrapped stores no prefix). With --speculate, the draft
    model (if any) is loaded and checked here."""
    from ..memory import check_model
    from ..prefix_cache import PrefixCache
    from ..speculative import make_config

    settings = config.cache_settings.validate(model.args.head_dim)
    check_options(config)
    ctx = config.ctx or model.args.max_position_embeddings
    if ctx > model.args.max_position_embeddings:
        raise UsageError(f"--ctx {ctx} is more than the model's context ({model.args.max_position_embeddings})")
    check_model(model, ctx, config.max_batch, settings)
    options = dict(config.engine_options)
    if not settings.default:
        options.setdefault("make_cache", lambda n: model.make_cache(1, max_len=n, settings=settings))
    prefix = PrefixCache(config.prefix_cache_bytes, eval=model.ops.eval) if config.prefix_cache_bytes else None
    if config.speculate is not None:
        options.setdefault("speculate", make_config(config.speculate, config.num_draft, config.draft_model,
                                                    target_model=model, target_tokenizer=tokenizer))
    return Engine(model, tokenizer, max_batch=config.max_batch, max_queue=config.max_queue,
                  prefill_chunk=config.prefill_chunk, ctx=config.ctx,
                  prefix_cache=prefix, **options)


def check_options(config: ServeConfig) -> None:
    """Option errors that need no model: the cache settings and the speculation options."""
    from ..speculative import check_options as check_speculation

    config.cache_settings.validate()
    check_speculation(config.speculate, config.num_draft, config.draft_model is not None)


def _kv_label(config: ServeConfig, ops) -> str:
    from ..cache import for_backend

    kv = f"{config.kv_bits}-bit KV" if config.kv_bits else \
        f"{for_backend(config.cache_settings, ops).kv_dtype or 'float'} KV"
    if config.max_kv_size:
        kv += f", window {config.max_kv_size}"
    return kv + (f", speculate {config.speculate} k<={config.num_draft}" if config.speculate else "")


def run(config: ServeConfig) -> None:
    """Load the model, start the engine and serve until SIGINT/SIGTERM (uvicorn's handlers): then stop taking
    requests, let in-flight ones finish for up to config.shutdown_timeout seconds, cancel the rest."""
    import uvicorn

    from .. import api
    from ..sampling_defaults import describe, with_overrides

    check_options(config)  # before the model loads
    path = api.resolve(config.model, config.revision)
    values, source = with_overrides(path, config.sampling or {})
    if config.parallel is not None:
        model, tokenizer = _parallel_model(path, config)
        if model is None:  # another rank than 0: it served rank 0's forward passes until rank 0 closed
            return
        # a saved prefix would live on rank 0 alone; pipeline ranks run one sequence per step
        config = replace(config, prefix_cache_bytes=0,
                         max_batch=config.max_batch if config.parallel == "tensor" else 1)
    sock = _listen(config)
    try:
        if config.parallel is None:
            model, tokenizer = api.load(path, backend=config.backend, numpy_weights=config.numpy_weights)
        engine = make_engine(model, tokenizer, config)
        if config.warmup and config.parallel is None:
            logger.info("warm-up run: %.2f s", engine.warm_up())
        engine.start()
    except BaseException:
        sock.close()
        _close(model if config.parallel is not None else None)
        raise
    config = replace(config, sampling=values)
    model_id = config.model_id or (path.stem if path.is_file() else path.name)
    app = create_app(engine, model_id, config, accepted_names(model_id, config, path))

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):  # uvicorn's own re-raises the signal after shutting down: exit 0 instead
            old = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in old.items():
                    signal.signal(sig, handler)

    server = Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning",
                                   timeout_graceful_shutdown=int(config.shutdown_timeout) or None,
                                   access_log=False, log_config=None))
    shown = sorted(repr(n) for n in app.state.model_names if n != str(path))
    names = "any model name" if config.any_model else f"model names {', '.join(shown)} and the file's path"
    print(f"mlxllama serve: {model_id} on http://{config.host}:{config.port}/v1 ({model.device}, "
          f"max batch {config.max_batch}, context {engine.ctx}, {_kv_label(config, model.ops)})\n"
          f"  requests that leave them out get: {describe(values)} ({source}), max tokens "
          f"{min(config.max_tokens, engine.ctx)}; accepting {names}", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        _close(model if config.parallel is not None else None)
    logger.info("mlxllama serve: stopped")


def _parallel_model(path, config: ServeConfig):
    """Under mlx.launch: (rank 0's distributed model, tokenizer) on rank 0; (None, None) on the other ranks once
    rank 0 has closed (they serve its forward passes, batched steps included, until then)."""
    from ..distributed import setup

    return setup(path, config.parallel, backend="mlx" if config.backend == "auto" else config.backend,
                 revision=config.revision)


def _close(model) -> None:
    if model is not None:
        model.close()  # releases the other ranks


def _listen(config: ServeConfig) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.host, config.port))
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot listen on {config.host}:{config.port}: {e.strerror or e}") from None
    return sock
