"""Webhook endpoints and deliveries. Semantics follow the Standard Webhooks spec: a stable message id
per delivery, signatures with every valid secret, 2xx only is success, 410 disables the endpoint,
retries with backoff and jitter that honour ``Retry-After``."""

from __future__ import annotations

import base64
import enum
import ipaddress
import random
import re
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from urllib.parse import urlsplit

from keel.contexts.webhooks.domain.errors import UnsafeUrl

SECRET_PREFIX = "whsec_"  # noqa: S105 - a prefix, not a secret
SECRET_BYTES = 32  # the spec allows 24-64
ROTATION_GRACE = timedelta(hours=24)  # the previous secret keeps signing this long after a rotation
ATTEMPT_TIMEOUT = 15.0  # seconds; the spec's upper bound
# The spec's example schedule: the delay before retry n (after the first attempt).
RETRY_SCHEDULE = (5, 300, 1800, 7200, 18000, 36000, 36000)
MAX_ATTEMPTS = 1 + len(RETRY_SCHEDULE)
RETRY_JITTER = 0.2
MAX_RETRY_AFTER = 24 * 3600.0
DISABLE_AFTER = timedelta(days=5)  # an endpoint with no success for this long is disabled
CLAIM_LEASE = timedelta(seconds=60)  # an attempt whose worker vanished is taken over after this
HONOURS_RETRY_AFTER = frozenset({429, 502, 503, 504})
MAX_URL_LENGTH = 2048


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def check_url(url: str, *, allow_private: bool) -> str:
    """The target must be an absolute http(s) URL without credentials; plain http and literal
    private addresses only when private targets are allowed. (Names are checked again at delivery,
    where they resolve: a public name may point at a private address.)"""
    if len(url) > MAX_URL_LENGTH:
        raise UnsafeUrl(f"The URL is longer than {MAX_URL_LENGTH} characters.")
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises on an invalid port
    except ValueError:
        raise UnsafeUrl("The URL is malformed.") from None
    if parts.scheme not in ("https", "http") or not host:
        raise UnsafeUrl("The URL must be an absolute https:// URL.")
    if parts.scheme == "http" and not allow_private:
        raise UnsafeUrl("The URL must use https.")
    if parts.username or parts.password:
        raise UnsafeUrl("The URL must not contain credentials.")
    if "[" in parts.netloc and not isinstance(_literal_address(host), ipaddress.IPv6Address):
        raise UnsafeUrl("The URL is malformed.")  # brackets hold an IPv6 address, nothing else
    host = host.rstrip(".")
    if _NUMERIC_LABEL.fullmatch(host.rsplit(".", 1)[-1]) and _literal_address(host) is None:
        # URL parsers (and resolvers) read a host ending in a number as an IPv4 address in some notation
        # (2130706433, 0x7f.1, 0177.0.0.1) or refuse it (1.2.3.256): only dotted decimal is accepted.
        raise UnsafeUrl("The URL must name an IPv4 address in dotted-decimal form.")
    if allow_private:
        return url
    if host == "localhost" or host.endswith((".localhost", ".local", ".internal")):
        raise UnsafeUrl("The URL points to a private host.")
    address = _literal_address(host)
    if address is not None and not is_public_address(address):
        raise UnsafeUrl("The URL points to a private, loopback or link-local address.")
    return url


def _literal_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a host names literally. Other spellings resolvers accept (``127.1``, ``2130706433``)
    are names here: the connect-time guard, which checks what a name resolves to, refuses them."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


_NUMERIC_LABEL = re.compile(r"[0-9]+|0[xX][0-9a-fA-F]*")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052: a NAT64 gateway reaches the IPv4 address inside


