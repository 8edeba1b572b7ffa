"""The HTTP layer under the routes, as plain ASGI middleware: OpenAI's error bodies, the body size limit, the API
key, the per-path counter and the access log (one line per request: status, seconds, tokens)."""

from __future__ import annotations

import hmac
import logging
import time

from fastapi.responses import JSONResponse

logger = logging.getLogger("mlxllama.server.access")
error_logger = logging.getLogger("mlxllama.server")

PATHS = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"}
USAGE_KEY = "mlxllama.usage"  # the scope key where a generation route leaves its token counts for the log


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


class _TooLarge(Exception):
    pass


class BodyLimit:
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
        resp = error_response(413, f"the request body is over {self.limit} bytes", code="request_too_large")
        await resp(scope, receive, send)


class Gate:
    """The API key (all paths but /health), then the counter and the access log for every answered request."""

    def __init__(self, app, api_key: str | None, count, access_log: bool = True):
        self.app, self.count, self.access_log = app, count, access_log
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 0

        async def tracking_send(msg):
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            if self.key is not None and scope["path"] != "/health" and not self._authorized(scope):
                resp = error_response(401, "a valid API key is required: Authorization: Bearer KEY",
                                      code="invalid_api_key")
                await resp(scope, receive, tracking_send)
            else:
                await self.app(scope, receive, tracking_send)
        except Exception:  # a bug on the server's side: its traceback in the log once, OpenAI's 500 to the client
            error_logger.error("%s %s failed", scope["method"], repr(scope["path"][:200])[1:-1], exc_info=True)
            if not status:
                resp = error_response(500, "internal server error", type_="server_error")
                await resp(scope, receive, tracking_send)
        finally:
            status = status or 499  # no response started: the client went away (or the server stopped first)
            self.count(scope["path"] if scope["path"] in PATHS else "other", status)
            if self.access_log:
                self._log(scope, status, time.perf_counter() - t0)

    def _authorized(self, scope) -> bool:
        given = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("latin-1"), self.key)

    @staticmethod
    def _log(scope, status: int, seconds: float) -> None:
        client = scope.get("client")
        who = f"{client[0]}:{client[1]}" if client else "-"
        usage = scope.get(USAGE_KEY)
        tokens = (f" prompt={usage['prompt']} completion={usage['completion']} finish={usage['finish']}"
                  if usage else "")
        path = repr(scope["path"][:200])[1:-1]  # a hostile path's control characters stay escaped, on one line
        logger.info('%s "%s %s" %d %.3fs%s', who, scope["method"], path, status, seconds, tokens)
