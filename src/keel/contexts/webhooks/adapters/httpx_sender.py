"""Webhook attempts over HTTP with httpx: Standard Webhooks headers signed by the official
``standardwebhooks`` package, a hard timeout, no redirects, and an SSRF guard at connect time."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpcore
import httpx
from standardwebhooks.webhooks import Webhook

from keel.contexts.webhooks.domain.model import ATTEMPT_TIMEOUT, SendResult, is_public_address
from keel.platform.context import request_id_var

USER_AGENT = "Keel-Webhooks/1"


class BlockedAddress(OSError):
    pass


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    """Resolves the host itself, refuses non-public addresses, then connects to the address it
    checked, so a DNS answer cannot change between the check and the connection (rebinding).
    TLS still verifies the certificate against the URL's host name."""

    def __init__(self, inner: httpcore.AsyncNetworkBackend) -> None:
        self._inner = inner

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
        addresses = [str(info[4][0]) for info in infos]
        allowed = [a for a in addresses if is_public_address(ipaddress.ip_address(a.split("%", 1)[0]))]
        if not allowed:
            raise BlockedAddress(f"{host} resolves to a private, loopback or link-local address")
        return await self._inner.connect_tcp(
            allowed[0], port, timeout=timeout, local_address=local_address, socket_options=socket_options
        )

    async def connect_unix_socket(self, *args: Any, **kwargs: Any) -> httpcore.AsyncNetworkStream:
        raise BlockedAddress("unix sockets are not webhook targets")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _GuardedTransport(httpx.AsyncHTTPTransport):
    def __init__(self) -> None:
        super().__init__(retries=0)
        # httpx has no public hook for the network backend; the pool is rebuilt with the guard.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(), network_backend=_GuardedBackend(httpcore.AnyIOBackend())
        )


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


class HttpxWebhookSender:
    def __init__(self, *, allow_private: bool = False, timeout: float = ATTEMPT_TIMEOUT) -> None:
        transport = httpx.AsyncHTTPTransport(retries=0) if allow_private else _GuardedTransport()
        self._client = httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(timeout),
            follow_redirects=False,  # 3xx is a failure: a redirect could lead anywhere
            trust_env=False,  # an environment proxy would bypass the address guard
            headers={"User-Agent": USER_AGENT},
        )
        self._timeout = timeout

    async def aclose(self) -> None:
        await self._client.aclose()

    async def send(self, url: str, *, message_id: str, body: str, secrets: Sequence[str]) -> SendResult:
        now = datetime.now(UTC)
        # One signature per valid secret, space-separated: receivers still on the old secret verify.
        signature = " ".join(Webhook(secret).sign(message_id, now, body) for secret in secrets)
        headers = {
            "content-type": "application/json",
            "webhook-id": message_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": signature,
        }
        if (rid := request_id_var.get()) is not None:
            headers["x-request-id"] = rid
        started = time.perf_counter()
        try:
            async with self._client.stream("POST", url, content=body.encode(), headers=headers) as response:
                # The body is not needed; reading a few bytes lets the connection be reused.
                async for _ in response.aiter_raw(1024):
                    break
                status = response.status_code
                retry_after = parse_retry_after(response.headers.get("retry-after"))
        except BlockedAddress as exc:
            return SendResult(latency_ms=_ms(started), error=f"Target refused: {exc}.", refused=True)
        except httpx.InvalidURL as exc:
            # A URL stored before its checks were tightened: it can never work, so it fails like a refusal.
            return SendResult(latency_ms=_ms(started), error=f"Target refused: invalid URL ({exc}).", refused=True)
        except httpx.TimeoutException:
            return SendResult(latency_ms=_ms(started), error=f"No response within {self._timeout:g}s.")
        except httpx.HTTPError as exc:
            return SendResult(latency_ms=_ms(started), error=f"Connection failed: {type(exc).__name__}.")
        error = None if 200 <= status < 300 else f"HTTP {status}"
        return SendResult(latency_ms=_ms(started), status_code=status, error=error, retry_after=retry_after)


def _ms(started: float) -> int:
    return round((time.perf_counter() - started) * 1000)
