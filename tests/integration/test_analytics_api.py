"""Analytics over HTTP on the embedded default (SQLite, jobs in-process, the cache and the request tally
in memory), and on Postgres where the SQL decides (grouping by UTC day, the rollup upserts, adding
request counts).

Every app here runs on a ``ManualClock`` passed to ``client_for``: "today" is whatever the test says, so
a test can create a payment "yesterday", close the day, and change it late, and no test depends on the
date it runs on or on midnight passing while it runs. The clock only moves when a test moves it, which
also makes ``generated_at`` tell a recomputed summary (a later clock) from a cached one.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar, cast

import httpx
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy import select

from keel.contexts.analytics.adapters.sql.models import DailyFigureRow, RolledUpDayRow
from keel.contexts.analytics.domain.services import RECOMPUTE_AFTER, ROLLUP_JOB, rollup_job_id
from keel.main.container import Container
from tests.fakes.clock import ManualClock
from tests.support.app import client_for, finished_job, job, make_settings, signup
from tests.support.waiting import eventually

Client = AsyncTestClient[Litestar]
PROBLEM = "application/problem+json"
T = TypeVar("T")

# Mid-morning UTC: nothing the tests do at this time is near a day's edge.
START = datetime(2026, 3, 7, 9, 30, tzinfo=UTC)
EMPTY_DAY = {"rolled_up": False, "payments": [], "refunds": [], "new_users": 0, "api_requests": 0}


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
async def client(sqlite_url: str, tmp_path: Path, clock: ManualClock) -> AsyncIterator[Client]:
    """The embedded default on the test's clock."""
    async with client_for(make_settings(sqlite_url, tmp_path), clock=clock) as c:
        yield c


@pytest.fixture
async def any_client(database_url: str, tmp_path: Path, clock: ManualClock) -> AsyncIterator[Client]:
    """The same app on SQLite and on Postgres."""
    async with client_for(make_settings(database_url, tmp_path), clock=clock) as c:
        yield c


# -- helpers ----------------------------------------------------------------------------------------


def container_of(client: Client) -> Container:
    return cast(Container, client.app.state["container"])


