"""Security properties of the running service, checked from the outside.

- **Secrets stay out of the logs**: a real ``keel serve`` (and, in the production topology, a real
  ``keel worker``) at DEBUG level is driven through signup, API keys (created with and without an
  Idempotency-Key, replayed, revoked), wrong keys sent every way a careless client sends them, webhook
  endpoints (created, rotated, delivering signed requests to a real receiver) and idempotent payments
  and refunds. Afterwards none of the issued or sent secrets may appear in what the processes wrote,
  neither whole nor the part after its prefix (``keel_``, ``whsec_``, ``sk_test_``). This extends
  ``test_observability.py``, which checks the in-process log pipeline.
- **API keys are stored as hashes only**: after the same run every text (and binary) value of every
  table, and in production every Redis key and value, is searched for the issued keys.
- **SSRF**: webhook targets that are not in ``test_webhooks_api.py`` already: more private ranges and
  spellings at creation, IPv4 in the forms ``inet_aton`` accepts (decimal, octal, hex, short) and names
  resolving to private addresses at delivery, DNS rebinding, and ``KEEL_WEBHOOKS_ALLOW_PRIVATE``.
- **Request size and slow clients in the production server** (granian through ``keel serve``): bodies
  over ``KEEL_MAX_BODY_BYTES`` with a Content-Length, chunked, or with a lying Content-Length, and
  clients that send their request (or nothing) very slowly.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import secrets
import socket
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpcore
import httpx
import pytest
import sqlalchemy
from litestar import Litestar
from litestar.testing import AsyncTestClient
from loguru import logger
from redis import Redis
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from keel.contexts.webhooks.adapters.httpx_sender import HttpxWebhookSender
from keel.contexts.webhooks.domain.model import new_secret
from keel.contexts.webhooks.domain.services import DELIVER_JOB
from keel.main.app import create_app
from tests.integration.test_server import KEEL, serve
from tests.support.app import UNLIMITED, client_for, make_settings, signup
from tests.support.receivers import Receiver, webhook_receiver
from tests.support.stripe_stub import running_stripe_stub
from tests.support.waiting import eventually

Client = AsyncTestClient[Litestar]
PROBLEM = "application/problem+json"


# ==================================================================================================
# Secrets in logs and at rest
# ==================================================================================================


@dataclass
class Secrets:
    """Every secret value the run issued or sent, by kind."""

    api_keys: list[str] = field(default_factory=list)  # issued by Keel: never stored in clear
    wrong_keys: list[str] = field(default_factory=list)  # sent by clients, never issued: never stored either
    webhook_secrets: list[str] = field(default_factory=list)  # issued by Keel: stored (they sign deliveries)
    other: list[str] = field(default_factory=list)  # configuration secrets (the Stripe key)

    def every(self) -> list[str]:
        return [*self.api_keys, *self.wrong_keys, *self.webhook_secrets, *self.other]


def forms(secret: str) -> list[str]:
    """The secret and the part after its prefix (``keel_…``, ``whsec_…``, ``sk_test_…``): a redaction that
    kept the prefix and dropped the rest is fine, the other way round is not."""
    for prefix in ("keel_", "whsec_", "sk_test_"):
        if secret.startswith(prefix):
            return [secret, secret[len(prefix) :]]
    return [secret]


def leaks(haystack: bytes, values: Iterable[str]) -> list[str]:
    """The values found in ``haystack``, whole or after their prefix, as text or as hex (a bytea dump)."""
    found = []
    for value in values:
        for form in forms(value):
            if form.encode() in haystack or form.encode().hex().encode() in haystack:
                found.append(form)
    return found


def authorized(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def expect(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, (r.request.method, r.request.url, r.status_code, r.text)
    body: dict[str, Any] = r.json() if r.content else {}
    return body


def exercise(http: httpx.Client, receiver: Receiver) -> Secrets:
    """What a tenant and a few careless clients do in a day; returns every secret involved."""
    found = Secrets()
    signed_up = expect(
        http.post("/v1/signup", json={"organization": "Acme", "owner_email": "o@acme.test", "owner_name": "O"}), 201
    )
    token = signed_up["api_key"]["token"]
    found.api_keys.append(token)
    auth = authorized(token)
    expect(http.get("/v1/tenant", headers={**auth, "X-Request-ID": "secrets-1"}), 200)

    # A key created under an Idempotency-Key (its response is stored to be replayed), and its replay.
    idem = {**auth, "Idempotency-Key": "create-ci-key"}
    created = expect(http.post("/v1/api-keys", headers=idem, json={"name": "ci"}), 201)
    replayed = http.post("/v1/api-keys", headers=idem, json={"name": "ci"})
    assert (replayed.headers.get("idempotent-replayed"), expect(replayed, 201)["token"]) == ("true", created["token"])
    found.api_keys.append(created["token"])
    expect(http.get("/v1/tenant", headers=authorized(created["token"])), 200)
    # A revoked key, used afterwards.
    old = expect(http.post("/v1/api-keys", headers=auth, json={"name": "old"}), 201)
    found.api_keys.append(old["token"])
    expect(http.delete(f"/v1/api-keys/{old['id']}", headers=auth), 204)
    expect(http.get("/v1/tenant", headers=authorized(old["token"])), 401)

    # Wrong keys, sent the ways clients get it wrong.
    made_up = "keel_" + secrets.token_urlsafe(32)
    typo = token[:-1] + ("A" if token[-1] != "A" else "B")
    found.wrong_keys += [made_up, typo]
    for headers in (
        authorized(made_up),
        authorized(typo),
        {"Authorization": made_up},  # no scheme
        {"Authorization": f"bearer  {typo}"},
        {"Authorization": f"Basic {base64.b64encode(f'{made_up}:'.encode()).decode()}"},
        {"X-API-Key": made_up},
        {"X-Request-ID": made_up},  # a well-formed request id: echoed and bound to every log line
    ):
        expect(http.get("/v1/tenant", headers=headers), 401)
    expect(http.get("/v1/tenant", params={"api_key": made_up}), 401)
    expect(http.get(f"/v1/users/{made_up}", headers=auth), 404)
    # Keys pasted into bodies: a field that refuses them, and a body that is not JSON.
    expect(http.post("/v1/users", headers=auth, json={"email": made_up, "name": typo}), 422)
    expect(http.post("/v1/users", headers={**auth, "Content-Type": "application/json"}, content=f'{{"x": "{typo}'), 400)

    # Webhooks: a secret at creation and one per rotation, each signing deliveries.
    endpoint = expect(
        http.post(
            "/v1/webhook-endpoints",
            headers={**auth, "Idempotency-Key": "create-hook"},
            json={"url": receiver.url, "event_types": ["user.created", "payment.succeeded"]},
        ),
        201,
    )
    found.webhook_secrets.append(endpoint["secret"])
    expect(http.post("/v1/users", headers=auth, json={"email": "ada@acme.test", "name": "Ada"}), 201)
    rotated = expect(
        http.post(
            f"/v1/webhook-endpoints/{endpoint['id']}/rotate-secret", headers={**auth, "Idempotency-Key": "rotate-1"}
        ),
        200,
    )
    found.webhook_secrets.append(rotated["secret"])
    expect(http.post("/v1/users", headers=auth, json={"email": "bob@acme.test", "name": "Bob"}), 201)

    # Idempotent payments and refunds (replayed once each).
    pay = {**auth, "Idempotency-Key": "order-1042"}
    charge = {"amount": 2500, "currency": "EUR", "payment_method": "pm_card_visa", "customer_email": "c@acme.test"}
    payment = expect(http.post("/v1/payments", headers=pay, json=charge), 202)["payment"]
    assert http.post("/v1/payments", headers=pay, json=charge).headers.get("idempotent-replayed") == "true"
    refund = {**auth, "Idempotency-Key": "refund-1042"}
    r = http.post(f"/v1/payments/{payment['id']}/refunds", headers=refund, json={"amount": 500})
    # Refunding needs the payment captured, which the job queue does at its own pace: either answer is fine.
    assert r.status_code in (202, 409), r.text
    return found


def assert_signed_deliveries(receiver: Receiver, found: Secrets) -> None:
    """The secrets really were used: the three deliveries (two users, one payment; in any order) each verify
    with a secret of the endpoint, and the rotated secret signed at least one."""
    requests = receiver.wait_for(3, timeout=30)
    types = []
    signers: set[str] = set()
    for request in requests:
        verified = []
        for secret in found.webhook_secrets:
            with contextlib.suppress(WebhookVerificationError):
                verified.append(Webhook(secret).verify(request.body, request.headers)["type"])
                signers.add(secret)
        assert verified, request
        types.append(verified[0])
    assert sorted(types) == ["payment.succeeded", "user.created", "user.created"]
    assert found.webhook_secrets[-1] in signers


def assert_logs_hold_no_secret(logs: list[Path], found: Secrets) -> None:
    text = b"".join(path.read_bytes() for path in logs)
    lines = [json.loads(line) for line in text.splitlines() if line.startswith(b"{")]
    # The scan means something only if the run logged at DEBUG and logged the refused requests.
    assert any(line["level"] == "DEBUG" for line in lines)
    assert any(line.get("msg") == "request served" and line.get("status") == 401 for line in lines)
    # And a secret did reach the pipeline (a key sent as X-Request-ID is bound to the log lines): redacted.
    assert b"keel_[REDACTED]" in text
    assert leaks(text, found.every()) == []


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def assert_stored_as_hashes(stored: bytes, found: Secrets) -> None:
    # The dump is the real data: webhook secrets are kept (deliveries are signed with them), and every
    # issued key is there as its SHA-256.
    assert sorted(leaks(stored, found.webhook_secrets)) == sorted(f for s in found.webhook_secrets for f in forms(s))
    assert all(sha256_hex(key).encode() in stored for key in found.api_keys)
    assert leaks(stored, found.api_keys + found.wrong_keys) == []


def sqlite_dump(path: Path) -> bytes:
    """Every value of every table of the embedded database, as bytes."""
    out: list[bytes] = []
    with sqlite3.connect(path) as db:
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for row in db.execute(f'SELECT * FROM "{table}"'):
                out += [v if isinstance(v, bytes) else str(v).encode() for v in row]
    return b"\n".join(out)


async def postgres_dump(url: str) -> bytes:
    """Every row of every table of the database, as JSON text (bytea in hex)."""
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        tables = await conn.fetch(
            "SELECT table_schema, table_name FROM information_schema.tables "
            "WHERE table_type = 'BASE TABLE' AND table_schema NOT IN ('pg_catalog', 'information_schema')"
        )
        out: list[bytes] = []
        for t in tables:
            rows = await conn.fetch(f'SELECT row_to_json(x)::text AS j FROM "{t[0]}"."{t[1]}" x')
            out += [row["j"].encode() for row in rows]
        return b"\n".join(out)
    finally:
        await conn.close()


def redis_dump(url: str) -> bytes:
    """Every key of the Redis database and every value it holds, whatever its type."""
    out: list[bytes] = []
    with Redis.from_url(url) as r:
        for key in r.scan_iter(count=1000):
            out.append(key)
            kind = r.type(key).decode()
            if kind == "string":
                out.append(r.get(key) or b"")
            elif kind == "hash":
                out += [b for pair in r.hgetall(key).items() for b in pair]
            elif kind == "list":
                out += r.lrange(key, 0, -1)
            elif kind == "set":
                out += list(r.smembers(key))
            elif kind == "zset":
                out += [member for member, _ in r.zrange(key, 0, -1, withscores=True)]
            elif kind == "stream":
                for entry_id, fields in r.xrange(key):
                    out += [entry_id, *(b for pair in fields.items() for b in pair)]
    return b"\n".join(out)


def test_embedded_default_logs_no_secret_and_stores_api_keys_as_hashes_only(tmp_path: Path) -> None:
    settings = {**UNLIMITED, "KEEL_LOG_LEVEL": "DEBUG", "KEEL_WEBHOOKS_ALLOW_PRIVATE": "true"}
    with webhook_receiver() as receiver:
        with serve(tmp_path, **settings) as (base, log), httpx.Client(base_url=base, timeout=10) as http:
            found = exercise(http, receiver)
            assert_signed_deliveries(receiver, found)
        # The server has stopped: its log is complete and its database quiet.
        assert_logs_hold_no_secret([log], found)
    assert_stored_as_hashes(sqlite_dump(tmp_path / "data" / "keel.db"), found)


def test_production_topology_logs_no_secret_and_stores_api_keys_as_hashes_only(
    pg_url: str, redis_url: str, tmp_path: Path
) -> None:
    """Postgres, Redis, the Stripe provider and a separate ``keel worker``: the key reaches the worker's
    environment and the Stripe SDK, the jobs run in another process with their own logs."""
    stripe_key = "sk_test_" + secrets.token_urlsafe(24)
    with running_stripe_stub() as stripe, webhook_receiver() as receiver:
        settings = {
            **UNLIMITED,
            "KEEL_LOG_LEVEL": "DEBUG",
            "KEEL_DATABASE_URL": pg_url,
            "KEEL_REDIS_URL": redis_url,
            "KEEL_WEBHOOKS_ALLOW_PRIVATE": "true",
            "KEEL_PAYMENTS_PROVIDER": "stripe",
            "KEEL_STRIPE_SECRET_KEY": stripe_key,
            "KEEL_STRIPE_API_BASE": stripe.url,
        }
        with serve(tmp_path, **settings) as (base, log), httpx.Client(base_url=base, timeout=10) as http:
            found = exercise(http, receiver)
            found.other.append(stripe_key)
            worker_log = tmp_path / "worker.log"
            env = serve_env(tmp_path, settings)
            with worker_log.open("wb") as out:
                worker = subprocess.Popen(
                    [KEEL, "worker", "--burst", "--simple"], env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT
                )
            try:
                assert worker.wait(90) == 0, worker_log.read_text()
            finally:
                if worker.poll() is None:
                    worker.kill()
                    worker.wait()
            assert_signed_deliveries(receiver, found)
            assert stripe.charges(), "the payment was not captured through the Stripe stand-in"
    assert_logs_hold_no_secret([log, worker_log], found)
    assert_stored_as_hashes(asyncio.run(postgres_dump(pg_url)), found)
    cached = redis_dump(redis_url)
    # The dump is the real data: the cache resolving keys to tenants is there, filed under hashes.
    assert sha256_hex(found.api_keys[0]).encode() in cached
    assert leaks(cached, found.api_keys + found.wrong_keys) == []


def serve_env(tmp_path: Path, settings: dict[str, str]) -> dict[str, str]:
    """The environment ``serve`` gives the API, for a worker of the same deployment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEEL_", "OTEL_"))}
    return env | {"KEEL_DATA_DIR": str(tmp_path / "data"), "KEEL_LOG_JSON": "true", **settings}


