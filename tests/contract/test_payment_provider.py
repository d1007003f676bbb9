"""One contract for payment providers, run against the fake, the sandbox (its ledger on SQLite and on
Postgres) and the Stripe adapter talking to a local Stripe stand-in.

Each provider comes with a probe of the money it actually moved (the fake's ledger, the sandbox's ledger
table, the charges and refunds the Stripe stub booked), so "idempotent" is checked where it matters: a
repeated request must never take or give back money twice.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from sqlalchemy import func, select

from keel.contexts.payments.adapters.sql.models import SandboxOperationRow
from keel.contexts.payments.adapters.sql.sandbox import SandboxPaymentProvider
from keel.contexts.payments.adapters.stripe_provider import StripePaymentProvider
from keel.contexts.payments.domain.model import (
    ChargeOrder,
    FailureReason,
    ProviderResult,
    ProviderUnavailable,
    RefundOrder,
    RefundReason,
    capture_key,
    refund_key,
)
from keel.contexts.payments.ports.provider import PaymentProvider
from keel.platform.adapters.sql.engine import create_engine, session_factory
from keel.platform.domain.ids import new_id
from tests.fakes.clock import ManualClock
from tests.fakes.payments import FakePaymentProvider
from tests.support.stripe_stub import StripeStub, running_stripe_stub

# The Stripe SDK's httpx client passes its form body as ``data=``, which httpx deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

PROVIDERS = ["fake", "sandbox-sqlite", "sandbox-postgres", "stripe"]
# Providers that, like real ones, refuse a key reused for different parameters (the fake answers it
# with its first result).
KEY_CHECKING = ["sandbox-sqlite", "sandbox-postgres", "stripe"]

VISA = "pm_card_visa"


@dataclass
class Subject:
    provider: PaymentProvider
    charges: Callable[[], Awaitable[list[int]]]  # amounts actually charged, one per charge
    refunds: Callable[[], Awaitable[list[int]]]  # amounts actually refunded, one per refund


@pytest.fixture
def stub() -> Iterator[StripeStub]:
    with running_stripe_stub() as s:
        yield s


@dataclass(frozen=True)
class Backing:
    kind: str
    url: str | None = None  # the sandbox's database
    stub: StripeStub | None = None


@pytest.fixture(params=PROVIDERS)
def provider_kind(request: pytest.FixtureRequest) -> Backing:
    kind = request.param
    if kind.startswith("sandbox-"):
        return Backing(kind, url=str(request.getfixturevalue("sqlite_url" if kind == "sandbox-sqlite" else "pg_url")))
    if kind == "stripe":
        return Backing(kind, stub=request.getfixturevalue("stub"))
    return Backing(kind)


@pytest.fixture
async def subject(provider_kind: Backing) -> AsyncIterator[Subject]:
    if provider_kind.kind == "fake":
        fake = FakePaymentProvider()

        async def fake_moved(what: str) -> list[int]:
            return [e.amount for e in fake.ledger.values() if e.kind == what and e.result.reference is not None]

        yield Subject(fake, lambda: fake_moved("charge"), lambda: fake_moved("refund"))
    elif provider_kind.url is not None:
        engine = create_engine(provider_kind.url)
        sessions = session_factory(engine)

        async def ledger(what: str) -> list[int]:
            async with sessions() as s:
                stmt = select(SandboxOperationRow.amount).where(
                    SandboxOperationRow.kind == what, SandboxOperationRow.outcome == "succeeded"
                )
                return list((await s.execute(stmt)).scalars())

        try:
            sandbox = SandboxPaymentProvider(sessions, ManualClock(datetime(2026, 5, 1, 8, 0, tzinfo=UTC)))
            yield Subject(sandbox, lambda: ledger("charge"), lambda: ledger("refund"))
        finally:
            await engine.dispose()
    else:
        stub = provider_kind.stub
        assert stub is not None
        stripe = StripePaymentProvider("sk_test_keel", api_base=stub.url)

        async def booked_charges() -> list[int]:
            return [c["amount"] for c in stub.charges()]

        async def booked_refunds() -> list[int]:
            return [r["amount"] for r in stub.refunds()]

        try:
            yield Subject(stripe, booked_charges, booked_refunds)
        finally:
            await stripe.aclose()


def charge(token: str = VISA, amount: int = 2500, key: str | None = None) -> ChargeOrder:
    return ChargeOrder(
        idempotency_key=key or capture_key(new_id()),
        amount=amount,
        currency="EUR",
        payment_method=token,
        description="Order #1042",
        customer_email="ada@example.test",
        metadata={"order_id": "1042"},
    )


def refund(reference: str, amount: int, key: str | None = None) -> RefundOrder:
    return RefundOrder(
        idempotency_key=key or refund_key(new_id()),
        charge_reference=reference,
        amount=amount,
        currency="EUR",
        reason=RefundReason.REQUESTED_BY_CUSTOMER,
    )


async def captured(subject: Subject, amount: int = 2500) -> str:
    result = await subject.provider.capture(charge(amount=amount))
    assert result.reference is not None, result
    return result.reference


def failure_reason(result: ProviderResult) -> FailureReason:
    assert result.reference is None
    assert result.failure is not None
    assert result.failure.message.strip(), "a refusal explains itself"
    return result.failure.reason


# -- charges ----------------------------------------------------------------------------------------


async def test_a_good_card_is_charged_once_and_gets_a_reference(subject: Subject) -> None:
    result = await subject.provider.capture(charge(amount=2500))
    assert result.failure is None
    assert result.reference
    assert await subject.charges() == [2500]
    other = await subject.provider.capture(charge(amount=700))
    assert other.reference not in (None, result.reference)
    assert sorted(await subject.charges()) == [700, 2500]


async def test_the_same_idempotency_key_is_the_same_charge(subject: Subject) -> None:
    order = charge(amount=1800)
    first = await subject.provider.capture(order)
    again = await subject.provider.capture(order)
    assert first.reference is not None
    assert again == first
    assert await subject.charges() == [1800]


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("pm_card_chargeDeclined", FailureReason.CARD_DECLINED),
        ("pm_card_chargeDeclinedInsufficientFunds", FailureReason.INSUFFICIENT_FUNDS),
        ("pm_1NoSuchPaymentMethod", FailureReason.INVALID_PAYMENT_METHOD),
    ],
)
async def test_refused_cards_are_a_definitive_failure_and_move_no_money(
    subject: Subject, token: str, reason: FailureReason
) -> None:
    order = charge(token)
    result = await subject.provider.capture(order)
    assert failure_reason(result) is reason
    # Asked again under the same key, the answer stands.
    assert await subject.provider.capture(order) == result
    assert await subject.charges() == []


async def test_an_outage_is_not_an_answer_and_the_retry_under_the_same_key_charges_once(subject: Subject) -> None:
    order = charge("pm_card_providerUnavailable", amount=990)
    for _ in range(2):
        with pytest.raises(ProviderUnavailable):
            await subject.provider.capture(order)
        assert await subject.charges() == []
    third = await subject.provider.capture(order)
    assert third.reference is not None
    assert await subject.provider.capture(order) == third
    assert await subject.charges() == [990]


# -- refunds ----------------------------------------------------------------------------------------


async def test_part_of_a_charge_is_refunded(subject: Subject) -> None:
    reference = await captured(subject, 2500)
    result = await subject.provider.refund(refund(reference, 1000))
    assert result.failure is None
    assert result.reference
    assert result.reference != reference
    assert await subject.refunds() == [1000]
    # What is left can be refunded too.
    rest = await subject.provider.refund(refund(reference, 1500))
    assert rest.reference not in (None, result.reference)
    assert sorted(await subject.refunds()) == [1000, 1500]


async def test_refunds_beyond_the_charge_are_rejected(subject: Subject) -> None:
    reference = await captured(subject, 2500)
    first = await subject.provider.refund(refund(reference, 1500))
    assert first.reference is not None
    second = await subject.provider.refund(refund(reference, 1001))
    assert failure_reason(second) is FailureReason.REFUND_REJECTED
    assert await subject.refunds() == [1500]


async def test_a_replayed_refund_key_gets_the_same_answer_and_refunds_once(subject: Subject) -> None:
    reference = await captured(subject, 2500)
    order = refund(reference, 2500)
    first = await subject.provider.refund(order)
    assert first.reference is not None
    assert await subject.provider.refund(order) == first
    assert await subject.refunds() == [2500]


async def test_a_refund_of_an_unknown_charge_is_rejected(subject: Subject) -> None:
    declined = await subject.provider.capture(charge("pm_card_chargeDeclined"))
    assert declined.failure is not None
    result = await subject.provider.refund(refund("pi_0000000000000000unknown", 100))
    assert failure_reason(result) is FailureReason.REFUND_REJECTED
    assert await subject.refunds() == []


# -- keys reused for something else -----------------------------------------------------------------


@pytest.mark.parametrize("provider_kind", KEY_CHECKING, indirect=True)
async def test_a_key_reused_for_a_different_amount_is_refused_and_moves_no_money(subject: Subject) -> None:
    key = capture_key(new_id())
    first = await subject.provider.capture(charge(amount=1000, key=key))
    assert first.reference is not None
    reused = await subject.provider.capture(charge(amount=2000, key=key))
    assert failure_reason(reused) is FailureReason.PROVIDER_ERROR
    assert await subject.charges() == [1000]
    # The first request under the key still gets its own answer.
    assert await subject.provider.capture(charge(amount=1000, key=key)) == first


@pytest.mark.parametrize("provider_kind", KEY_CHECKING, indirect=True)
async def test_a_refund_key_reused_for_a_different_amount_refunds_nothing_more(subject: Subject) -> None:
    reference = await captured(subject, 2500)
    key = refund_key(new_id())
    first = await subject.provider.refund(refund(reference, 500, key=key))
    assert first.reference is not None
    reused = await subject.provider.refund(refund(reference, 800, key=key))
    assert reused.reference is None
    assert reused.failure is not None
    assert await subject.refunds() == [500]


async def test_sandbox_providers_on_one_database_share_one_ledger(sqlite_url: str) -> None:
    """Two sandbox providers on one database share one ledger, as two worker processes do."""
    engine = create_engine(sqlite_url)
    sessions = session_factory(engine)
    clock = ManualClock()
    try:
        one, two = SandboxPaymentProvider(sessions, clock), SandboxPaymentProvider(sessions, clock)
        order = charge(amount=4200)
        first = await one.capture(order)
        assert await two.capture(order) == first
        async with sessions() as s:
            count = (await s.execute(select(func.count()).select_from(SandboxOperationRow))).scalar_one()
        assert count == 1
    finally:
        await engine.dispose()
