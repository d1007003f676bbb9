"""Idempotency-Key for unsafe POSTs (draft-ietf-httpapi-idempotency-key-header; Stripe semantics).

A middleware rather than a decorator: it must see the raw body (for the fingerprint) and the
complete response (to replay it byte for byte), and it must work for any POST handler, present or
future. Handlers opt in to *requiring* a key with ``opt={"idempotency": "required"}``.
"""

from __future__ import annotations

import hashlib
import os
import re
from datetime import timedelta

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from litestar.enums import ScopeType
from litestar.types import ASGIApp, HTTPRequestEvent, Message, Receive, ReceiveMessage, Scope, Send
from loguru import logger

from keel.main.errors import TOO_LARGE
from keel.main.rate_limit import client_ip
from keel.platform.adapters.http.problems import ProblemError, problem_type
from keel.platform.domain.tenancy import Principal
from keel.platform.ports.clock import Clock
from keel.platform.ports.idempotency import IdempotencyStore, StoredResponse

KEY_REQUIRED = problem_type(
    "idempotency-key-required",
    400,
    "This operation creates something that must not be created twice: send an `Idempotency-Key` header "
    "(a unique value of 1-255 characters per logical operation, reused unchanged on retries).",
)
KEY_INVALID = problem_type(
    "idempotency-key-invalid", 400, "`Idempotency-Key` must appear once and hold 1-255 visible ASCII characters."
)
KEY_IN_FLIGHT = problem_type(
    "idempotency-key-in-flight",
    409,
    "A request with this Idempotency-Key is still being processed; retry the same request shortly.",
)
KEY_REUSED = problem_type(
    "idempotency-key-reused",
    422,
    "This Idempotency-Key was already used for a different request (another endpoint or payload).",
)
STORE_DOWN = problem_type(
    "idempotency-unavailable", 503, "Idempotency keys cannot be checked right now; retry with the same key."
)

RETENTION = timedelta(hours=24)
IN_FLIGHT_HOLD = timedelta(minutes=2)  # a crashed request frees its key after this
_MAX_LEN = 255
_TOKEN = re.compile(r"^[\x21-\x7e]{1,255}$")
_SF_STRING = re.compile(r'^"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*)"$')
# Validation failures and conflicts are not remembered: the client fixes the request and retries
# with the same key. 5xx are not remembered either (Keel's choice): the client may simply retry.
_NOT_STORED = {400, 409, 413, 415, 422, 429}
_SKIP_HEADERS = {b"date", b"server", b"x-request-id", b"ratelimit", b"ratelimit-policy", b"content-length"}


def parse_key(values: list[bytes]) -> str:
    if len(values) != 1:
        raise ProblemError(400, "Send exactly one Idempotency-Key header.", KEY_INVALID.slug)
    # Only HTTP whitespace (SP, HTAB) is optional around a field value; str.strip() would also eat
    # bytes such as 0xA0 and make "k1\xa0" replay "k1".
    raw = values[0].decode("latin-1").strip(" \t")
    quoted = _SF_STRING.match(raw)
    key = re.sub(r'\\(["\\])', r"\1", quoted.group(1)) if quoted else raw
    if not key or len(key) > _MAX_LEN or (not quoted and not _TOKEN.match(key)):
        raise ProblemError(400, "Idempotency-Key must be 1-255 visible ASCII characters.", KEY_INVALID.slug)
    return key


