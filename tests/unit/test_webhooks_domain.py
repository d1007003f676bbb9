"""The webhooks model: URL safety, secrets and their rotation, and what each answer of a receiver
means for the delivery (Standard Webhooks semantics)."""

from __future__ import annotations

import base64
import json
import random
from datetime import UTC, datetime, timedelta

import pytest

from keel.contexts.webhooks.domain.errors import UnsafeUrl
from keel.contexts.webhooks.domain.model import (
    MAX_ATTEMPTS,
    MAX_RETRY_AFTER,
    MAX_URL_LENGTH,
    RETRY_JITTER,
    RETRY_SCHEDULE,
    ROTATION_GRACE,
    SECRET_PREFIX,
    Endpoint,
    Outcome,
    SendResult,
    check_url,
    new_secret,
    outcome,
    payload_of,
    retry_delay,
)
from keel.platform.domain.ids import new_id

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)

# -- check_url --------------------------------------------------------------------------------------

PUBLIC_HTTPS = [
    "https://example.com/hooks",
    "https://example.com:8443/hooks?x=1&y=2#frag",
    "https://hooks.example.co.uk",
    "https://93.184.216.34/hooks",
    "https://[2606:4700:4700::1111]/hooks",
    "https://b\u00fccher.example/hooks",
]


@pytest.mark.parametrize("url", PUBLIC_HTTPS)
@pytest.mark.parametrize("allow_private", [False, True])
def test_public_https_urls_are_accepted_and_kept_verbatim(url: str, allow_private: bool) -> None:
    assert check_url(url, allow_private=allow_private) == url


REFUSED_ALWAYS = [
    ("ftp", "ftp://example.com/hooks"),
    ("javascript", "javascript:alert(1)"),
    ("file", "file:///etc/passwd"),
    ("relative", "/hooks"),
    ("scheme-relative", "//example.com/hooks"),
    ("no-host", "https:///hooks"),
    ("empty-host-with-port", "https://:443/hooks"),
    ("credentials", "https://user:pass@example.com/hooks"),
    ("username-only", "https://user@example.com/hooks"),
    ("empty-password", "https://user:@example.com/hooks"),
    ("port-out-of-range", "https://example.com:99999/hooks"),
    ("port-not-a-number", "https://example.com:abc/hooks"),
    ("too-long", "https://example.com/" + "a" * MAX_URL_LENGTH),
]


@pytest.mark.parametrize(("name", "url"), REFUSED_ALWAYS, ids=[n for n, _ in REFUSED_ALWAYS])
@pytest.mark.parametrize("allow_private", [False, True])
def test_malformed_or_credentialed_urls_are_refused_even_when_private_targets_are_allowed(
    name: str, url: str, allow_private: bool
) -> None:
    with pytest.raises(UnsafeUrl) as info:
        check_url(url, allow_private=allow_private)
    assert info.value.pointer == "#/url"
    assert info.value.code == "webhook-url-not-allowed"


PRIVATE = [
    ("plain-http", "http://example.com/hooks"),
    ("localhost", "https://localhost/hooks"),
    ("localhost-uppercase", "https://LOCALHOST:8443/hooks"),
    ("dot-localhost", "https://api.localhost/hooks"),
    ("dot-local", "https://printer.local/hooks"),
    ("dot-internal", "https://metadata.google.internal/computeMetadata/v1/"),
    ("loopback", "https://127.0.0.1/hooks"),
    ("loopback-other", "https://127.255.0.9:8080/hooks"),
    ("unspecified", "https://0.0.0.0/hooks"),
    ("private-10", "https://10.0.0.1/hooks"),
    ("private-172", "https://172.16.5.4/hooks"),
    ("private-192", "https://192.168.1.1/hooks"),
    ("shared-cgnat", "https://100.64.0.1/hooks"),
    ("link-local-metadata", "https://169.254.169.254/latest/meta-data/"),
    ("multicast", "https://224.0.0.1/hooks"),
    ("broadcast", "https://255.255.255.255/hooks"),
    ("documentation", "https://192.0.2.10/hooks"),
    ("ipv6-loopback", "https://[::1]/hooks"),
    ("ipv6-unspecified", "https://[::]/hooks"),
    ("ipv6-unique-local", "https://[fd00::1]/hooks"),
    ("ipv6-link-local", "https://[fe80::1]/hooks"),
    ("ipv6-multicast", "https://[ff02::1]/hooks"),
    ("ipv4-mapped-loopback", "https://[::ffff:127.0.0.1]/hooks"),
    ("ipv4-mapped-private", "https://[::ffff:10.1.2.3]/hooks"),
    ("ipv4-mapped-metadata", "https://[::ffff:a9fe:a9fe]/hooks"),
]


@pytest.mark.parametrize(("name", "url"), PRIVATE, ids=[n for n, _ in PRIVATE])
def test_plain_http_and_private_targets_are_refused_by_default(name: str, url: str) -> None:
    with pytest.raises(UnsafeUrl) as info:
        check_url(url, allow_private=False)
    assert info.value.pointer == "#/url"