# ==================================================================================================
# SSRF: webhook targets
# ==================================================================================================


@pytest.fixture
async def strict_client(sqlite_url: str, tmp_path: Path) -> AsyncIterator[Client]:
    """Production defaults: private targets refused."""
    async with client_for(make_settings(sqlite_url, tmp_path)) as c:
        yield c


@pytest.fixture
async def lax_client(sqlite_url: str, tmp_path: Path) -> AsyncIterator[Client]:
    async with client_for(make_settings(sqlite_url, tmp_path, KEEL_WEBHOOKS_ALLOW_PRIVATE="true")) as c:
        yield c


# Beyond test_webhooks_api.PRIVATE_TARGETS: other non-global ranges, and other spellings of private hosts.
MORE_PRIVATE_TARGETS = [
    "https://0.0.0.0/hooks",  # "this host": Linux connects it to the local machine
    "https://172.16.0.1/hooks",
    "https://100.64.0.1/hooks",  # shared address space (carrier-grade NAT)
    "https://198.18.0.1/hooks",  # benchmarking
    "https://224.0.0.1/hooks",  # multicast
    "https://255.255.255.255/hooks",
    "https://[::]/hooks",
    "https://[fc00::1]/hooks",  # unique local
    "https://[fe80::1]/hooks",  # link-local
    "https://[fe80::1%25eth0]/hooks",  # ... with a zone
    "https://[ff02::1]/hooks",  # multicast
    "https://[::ffff:169.254.169.254]/hooks",  # the metadata service, IPv4-mapped
    "https://[::ffff:a9fe:a9fe]/hooks",  # ... in hex
    "https://[0:0:0:0:0:ffff:7f00:1]/hooks",  # loopback, IPv4-mapped and uncompressed
    "https://169.254.169.254:443/latest/meta-data/",
    "https://127.0.0.1./hooks",  # a trailing dot
    "https://127.0.0.1#@example.com/hooks",  # what follows # is a fragment: the host is 127.0.0.1
    "https://LOCALHOST/hooks",
    "https://localhost./hooks",
    "https://api.localhost/hooks",
    "https://metadata.google.internal/computeMetadata/v1/",
    "https://printer.local/hooks",
]
# Credentials in the URL, whatever the host: refused even when private targets are allowed.
WITH_CREDENTIALS = ["https://example.com@127.0.0.1/hooks", "https://127.0.0.1\\@example.com/hooks"]
# 127.0.0.1 as inet_aton (and so getaddrinfo) reads other notations: decimal, octal, hex, short forms.
LOOPBACK_NOTATIONS = [
    "2130706433",
    "017700000001",
    "0x7f000001",
    "0177.0.0.1",
    "0x7f.0.0.1",
    "0x7f.1",
    "127.0.1",
    "127.000.000.001",
]
PARSED_BY_HTTPX = [h for h in LOOPBACK_NOTATIONS if h not in ("0177.0.0.1", "127.000.000.001")]
METADATA_DECIMAL = "2852039166"  # 169.254.169.254
# Hosts urlsplit accepts and httpx does not: four dotted numbers that are no IPv4 address, an IPvFuture.
UNPARSABLE_HOSTS = ["1.2.3.256", "0177.0.0.1", "[v1.x]"]


