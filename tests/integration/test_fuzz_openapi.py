"""Property-based fuzzing of every operation in ``/openapi.json`` with schemathesis.

The real app runs in-process (its lifespan, job runner included, held open for the whole module by
Litestar's test client), on the embedded SQLite default and on Postgres. schemathesis generates valid
and invalid requests for each documented operation from the document itself, and sends them with a
valid API key through a ``requests`` session wired to that client. Path parameters are either what
schemathesis generates or the ids of real objects seeded first (a user, an API key, a webhook endpoint
and one of its deliveries, a payment and its refund, a job), so generated bodies reach the services and
the database, not only the 404 branch. Every response must not be a server error and must conform to
the document: a documented status code, the documented content type and headers, and a body valid
against the documented schema.

Generation is derandomized, so a run is reproducible; ``KEEL_FUZZ_EXAMPLES`` sets the number of
generated examples per operation (25 by default; ``just chaos`` runs 500).

schemathesis's own ASGI loader (``from_asgi``) is not used: its pytest plugin ends every ASGI lifespan
it started at each test's teardown, which would close the app's container after the first operation.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import strategies as st
from litestar import Litestar
from litestar.testing import TestClient
from PIL import Image
from requests.adapters import BaseAdapter
from requests.structures import CaseInsensitiveDict
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from urllib3 import HTTPHeaderDict, HTTPResponse

from keel.contexts.notifications.adapters.mailers import build_message
from keel.contexts.notifications.domain.model import OutgoingEmail
from keel.main.app import create_app
from tests.support.app import client_for, make_settings
from tests.support.servers import PostgresServer, admin_sql

EXAMPLES = int(os.environ.get("KEEL_FUZZ_EXAMPLES", "25"))
BASE_URL = "http://testserver.local"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# A public-looking name that never resolves (.invalid, RFC 6761): the URL is accepted, and every
# delivery to it fails at once without any traffic, so deliveries exist to be read and retried.
REFUSED_URL = "https://keel-fuzz.invalid:9/hooks"
# Every operation of the document; ``test_every_documented_operation_is_fuzzed`` keeps the list whole.
OPERATIONS = [
    "POST /v1/signup",
    "GET /v1/tenant",
    "PATCH /v1/tenant/config",
    "GET /v1/api-keys",
    "POST /v1/api-keys",
    "DELETE /v1/api-keys/{key_id}",
    "GET /v1/users",
    "POST /v1/users",
    "GET /v1/users/{user_id}",
    "DELETE /v1/users/{user_id}",
    "PATCH /v1/users/{user_id}",
    "GET /v1/users/{user_id}/avatar",
    "PUT /v1/users/{user_id}/avatar",
    "GET /v1/webhook-endpoints",
    "POST /v1/webhook-endpoints",
    "GET /v1/webhook-endpoints/{endpoint_id}",
    "DELETE /v1/webhook-endpoints/{endpoint_id}",
    "PATCH /v1/webhook-endpoints/{endpoint_id}",
    "GET /v1/webhook-endpoints/{endpoint_id}/deliveries",
    "GET /v1/webhook-endpoints/{endpoint_id}/deliveries/{delivery_id}",
    "POST /v1/webhook-endpoints/{endpoint_id}/deliveries/{delivery_id}/retry",
    "POST /v1/webhook-endpoints/{endpoint_id}/rotate-secret",
    "GET /v1/webhook-event-types",
    "GET /v1/payments",
    "POST /v1/payments",
    "GET /v1/payments/{payment_id}",
    "GET /v1/payments/{payment_id}/refunds",
    "POST /v1/payments/{payment_id}/refunds",
    "GET /v1/payments/{payment_id}/refunds/{refund_id}",
    "POST /v1/analytics/rollups",
    "GET /v1/analytics/summary",
    "GET /v1/jobs/{job_id}",
    "GET /healthz",
    "GET /livez",
]


# --------------------------------------------------------------------------------------------------
# The app behind a requests session
# --------------------------------------------------------------------------------------------------


class AppAdapter(BaseAdapter):
    """Hands each prepared request to the app through Litestar's test client and the answer back as a
    ``requests`` response: schemathesis sends through requests, the app's lifespan belongs to the client."""

    def __init__(self, client: TestClient[Litestar]) -> None:
        super().__init__()
        self._client = client

    def send(
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: float | tuple[float | None, float | None] | None = None,
        verify: bool | str = True,
        cert: bytes | str | tuple[bytes | str, bytes | str] | None = None,
        proxies: Mapping[str, str] | None = None,
    ) -> requests.Response:
        raw = request.body
        body = raw.encode() if isinstance(raw, str) else raw if isinstance(raw, bytes) else None
        headers = [(k, v if isinstance(v, str) else v.decode("latin-1")) for k, v in request.headers.items()]
        assert request.method is not None
        assert request.url is not None
        answer = self._client.request(request.method, request.url, headers=headers, content=body)
        response = requests.Response()
        response.status_code = answer.status_code
        response.reason = answer.reason_phrase
        # What requests' own HTTP adapter builds: a urllib3 response, whose headers keep repeated fields apart.
        response.raw = HTTPResponse(
            body=io.BytesIO(answer.content),
            headers=HTTPHeaderDict(answer.headers.multi_items()),
            status=answer.status_code,
            reason=answer.reason_phrase,
            preload_content=False,
            decode_content=False,
        )
        response.headers = CaseInsensitiveDict({name: answer.headers[name] for name in answer.headers})
        response.url = request.url
        response.request = request
        response.encoding = answer.encoding
        return response

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------------------
# Seeded objects
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seeds:
    """Ids of real objects by path parameter name; the ``doomed`` ones are for DELETE, so that deleting a
    seeded object does not leave the operations after it with nothing but 404s."""

    token: str
    other_token: str  # another tenant's: its configuration is fuzzed (a low rate limit included)
    ids: dict[str, str]
    doomed: dict[str, str]