@pytest.mark.parametrize(("name", "url"), PRIVATE, ids=[n for n, _ in PRIVATE])
def test_private_targets_are_accepted_when_allowed(name: str, url: str) -> None:
    assert check_url(url, allow_private=True) == url


MALFORMED_IPV6 = ["https://[::1/hooks", "https://[zz]/hooks", "https://exa]mple.com/hooks"]


@pytest.mark.parametrize("url", MALFORMED_IPV6)
def test_malformed_bracketed_hosts_are_refused_as_unsafe_urls(url: str) -> None:
    """A URL the parser cannot split is the caller's mistake (422), not an internal error.
    (Today urlsplit's ValueError escapes check_url and the API answers 500.)"""
    for allow_private in (False, True):
        with pytest.raises(UnsafeUrl):
            check_url(url, allow_private=allow_private)


def test_url_length_limit_is_inclusive() -> None:
    url = "https://example.com/" + "a" * (MAX_URL_LENGTH - len("https://example.com/"))
    assert len(url) == MAX_URL_LENGTH
    assert check_url(url, allow_private=False) == url
    with pytest.raises(UnsafeUrl):
        check_url(url + "a", allow_private=False)


# -- secrets ----------------------------------------------------------------------------------------


def test_new_secret_is_whsec_and_base64_of_32_random_bytes() -> None:
    secrets = {new_secret() for _ in range(50)}
    assert len(secrets) == 50
    for s in secrets:
        assert s.startswith(SECRET_PREFIX)
        assert s.startswith("whsec_")
        raw = base64.b64decode(s.removeprefix("whsec_"), validate=True)
        assert len(raw) == 32


def endpoint(**kw: object) -> Endpoint:
    values: dict[str, object] = {
        "id": new_id(),
        "tenant_id": new_id(),
        "url": "https://example.com/hooks",
        "description": "",
        "event_types": ("user.created", "user.deleted"),
        "enabled": True,
        "secret": new_secret(),
        "created_at": NOW,
        "updated_at": NOW,
    }
    values.update(kw)
    return Endpoint(**values)  # type: ignore[arg-type]


def test_a_new_endpoint_signs_with_its_secret_only() -> None:
    e = endpoint()
    assert e.signing_secrets(NOW) == [e.secret]
    assert e.signing_secrets(NOW + timedelta(days=400)) == [e.secret]


def test_rotation_keeps_the_previous_secret_signing_for_24_hours_then_only_the_new_one() -> None:
    e = endpoint()
    rotated_at = NOW + timedelta(hours=1)
    r = e.rotated(rotated_at)
    assert timedelta(hours=24) == ROTATION_GRACE
    assert r.secret != e.secret
    assert r.secret.startswith("whsec_")
    assert r.previous_secret == e.secret
    assert r.previous_secret_expires_at == rotated_at + timedelta(hours=24)
    assert r.updated_at == rotated_at
    assert (r.id, r.tenant_id, r.url, r.created_at) == (e.id, e.tenant_id, e.url, e.created_at)
    # Both sign during the grace period, the new one first.
    assert r.signing_secrets(rotated_at) == [r.secret, e.secret]
    assert r.signing_secrets(rotated_at + timedelta(hours=23, minutes=59, seconds=59)) == [r.secret, e.secret]
    # From the expiry on, only the new one.
    assert r.signing_secrets(rotated_at + timedelta(hours=24)) == [r.secret]
    assert r.signing_secrets(rotated_at + timedelta(days=3)) == [r.secret]


def test_rotating_twice_drops_the_oldest_secret_at_once() -> None:
    e = endpoint()
    first = e.rotated(NOW)
    second = first.rotated(NOW + timedelta(hours=2))
    assert second.signing_secrets(NOW + timedelta(hours=2)) == [second.secret, first.secret]
    assert e.secret not in second.signing_secrets(NOW + timedelta(hours=2))


def test_subscription_needs_the_type_and_an_enabled_endpoint() -> None:
    e = endpoint()
    assert e.subscribes_to("user.created")
    assert not e.subscribes_to("user.updated")
    assert not e.subscribes_to("user")
    off = e.disabled("The receiver answered 410 Gone.", NOW + timedelta(minutes=1))
    assert not off.enabled
    assert off.disabled_reason == "The receiver answered 410 Gone."
    assert off.updated_at == NOW + timedelta(minutes=1)
    assert not off.subscribes_to("user.created")


# -- outcomes ---------------------------------------------------------------------------------------