async def create_hook(client: Client, headers: dict[str, str], url: str) -> httpx.Response:
    return await client.post(
        "/v1/webhook-endpoints", headers=headers, json={"url": url, "event_types": ["user.created"]}
    )


def assert_problem(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    body: dict[str, Any] = r.json()
    assert body["status"] == status
    return body


async def test_more_private_targets_and_credentials_are_refused_at_creation(strict_client: Client) -> None:
    t = await signup(strict_client)
    h = t["headers"]
    kept = (await create_hook(strict_client, h, "https://example.com/hooks")).json()
    for url in MORE_PRIVATE_TARGETS + WITH_CREDENTIALS:
        problem = assert_problem(await create_hook(strict_client, h, url), 422)
        assert problem["errors"][0]["pointer"] == "#/url", (url, problem)
        patched = await strict_client.patch(f"/v1/webhook-endpoints/{kept['id']}", headers=h, json={"url": url})
        assert_problem(patched, 422)
    listed = (await strict_client.get("/v1/webhook-endpoints", headers=h)).json()["items"]
    assert [x["url"] for x in listed] == ["https://example.com/hooks"]


async def test_allowing_private_targets_accepts_them_but_never_credentials(lax_client: Client) -> None:
    t = await signup(lax_client)
    for url in [*MORE_PRIVATE_TARGETS, "http://127.0.0.1:8080/hooks", "http://localhost/hooks"]:
        r = await create_hook(lax_client, t["headers"], url)
        assert r.status_code == 201, (url, r.text)
    for url in WITH_CREDENTIALS:
        assert_problem(await create_hook(lax_client, t["headers"], url), 422)


async def test_ipv4_in_other_notations_is_refused_at_creation(strict_client: Client) -> None:
    t = await signup(strict_client)
    accepted = []
    for host in [*LOOPBACK_NOTATIONS, METADATA_DECIMAL]:
        r = await create_hook(strict_client, t["headers"], f"https://{host}/hooks")
        if r.status_code != 422:
            accepted.append((host, r.status_code))
    assert accepted == []


async def test_a_nat64_address_embedding_a_private_one_is_refused(strict_client: Client) -> None:
    t = await signup(strict_client)
    assert_problem(await create_hook(strict_client, t["headers"], "https://[64:ff9b::a9fe:a9fe]/hooks"), 422)


async def test_a_url_the_sender_cannot_parse_is_refused_or_fails_its_deliveries_cleanly(
    sqlite_url: str, tmp_path: Path
) -> None:
    crashes: list[str] = []
    sink = logger.add(
        lambda m: crashes.append(m.record["message"]) if m.record["extra"].get("job") == DELIVER_JOB else None,
        level="ERROR",
    )
    try:
        async with client_for(make_settings(sqlite_url, tmp_path)) as client:
            t = await signup(client)
            h = t["headers"]
            endpoints = []
            for host in UNPARSABLE_HOSTS:
                r = await create_hook(client, h, f"https://{host}/hooks")
                assert r.status_code in (201, 422), r.text
                if r.status_code == 201:
                    endpoints.append(r.json()["id"])
            r = await client.post("/v1/users", headers=h, json={"email": "ada@acme.test", "name": "Ada"})
            assert r.status_code == 201, r.text

            async def settled() -> list[dict[str, Any]] | None:
                found = []
                for endpoint_id in endpoints:
                    page = await client.get(f"/v1/webhook-endpoints/{endpoint_id}/deliveries", headers=h)
                    found += page.json()["items"]
                done = len(found) == len(endpoints) and all(d["attempt_count"] for d in found)
                return found if done or crashes else None

            deliveries = (await eventually(settled) or []) if endpoints else []
    finally:
        logger.remove(sink)
    assert crashes == []
    for d in deliveries:
        assert (d["status"], d["attempt_count"], d["last_status_code"]) in (("pending", 1, None), ("failed", 1, None))
        assert d["last_error"]


# -- at connection time: the sender's guard, with names resolved by a scripted resolver --------------


@dataclass
class FakeDns:
    """``socket.getaddrinfo`` for a few names: each has a list of answers, given in turn (the last one
    repeats); every other name goes to the real resolver."""

    answers: dict[str, list[list[str]]] = field(default_factory=dict)
    asked: list[str] = field(default_factory=list)
    real: Callable[..., Any] = socket.getaddrinfo

    def __call__(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        script = self.answers.get(name)
        if script is None:
            return self.real(host, port, *args, **kwargs)
        self.asked.append(name)
        addresses = script.pop(0) if len(script) > 1 else script[0]
        return [
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (a, int(port), 0, 0))
            if ":" in a
            else (socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, int(port)))
            for a in addresses
        ]


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> FakeDns:
    fake = FakeDns()
    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return fake