def is_public_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        elif address in _NAT64:
            address = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        elif address.sixtofour is not None and not is_public_address(address.sixtofour):
            return False
    return address.is_global and not address.is_multicast


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoint:
    id: uuid.UUID
    tenant_id: uuid.UUID
    url: str
    description: str
    event_types: tuple[str, ...]
    enabled: bool
    secret: str
    created_at: datetime
    updated_at: datetime
    disabled_reason: str | None = None
    previous_secret: str | None = None
    previous_secret_expires_at: datetime | None = None
    failing_since: datetime | None = None

    def signing_secrets(self, now: datetime) -> list[str]:
        keys = [self.secret]
        if self.previous_secret and self.previous_secret_expires_at and self.previous_secret_expires_at > now:
            keys.append(self.previous_secret)
        return keys

    def subscribes_to(self, event_type: str) -> bool:
        return self.enabled and event_type in self.event_types

    def rotated(self, now: datetime) -> Endpoint:
        return replace(
            self,
            secret=new_secret(),
            previous_secret=self.secret,
            previous_secret_expires_at=now + ROTATION_GRACE,
            updated_at=now,
        )

    def disabled(self, reason: str, now: datetime) -> Endpoint:
        return replace(self, enabled=False, disabled_reason=reason, updated_at=now)


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"  # waiting for its next attempt (the first, or a retry at next_attempt_at)
    SENDING = "sending"  # an attempt is in flight
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # attempts exhausted, endpoint gone or disabled, or target refused


@dataclass(frozen=True, slots=True, kw_only=True)
class Attempt:
    id: uuid.UUID
    delivery_id: uuid.UUID
    tenant_id: uuid.UUID
    number: int
    started_at: datetime
    latency_ms: int
    status_code: int | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Delivery:
    id: uuid.UUID  # sent as ``webhook-id``: the same on every attempt
    tenant_id: uuid.UUID
    endpoint_id: uuid.UUID
    event_id: uuid.UUID
    event_type: str
    payload: str  # the exact body, so every attempt sends (and signs) the same bytes
    status: DeliveryStatus
    attempts: int
    created_at: datetime
    updated_at: datetime
    next_attempt_at: datetime | None = None
    last_status_code: int | None = None
    last_error: str | None = None
    # How many attempts the current round may make: the automatic schedule, or 1 for a manual retry.
    attempt_budget: int = MAX_ATTEMPTS
    # Fences the attempt in flight: set by each claim, so a run that lost its claim (its worker was
    # presumed dead and the job retried) cannot overwrite what the newer run recorded.
    claim_token: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SendResult:
    latency_ms: int
    status_code: int | None = None
    error: str | None = None
    retry_after: float | None = None  # seconds, from the response's Retry-After
    refused: bool = False  # the target resolved to an address deliveries may not reach

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


class Outcome(enum.Enum):
    SUCCEEDED = "succeeded"
    RETRY = "retry"
    GIVE_UP = "give-up"
    GONE = "gone"


def outcome(result: SendResult, attempts: int, budget: int) -> Outcome:
    """``attempts``: attempts made so far, this one included; ``budget``: where this round stops."""
    if result.ok:
        return Outcome.SUCCEEDED
    if result.status_code == 410:
        return Outcome.GONE
    if result.refused or attempts >= budget:
        return Outcome.GIVE_UP
    return Outcome.RETRY


def retry_delay(
    retry_number: int,
    result: SendResult,
    rng: random.Random | None = None,
    schedule: Sequence[float] = RETRY_SCHEDULE,
) -> float:
    """Seconds before retry ``retry_number`` (1-based): the schedule with jitter, or later if the
    receiver asked for it with ``Retry-After``."""
    r = rng or random
    base = schedule[min(retry_number, len(schedule)) - 1]
    delay = base * (1 + r.uniform(-RETRY_JITTER, RETRY_JITTER))
    if result.retry_after is not None and result.status_code in HONOURS_RETRY_AFTER:
        delay = max(delay, min(result.retry_after, MAX_RETRY_AFTER))
    return delay


def payload_of(event_type: str, occurred_at: datetime, data: dict[str, object]) -> dict[str, object]:
    """The Standard Webhooks payload shape."""
    return {"type": event_type, "timestamp": occurred_at.isoformat(), "data": data}