async def on_app(client: Client, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run ``fn(*args)`` on the app's own event loop, where its engine and background tasks live."""
    return await asyncio.to_thread(client.blocking_portal.call, fn, *args)


def today(clock: ManualClock) -> date:
    return clock.now().date()


def day(clock: ManualClock, offset: int = 0) -> str:
    """The ISO date ``offset`` days from the clock's today."""
    return (today(clock) + timedelta(days=offset)).isoformat()


def stamp(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def money(currency: str, status: str, count: int, amount: int, display: str) -> dict[str, Any]:
    return {"currency": currency, "status": status, "count": count, "amount": amount, "amount_display": display}


async def get_summary(client: Client, tenant: dict[str, Any], **params: str) -> httpx.Response:
    return await client.get("/v1/analytics/summary", params=params, headers=tenant["headers"])


async def summary(client: Client, tenant: dict[str, Any], **params: str) -> dict[str, Any]:
    r = await get_summary(client, tenant, **params)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    found: dict[str, Any] = r.json()
    return found


def by_date(s: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The summary's days by date, without the date itself."""
    return {d["date"]: {k: v for k, v in d.items() if k != "date"} for d in s["days"]}


def assert_problem(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM), r.headers
    body: dict[str, Any] = r.json()
    assert body["status"] == status
    return body


async def payment(client: Client, tenant: dict[str, Any], payment_id: str) -> dict[str, Any]:
    r = await client.get(f"/v1/payments/{payment_id}", headers=tenant["headers"])
    assert r.status_code == 200, r.text
    found: dict[str, Any] = r.json()
    return found


async def pay(
    client: Client, tenant: dict[str, Any], amount: int, currency: str = "EUR", method: str = "pm_card_visa"
) -> dict[str, Any]:
    """A payment, once its capture job has decided it."""
    r = await client.post(
        "/v1/payments",
        json={"amount": amount, "currency": currency, "payment_method": method},
        headers={**tenant["headers"], "Idempotency-Key": f"analytics-{uuid.uuid4()}"},
    )
    assert r.status_code == 202, r.text
    payment_id = r.json()["payment"]["id"]

    async def decided() -> dict[str, Any] | None:
        p = await payment(client, tenant, payment_id)
        return p if p["status"] != "pending" else None

    found: dict[str, Any] = await eventually(decided)
    return found


async def refund(client: Client, tenant: dict[str, Any], payment_id: str, amount: int | None = None) -> dict[str, Any]:
    """A refund, once its job has settled it."""
    path = f"/v1/payments/{payment_id}/refunds"
    headers = {**tenant["headers"], "Idempotency-Key": f"analytics-{uuid.uuid4()}"}
    r = await (
        client.post(path, json={"amount": amount}, headers=headers) if amount else client.post(path, headers=headers)
    )
    assert r.status_code == 202, r.text
    refund_id = r.json()["refund"]["id"]

    async def settled() -> dict[str, Any] | None:
        got = await client.get(f"{path}/{refund_id}", headers=tenant["headers"])
        assert got.status_code == 200, got.text
        return got.json() if got.json()["status"] != "pending" else None

    found: dict[str, Any] = await eventually(settled)
    return found


async def add_user(client: Client, tenant: dict[str, Any], email: str) -> str:
    r = await client.post("/v1/users", json={"email": email, "name": "Ada"}, headers=tenant["headers"])
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def request_rollup(client: Client, tenant: dict[str, Any], start: str, end: str) -> httpx.Response:
    return await client.post("/v1/analytics/rollups", json={"from": start, "to": end}, headers=tenant["headers"])


async def rollup(client: Client, tenant: dict[str, Any], start: str, end: str) -> dict[str, Any]:
    """POST a rollup; returns its job once finished."""
    r = await request_rollup(client, tenant, start, end)
    assert r.status_code == 202, r.text
    return await finished_job(client, tenant, r.json()["job_id"])


async def flush_requests(client: Client) -> int:
    """What the 1 s counter flush and the 60 s ``analytics.flush_requests`` job do, now: the app's counts
    into the tally, the tally into the database."""
    container = container_of(client)
    await on_app(client, container.request_counter.flush)
    return await on_app(client, container.analytics.flush_requests)


async def stored(client: Client, tenant: dict[str, Any]) -> tuple[set[tuple[Any, ...]], set[str]]:
    """The tenant's stored figures (day, metric, currency, status, count, amount) and rolled-up days."""
    tenant_id = uuid.UUID(tenant["tenant"]["id"])

    async def read() -> tuple[set[tuple[Any, ...]], set[str]]:
        async with container_of(client).sessions() as s:
            rows = (await s.execute(select(DailyFigureRow).where(DailyFigureRow.tenant_id == tenant_id))).scalars()
            figures = {(r.day.isoformat(), r.metric, r.currency, r.status, r.count, r.amount) for r in rows}
            days = (await s.execute(select(RolledUpDayRow.day).where(RolledUpDayRow.tenant_id == tenant_id))).scalars()
            return figures, {d.isoformat() for d in days}

    return await on_app(client, read)


# -- the summary ------------------------------------------------------------------------------------


async def test_the_summary_defaults_to_the_30_days_ending_today_with_every_day_listed(
    client: Client, tenant: dict[str, Any], clock: ManualClock
) -> None:
    s = await summary(client, tenant)
    assert set(s) == {"from", "to", "currency", "totals", "days", "generated_at"}
    assert (s["from"], s["to"], s["currency"]) == (day(clock, -29), day(clock), None)
    assert stamp(s["generated_at"]) == START
    # Every day, oldest first, empty ones included; today holds the owner the signup created.
    assert [d["date"] for d in s["days"]] == [day(clock, i) for i in range(-29, 1)]
    for d in s["days"][:-1]:
        assert d == {"date": d["date"], **EMPTY_DAY}
    assert s["days"][-1] == {"date": day(clock), **EMPTY_DAY, "new_users": 1}
    assert s["totals"] == {"payments": [], "refunds": [], "new_users": 1, "api_requests": 0}

    # `from` alone: 30 days from it, never past today; `to` alone: the 30 days ending then.
    cases = [
        ({"from": day(clock, -100)}, (day(clock, -100), day(clock, -71), 30)),
        ({"from": day(clock, -5)}, (day(clock, -5), day(clock), 6)),
        ({"from": day(clock)}, (day(clock), day(clock), 1)),
        ({"to": day(clock, -40)}, (day(clock, -69), day(clock, -40), 30)),
        ({"from": day(clock, -3), "to": day(clock, -3)}, (day(clock, -3), day(clock, -3), 1)),
        ({"from": day(clock, -365), "to": day(clock)}, (day(clock, -365), day(clock), 366)),  # the longest
    ]
    for params, (start, end, n) in cases:
        s = await summary(client, tenant, **params)
        assert (s["from"], s["to"], len(s["days"])) == (start, end, n), params
        assert (s["days"][0]["date"], s["days"][-1]["date"]) == (start, end), params
        assert s["totals"]["new_users"] == (1 if end == day(clock) else 0), params


async def test_payments_and_refunds_are_reported_by_day_currency_and_current_status(
    any_client: Client, clock: ManualClock
) -> None:
    client = any_client
    tenant = await signup(client)
    # Days are UTC days whatever the tenant's time zone: at 09:30 UTC it is 22:30 the day before there.
    r = await client.patch("/v1/tenant/config", json={"timezone": "Pacific/Pago_Pago"}, headers=tenant["headers"])
    assert r.status_code == 200, r.text
    d0 = day(clock)
    eur = await pay(client, tenant, 2500)
    declined = await pay(client, tenant, 700, method="pm_card_chargeDeclined")
    assert (eur["status"], declined["status"]) == ("succeeded", "failed")
    clock.advance(days=1)
    d1 = day(clock)
    assert (await pay(client, tenant, 1999, "usd"))["status"] == "succeeded"
    assert (await pay(client, tenant, 500, "JPY"))["status"] == "succeeded"
    await add_user(client, tenant, "ada@acme.test")
    clock.advance(days=1)
    d2 = day(clock)
    assert (await pay(client, tenant, 1000))["status"] == "succeeded"
    # Today's refund of the first day's payment: the payment's figure changes status on its own day, the
    # refund counts today.
    await refund(client, tenant, eur["id"], 500)
    assert (await payment(client, tenant, eur["id"]))["status"] == "partially_refunded"

    s = await summary(client, tenant, **{"from": day(clock, -3), "to": d2})
    assert (s["from"], s["to"], s["currency"]) == (day(clock, -3), d2, None)
    assert by_date(s) == {
        day(clock, -3): EMPTY_DAY,
        d0: {
            **EMPTY_DAY,
            "payments": [
                money("EUR", "failed", 1, 700, "7.00 EUR"),
                money("EUR", "partially_refunded", 1, 2500, "25.00 EUR"),
            ],
            "new_users": 1,
        },
        d1: {
            **EMPTY_DAY,
            "payments": [money("JPY", "succeeded", 1, 500, "500 JPY"), money("USD", "succeeded", 1, 1999, "19.99 USD")],
            "new_users": 1,
        },
        d2: {
            **EMPTY_DAY,
            "payments": [money("EUR", "succeeded", 1, 1000, "10.00 EUR")],
            "refunds": [money("EUR", "succeeded", 1, 500, "5.00 EUR")],
        },
    }
    assert s["totals"] == {
        "payments": [
            money("EUR", "failed", 1, 700, "7.00 EUR"),
            money("EUR", "partially_refunded", 1, 2500, "25.00 EUR"),
            money("EUR", "succeeded", 1, 1000, "10.00 EUR"),
            money("JPY", "succeeded", 1, 500, "500 JPY"),
            money("USD", "succeeded", 1, 1999, "19.99 USD"),
        ],
        "refunds": [money("EUR", "succeeded", 1, 500, "5.00 EUR")],
        "new_users": 2,
        "api_requests": 0,
    }

    # A currency narrows the money figures only; it is answered upper case, however it was sent.
    for sent in ("eur", "EUR", "eUr"):
        narrowed = await summary(client, tenant, **{"from": d0, "to": d2, "currency": sent})
        assert narrowed["currency"] == "EUR"
        assert narrowed["totals"] == {
            "payments": [
                money("EUR", "failed", 1, 700, "7.00 EUR"),
                money("EUR", "partially_refunded", 1, 2500, "25.00 EUR"),
                money("EUR", "succeeded", 1, 1000, "10.00 EUR"),
            ],
            "refunds": [money("EUR", "succeeded", 1, 500, "5.00 EUR")],
            "new_users": 2,
            "api_requests": 0,
        }
        assert [len(d["payments"]) for d in narrowed["days"]] == [2, 0, 1]
        assert [d["new_users"] for d in narrowed["days"]] == [1, 1, 0]
    usd = await summary(client, tenant, **{"from": d0, "to": d2, "currency": "usd"})
    assert (usd["totals"]["payments"], usd["totals"]["refunds"]) == (
        [money("USD", "succeeded", 1, 1999, "19.99 USD")],
        [],
    )
    none = await summary(client, tenant, **{"from": d0, "to": d2, "currency": "GBP"})
    assert none["totals"] == {"payments": [], "refunds": [], "new_users": 2, "api_requests": 0}
    assert all(d["payments"] == d["refunds"] == [] for d in none["days"])


# (query, pointer at the offending input): each refused with a 422 validation problem.
INVALID_RANGES: list[tuple[str, Callable[[ManualClock], dict[str, str]], str]] = [
    ("from-after-to", lambda c: {"from": day(c, -1), "to": day(c, -2)}, "#/from"),
    ("to-tomorrow", lambda c: {"to": day(c, 1)}, "#/to"),
    ("to-in-a-year", lambda c: {"from": day(c, -1), "to": day(c, 365)}, "#/to"),
    ("from-tomorrow", lambda c: {"from": day(c, 1)}, "#/from"),
    ("367-days", lambda c: {"from": day(c, -366), "to": day(c)}, "#/from"),
    ("367-days-in-the-past", lambda c: {"from": day(c, -1000), "to": day(c, -634)}, "#/from"),
    ("unknown-currency", lambda c: {"currency": "XXX"}, "#/currency"),
    ("retired-currency", lambda c: {"currency": "dem"}, "#/currency"),
    ("to-at-the-calendars-start", lambda c: {"to": "0001-01-01"}, "#/from"),
    ("from-at-the-calendars-end", lambda c: {"from": "9999-12-31"}, "#/from"),
]
# Refused by the parameters' own types: a 422 naming the query parameter.
MALFORMED: list[tuple[str, dict[str, str], str]] = [
    ("from-a-word", {"from": "yesterday"}, "from"),
    ("from-empty", {"from": ""}, "from"),
    ("from-february-30", {"from": "2026-02-30"}, "from"),
    ("from-month-13", {"from": "2026-13-01"}, "from"),
    ("from-a-timestamp", {"from": "2026-03-01T00:00:00Z"}, "from"),
    ("from-basic-format", {"from": "20260301"}, "from"),
    ("to-slashes", {"to": "2026/03/01"}, "to"),
    ("currency-four-letters", {"currency": "EURO"}, "currency"),
    ("currency-digits", {"currency": "978"}, "currency"),
    ("currency-empty", {"currency": ""}, "currency"),
    ("currency-symbol", {"currency": "\u20ac"}, "currency"),
    ("currency-trailing-newline", {"currency": "EUR\n"}, "currency"),
]


async def test_invalid_summary_queries_are_422_problems_pointing_at_the_input(
    client: Client, tenant: dict[str, Any], clock: ManualClock
) -> None:
    failures: list[str] = []
    for name, params, pointer in INVALID_RANGES:
        r = await get_summary(client, tenant, **params(clock))
        if r.status_code != 422 or not r.headers["content-type"].startswith(PROBLEM):
            failures.append(f"{name}: {r.status_code} {r.text[:300]}")
            continue
        problem = r.json()
        if (problem["type"], problem["status"]) != ("/problems/validation-error", 422):
            failures.append(f"{name}: {problem}")
        elif [e.get("pointer") for e in problem.get("errors") or []] != [pointer]:
            failures.append(f"{name}: errors {problem.get('errors')} do not point at {pointer}")
        elif not problem.get("detail"):
            failures.append(f"{name}: no detail")
    for name, query, parameter in MALFORMED:
        r = await get_summary(client, tenant, **query)
        if r.status_code != 422 or not r.headers["content-type"].startswith(PROBLEM):
            failures.append(f"{name}: {r.status_code} {r.text[:300]}")
            continue
        errors = r.json().get("errors") or []
        if r.json()["type"] != "/problems/validation-error" or not errors:
            failures.append(f"{name}: {r.json()}")
        elif parameter == "currency" and [(e.get("parameter"), e.get("location")) for e in errors] != [
            ("currency", "query")
        ]:
            failures.append(f"{name}: errors {errors} do not name the currency parameter")
    assert not failures, "\n".join(failures)

    # The messages say what is allowed.
    to = assert_problem(await get_summary(client, tenant, to=day(clock, 1)), 422)
    assert day(clock) in to["detail"]
    long = assert_problem(await get_summary(client, tenant, **{"from": day(clock, -366), "to": day(clock)}), 422)
    assert "366" in long["detail"]
    unknown = assert_problem(await get_summary(client, tenant, currency="xxx"), 422)
    assert "xxx" in unknown["detail"]


async def test_a_malformed_date_is_reported_under_the_parameter_the_client_sent(
    client: Client, tenant: dict[str, Any]
) -> None:
    for name in ("from", "to"):
        problem = assert_problem(await get_summary(client, tenant, **{name: "yesterday"}), 422)
        assert [(e.get("parameter"), e.get("location")) for e in problem["errors"]] == [(name, "query")], problem


async def test_analytics_needs_an_api_key(client: Client, tenant: dict[str, Any], clock: ManualClock) -> None:
    revoked = await client.post("/v1/api-keys", json={"name": "old"}, headers=tenant["headers"])
    assert revoked.status_code == 201, revoked.text
    gone = await client.delete(f"/v1/api-keys/{revoked.json()['id']}", headers=tenant["headers"])
    assert gone.status_code == 204, gone.text
    for headers in (
        {},
        {"Authorization": "Bearer keel_" + "A" * 43},
        {"Authorization": f"Bearer {revoked.json()['token']}"},
        {"Authorization": tenant["headers"]["Authorization"].removeprefix("Bearer ")},
    ):
        for r in (
            await client.get("/v1/analytics/summary", headers=headers),
            await client.post(
                "/v1/analytics/rollups", json={"from": day(clock, -2), "to": day(clock, -1)}, headers=headers
            ),
        ):
            problem = assert_problem(r, 401)
            assert problem["type"] == "/problems/unauthorized"
            assert "www-authenticate" in r.headers
    # Nothing was rolled up by the refused requests.
    assert await stored(client, tenant) == (set(), set())


# -- rollups ----------------------------------------------------------------------------------------


async def test_a_rollup_is_a_job_after_which_its_days_read_rolled_up_with_the_same_figures(
    any_client: Client, clock: ManualClock
) -> None:
    client = any_client
    tenant = await signup(client)
    d0 = day(clock)
    await pay(client, tenant, 2500)
    await pay(client, tenant, 2500)
    await pay(client, tenant, 990, method="pm_card_chargeDeclined")
    await add_user(client, tenant, "ada@acme.test")
    clock.advance(days=1)
    d1 = day(clock)
    p = await pay(client, tenant, 1999, "USD")
    await refund(client, tenant, p["id"], 999)
    clock.advance(days=1)
    d2 = day(clock)
    await pay(client, tenant, 100)  # today's: never rolled up
    span = {"from": day(clock, -3), "to": d2}
    live = await summary(client, tenant, **span)
    assert not any(d["rolled_up"] for d in live["days"])

    clock.advance(seconds=1)
    r = await request_rollup(client, tenant, day(clock, -3), d1)
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert set(accepted) == {"job_id", "status_url", "from", "to"}
    assert (accepted["from"], accepted["to"]) == (day(clock, -3), d1)
    assert accepted["status_url"] == f"/v1/jobs/{accepted['job_id']}" == r.headers["location"]
    done = await finished_job(client, tenant, accepted["job_id"])
    assert (done["type"], done["status"], done["attempts"], done["progress"]) == (ROLLUP_JOB, "succeeded", 1, 100)
    assert (done["result"], done["error"]) == ({"days": 3}, None)

    # The rollup replaced the tenant's history: the summary is recomputed, the closed days now come from
    # the stored rollups, with the figures they had live.
    rolled = await summary(client, tenant, **span)
    assert stamp(rolled["generated_at"]) == clock.now() > stamp(live["generated_at"])
    assert [d["rolled_up"] for d in rolled["days"]] == [True, True, True, False]
    assert [{**d, "rolled_up": False} for d in rolled["days"]] == live["days"]
    assert rolled["totals"] == live["totals"]

    figures, days = await stored(client, tenant)
    assert days == {day(clock, -3), d0, d1}  # an empty day is rolled up too
    assert figures == {
        (d0, "payments", "EUR", "failed", 1, 990),
        (d0, "payments", "EUR", "succeeded", 2, 5000),
        (d0, "new_users", "", "", 2, 0),
        (d1, "payments", "USD", "partially_refunded", 1, 1999),
        (d1, "refunds", "USD", "succeeded", 1, 999),
    }

    # Recomputing is idempotent: the same figures, however often.
    for _ in range(2):
        again = await rollup(client, tenant, day(clock, -3), d1)
        assert (again["status"], again["result"]) == ("succeeded", {"days": 3})
        assert await stored(client, tenant) == (figures, days)
        s = await summary(client, tenant, **span)
        assert (s["days"], s["totals"]) == (rolled["days"], rolled["totals"])


async def test_a_rollup_only_covers_closed_days_and_at_most_92_of_them(
    client: Client, tenant: dict[str, Any], clock: ManualClock
) -> None:
    invalid: list[tuple[str, dict[str, Any], str]] = [
        ("to-today", {"from": day(clock, -1), "to": day(clock)}, "#/to"),
        ("today-only", {"from": day(clock), "to": day(clock)}, "#/from"),
        ("to-tomorrow", {"from": day(clock, -1), "to": day(clock, 1)}, "#/to"),
        ("in-the-future", {"from": day(clock, 1), "to": day(clock, 2)}, "#/from"),
        ("from-after-to", {"from": day(clock, -1), "to": day(clock, -2)}, "#/from"),
        ("93-days", {"from": day(clock, -93), "to": day(clock, -1)}, "#/from"),
        ("93-days-long-ago", {"from": day(clock, -400), "to": day(clock, -308)}, "#/from"),
        ("from-malformed", {"from": "2026-02-30", "to": day(clock, -1)}, "#/from"),
        ("to-a-timestamp", {"from": day(clock, -2), "to": f"{day(clock, -1)}T00:00:00Z"}, "#/to"),
        ("from-a-number", {"from": 20260301, "to": day(clock, -1)}, "#/from"),
        ("to-null", {"from": day(clock, -2), "to": None}, "#/to"),
        ("unknown-field", {"from": day(clock, -2), "to": day(clock, -1), "tenant_id": str(uuid.uuid4())}, "#"),
        ("missing-to", {"from": day(clock, -2)}, "#"),
        ("missing-both", {}, "#"),
    ]
    failures: list[str] = []
    for name, body, pointer in invalid:
        r = await client.post("/v1/analytics/rollups", json=body, headers=tenant["headers"])
        if r.status_code != 422 or not r.headers["content-type"].startswith(PROBLEM):
            failures.append(f"{name}: {r.status_code} {r.text[:300]}")
            continue
        pointers = [e.get("pointer") for e in r.json().get("errors") or []]
        if r.json()["type"] != "/problems/validation-error" or pointers != [pointer]:
            failures.append(f"{name}: {r.json()}")
    assert not failures, "\n".join(failures)
    to_today = assert_problem(await request_rollup(client, tenant, day(clock, -1), day(clock)), 422)
    assert day(clock, -1) in to_today["detail"]  # the last day it may take
    assert "92" in assert_problem(await request_rollup(client, tenant, day(clock, -93), day(clock, -1)), 422)["detail"]

    # Not JSON, or not labelled JSON.
    headers = {**tenant["headers"], "Content-Type": "application/json"}
    assert_problem(await client.post("/v1/analytics/rollups", content=b'{"from": ', headers=headers), 400)
    body = f'{{"from": "{day(clock, -2)}", "to": "{day(clock, -1)}"}}'.encode()
    text = {**tenant["headers"], "Content-Type": "text/plain"}
    assert_problem(await client.post("/v1/analytics/rollups", content=body, headers=text), 415)
    assert_problem(await client.post("/v1/analytics/rollups", content=b"[]", headers=headers), 422)

    # The longest range is fine; the refused requests above rolled up nothing.
    done = await rollup(client, tenant, day(clock, -200), day(clock, -109))
    assert (done["status"], done["result"]) == ("succeeded", {"days": 92})
    s = await summary(client, tenant, **{"from": day(clock, -365), "to": day(clock)})
    assert {d["date"] for d in s["days"] if d["rolled_up"]} == {day(clock, -i) for i in range(109, 201)}
    assert (await stored(client, tenant))[1] == {day(clock, -i) for i in range(109, 201)}


async def test_another_tenants_rollup_job_is_not_found(
    client: Client, tenant: dict[str, Any], other_tenant: dict[str, Any], clock: ManualClock
) -> None:
    r = await request_rollup(client, tenant, day(clock, -2), day(clock, -1))
    assert r.status_code == 202, r.text
    await finished_job(client, tenant, r.json()["job_id"])
    assert_problem(await client.get(r.json()["status_url"], headers=other_tenant["headers"]), 404)
    assert (await stored(client, other_tenant))[1] == set()
    assert (await stored(client, tenant))[1] == {day(clock, -2), day(clock, -1)}


# -- the cache --------------------------------------------------------------------------------------


async def test_a_new_payment_invalidates_the_cached_summary(
    client: Client, tenant: dict[str, Any], clock: ManualClock
) -> None:
    stats = container_of(client).cache.stats
    first = await summary(client, tenant)
    clock.advance(seconds=1)
    hits = stats.hits
    cached = await summary(client, tenant)
    assert cached == first  # generated_at included: served from the cache
    assert stats.hits > hits

    clock.advance(seconds=1)
    p = await pay(client, tenant, 4200)
    assert p["status"] == "succeeded"
    expected = [money("EUR", "succeeded", 1, 4200, "42.00 EUR")]

    # Eventually, because payment.succeeded is published just after the payment commits; with the
    # clock held, no cache entry expires meanwhile: only the event can make the summary current.
    async def current() -> dict[str, Any] | None:
        s = await summary(client, tenant)
        return s if s["totals"]["payments"] == expected else None

    fresh = await eventually(current)
    assert stamp(fresh["generated_at"]) == clock.now() > stamp(first["generated_at"])
    assert fresh["days"][-1]["payments"] == expected


async def test_a_summary_of_past_days_stays_cached_through_todays_payments_until_a_rollup(
    client: Client, tenant: dict[str, Any], clock: ManualClock
) -> None:
    d0 = day(clock)
    clock.advance(days=3)
    span = {"from": d0, "to": day(clock, -1)}
    past = await summary(client, tenant, **span)
    assert by_date(past)[d0] == {**EMPTY_DAY, "new_users": 1}
    stats = container_of(client).cache.stats

    clock.advance(seconds=1)
    await pay(client, tenant, 1000)
    await add_user(client, tenant, "ada@acme.test")

    async def today_current() -> bool:
        s = await summary(client, tenant, **{"from": day(clock)})
        return bool(s["totals"]["new_users"] == 1 and s["totals"]["payments"])

    await eventually(today_current)
    hits, loads = stats.hits, stats.loads
    assert await summary(client, tenant, **span) == past  # not recomputed: generated_at is the old one
    assert stats.loads == loads
    assert stats.hits > hits

    # A rollup replaces the history: the past summary is recomputed, from the rollups.
    clock.advance(seconds=1)
    await rollup(client, tenant, d0, day(clock, -1))
    rolled = await summary(client, tenant, **span)
    assert stamp(rolled["generated_at"]) == clock.now()
    assert all(d["rolled_up"] for d in rolled["days"])
    assert by_date(rolled)[d0] == {**EMPTY_DAY, "rolled_up": True, "new_users": 1}


async def test_a_late_change_to_a_closed_day_is_rolled_up_again(
    client: Client, tenant: dict[str, Any], clock: ManualClock
) -> None:
    tenant_id = uuid.UUID(tenant["tenant"]["id"])
    d0 = day(clock)
    p = await pay(client, tenant, 2500)
    user = await add_user(client, tenant, "ada@acme.test")
    clock.advance(days=1)
    d1 = day(clock)
    done = await rollup(client, tenant, d0, d0)
    assert done["result"] == {"days": 1}
    closed = {
        **EMPTY_DAY,
        "rolled_up": True,
        "payments": [money("EUR", "succeeded", 1, 2500, "25.00 EUR")],
        "new_users": 2,
    }
    assert by_date(await summary(client, tenant, **{"from": d0}))[d0] == closed

    # Today: yesterday's payment is refunded in full and yesterday's user deleted. Both change the closed
    # day, so each asks for it to be rolled up again after RECOMPUTE_AFTER seconds; the clock is held, so
    # both fall in one window and share one job.
    await refund(client, tenant, p["id"])
    r = await client.delete(f"/v1/users/{user}", headers=tenant["headers"])
    assert r.status_code == 204, r.text
    late = rollup_job_id("late", tenant_id, date.fromisoformat(d0), int(clock.now().timestamp()) // RECOMPUTE_AFTER)

    async def scheduled() -> dict[str, Any] | None:
        r = await client.get(f"/v1/jobs/{late}", headers=tenant["headers"])
        return r.json() if r.status_code == 200 else None

    waiting = await eventually(scheduled)
    assert (waiting["type"], waiting["status"], waiting["attempts"]) == (ROLLUP_JOB, "scheduled", 0)
    # Until it runs, the closed day reads its stored rollup; today's refund is live already.
    s = await summary(client, tenant, **{"from": d0})
    assert by_date(s)[d0] == closed
    assert by_date(s)[d1]["refunds"] == [money("EUR", "succeeded", 1, 2500, "25.00 EUR")]

    # The scheduled job waits RECOMPUTE_AFTER real seconds (the in-process queue delays with asyncio, not
    # with the clock). The same job, run now on the app's queue, is what that run will do.
    container = container_of(client)
    args = {"tenant_id": str(tenant_id), "from": d0, "to": d0}
    now_id = await on_app(client, lambda: container.jobs.enqueue(ROLLUP_JOB, args, tenant_id=tenant_id))
    rerun = await finished_job(client, tenant, now_id)
    assert (rerun["status"], rerun["result"]) == ("succeeded", {"days": 1})
    s = await summary(client, tenant, **{"from": d0})
    assert by_date(s)[d0] == {
        **closed,
        "payments": [money("EUR", "refunded", 1, 2500, "25.00 EUR")],
        "new_users": 1,
    }
    assert by_date(s)[d1] == {**EMPTY_DAY, "refunds": [money("EUR", "succeeded", 1, 2500, "25.00 EUR")]}
    assert (await job(client, tenant, late))["status"] == "scheduled"  # still to come, and harmless


# -- API requests -----------------------------------------------------------------------------------


async def test_authenticated_requests_are_counted_per_tenant_and_day(any_client: Client, clock: ManualClock) -> None:
    client = any_client
    a = await signup(client, "Acme", "owner@acme.test")
    b = await signup(client, "Globex", "owner@globex.test")
    await flush_requests(client)  # whatever the signups left (nothing: signing up needs no key)
    for _ in range(5):
        assert (await client.get("/v1/tenant", headers=a["headers"])).status_code == 200
    # Counted whatever the outcome, once the key is known: a refused query is served too.
    assert (await get_summary(client, a, currency="XXX")).status_code == 422
    assert (await client.get(f"/v1/users/{uuid.uuid4()}", headers=a["headers"])).status_code == 404
    for _ in range(3):
        assert (await client.get("/v1/users", headers=b["headers"])).status_code == 200
    # Without a (valid) key nobody is counted.
    assert (await client.get("/v1/tenant")).status_code == 401
    assert (await client.get("/v1/tenant", headers={"Authorization": "Bearer keel_" + "A" * 43})).status_code == 401
    await flush_requests(client)

    s = await summary(client, a)
    assert (s["days"][-1]["api_requests"], s["totals"]["api_requests"]) == (7, 7)
    assert (await summary(client, b))["totals"]["api_requests"] == 3
    # The two summary requests are counted at the next flush.
    await flush_requests(client)
    assert (await summary(client, a))["totals"]["api_requests"] == 8
    assert (await summary(client, b))["totals"]["api_requests"] == 4
    # A flush with nothing new stores nothing twice.
    await flush_requests(client)
    await flush_requests(client)
    assert (await summary(client, b))["days"][-1]["api_requests"] == 5


async def test_requests_of_a_day_flushed_after_midnight_count_on_their_day_and_survive_its_rollup(
    any_client: Client, clock: ManualClock
) -> None:
    client = any_client
    tenant = await signup(client)
    d0 = day(clock)
    await flush_requests(client)
    clock.advance(hours=14)  # 23:30
    for _ in range(4):
        assert (await client.get("/v1/tenant", headers=tenant["headers"])).status_code == 200
    clock.advance(hours=1)  # 00:30 the next day
    past = await summary(client, tenant, **{"from": d0, "to": d0})
    assert past["totals"]["api_requests"] == 0  # served, not stored yet

    # Stored now, on the day they were served; the flush replaced the cached summary of the closed day.
    await flush_requests(client)
    assert (await summary(client, tenant, **{"from": d0, "to": d0}))["totals"]["api_requests"] == 4
    s = await summary(client, tenant, **{"from": d0})
    assert [d["api_requests"] for d in s["days"]] == [4, 1]  # today's: the first summary request

    # A rollup recomputes what other contexts hold; request counts are only ever counted, so it keeps them.
    await rollup(client, tenant, d0, d0)
    s = await summary(client, tenant, **{"from": d0, "to": d0})
    assert s["days"] == [{"date": d0, **EMPTY_DAY, "rolled_up": True, "new_users": 1, "api_requests": 4}]