@pytest.fixture
def connects(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every TCP connection the webhook sender opens, recorded and failed: no test here may reach anything."""
    opened: list[tuple[str, int]] = []

    async def connect_tcp(self: Any, host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        opened.append((host, port))
        raise httpcore.ConnectError("recorded, not connected")

    monkeypatch.setattr(httpcore.AnyIOBackend, "connect_tcp", connect_tcp)
    return opened


@pytest.fixture
async def guarded() -> AsyncIterator[HttpxWebhookSender]:
    sender = HttpxWebhookSender(allow_private=False)
    yield sender
    await sender.aclose()


async def send(sender: HttpxWebhookSender, url: str) -> Any:
    return await sender.send(url, message_id="msg_ssrf", body='{"type":"user.created"}', secrets=[new_secret()])


async def test_ipv4_in_other_notations_is_refused_at_connection(guarded: HttpxWebhookSender) -> None:
    """The real resolver reads these as 127.0.0.1 (and 169.254.169.254); the guard checks what it answers.
    (Four dotted parts with leading zeros never reach it: httpx refuses to parse them, see below.)"""
    with webhook_receiver() as receiver:
        port = receiver.url.split(":")[2].split("/")[0]
        for host in [*PARSED_BY_HTTPX, METADATA_DECIMAL]:
            result = await send(guarded, f"http://{host}:{port}/hooks")
            assert (result.refused, result.status_code) == (True, None), (host, result)
        assert receiver.received == []


PRIVATE_ANSWERS = {
    "ip6-localhost.test": ["::1"],
    "metadata.test": ["169.254.169.254"],
    "intranet.test": ["10.1.2.3"],
    "mapped.test": ["::ffff:127.0.0.1"],
    "zero.test": ["0.0.0.0"],
    "scoped.test": ["fe80::1%lo"],
    "cgnat.test": ["100.64.0.7"],
    "all-private.test": ["192.168.1.1", "fd00::1", "127.0.0.1"],
}


async def test_names_resolving_to_private_addresses_are_refused_without_connecting(
    guarded: HttpxWebhookSender, dns: FakeDns, connects: list[tuple[str, int]]
) -> None:
    for name, addresses in PRIVATE_ANSWERS.items():
        dns.answers[name] = [addresses]
        result = await send(guarded, f"https://{name}/hooks")
        assert (result.refused, result.status_code) == (True, None), (name, result)
        assert "refused" in (result.error or "").lower()
    assert connects == []
    assert dns.asked == list(PRIVATE_ANSWERS)


async def test_a_name_with_public_and_private_addresses_connects_only_to_a_public_one(
    guarded: HttpxWebhookSender, dns: FakeDns, connects: list[tuple[str, int]]
) -> None:
    dns.answers["mixed.test"] = [["127.0.0.1", "10.0.0.1", "93.184.216.34", "::1"]]
    result = await send(guarded, "https://mixed.test/hooks")
    assert (result.refused, result.status_code) == (False, None)
    assert connects == [("93.184.216.34", 443)]


async def test_the_address_checked_is_the_address_connected_to(
    guarded: HttpxWebhookSender, dns: FakeDns, connects: list[tuple[str, int]]
) -> None:
    """DNS rebinding within one attempt: the name answers a public address to the check and a private one
    to anything that resolves it again. The connection must go to the checked address itself."""
    dns.answers["rebind.test"] = [["93.184.216.34"], ["127.0.0.1"]]
    await send(guarded, "https://rebind.test:8443/hooks")
    assert dns.asked == ["rebind.test"]
    assert connects == [("93.184.216.34", 8443)]
    # The next attempt resolves again, gets the private answer, and is refused.
    result = await send(guarded, "https://rebind.test:8443/hooks")
    assert result.refused
    assert connects == [("93.184.216.34", 8443)]


async def test_a_name_that_turns_private_after_creation_is_refused_at_delivery(
    strict_client: Client, dns: FakeDns, connects: list[tuple[str, int]]
) -> None:
    """DNS rebinding across time: names are not resolved at creation (an answer then would prove nothing);
    when the delivery runs the name points at the metadata service, and the attempt is refused."""
    t = await signup(strict_client)
    h = t["headers"]
    dns.answers["hooks.customer.test"] = [["169.254.169.254"]]
    endpoint = (await create_hook(strict_client, h, "https://hooks.customer.test/keel")).json()
    assert endpoint["url"] == "https://hooks.customer.test/keel"
    assert dns.asked == []
    r = await strict_client.post("/v1/users", headers=h, json={"email": "ada@acme.test", "name": "Ada"})
    assert r.status_code == 201, r.text

    async def settled() -> list[dict[str, Any]] | None:
        page = await strict_client.get(f"/v1/webhook-endpoints/{endpoint['id']}/deliveries", headers=h)
        items: list[dict[str, Any]] = page.json()["items"]
        return items if items and items[0]["status"] == "failed" else None

    [delivery] = await eventually(settled) or []
    assert (delivery["attempt_count"], delivery["last_status_code"]) == (1, None)
    assert "refused" in delivery["last_error"].lower()
    assert "hooks.customer.test" in dns.asked
    assert connects == []


# ==================================================================================================
# Request size and slow clients in the production server (granian through `keel serve`)
# ==================================================================================================

MAX_BODY = 1024
# The server below gives headers 5 s (KEEL_HEADER_READ_TIMEOUT, granian's HTTP/1 header_read_timeout)
# and a body 5 s (KEEL_BODY_READ_TIMEOUT, then 408); the margin absorbs scheduling.
SLOW_CLIENT_BOUND = 15.0


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    closed: bool  # the server closed the connection after answering (when asked to watch for it)

    def problem(self) -> dict[str, Any]:
        assert self.headers["content-type"].startswith(PROBLEM), self.headers
        body: dict[str, Any] = json.loads(self.body)
        assert body["status"] == self.status
        assert body["request_id"] == self.headers["x-request-id"]
        return body


def exchange(port: int, data: bytes, within: float = 10.0, close_within: float = 0.0) -> Answer:
    """Send raw bytes on a new connection and read one response; then, given ``close_within``, whether the
    server closes the connection within that many seconds."""
    with socket.create_connection(("127.0.0.1", port), timeout=within) as s:
        s.sendall(data)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            assert chunk, f"connection closed without an answer; got {buf!r}"
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = s.recv(65536)
            assert chunk, "connection closed in the middle of the body"
            body += chunk
        # Whatever follows is the server's answer to the bytes after this request, if any.
        closed = False
        if close_within and len(body) == length:
            s.settimeout(close_within)
            with contextlib.suppress(TimeoutError, ConnectionResetError):
                closed = s.recv(1) == b""
        return Answer(int(status_line.split()[1]), headers, body[:length], closed)


def request(method: str, path: str, body: bytes = b"", *headers: str, length: int | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json", *headers]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def signup_body(size: int) -> bytes:
    """A valid signup of exactly ``size`` bytes (JSON allows trailing whitespace)."""
    doc = json.dumps(
        {"organization": f"Org {uuid.uuid4().hex[:8]}", "owner_email": "o@org.test", "owner_name": "O"}
    ).encode()
    assert len(doc) <= size
    return doc + b" " * (size - len(doc))


def chunked(body: bytes, size: int = 300) -> bytes:
    return b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size]) for i in range(0, len(body), size)
    ) + (b"0\r\n\r\n")


@dataclass
class Limited:
    port: int
    token: str


def hold(port: int, first: bytes, trickle: bytes, every: float = 0.5) -> float | None:
    """A slow client: open a connection, send ``first``, then one byte of ``trickle`` (cycled) every ``every``
    seconds. Returns after how long the server closed the connection or answered, or None if it still
    had not after SLOW_CLIENT_BOUND seconds."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=every) as s:
        if first:
            s.sendall(first)
        sent = 0
        while time.monotonic() - started < SLOW_CLIENT_BOUND:
            try:
                if s.recv(4096) is not None:  # an answer (a 408, say) or the end of the connection
                    return time.monotonic() - started
            except TimeoutError:
                pass
            except ConnectionResetError:
                return time.monotonic() - started
            if trickle:
                try:
                    s.sendall(trickle[sent % len(trickle) :][:1])
                except (BrokenPipeError, ConnectionResetError):
                    return time.monotonic() - started
                sent += 1
    return None


def in_thread(fn: Callable[[], float | None]) -> Future[float | None]:
    future: Future[float | None] = Future()

    def run() -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, daemon=True).start()
    return future


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Limited]:
    """One ``keel serve`` with a 1 KiB body limit, and 5 s for headers and for a body."""
    settings = {
        **UNLIMITED,
        "KEEL_MAX_BODY_BYTES": str(MAX_BODY),
        "KEEL_HEADER_READ_TIMEOUT": "5",
        "KEEL_BODY_READ_TIMEOUT": "5",
    }
    with serve(tmp_path_factory.mktemp("limits"), **settings) as (base, _):
        with httpx.Client(base_url=base, timeout=10) as http:
            r = http.post("/v1/signup", json={"organization": "Limits", "owner_email": "o@l.test", "owner_name": "O"})
            assert r.status_code == 201, r.text
        yield Limited(int(base.rsplit(":", 1)[1]), r.json()["api_key"]["token"])


