"""An OpenAI-compatible HTTP server: a thin shell over the Engine (mlxllama/engine.py), which runs in its own thread.

Routes: POST /v1/chat/completions, POST /v1/completions (stream or not), GET /v1/models, /health, /metrics.
Errors are OpenAI's JSON, {"error": {"message", "type", "param", "code"}}: 400 for bad input, 401 without the API
key, 413 for a body over the limit, 429 (with Retry-After) on a full queue, 503 while shutting down.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import signal
import socket
import time
import uuid
from collections import Counter
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..engine import Engine, EngineStopped, Event, QueueFull, RequestParams
from ..errors import UsageError
from ..sampling import SamplingParams
from . import metrics, structured
from .schemas import ChatCompletionRequest, CompletionRequest


@dataclass
class ServeConfig:
    """What `mlxllama serve` passes on; new options go here and in cli/serve.py."""
    model: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    backend: str = "auto"
    revision: str | None = None
    numpy_weights: str | None = None
    model_id: str | None = None  # the name /v1/models reports and requests may give; default: the file's stem
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
    speculate: str | None = None  # "lookup" or "draft" (draft_model: a reference with the model's vocabulary)
    num_draft: int = 8
    draft_model: str | None = None
    engine_options: dict[str, Any] = field(default_factory=dict)  # more Engine keyword arguments

    @property
    def cache_settings(self):
        from ..cache import CacheSettings

        return CacheSettings(kv_bits=self.kv_bits, kv_group_size=self.kv_group_size, max_kv_size=self.max_kv_size)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
           code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


class _TooLarge(Exception):
    pass


class _BodyLimit:
    """Refuses request bodies over `limit` bytes (413), by Content-Length or as they stream in."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._refuse(scope, receive, send)
        seen = 0
        started = False

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return msg

        async def tracking_send(msg):
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, limited, tracking_send)
        except _TooLarge:
            if not started:
                await self._refuse(scope, receive, send)

    async def _refuse(self, scope, receive, send):
        resp = _error(413, f"the request body is over {self.limit} bytes", code="request_too_large")
        await resp(scope, receive, send)


def create_app(engine: Engine, model_id: str, config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app over a started engine; the app's shutdown shuts the engine down."""
    config = config or ServeConfig()
    http_counts: Counter = Counter()

    @asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(engine.shutdown, config.shutdown_timeout)

    app = FastAPI(title="mlxllama", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_BodyLimit, limit=config.max_body_bytes)
    key = config.api_key.encode() if config.api_key else None

    @app.middleware("http")
    async def auth_and_count(request: Request, call_next):
        if key is not None and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if not (scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key)):
                resp = _error(401, "a valid API key is required: Authorization: Bearer KEY", code="invalid_api_key")
                http_counts[(request.url.path, 401)] += 1
                return resp
        resp = await call_next(request)
        http_counts[(request.url.path if request.url.path in _PATHS else "other", resp.status_code)] += 1
        return resp

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return _error(400, f"the body is not valid JSON: {first.get('msg', '')}", code="invalid_json")
        msg = str(first.get("msg", "invalid request"))
        param = ".".join(loc) or None
        return _error(400, f"{param}: {msg}" if param else msg, param=param, code="invalid_value")

    @app.exception_handler(UsageError)
    async def usage(request: Request, exc: UsageError):
        return _error(400, str(exc))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        return _error(500, f"internal error: {type(exc).__name__}", type_="server_error")

    @app.get("/health")
    async def health():
        if engine._draining or not engine.running_in_thread:
            return _error(503, "shutting down", type_="server_error")
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": int(START),
                                            "owned_by": "mlxllama"}]}

    @app.get("/metrics")
    async def metrics_route():
        return Response(metrics.render(engine, dict(http_counts)), media_type=metrics.CONTENT_TYPE)

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
        return await _generate(request, body, ids, max_tokens, body.logprobs, top, chat=True, plan=plan)

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
        return await _generate(request, body, ids, body.max_tokens or 16, lp is not None, lp or 0, chat=False,
                               plan=structured.Plan(constraint=constraint))

    async def _generate(request: Request, body, ids: list[int], max_tokens: int | None, logprobs: bool,
                        top_logprobs: int, chat: bool, plan: structured.Plan | None = None):
        if body.model is not None and body.model != model_id:
            return _error(400, f"the model {body.model!r} is not served here; this server serves {model_id!r}",
                          param="model", code="model_not_found")
        if not ids:
            return _error(400, "the prompt is empty", param="messages" if chat else "prompt")
        ctx = engine.ctx
        if len(ids) >= ctx:
            return _error(400, f"the prompt has {len(ids)} tokens but the context is {ctx} tokens",
                          param="messages" if chat else "prompt", code="context_length_exceeded")
        params = RequestParams(
            max_tokens=max_tokens or ctx, stop=body.stops,
            sampling=SamplingParams(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                                    min_p=body.min_p, repetition_penalty=body.repetition_penalty, seed=body.seed),
            frequency_penalty=body.frequency_penalty, presence_penalty=body.presence_penalty,
            logprobs=logprobs, top_logprobs=top_logprobs, constraint=plan.constraint if plan else None)
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
        created = int(time.time())
        shape = _Shape(rid, created, model_id, chat, engine.tokenizer)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_sse(events, handle, shape, include_usage, plan if chat else None),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text, lps, last = [], [], None
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        handle.cancel()
                        return Response(status_code=499)
                    continue
                text.append(ev.text)
                if ev.token is not None and ev.logprob is not None:
                    lps.append(ev)
                if ev.finish_reason is not None:
                    last = ev
                    break
        finally:
            if last is None:
                handle.cancel()
        if last.finish_reason in ("error", "cancelled"):
            return _error(503 if last.finish_reason == "cancelled" else 500,
                          last.error or "the request was cancelled: the server is shutting down", type_="server_error")
        out = shape.full("".join(text), last, lps if logprobs else None)
        if chat and plan is not None:
            choice = out["choices"][0]
            choice["message"], choice["finish_reason"] = structured.message("".join(text), plan,
                                                                            choice["finish_reason"])
        return out

    return app