@dataclass(frozen=True)
class Target:
    schema: Any  # schemathesis's OpenAPI schema (its classes are not typed for mypy)
    session: requests.Session
    seeds: Seeds


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 40, 40)).save(out, "PNG")
    return out.getvalue()


class Seeder:
    def __init__(self, client: TestClient[Litestar]) -> None:
        self.client = client
        self.token = ""

    def call(self, method: str, path: str, headers: dict[str, str] | None = None, **kwargs: Any) -> dict[str, Any]:
        auth = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        r = self.client.request(method, path, headers={**auth, **(headers or {})}, **kwargs)
        assert r.status_code < 300, (method, path, r.status_code, r.text)
        body: dict[str, Any] = r.json() if r.content else {}
        return body

    def until(self, path: str, ready: Any, within: float = 15.0) -> dict[str, Any]:
        """``GET path`` until ``ready(body)`` holds (bounded)."""
        deadline = time.monotonic() + within
        while True:
            body = self.call("GET", path)
            if ready(body):
                return body
            if time.monotonic() > deadline:
                raise AssertionError(f"{path} not ready within {within}s: {body}")
            time.sleep(0.05)

    def signup(self, n: int) -> str:
        body = {"organization": f"Fuzz {n}", "owner_email": f"owner{n}@fuzz.test", "owner_name": "Owner"}
        token: str = self.call("POST", "/v1/signup", json=body)["api_key"]["token"]
        return token

    def seed(self) -> Seeds:
        other_token = self.signup(2)
        self.token = self.signup(1)
        hooks = {"url": REFUSED_URL, "event_types": ["user.created", "payment.succeeded"]}
        endpoint = self.call("POST", "/v1/webhook-endpoints", json=hooks)
        doomed_endpoint = self.call("POST", "/v1/webhook-endpoints", json={**hooks, "event_types": ["user.deleted"]})
        user = self.call("POST", "/v1/users", json={"email": "ada@fuzz.test", "name": "Ada"})
        doomed_user = self.call("POST", "/v1/users", json={"email": "bob@fuzz.test", "name": "Bob"})
        doomed_key = self.call("POST", "/v1/api-keys", json={"name": "doomed"})
        avatar = self.call(
            "PUT", f"/v1/users/{user['id']}/avatar", headers={"Content-Type": "image/png"}, content=_png()
        )
        paid = self.call(
            "POST",
            "/v1/payments",
            headers={"Idempotency-Key": "seed-payment"},
            json={"amount": 2500, "currency": "EUR", "payment_method": "pm_card_visa", "customer_email": "a@fuzz.test"},
        )
        payment_id = paid["payment"]["id"]
        self.until(f"/v1/payments/{payment_id}", lambda p: p["status"] == "succeeded")
        refund = self.call(
            "POST",
            f"/v1/payments/{payment_id}/refunds",
            headers={"Idempotency-Key": "seed-refund"},
            json={"amount": 500},
        )
        deliveries = self.until(f"/v1/webhook-endpoints/{endpoint['id']}/deliveries", lambda page: page["items"])
        self.until(f"/v1/jobs/{avatar['job_id']}", lambda job: job["status"] == "succeeded")
        return Seeds(
            token=self.token,
            other_token=other_token,
            ids={
                "user_id": user["id"],
                "key_id": doomed_key["id"],
                "endpoint_id": endpoint["id"],
                "delivery_id": deliveries["items"][0]["id"],
                "payment_id": payment_id,
                "refund_id": refund["refund"]["id"],
                "job_id": paid["job_id"],
            },
            doomed={"user_id": doomed_user["id"], "key_id": doomed_key["id"], "endpoint_id": doomed_endpoint["id"]},
        )


# --------------------------------------------------------------------------------------------------
# The app under test, once per backend
# --------------------------------------------------------------------------------------------------


