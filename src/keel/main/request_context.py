"""Request id and access log: the first thing every request meets."""

from __future__ import annotations

import re
import secrets
import time
from functools import cache

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from loguru import logger
from opentelemetry import trace
from opentelemetry.semconv.attributes.http_attributes import HTTP_ROUTE

from keel.platform.context import request_id_var

REQUEST_ID_HEADER = "x-request-id"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$")
# "/v1/users/{user_id:uuid}" -> "/v1/users/{user_id}", the form OpenAPI and tracing backends expect.
_PARAM_TYPE = re.compile(r"\{(\w+):[^}]+\}")
_STATE_ID = "keel.request_id"
_STATE_START = "keel.started"


def route_of(scope: Scope) -> str | None:
    template = scope.get("path_template")
    return _route(template) if template else None


@cache  # templates come from the app's routes, a fixed set: each is rewritten once, not per request
def _route(template: str) -> str:
    return _PARAM_TYPE.sub(r"{\1}", template)


def ensure_request_id(scope: Scope) -> str:
    """The request's id: the client's ``X-Request-ID`` when well-formed, else a fresh one. Idempotent."""
    state = scope.setdefault("state", {})
    rid: str | None = state.get(_STATE_ID)
    if rid is None:
        rid = ""
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                if _VALID_REQUEST_ID.match(candidate):
                    rid = candidate
                break
        rid = rid or secrets.token_hex(16)  # 32 hex digits, like a UUID's, for a third of the cost
        state[_STATE_ID] = rid
        state[_STATE_START] = time.perf_counter()
    return rid


async def echo_request_id(message: Message, scope: Scope) -> None:
    """``before_send`` hook: every response, routed or not, carries the request id and is logged once."""
    if message["type"] != "http.response.start":
        return
    rid = ensure_request_id(scope)
    headers = list(message.get("headers", []))
    headers.append((b"x-request-id", rid.encode("latin-1")))
    message["headers"] = headers
    started = scope["state"].get(_STATE_START)
    status = message["status"]
    # Fields as keyword arguments rather than bind(): loguru drops a record below every sink's level
    # before building anything, where bind() would copy the logger's options for each request first.
    logger.log(
        _access_level(scope.get("path", ""), status),
        "request served",
        request_id=rid,
        method=scope.get("method"),
        path=scope.get("path"),
        route=route_of(scope),
        status=status,
        duration_ms=round((time.perf_counter() - started) * 1000, 2) if started else None,
    )


_PROBES = frozenset({"/livez", "/healthz"})


def _access_level(path: str, status: int) -> str:
    if status >= 500:
        return "WARNING"
    # Orchestrators poll the probes every few seconds; at INFO they would drown real traffic.
    return "DEBUG" if path in _PROBES else "INFO"


class RequestContextMiddleware:
    """Binds the request id for the handler's whole call tree (logs, jobs, outgoing calls) and names
    the server span after the route template, as the HTTP semantic conventions ask."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        token = request_id_var.set(ensure_request_id(scope))
        span = trace.get_current_span()
        if span.is_recording():
            route = route_of(scope) or scope.get("path", "")
            span.update_name(f"{scope.get('method')} {route}")
            span.set_attribute(HTTP_ROUTE, route)
        try:
            await self.app(scope, receive, send)
        finally:
            request_id_var.reset(token)