@pytest.fixture(scope="module")
def slow_clients(limited: Limited) -> Iterator[dict[str, Future[float | None]]]:
    """Three slow clients started together, so that their tests wait for them side by side (each takes up to
    SLOW_CLIENT_BOUND seconds): one sends its headers a byte at a time, one its body, one nothing at all."""
    slow_headers = b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * 64
    headers_only = request("POST", "/v1/signup", b"", length=MAX_BODY - 24)
    probes = {
        "slowloris": in_thread(lambda: hold(limited.port, b"", slow_headers)),
        "slow body": in_thread(lambda: hold(limited.port, headers_only, b" ")),
        "silent": in_thread(lambda: hold(limited.port, b"", b"")),
    }
    yield probes
    for probe in probes.values():
        probe.exception(SLOW_CLIENT_BOUND + 10)  # every slow client is done before the server stops


def test_a_body_at_the_limit_is_served_and_one_byte_more_is_413(limited: Limited) -> None:
    at_limit = exchange(limited.port, request("POST", "/v1/signup", signup_body(MAX_BODY), length=MAX_BODY))
    assert at_limit.status == 201, at_limit.body
    over = exchange(limited.port, request("POST", "/v1/signup", signup_body(MAX_BODY + 1), length=MAX_BODY + 1))
    assert over.status == 413
    assert over.problem()["type"] == "/problems/payload-too-large"
    # Authenticated routes too, whatever the body says.
    auth = f"Authorization: Bearer {limited.token}"
    over = exchange(limited.port, request("POST", "/v1/users", b"x" * 5000, auth, length=5000))
    assert (over.status, over.problem()["type"]) == (413, "/problems/payload-too-large")


