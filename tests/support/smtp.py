"""A real SMTP server on 127.0.0.1 (aiosmtpd, random port), recording every message it accepts."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any, cast

from aiosmtpd.controller import Controller


@dataclass(frozen=True)
class Delivered:
    """One accepted message: the SMTP envelope and the raw bytes of the message."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes

    @property
    def message(self) -> EmailMessage:
        return message_from_bytes(self.data, policy=policy.default)


class SmtpSink:
    """The aiosmtpd handler. ``refuse`` answers the next that many DATA commands with a temporary
    failure (451), as a mail server that is briefly unwell does; later messages are accepted."""

    def __init__(self, refuse: int = 0) -> None:
        self.refuse = refuse
        self.host = "127.0.0.1"
        self.port = 0
        self._delivered: list[Delivered] = []
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"smtp://{self.host}:{self.port}"

    @property
    def delivered(self) -> list[Delivered]:
        with self._lock:
            return list(self._delivered)

    @property
    def messages(self) -> list[EmailMessage]:
        return [d.message for d in self.delivered]

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Delivered]:
        """Block until at least ``count`` messages arrived (for sync tests; async ones poll ``delivered``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.delivered
            if len(got) >= count:
                return got
            time.sleep(0.02)
        raise AssertionError(f"expected {count} message(s), got {len(self.delivered)}")

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self._lock:
            if self.refuse > 0:
                self.refuse -= 1
                return "451 4.3.0 Try again later"
            content = envelope.original_content or envelope.content
            self._delivered.append(
                Delivered(
                    mail_from=str(envelope.mail_from),
                    rcpt_tos=tuple(str(r) for r in envelope.rcpt_tos),
                    data=content if isinstance(content, bytes) else str(content).encode(),
                )
            )
        return "250 2.0.0 Message accepted for delivery"


class _LoopbackController(Controller):
    """Binds port 0 (a truly free port, no probe-then-bind race) and learns the port from the socket."""

    def _trigger_server(self) -> None:
        server = cast(asyncio.Server, self.server)
        self.port = int(server.sockets[0].getsockname()[1])
        super()._trigger_server()  # type: ignore[no-untyped-call]


@contextmanager
def smtp_server(refuse: int = 0) -> Iterator[SmtpSink]:
    """``with smtp_server() as smtp:`` -> point ``KEEL_SMTP_URL`` at ``smtp.url``; read ``smtp.delivered``."""
    sink = SmtpSink(refuse=refuse)
    controller = _LoopbackController(sink, hostname="127.0.0.1", port=0, ready_timeout=10.0)
    controller.start()
    sink.port = controller.port
    try:
        yield sink
    finally:
        controller.stop()