_PATHS = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"}
START = time.time()


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


async def _sse(events: asyncio.Queue, handle, shape: _Shape, include_usage: bool, plan=None):
    """The SSE stream of one request. A client that goes away cancels the generator here (Starlette cancels the
    response task), and the finally clause cancels the sequence: the engine frees it at its next step."""
    done = False
    split = structured.StreamSplitter(plan) if plan is not None and not plan.passthrough else None
    try:
        if shape.chat:
            yield _data(shape.chunk(None, None, first=True))
        while True:
            ev: Event = await events.get()
            if ev.finish_reason in ("error", "cancelled"):
                done = True
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
    cache holds float K/V only: with --kv-bits or --max-kv-size there is none. With --speculate, the draft model
    (if any) is loaded and checked here."""
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
    use_prefix = config.prefix_cache_bytes and settings.default
    if config.speculate is not None:
        options.setdefault("speculate", make_config(config.speculate, config.num_draft, config.draft_model,
                                                    target_model=model, target_tokenizer=tokenizer))
    return Engine(model, tokenizer, max_batch=config.max_batch, max_queue=config.max_queue,
                  prefill_chunk=config.prefill_chunk, ctx=config.ctx,
                  prefix_cache=PrefixCache(config.prefix_cache_bytes) if use_prefix else None, **options)


def check_options(config: ServeConfig) -> None:
    """Option errors that need no model: the cache settings and the speculation options."""
    from ..speculative import check_options as check_speculation

    config.cache_settings.validate()
    check_speculation(config.speculate, config.num_draft, config.draft_model is not None)
    if config.speculate is not None and config.max_kv_size is not None:
        raise UsageError("--speculate and --max-kv-size do not combine: a rotating window cannot roll back "
                         "rejected drafts once it has wrapped")


def _kv_label(config: ServeConfig) -> str:
    kv = f"{config.kv_bits}-bit KV" if config.kv_bits else "float KV"
    if config.max_kv_size:
        kv += f", window {config.max_kv_size}"
    kv += "" if config.cache_settings.default or not config.prefix_cache_bytes else ", no prefix cache"
    return kv + (f", speculate {config.speculate} k<={config.num_draft}" if config.speculate else "")


def run(config: ServeConfig) -> None:
    """Load the model, start the engine and serve until SIGINT/SIGTERM (uvicorn's handlers): then stop taking
    requests, let in-flight ones finish for up to config.shutdown_timeout seconds, cancel the rest."""
    import uvicorn

    from .. import api

    check_options(config)  # before the model loads
    sock = socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.host, config.port))
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot listen on {config.host}:{config.port}: {e.strerror or e}") from None
    try:
        path = api.resolve(config.model, config.revision)
        model, tokenizer = api.load(path, backend=config.backend, numpy_weights=config.numpy_weights)
        engine = make_engine(model, tokenizer, config).start()
    except BaseException:
        sock.close()
        raise
    model_id = config.model_id or (path.stem if path.is_file() else path.name)
    app = create_app(engine, model_id, config)
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
                                           access_log=False))
    print(f"mlxllama serve: {model_id} on http://{config.host}:{config.port}/v1 ({model.device}, "
          f"max batch {config.max_batch}, context {engine.ctx}, {_kv_label(config)})", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
