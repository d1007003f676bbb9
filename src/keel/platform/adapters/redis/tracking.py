"""Redis server-assisted client-side caching: the connection that hears which keys changed.

One connection per process asks Redis to track every key under a prefix (``CLIENT TRACKING ON
BCAST PREFIX p``, redirected to itself) and subscribes to ``__redis__:invalidate``. Redis then sends
the name of every key under the prefix that any client modifies, deletes or lets expire, as part of
executing that command: before the writer gets its reply.

Hand-written on an ``asyncio.Protocol`` rather than redis-py's ``PubSub``: redis-py's asyncio client
has no client-side caching, and a PubSub reader is a task that runs whenever the event loop gets to
it, whereas a protocol's ``data_received`` runs as soon as the loop sees the bytes. ``pending()``
closes the rest of the gap: it asks the kernel how many bytes wait unread on the socket, so a caller
can tell whether an invalidation has arrived that the loop has not delivered yet.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import os
import socket
import ssl
import termios
from collections.abc import Callable
from typing import Any, cast

from loguru import logger
from redis.asyncio.connection import parse_url

_CHANNEL = b"__redis__:invalidate"


class ProtocolError(Exception):
    pass


def _encode(*parts: str | bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


_INCOMPLETE = object()


def _parse(buf: bytearray, pos: int) -> tuple[Any, int]:
    """One RESP2 value from ``buf`` at ``pos``: (value, next position), or (_INCOMPLETE, pos)."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        return _INCOMPLETE, pos
    kind, line = buf[pos : pos + 1], bytes(buf[pos + 1 : end])
    after = end + 2
    if kind == b"+":
        return line, after
    if kind == b"-":
        return ProtocolError(line.decode(errors="replace")), after
    if kind == b":":
        return int(line), after
    if kind == b"$":
        size = int(line)
        if size < 0:
            return None, after
        if len(buf) < after + size + 2:
            return _INCOMPLETE, pos
        return bytes(buf[after : after + size]), after + size + 2
    if kind == b"*":
        count = int(line)
        if count < 0:
            return None, after
        items = []
        for _ in range(count):
            item, after = _parse(buf, after)
            if item is _INCOMPLETE:
                return _INCOMPLETE, pos
            items.append(item)
        return items, after
    raise ProtocolError(f"unexpected RESP type {kind!r}")


class _TrackingProtocol(asyncio.Protocol):
    def __init__(self, on_keys: Callable[[list[bytes] | None], None]) -> None:
        self._on_keys = on_keys
        self._buffer = bytearray()
        self._replies: asyncio.Queue[Any] = asyncio.Queue()
        self._subscribed = False
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self._probe: socket.socket | None = None
        self._unread = array.array("i", [0])

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport, though not necessarily an asyncio.Transport subclass: uvloop's are not, and
        # granian runs the app on uvloop whenever it is installed.
        self.transport = cast(asyncio.Transport, transport)
        raw = transport.get_extra_info("socket")
        if raw is not None:
            # A duplicate of the descriptor, used only to ask how many bytes wait unread.
            self._probe = socket.socket(fileno=os.dup(raw.fileno()))

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        pos = 0
        try:
            while pos < len(self._buffer):
                value, pos_after = _parse(self._buffer, pos)
                if value is _INCOMPLETE:
                    break
                pos = pos_after
                self._dispatch(value)
        except (ProtocolError, ValueError) as exc:
            logger.warning("redis tracking connection: unreadable reply, reconnecting: {!r}", exc)
            self.abort()
            return
        del self._buffer[:pos]

    def _dispatch(self, value: Any) -> None:
        if (
            self._subscribed
            and isinstance(value, list)
            and len(value) == 3
            and value[0] == b"message"
            and value[1] == _CHANNEL
        ):
            # A list of key names, or nil when Redis flushed everything (FLUSHALL, FLUSHDB).
            self._on_keys(value[2] if isinstance(value[2], list) else None)
            return
        self._replies.put_nowait(value)

    async def command(self, *parts: str | bytes) -> Any:
        assert self.transport is not None
        self.transport.write(_encode(*parts))
        reply = await self._replies.get()
        if isinstance(reply, ProtocolError):
            raise reply
        return reply

    def subscribed(self) -> None:
        self._subscribed = True

    def pending(self) -> bool:
        """True when bytes have reached this process that the loop has not delivered yet."""
        if self._buffer:
            return True
        if self._probe is None:
            return False
        try:
            fcntl.ioctl(self._probe.fileno(), termios.FIONREAD, self._unread)  # a quarter of a recv's cost
        except OSError:
            return True
        return self._unread[0] > 0

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._probe is not None:
            self._probe.close()
            self._probe = None
        if not self.closed.done():
            self.closed.set_result(exc)


