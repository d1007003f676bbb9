"""Per-API-key (and per-IP on signup) rate limiting with the draft RateLimit headers."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from loguru import logger

from keel.main.errors import RATE_LIMITED
from keel.platform.adapters.http.problems import ProblemError
from keel.platform.domain.tenancy import Principal
from keel.platform.ports.rate_limit import RateLimitDecision, RateLimiter

QuotaLookup = Callable[[Principal], Awaitable[int | None]]

_OPEN_FOR = 1.0  # after a limiter failure, admit without asking for this long (no timeout per request)


class RateLimitStats:
    """Per process, shared by every route's middleware instance (Litestar builds one per route)."""

    def __init__(self) -> None:
        self.failed_open = 0
        self.open_until = 0.0


def client_ip(scope: Scope) -> str:
    client = scope.get("client")
    return client[0] if client else "unknown"


class RateLimitMiddleware:
    """Runs after authentication. Fails open: a broken limiter must not take the API down with it."""

    def __init__(
        self,
        app: ASGIApp,
        limiter: RateLimiter,
        quota: QuotaLookup,
        per_minute: int,
        signup_per_hour: int,
        stats: RateLimitStats,
    ) -> None:
        self.app = app
        self._limiter = limiter
        self._quota = quota
        self._per_minute = per_minute
        self._signup_per_hour = signup_per_hour
        self._stats = stats

    async def _policy(self, scope: Scope) -> tuple[str, str, int, int] | None:
        handler = scope.get("route_handler")
        if handler is not None and handler.opt.get("rate_limit") == "signup":
            return "signup", f"signup:{client_ip(scope)}", self._signup_per_hour, 3600
        user = scope.get("user")
        if isinstance(user, Principal):
            quota = await self._quota(user)
            return "default", f"key:{user.api_key_id}", quota or self._per_minute, 60
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP or time.monotonic() < self._stats.open_until:
            await self.app(scope, receive, send)
            return
        policy = await self._policy(scope)
        if policy is None:
            await self.app(scope, receive, send)
            return
        name, key, limit, window = policy
        try:
            decision = await self._limiter.hit(key, limit, window)
        except Exception as exc:  # noqa: BLE001 - fail open, loudly
            self._stats.failed_open += 1
            self._stats.open_until = time.monotonic() + _OPEN_FOR
            logger.warning("rate limiter unavailable, admitting requests: {!r}", exc)
            await self.app(scope, receive, send)
            return
        headers = _headers(name, decision)
        if not decision.allowed:
            retry = str(max(1, decision.reset_after))
            raise ProblemError(
                429,
                f"Rate limit of {limit} requests per {window} s exceeded; retry in {retry} s.",
                RATE_LIMITED.slug,
                headers={"Retry-After": retry, **{k.decode(): v.decode() for k, v in headers}},
            )

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *headers]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _headers(name: str, d: RateLimitDecision) -> list[tuple[bytes, bytes]]:
    # draft-ietf-httpapi-ratelimit-headers: structured-field lists keyed by policy name.
    return [
        (b"ratelimit-policy", f'"{name}";q={d.limit};w={d.window}'.encode()),
        (b"ratelimit", f'"{name}";r={d.remaining};t={d.reset_after}'.encode()),
    ]