def res(status: int | None = None, **kw: object) -> SendResult:
    return SendResult(latency_ms=5, status_code=status, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_any_2xx_is_success_even_on_the_last_attempt(status: int) -> None:
    assert res(status).ok
    assert outcome(res(status), 1, MAX_ATTEMPTS) is Outcome.SUCCEEDED
    assert outcome(res(status), MAX_ATTEMPTS, MAX_ATTEMPTS) is Outcome.SUCCEEDED


def test_410_gone_is_final_whatever_the_budget() -> None:
    assert outcome(res(410), 1, MAX_ATTEMPTS) is Outcome.GONE
    assert outcome(res(410), MAX_ATTEMPTS, MAX_ATTEMPTS) is Outcome.GONE


@pytest.mark.parametrize(
    "status", [100, 199, 300, 301, 302, 304, 307, 308, 400, 401, 403, 404, 409, 429, 500, 503, 599]
)
def test_other_statuses_are_retried_while_the_budget_lasts(status: int) -> None:
    assert not res(status).ok
    assert outcome(res(status), 1, MAX_ATTEMPTS) is Outcome.RETRY
    assert outcome(res(status), MAX_ATTEMPTS - 1, MAX_ATTEMPTS) is Outcome.RETRY
    assert outcome(res(status), MAX_ATTEMPTS, MAX_ATTEMPTS) is Outcome.GIVE_UP


def test_network_errors_are_retried_and_refused_targets_are_given_up_at_once() -> None:
    assert outcome(res(None, error="No response within 15s."), 1, MAX_ATTEMPTS) is Outcome.RETRY
    assert outcome(res(None, error="Connection failed: ConnectError."), 3, MAX_ATTEMPTS) is Outcome.RETRY
    assert outcome(res(None, error="Target refused.", refused=True), 1, MAX_ATTEMPTS) is Outcome.GIVE_UP


def test_a_manual_retry_budget_of_one_more_attempt_gives_up_after_it() -> None:
    # A delivery that failed after 8 attempts and is retried by hand gets budget 9.
    assert outcome(res(500), 9, 9) is Outcome.GIVE_UP
    assert outcome(res(200), 9, 9) is Outcome.SUCCEEDED


class FixedJitter(random.Random):
    """uniform() returns the low end, the high end or the middle of the range."""

    def __init__(self, where: str) -> None:
        super().__init__(0)
        self.where = where

    def uniform(self, a: float, b: float) -> float:
        return {"low": a, "high": b, "mid": (a + b) / 2}[self.where]


def test_the_default_schedule_is_the_standard_webhooks_example() -> None:
    assert RETRY_SCHEDULE == (5, 300, 1800, 7200, 18000, 36000, 36000)
    assert MAX_ATTEMPTS == 8


@pytest.mark.parametrize("n", range(1, len(RETRY_SCHEDULE) + 1))
def test_retry_delay_follows_the_schedule_with_bounded_jitter(n: int) -> None:
    base = RETRY_SCHEDULE[n - 1]
    assert retry_delay(n, res(500), FixedJitter("mid")) == pytest.approx(base)
    assert retry_delay(n, res(500), FixedJitter("low")) == pytest.approx(base * (1 - RETRY_JITTER))
    assert retry_delay(n, res(500), FixedJitter("high")) == pytest.approx(base * (1 + RETRY_JITTER))
    rng = random.Random(n)
    for _ in range(200):
        assert base * 0.8 - 1e-9 <= retry_delay(n, res(503), rng) <= base * 1.2 + 1e-9


def test_jitter_spreads_retries() -> None:
    rng = random.Random(1)
    assert len({round(retry_delay(1, res(500), rng), 6) for _ in range(20)}) > 10


def test_retries_past_the_schedule_use_its_last_delay() -> None:
    mid = FixedJitter("mid")
    assert retry_delay(50, res(500), mid) == pytest.approx(RETRY_SCHEDULE[-1])
    assert retry_delay(4, res(500), mid, schedule=(0.2, 0.5)) == pytest.approx(0.5)
    assert retry_delay(1, res(500), mid, schedule=(0.2, 0.5)) == pytest.approx(0.2)


@pytest.mark.parametrize("status", [429, 502, 503, 504])
def test_retry_after_is_honoured_for_throttling_and_unavailability(status: int) -> None:
    mid = FixedJitter("mid")
    assert retry_delay(1, res(status, retry_after=120.0), mid) == 120.0
    # Never sooner than the schedule.
    assert retry_delay(2, res(status, retry_after=1.0), mid) == pytest.approx(300)
    assert retry_delay(1, res(status, retry_after=0.0), mid) == pytest.approx(5)
    # Capped: a receiver cannot park a delivery for a year.
    assert retry_delay(1, res(status, retry_after=365 * 86400.0), mid) == MAX_RETRY_AFTER
    assert MAX_RETRY_AFTER == 24 * 3600


@pytest.mark.parametrize("status", [None, 301, 400, 404, 408, 409, 500, 501, 505])
def test_retry_after_is_ignored_for_other_answers(status: int | None) -> None:
    mid = FixedJitter("mid")
    assert retry_delay(1, res(status, retry_after=3600.0), mid) == pytest.approx(5)


def test_payload_has_the_standard_webhooks_shape() -> None:
    at = datetime(2026, 2, 3, 4, 5, 6, 789000, tzinfo=UTC)
    p = payload_of("user.created", at, {"user_id": "u1", "email": "a@b.test"})
    assert p == {"type": "user.created", "timestamp": at.isoformat(), "data": {"user_id": "u1", "email": "a@b.test"}}
    assert datetime.fromisoformat(str(p["timestamp"])) == at
    assert json.loads(json.dumps(p)) == p