def test_a_chunked_body_is_counted_as_it_arrives(limited: Limited) -> None:
    te = "Transfer-Encoding: chunked"
    within = exchange(limited.port, request("POST", "/v1/signup", chunked(signup_body(MAX_BODY)), te))
    assert within.status == 201, within.body
    over = exchange(limited.port, request("POST", "/v1/signup", chunked(signup_body(MAX_BODY + 1)), te))
    assert (over.status, over.problem()["type"]) == (413, "/problems/payload-too-large")
    # The rest of an endless body is not waited for: the answer comes after the first chunks.
    endless = request("POST", "/v1/signup", chunked(b" " * (MAX_BODY * 2))[:-5], te)
    assert exchange(limited.port, endless).status == 413


def test_a_content_length_over_the_limit_is_answered_before_the_body_arrives(limited: Limited) -> None:
    answer = exchange(limited.port, request("POST", "/v1/signup", b"{", length=10**9))
    assert (answer.status, answer.problem()["type"]) == (413, "/problems/payload-too-large")


def test_a_content_length_shorter_than_the_body_reads_what_it_announced(limited: Limited) -> None:
    """The rest is not this request's body: the server must not read past the announced length, nor
    fail. 10 bytes of a signup are malformed JSON."""
    answer = exchange(limited.port, request("POST", "/v1/signup", signup_body(MAX_BODY * 3), length=10))
    assert (answer.status, answer.problem()["type"]) == (400, "/problems/malformed-request")
    assert exchange(limited.port, request("GET", "/livez")).status == 200


