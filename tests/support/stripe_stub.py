"""A stand-in for Stripe's API on 127.0.0.1: a real HTTP server that answers what the official SDK sends
for PaymentIntents and Refunds, the way Stripe's test mode answers it, and records every request.

It models what Keel relies on: API keys (401 without a valid ``Bearer sk_…``/``rk_…``), idempotency keys
(a replay gets the stored first answer; different parameters under the same key get 400
``idempotency_error``; 5xx answers are not stored), the test card tokens (the same ones as the sandbox
provider), and refunds bounded by what is left of the charge. ``script`` answers the next requests with
canned errors (429, 500, …) before anything else happens, like an outage in front of the API.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

SUCCEEDS = "pm_card_visa"
DECLINED = "pm_card_chargeDeclined"
INSUFFICIENT_FUNDS = "pm_card_chargeDeclinedInsufficientFunds"
UNAVAILABLE_TWICE = "pm_card_providerUnavailable"  # two 500s per idempotency key, then success
AUTHENTICATION_REQUIRED = "pm_card_authenticationRequired"  # Stripe's 3-D Secure test card: requires_action
OUTAGES_PER_KEY = 2

_DECLINE_CODES = {DECLINED: "generic_decline", INSUFFICIENT_FUNDS: "insufficient_funds"}

Json = dict[str, Any]


@dataclass(frozen=True)
class StubRequest:
    method: str
    path: str  # without the query string
    headers: dict[str, str]  # lower-cased names
    form: dict[str, str]  # the form-encoded body (or the query of a GET), flat: "metadata[order]" -> "1042"

    @property
    def idempotency_key(self) -> str | None:
        return self.headers.get("idempotency-key")


@dataclass(frozen=True)
class StubReply:
    status: int
    body: Json


def error_body(type_: str, message: str, **fields: Any) -> Json:
    return {"error": {"type": type_, "message": message, **fields}}


def _nested(form: dict[str, str], name: str) -> dict[str, str]:
    """``metadata[order]=1042`` -> {"order": "1042"} (what the SDK makes of a dict parameter)."""
    prefix = f"{name}["
    return {k[len(prefix) : -1]: v for k, v in form.items() if k.startswith(prefix) and k.endswith("]")}


def _masked(key: str) -> str:
    """How Stripe echoes a refused key: never in full."""
    return key[:8] + "*" * max(len(key) - 12, 4) + key[-4:]


@dataclass
class StripeStub:
    url: str = ""
    requests: list[StubRequest] = field(default_factory=list)
    # None: any key that looks like a secret or restricted key is accepted.
    accepted_keys: set[str] | None = None
    # Answered first, in order, whatever the request (never stored under an idempotency key).
    script: list[StubReply] = field(default_factory=list)
    # Tokens whose PaymentIntents stay ``processing`` until ``settle`` says otherwise.
    processing: set[str] = field(default_factory=set)
    _intents: dict[str, Json] = field(default_factory=dict)
    _refunds: dict[str, Json] = field(default_factory=dict)
    _idempotent: dict[str, tuple[str, str, dict[str, str], StubReply]] = field(default_factory=dict)
    _outages: dict[str | None, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    # -- what tests read -------------------------------------------------------------------------

    def charges(self) -> list[Json]:
        """Money taken: every PaymentIntent that succeeded."""
        with self._lock:
            return [dict(i) for i in self._intents.values() if i["status"] == "succeeded"]

    def intents(self) -> list[Json]:
        """Every PaymentIntent created, whatever became of it."""
        with self._lock:
            return [dict(i) for i in self._intents.values()]

    def refunds(self) -> list[Json]:
        """Money given back: every refund that succeeded."""
        with self._lock:
            return [dict(r) for r in self._refunds.values() if r["status"] == "succeeded"]

    def calls(self, method: str, path: str) -> list[StubRequest]:
        with self._lock:
            return [r for r in self.requests if r.method == method and r.path == path]

    def intent_creates(self) -> list[StubRequest]:
        return self.calls("POST", "/v1/payment_intents")

    def fail_next(self, status: int, body: Json | None = None, times: int = 1) -> None:
        default = (
            error_body("invalid_request_error", "Too many requests hit the API too quickly.", code="rate_limit")
            if status == 429
            else error_body("api_error", "An unknown error occurred.")
        )
        with self._lock:
            self.script.extend(StubReply(status, body or default) for _ in range(times))

    def settle(self, intent_id: str, status: str = "succeeded") -> None:
        """A ``processing`` PaymentIntent reaches its final state (as Stripe does later, on its own)."""
        with self._lock:
            intent = self._intents[intent_id]
            intent["status"] = status
            intent["amount_received"] = intent["amount"] if status == "succeeded" else 0

    def close(self) -> None:
        """Stop answering: later requests find the port closed."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # -- the API ---------------------------------------------------------------------------------

    def handle(self, method: str, path: str, headers: dict[str, str], form: dict[str, str]) -> StubReply:
        with self._lock:
            request = StubRequest(method, path, headers, form)
            self.requests.append(request)
            refused = self._authenticate(headers.get("authorization", ""))
            if refused is not None:
                return refused
            if self.script:
                return self.script.pop(0)
            key = request.idempotency_key if method == "POST" else None
            if key is not None and key in self._idempotent:
                first_method, first_path, first_form, reply = self._idempotent[key]
                if (first_method, first_path, first_form) != (method, path, form):
                    return StubReply(
                        400,
                        error_body(
                            "idempotency_error",
                            "Keys for idempotent requests can only be used with the same parameters they were "
                            f"first used with. Try using a key other than '{key}' if you meant to execute a "
                            "different request.",
                        ),
                    )
                return reply
            reply = self._route(method, path, form, key)
            if key is not None and reply.status < 500:
                self._idempotent[key] = (method, path, form, reply)
            return reply

    def _authenticate(self, authorization: str) -> StubReply | None:
        scheme, _, key = authorization.partition(" ")
        if scheme != "Bearer" or not key:
            message = "You did not provide an API key. You need to provide your API key in the Authorization header."
            return StubReply(401, error_body("invalid_request_error", message))
        valid = key.startswith(("sk_", "rk_")) if self.accepted_keys is None else key in self.accepted_keys
        if not valid:
            return StubReply(401, error_body("invalid_request_error", f"Invalid API Key provided: {_masked(key)}"))
        return None

    def _route(self, method: str, path: str, form: dict[str, str], key: str | None) -> StubReply:
        if method == "POST" and path == "/v1/payment_intents":
            return self._create_intent(form, key)
        if method == "GET" and path.startswith("/v1/payment_intents/"):
            intent = self._intents.get(path.rsplit("/", 1)[1])
            if intent is None:
                return _missing("payment_intent", path.rsplit("/", 1)[1], param="intent", status=404)
            return StubReply(200, dict(intent))
        if method == "POST" and path == "/v1/refunds":
            return self._create_refund(form)
        return StubReply(404, error_body("invalid_request_error", f"Unrecognized request URL ({method}: {path})."))

    def _create_intent(self, form: dict[str, str], key: str | None) -> StubReply:
        for required in ("amount", "currency"):
            if required not in form:
                return StubReply(
                    400,
                    error_body(
                        "invalid_request_error",
                        f"Missing required param: {required}.",
                        code="parameter_missing",
                        param=required,
                    ),
                )
        token = form.get("payment_method", "")
        if token == UNAVAILABLE_TWICE:
            seen = self._outages.get(key, 0) + 1
            self._outages[key] = seen
            if seen <= OUTAGES_PER_KEY:
                return StubReply(500, error_body("api_error", "An unknown error occurred."))
        if not token.startswith(("pm_card_", "tok_")):
            return _missing("payment_method", token, param="payment_method")
        intent: Json = {
            "id": f"pi_{uuid.uuid4().hex[:24]}",
            "object": "payment_intent",
            "amount": int(form["amount"]),
            "amount_received": 0,
            "currency": form["currency"],
            "status": "requires_payment_method",
            "capture_method": "automatic",
            "confirmation_method": "automatic",
            "payment_method": token,
            "description": form.get("description"),
            "metadata": _nested(form, "metadata"),
            "created": int(time.time()),
            "livemode": False,
            "latest_charge": None,
            "last_payment_error": None,
            "next_action": None,
        }
        self._intents[intent["id"]] = intent
        if token in _DECLINE_CODES:
            decline = _DECLINE_CODES[token]
            error: Json = {
                "type": "card_error",
                "code": "card_declined",
                "decline_code": decline,
                "message": "Your card was declined."
                if decline == "generic_decline"
                else "Your card has insufficient funds.",
                "param": "payment_method",
            }
            intent["last_payment_error"] = dict(error)
            return StubReply(402, {"error": {**error, "payment_intent": dict(intent)}})
        if token == AUTHENTICATION_REQUIRED:
            intent["status"] = "requires_action"
            intent["next_action"] = {"type": "use_stripe_sdk", "use_stripe_sdk": {}}
        elif token in self.processing:
            intent["status"] = "processing"
        else:
            intent["status"] = "succeeded"
            intent["amount_received"] = intent["amount"]
            intent["latest_charge"] = f"ch_{uuid.uuid4().hex[:24]}"
        return StubReply(200, dict(intent))

    def _create_refund(self, form: dict[str, str]) -> StubReply:
        intent_id = form.get("payment_intent", "")
        intent = self._intents.get(intent_id)
        if intent is None or intent["status"] != "succeeded":
            return _missing("payment_intent", intent_id, param="payment_intent")
        refunded = sum(
            r["amount"]
            for r in self._refunds.values()
            if r["payment_intent"] == intent_id and r["status"] == "succeeded"
        )
        left = intent["amount"] - refunded
        amount = int(form["amount"]) if "amount" in form else left
        if left <= 0:
            return StubReply(
                400,
                error_body(
                    "invalid_request_error",
                    f"Charge {intent['latest_charge']} has already been refunded.",
                    code="charge_already_refunded",
                ),
            )
        if amount > left:
            return StubReply(
                400,
                error_body(
                    "invalid_request_error",
                    f"Refund amount ({amount}) is greater than unrefunded amount on charge ({left})",
                    code="amount_too_large",
                    param="amount",
                ),
            )
        refund: Json = {
            "id": f"re_{uuid.uuid4().hex[:24]}",
            "object": "refund",
            "amount": amount,
            "currency": intent["currency"],
            "payment_intent": intent_id,
            "charge": intent["latest_charge"],
            "reason": form.get("reason"),
            "status": "succeeded",
            "metadata": _nested(form, "metadata"),
            "created": int(time.time()),
        }
        self._refunds[refund["id"]] = refund
        return StubReply(200, dict(refund))