class RedisKeyTracking:
    """Keeps one tracking connection open (reconnecting with backoff) and reports what it hears.

    ``on_keys(names)`` gets the changed keys, or None for "assume everything changed": a flush, and
    every (re)connection or loss, because nothing is heard while the connection is down.
    ``ready`` is True only while the connection is up and subscribed.
    """

    def __init__(
        self,
        url: str,
        prefix: str,
        on_keys: Callable[[list[bytes] | None], None],
        *,
        connect_timeout: float = 1.0,
    ) -> None:
        self._url = url
        self._prefix = prefix
        self._on_keys = on_keys
        self._connect_timeout = connect_timeout
        self._protocol: _TrackingProtocol | None = None
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()

    @property
    def ready(self) -> bool:
        return self._protocol is not None

    def pending(self) -> bool:
        protocol = self._protocol
        return protocol is None or protocol.pending()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="redis-key-tracking")

    async def wait_ready(self) -> None:
        """Until tracking is up (bound it with ``asyncio.timeout``)."""
        await self._connected.wait()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._lost()

    def _lost(self) -> None:
        if self._protocol is not None:
            self._protocol.abort()
            self._protocol = None
        self._connected.clear()
        self._on_keys(None)

    async def _run(self) -> None:
        delay = 0.05
        while True:
            try:
                protocol = await asyncio.wait_for(self._connect(), self._connect_timeout)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure: stay in pass-through and retry
                logger.debug("redis key tracking unavailable, retrying in {:.2f}s: {!r}", delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.05
            # Whatever changed while no one was listening is unknown: start from an empty tier.
            self._on_keys(None)
            self._protocol = protocol
            self._connected.set()
            try:
                await protocol.closed
            finally:
                self._lost()

    async def _connect(self) -> _TrackingProtocol:
        options = parse_url(self._url)
        loop = asyncio.get_running_loop()
        protocol: _TrackingProtocol | None = None

        def factory() -> _TrackingProtocol:
            nonlocal protocol
            protocol = _TrackingProtocol(self._on_keys)
            return protocol

        if "path" in options:
            await loop.create_unix_connection(factory, options["path"])
        else:
            context: ssl.SSLContext | None = None
            if options.get("connection_class") is not None and "SSL" in options["connection_class"].__name__:
                context = ssl.create_default_context()
                if options.get("ssl_cert_reqs") in ("none", "optional"):
                    context.check_hostname = False
                    context.verify_mode = ssl.CERT_NONE
            await loop.create_connection(
                factory, options.get("host", "localhost"), options.get("port", 6379), ssl=context
            )
        assert protocol is not None
        try:
            if options.get("password") is not None:
                if options.get("username"):
                    await protocol.command("AUTH", options["username"], options["password"])
                else:
                    await protocol.command("AUTH", options["password"])
            client_id = await protocol.command("CLIENT", "ID")
            await protocol.command(
                "CLIENT", "TRACKING", "ON", "REDIRECT", str(client_id), "BCAST", "PREFIX", self._prefix
            )
            await protocol.command("SUBSCRIBE", _CHANNEL)
            protocol.subscribed()
        except BaseException:
            protocol.abort()
            raise
        return protocol