def test_content_length_and_chunked_together_is_not_read_by_the_content_length(limited: Limited) -> None:
    """A smuggling shape (RFC 9112 §6.3): Transfer-Encoding wins over Content-Length, or the request is
    refused; either way the connection is closed after the answer."""
    body = chunked(signup_body(MAX_BODY + 1))
    smuggled = request("POST", "/v1/signup", body, "Transfer-Encoding: chunked", length=5)
    answer = exchange(limited.port, smuggled, close_within=5.0)
    assert answer.status in (400, 413)
    assert answer.closed


def test_a_slowloris_client_is_disconnected(slow_clients: dict[str, Future[float | None]]) -> None:
    """Headers sent a byte every half second, never finished."""
    took = slow_clients["slowloris"].result(SLOW_CLIENT_BOUND + 10)
    assert took is not None, f"still connected after {SLOW_CLIENT_BOUND} s"


def test_a_client_sending_its_body_slowly_is_disconnected(slow_clients: dict[str, Future[float | None]]) -> None:
    """Complete headers announcing a body within the limit, then one byte every half second."""
    took = slow_clients["slow body"].result(SLOW_CLIENT_BOUND + 10)
    assert took is not None, f"still connected after {SLOW_CLIENT_BOUND} s"


@pytest.mark.xfail(
    strict=True,
    reason="a connection that never sends a byte is kept open: granian's HTTP/1 header_read_timeout starts "
    "with the first byte, and granian has no idle-connection timeout (a proxy in front must bound it)",
)
def test_a_connection_that_sends_nothing_is_closed(slow_clients: dict[str, Future[float | None]]) -> None:
    took = slow_clients["silent"].result(SLOW_CLIENT_BOUND + 10)
    assert took is not None, f"still connected after {SLOW_CLIENT_BOUND} s"


async def test_a_body_that_stalls_is_answered_408_problem_json(sqlite_url: str, tmp_path: Path) -> None:
    """In process, the same deadline: part of a body, then nothing; the answer is a 408 problem that
    names the limit, and nothing was created."""
    settings = make_settings(sqlite_url, tmp_path, KEEL_BODY_READ_TIMEOUT="1")
    app = create_app(settings)
    sent: list[dict[str, Any]] = []
    parts = [{"type": "http.request", "body": b'{"organization": "Sl', "more_body": True}]

    async def receive() -> dict[str, Any]:
        if parts:
            return parts.pop()
        await asyncio.sleep(3600)  # the rest never comes
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/signup",
        "raw_path": b"/v1/signup",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"100")],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    async with app.lifespan():
        async with asyncio.timeout(10):
            await app(scope, receive, send)  # type: ignore[arg-type]
        start = next(m for m in sent if m["type"] == "http.response.start")
        assert start["status"] == 408
        body = json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))
        assert body["type"] == "/problems/request-timeout"
        assert "1 seconds" in body["detail"]
        async with app.state["container"].engine.connect() as conn:
            assert (await conn.execute(sqlalchemy.text("SELECT count(*) FROM tenants"))).scalar() == 0
