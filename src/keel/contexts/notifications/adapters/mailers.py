"""Mail transports: SMTP (aiosmtplib) in production, ``.eml`` files in the data directory by default."""

from __future__ import annotations

import asyncio
import re
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path
from urllib.parse import unquote, urlsplit

import aiosmtplib

from keel.contexts.notifications.domain.model import OutgoingEmail

# Every character the email package treats as a line break (str.splitlines): one in a header value
# raises, and names of users and organizations stored before the edge refused them may hold some.
_LINE_BREAKS = re.compile("[\r\n\x0b\x0c\x1c-\x1e\x85\u2028\u2029]+")


def _one_line(value: str) -> str:
    return _LINE_BREAKS.sub(" ", value)


def build_message(email: OutgoingEmail, sender: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = email.to
    msg["Subject"] = _one_line(email.subject)
    msg["Date"] = formatdate(localtime=False, usegmt=True)
    msg["Message-ID"] = email.message_id
    for name, value in email.headers.items():
        msg[name] = _one_line(value)
    msg.set_content(email.text)
    msg.add_alternative(email.html, subtype="html")
    return msg


class SmtpMailer:
    """``smtp://user:pass@host:port`` (STARTTLS when the server offers it), ``smtps://`` for implicit TLS."""

    def __init__(self, url: str, sender: str, *, timeout: float = 30.0) -> None:
        parts = urlsplit(url)
        self._tls = parts.scheme == "smtps"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (465 if self._tls else 25)
        self._user = unquote(parts.username) if parts.username else None
        self._password = unquote(parts.password) if parts.password else None
        self._sender = sender
        self._timeout = timeout

    async def send(self, email: OutgoingEmail) -> None:
        await aiosmtplib.send(
            build_message(email, self._sender),
            hostname=self._host,
            port=self._port,
            username=self._user,
            password=self._password,
            use_tls=self._tls,
            start_tls=None if not self._tls else False,  # None: upgrade when the server offers STARTTLS
            timeout=self._timeout,
        )


_UNSAFE = re.compile(r"[^A-Za-z0-9._@-]+")


class FileMailer:
    """Development transport: each email becomes ``<data dir>/mail/<message-id>.eml``, openable in any
    mail client. Writing the same message again replaces the file (no duplicates)."""

    def __init__(self, directory: Path, sender: str) -> None:
        self._dir = directory
        self._sender = sender

    async def send(self, email: OutgoingEmail) -> None:
        name = _UNSAFE.sub("_", email.message_id.strip("<>")) + ".eml"
        data = build_message(email, self._sender).as_bytes()
        await asyncio.to_thread(self._write, self._dir / name, data)

    def _write(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