def _missing(kind: str, value: str, *, param: str, status: int = 400) -> StubReply:
    names = {"payment_method": "PaymentMethod", "payment_intent": "PaymentIntent"}
    return StubReply(
        status,
        error_body(
            "invalid_request_error",
            f"No such {names[kind]}: '{value}'",
            code="resource_missing",
            param=param,
        ),
    )


@contextmanager
def running_stripe_stub() -> Iterator[StripeStub]:
    stub = StripeStub()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            parts = urlsplit(self.path)
            raw = self.rfile.read(int(self.headers.get("content-length", "0"))).decode()
            form = dict(parse_qsl(raw if self.command == "POST" else parts.query, keep_blank_values=True))
            headers = {k.lower(): v for k, v in self.headers.items()}
            reply = stub.handle(self.command, parts.path, headers, form)
            data = json.dumps(reply.body).encode()
            self.send_response(reply.status)
            self.send_header("content-type", "application/json")
            self.send_header("request-id", f"req_{uuid.uuid4().hex[:14]}")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _answer

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    stub._server = server
    stub.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield stub
    finally:
        stub.close()


@pytest.fixture
def stripe_stub() -> Iterator[StripeStub]:
    """A fresh Stripe stand-in for one test (import this fixture into the test module to use it)."""
    with running_stripe_stub() as stub:
        yield stub