def _admin(pg: PostgresServer, sql: str) -> None:
    # Module fixtures are synchronous; the admin helper is a coroutine.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, admin_sql(pg, sql)).result()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh, migrated database for the module (the session's templates, as the per-test fixtures use)."""
    if request.param == "sqlite":
        target = tmp_path_factory.mktemp("fuzz-db") / "keel.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), target)
        yield f"sqlite+aiosqlite:///{target}"
        return
    pg: PostgresServer = request.getfixturevalue("pg")
    name = f"fuzz_{uuid.uuid4().hex[:12]}"
    _admin(pg, f'CREATE DATABASE "{name}" TEMPLATE "keel_template"')
    try:
        yield pg.url(name)
    finally:
        _admin(pg, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def target(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    app = create_app(make_settings(database, tmp_path_factory.mktemp("fuzz-data")), configure_logs=False)
    with TestClient(app, base_url=BASE_URL, raise_server_exceptions=False) as client:
        document = client.get("/openapi.json")
        assert document.status_code == 200, document.text
        schema = schemathesis.openapi.from_dict(document.json())
        # Every request carries a valid key (added by the test); schemathesis would otherwise also make up
        # or drop the Authorization header, and all those requests would stop at a 401.
        schema.config.generation.update(with_security_parameters=False)
        schema.config.update(base_url=BASE_URL)
        session = requests.Session()
        session.mount(BASE_URL, AppAdapter(client))
        yield Target(schema=schema, session=session, seeds=Seeder(client).seed())


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------


def strategy(operation: Any, seeds: Seeds) -> st.SearchStrategy[Any]:
    """The document's own examples, then valid and invalid requests with generated path parameters or
    the seeded ids; half of them made to reach further (``deepen``)."""
    names = [p.name for p in operation.path_parameters]
    real = seeds.doomed if operation.method.upper() == "DELETE" else {}
    variants: list[dict[str, Any] | None] = [None]
    if names:
        variants.append({name: real.get(name, seeds.ids[name]) for name in names})
    generated = st.one_of(
        *operation.get_strategies_from_examples(),
        *(
            operation.as_strategy(mode, path_parameters=fixed)
            for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
            for fixed in variants
        ),
    )
    return generated.flatmap(lambda case: st.booleans().map(lambda deeper: deepen(case) if deeper else case))


def deepen(case: Any) -> Any:
    """Put in what random data almost never gets right and without which a request stops at its first
    check: a well-formed Idempotency-Key (derived from the request, so a repeated request is a replay), a
    webhook URL the service accepts and an event type it knows."""
    if "Idempotency-Key" in case.headers:
        digest = hashlib.sha256(repr((case.path_parameters, case.body)).encode()).hexdigest()
        case.headers["Idempotency-Key"] = f"fuzz-{digest[:32]}"
    if isinstance(case.body, dict) and "url" in case.body:
        case.body = {**case.body, "url": REFUSED_URL}
    if isinstance(case.body, dict) and "event_types" in case.body:
        case.body = {**case.body, "event_types": ["user.created"]}
    return case


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------


def test_every_documented_operation_is_fuzzed(target: Target) -> None:
    documented = [f"{op.ok().method.upper()} {op.ok().path}" for op in target.schema.get_all_operations()]
    assert sorted(documented) == sorted(OPERATIONS)


@pytest.mark.parametrize("label", OPERATIONS)
@pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies")
def test_every_operation_answers_as_documented(label: str, target: Target) -> None:
    method, path = label.split(" ", 1)
    operation = target.schema[path][method]
    # The other tenant's configuration takes the fuzzed rate limits, so this tenant's requests are never throttled.
    token = target.seeds.other_token if path == "/v1/tenant/config" else target.seeds.token

    @hypothesis.settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(hypothesis.HealthCheck),
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate, hypothesis.Phase.shrink],
    )
    @hypothesis.given(case=strategy(operation, target.seeds))
    def fuzz(case: Any) -> None:
        case.call_and_validate(session=target.session, headers={"Authorization": f"Bearer {token}"}, checks=CHECKS)

    fuzz()


# --------------------------------------------------------------------------------------------------
# What fuzzing found
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85"])
async def test_names_with_a_unicode_line_break_are_refused_at_the_edge(
    sqlite_url: str, tmp_path: Path, separator: str
) -> None:
    """Fuzzing found these accepted: the email package counts them as line breaks, so the welcome
    email's Subject raised on every attempt and was never sent."""
    async with client_for(make_settings(sqlite_url, tmp_path)) as client:
        body = {"organization": f"Acme{separator}Rockets", "owner_email": "owner@acme.test", "owner_name": "Owner"}
        r = await client.post("/v1/signup", json=body)
        assert r.status_code == 422, r.text
        assert r.headers["content-type"].startswith("application/problem+json")


def test_a_name_stored_before_the_edge_refused_line_breaks_still_makes_a_sendable_email() -> None:
    email = OutgoingEmail(
        to="owner@acme.test",
        subject="Welcome to Acme\u2028Rockets\x85Inc",
        text="Hello",
        html="<p>Hello</p>",
        message_id="<m1@keel.test>",
        headers={"X-Keel-Organization": "Acme\u2029Rockets"},
    )
    message = build_message(email, "Keel <no-reply@keel.test>")
    assert message["Subject"] == "Welcome to Acme Rockets Inc"
    assert message.as_bytes().count(b"Subject:") == 1
