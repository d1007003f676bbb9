"""A real HTTP webhook receiver on 127.0.0.1, scripted per request, recording what it received."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]  # lower-cased names
    body: bytes
    at: float


class Receiver:
    """``script`` answers the first requests in order; after it runs out, every request gets ``then``.
    ``started`` is set when a request arrives, before its reply (tests kill workers mid-request)."""

    def __init__(self, script: list[Reply] | None = None, then: Reply | None = None) -> None:
        self.script = list(script or [])
        self.then = then or Reply()
        self.received: list[Received] = []
        self.started = threading.Event()
        self._lock = threading.Lock()
        self.url = ""

    def _next(self) -> Reply:
        with self._lock:
            return self.script.pop(0) if self.script else self.then

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.received) >= count:
                    return list(self.received)
            time.sleep(0.02)
        raise AssertionError(f"expected {count} request(s), got {len(self.received)}")


@contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """An HTTP server on a free loopback port, in a thread, for as long as the block; yields its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def webhook_receiver(script: list[Reply] | None = None, then: Reply | None = None) -> Iterator[Receiver]:
    receiver = Receiver(script, then)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            receiver.started.set()
            reply = receiver._next()
            if reply.delay:
                time.sleep(reply.delay)
            with receiver._lock:
                receiver.received.append(
                    Received(
                        path=self.path,
                        headers={k.lower(): v for k, v in self.headers.items()},
                        body=body,
                        at=time.time(),
                    )
                )
            self.send_response(reply.status)
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    with serving(Handler) as base:
        receiver.url = f"{base}/hooks"
        yield receiver