class IdempotencyMiddleware:
    def __init__(self, app: ASGIApp, store: IdempotencyStore, clock: Clock, max_body: int) -> None:
        self.app = app
        self._store = store
        self._clock = clock
        self._max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        handler = scope.get("route_handler")
        mode = handler.opt.get("idempotency", "optional") if handler is not None else "off"
        values = [v for k, v in scope["headers"] if k == b"idempotency-key"]
        if mode == "off" or (not values and mode != "required"):
            await self.app(scope, receive, send)
            return
        if not values:
            raise ProblemError(400, "This operation requires an Idempotency-Key header.", KEY_REQUIRED.slug)
        key = parse_key(values)

        user = scope.get("user")
        owner = f"t:{user.tenant_id}" if isinstance(user, Principal) else f"ip:{client_ip(scope)}"
        sealer = _Sealer(owner, key)
        store_key = sealer.store_key
        body = await self._read_body(receive)
        fingerprint = hashlib.sha256(b"POST\0" + scope["path"].encode() + b"\0" + body).hexdigest()

        now = self._clock.now()
        try:
            record = await self._store.claim(store_key, fingerprint, now, now + IN_FLIGHT_HOLD)
        except Exception as exc:  # noqa: BLE001 - fail closed: without the store, a retry could act twice
            logger.warning("idempotency store unavailable: {!r}", exc)
            raise ProblemError(
                503, "Idempotency keys cannot be checked right now.", STORE_DOWN.slug, headers={"Retry-After": "1"}
            ) from None
        if record is not None:
            if record.fingerprint != fingerprint:
                raise ProblemError(422, "This Idempotency-Key was used for a different request.", KEY_REUSED.slug)
            if record.response is None:
                raise ProblemError(
                    409,
                    "A request with this Idempotency-Key is in progress.",
                    KEY_IN_FLIGHT.slug,
                    headers={"Retry-After": "1"},
                )
            await _replay(record.response, sealer.open(record.response.body), send)
            return
        await self._run_and_store(scope, body, receive, send, sealer, fingerprint)

    async def _read_body(self, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max_body:
                raise ProblemError(413, "The request body exceeds the size limit.", TOO_LARGE.slug)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    async def _run_and_store(
        self, scope: Scope, body: bytes, receive: Receive, send: Send, sealer: _Sealer, fingerprint: str
    ) -> None:
        store_key = sealer.store_key
        delivered = False

        async def replay_body() -> ReceiveMessage:
            nonlocal delivered
            if not delivered:
                delivered = True
                first: HTTPRequestEvent = {"type": "http.request", "body": body, "more_body": False}
                return first
            return await receive()

        status = 500
        headers: list[tuple[str, str]] = []
        parts: list[bytes] = []

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers.extend(
                    (k.decode("latin-1"), v.decode("latin-1"))
                    for k, v in message.get("headers", [])
                    if k.lower() not in _SKIP_HEADERS
                )
            elif message["type"] == "http.response.body":
                parts.append(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, replay_body, capture)
        except BaseException:
            await self._forget(store_key, fingerprint)
            raise
        if status in _NOT_STORED or status >= 500:
            await self._forget(store_key, fingerprint)
            return
        response = StoredResponse(status=status, headers=headers, body=sealer.seal(b"".join(parts)))
        try:
            await self._store.complete(store_key, fingerprint, response, self._clock.now() + RETENTION)
        except Exception as exc:  # noqa: BLE001 - the response is out; the claim lapses after IN_FLIGHT_HOLD
            logger.warning("could not store the idempotent response: {!r}", exc)

    async def _forget(self, store_key: str, fingerprint: str) -> None:
        try:
            await self._store.release(store_key, fingerprint)
        except Exception as exc:  # noqa: BLE001 - the claim lapses after IN_FLIGHT_HOLD
            logger.warning("could not release the idempotency key: {!r}", exc)


class _Sealer:
    """Stored responses can hold secrets (a freshly issued API key is shown exactly once, and its
    replay must show it again). So the store never sees the client's key nor a readable body: the
    record is filed under a hash of (owner, key) and the body is sealed with AES-GCM under another
    hash of them. Reading a record back requires the key the client sent."""

    def __init__(self, owner: str, key: str) -> None:
        material = f"{owner}\0{key}".encode()
        self.store_key = hashlib.sha256(b"keel-idempotency-id\0" + material).hexdigest()
        self._aead = AESGCM(hashlib.sha256(b"keel-idempotency-seal\0" + material).digest())

    def seal(self, body: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, body, None)

    def open(self, sealed: bytes) -> bytes:
        return self._aead.decrypt(sealed[:12], sealed[12:], None)


async def _replay(response: StoredResponse, body: bytes, send: Send) -> None:
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers]
    headers.append((b"content-length", str(len(body)).encode()))
    headers.append((b"idempotent-replayed", b"true"))
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
