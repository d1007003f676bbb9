"""The payments model: the payment and refund state machines, refund reservations, provider results,
currencies and idempotency keys."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from keel.contexts.payments.domain.currencies import MINOR_UNITS, format_amount, normalize_currency
from keel.contexts.payments.domain.errors import IllegalTransition, RefundExceedsPayment
from keel.contexts.payments.domain.model import (
    Failure,
    FailureReason,
    Payment,
    PaymentStatus,
    ProviderResult,
    Refund,
    RefundReason,
    RefundStatus,
    capture_key,
    refund_key,
)
from keel.platform.domain.errors import Conflict
from keel.platform.domain.ids import new_id

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
LATER = NOW + timedelta(minutes=1)
DECLINED = Failure(reason=FailureReason.CARD_DECLINED, message="Your card was declined.")


def payment(amount: int = 100, **changes: object) -> Payment:
    p = Payment(
        id=new_id(),
        tenant_id=new_id(),
        amount=amount,
        currency="EUR",
        payment_method="pm_card_visa",
        description="Order #1",
        customer_email="zoe@acme.test",
        metadata={"order": "1"},
        status=PaymentStatus.PENDING,
        provider="sandbox",
        created_at=NOW,
        updated_at=NOW,
    )
    return replace(p, **changes)  # type: ignore[arg-type]


def succeeded(amount: int = 100) -> Payment:
    return payment(amount).succeed("ch_1", NOW)


def refund(status: RefundStatus = RefundStatus.PENDING, amount: int = 40) -> Refund:
    return Refund(
        id=new_id(),
        tenant_id=new_id(),
        payment_id=new_id(),
        amount=amount,
        currency="EUR",
        reason=RefundReason.REQUESTED_BY_CUSTOMER,
        status=status,
        created_at=NOW,
        updated_at=NOW,
    )


# -- the payment state machine ----------------------------------------------------------------------


def test_a_pending_payment_succeeds_with_the_provider_reference() -> None:
    p = payment()
    done = p.succeed("ch_123", LATER)
    assert done.status is PaymentStatus.SUCCEEDED
    assert done.provider_reference == "ch_123"
    assert (done.failure_reason, done.failure_message) == (None, None)
    assert done.updated_at == LATER
    assert done.created_at == NOW
    assert done.version == p.version + 1
    # Values: the original is untouched.
    assert p.status is PaymentStatus.PENDING
    assert p.provider_reference is None
    assert p.version == 1


def test_a_pending_payment_fails_with_the_reason_and_message() -> None:
    p = payment()
    failed = p.fail(DECLINED, LATER)
    assert failed.status is PaymentStatus.FAILED
    assert failed.failure_reason is FailureReason.CARD_DECLINED
    assert failed.failure_message == "Your card was declined."
    assert failed.provider_reference is None
    assert failed.updated_at == LATER
    assert failed.version == 2


def test_a_succeeded_payment_is_partially_then_fully_refunded() -> None:
    p = succeeded(100)
    p, first = p.reserve_refund(30, NOW)
    p = p.settle_refund(first, NOW)
    assert p.status is PaymentStatus.PARTIALLY_REFUNDED
    assert (p.amount_refunded, p.amount_refunding) == (30, 0)
    p, rest = p.reserve_refund(None, NOW)
    assert rest == 70
    p = p.settle_refund(rest, NOW)
    assert p.status is PaymentStatus.REFUNDED
    assert (p.amount_refunded, p.amount_refunding) == (100, 0)
    assert p.refundable == 0


def test_a_single_full_refund_goes_straight_to_refunded() -> None:
    p, amount = succeeded(100).reserve_refund(None, NOW)
    assert p.settle_refund(amount, NOW).status is PaymentStatus.REFUNDED


def _succeed(p: Payment) -> Payment:
    return p.succeed("ch_2", LATER)


def _fail(p: Payment) -> Payment:
    return p.fail(DECLINED, LATER)


def _refund(p: Payment) -> Payment:
    return p.reserve_refund(10, LATER)[0]


def _failed() -> Payment:
    return payment().fail(DECLINED, NOW)


def _fully_refunded() -> Payment:
    p, amount = succeeded(100).reserve_refund(None, NOW)
    return p.settle_refund(amount, NOW)


def _partly_refunded() -> Payment:
    p, amount = succeeded(100).reserve_refund(40, NOW)
    return p.settle_refund(amount, NOW)


Step = Callable[[], Payment]
Act = Callable[[Payment], Payment]

ILLEGAL: list[tuple[str, Step, Act, str]] = [
    ("succeed twice", succeeded, _succeed, "A succeeded payment cannot be marked succeeded."),
    ("fail after succeed", succeeded, _fail, "A succeeded payment cannot be marked failed."),
    ("succeed after fail", _failed, _succeed, "A failed payment cannot be marked succeeded."),
    ("fail twice", _failed, _fail, "A failed payment cannot be marked failed."),
    ("refund a pending payment", payment, _refund, "A pending payment cannot be refunded."),
    ("refund a failed payment", _failed, _refund, "A failed payment cannot be refunded."),
    ("refund a refunded payment", _fully_refunded, _refund, "A refunded payment cannot be refunded."),
    ("succeed a refunded payment", _fully_refunded, _succeed, "A refunded payment cannot be marked succeeded."),
    ("fail a partly refunded one", _partly_refunded, _fail, "A partially_refunded payment cannot be marked failed."),
]  # fmt: skip


@pytest.mark.parametrize(("start", "act", "message"), [c[1:] for c in ILLEGAL], ids=[c[0] for c in ILLEGAL])
def test_illegal_transitions_raise(start: Step, act: Act, message: str) -> None:
    with pytest.raises(IllegalTransition) as caught:
        act(start())
    assert caught.value.detail == message
    assert caught.value.code == "payment-state-conflict"
    assert isinstance(caught.value, Conflict)


def test_a_partly_refunded_payment_can_still_be_refunded() -> None:
    p, amount = _partly_refunded().reserve_refund(None, LATER)
    assert amount == 60
    assert p.status is PaymentStatus.PARTIALLY_REFUNDED
    assert p.amount_refunding == 60


@pytest.mark.parametrize("settle", ["settle", "release"])
def test_settling_a_refund_that_was_never_reserved_is_illegal(settle: str) -> None:
    p = payment()
    with pytest.raises(IllegalTransition):
        p.settle_refund(10, LATER) if settle == "settle" else p.release_refund(10, LATER)


def test_every_change_increments_the_version() -> None:
    p = payment()
    assert p.version == 1
    p = p.succeed("ch_1", NOW)
    assert p.version == 2
    p, _ = p.reserve_refund(30, NOW)
    assert p.version == 3
    p = p.release_refund(30, NOW)
    assert p.version == 4
    p, _ = p.reserve_refund(30, NOW)
    p = p.settle_refund(30, NOW)
    assert p.version == 6
    assert payment().fail(DECLINED, NOW).version == 2


# -- refundable and reservations --------------------------------------------------------------------


@pytest.mark.parametrize("status", [PaymentStatus.PENDING, PaymentStatus.FAILED, PaymentStatus.REFUNDED])
def test_nothing_is_refundable_unless_the_payment_was_captured(status: PaymentStatus) -> None:
    assert payment(100, status=status).refundable == 0


def test_refundable_is_the_amount_minus_settled_and_reserved_refunds() -> None:
    assert succeeded(100).refundable == 100
    assert payment(100, status=PaymentStatus.SUCCEEDED, amount_refunding=25).refundable == 75
    assert (
        payment(100, status=PaymentStatus.PARTIALLY_REFUNDED, amount_refunded=30, amount_refunding=25).refundable == 45
    )


def test_reserving_none_takes_everything_left() -> None:
    p = payment(100, status=PaymentStatus.PARTIALLY_REFUNDED, amount_refunded=30, amount_refunding=25)
    reserved, amount = p.reserve_refund(None, LATER)
    assert amount == 45
    assert reserved.amount_refunding == 70
    assert reserved.amount_refunded == 30
    assert reserved.refundable == 0
    assert reserved.updated_at == LATER
    assert reserved.status is PaymentStatus.PARTIALLY_REFUNDED


def test_reserving_an_amount_sets_it_aside() -> None:
    reserved, amount = succeeded(100).reserve_refund(60, LATER)
    assert amount == 60
    assert (reserved.amount_refunding, reserved.refundable) == (60, 40)
    assert reserved.status is PaymentStatus.SUCCEEDED  # not refunded until the refund settles
    with pytest.raises(RefundExceedsPayment) as caught:
        reserved.reserve_refund(60, LATER)
    assert caught.value.detail == "A refund of 60 exceeds what is left to refund (40, in minor units)."
    assert caught.value.code == "refund-exceeds-payment"


@pytest.mark.parametrize("amount", [0, -1, -100, 101])
def test_reserving_zero_negative_or_too_much_is_refused(amount: int) -> None:
    p = succeeded(100)
    with pytest.raises(RefundExceedsPayment) as caught:
        p.reserve_refund(amount, LATER)
    assert caught.value.detail == f"A refund of {amount} exceeds what is left to refund (100, in minor units)."
    assert isinstance(caught.value, Conflict)


@pytest.mark.parametrize("amount", [None, 1])
def test_reserving_when_everything_is_reserved_says_nothing_is_left(amount: int | None) -> None:
    p, _ = succeeded(100).reserve_refund(None, NOW)
    assert p.status is PaymentStatus.SUCCEEDED
    with pytest.raises(RefundExceedsPayment) as caught:
        p.reserve_refund(amount, LATER)
    assert caught.value.detail == "Nothing is left to refund on this payment."


def test_settling_moves_the_reservation_to_refunded() -> None:
    p, _ = succeeded(100).reserve_refund(30, NOW)
    p, _ = p.reserve_refund(50, NOW)
    settled = p.settle_refund(30, LATER)
    assert (settled.amount_refunded, settled.amount_refunding, settled.refundable) == (30, 50, 20)
    assert settled.status is PaymentStatus.PARTIALLY_REFUNDED
    assert settled.updated_at == LATER
    done = settled.settle_refund(50, LATER)
    assert (done.amount_refunded, done.amount_refunding, done.refundable) == (80, 0, 20)
    assert done.status is PaymentStatus.PARTIALLY_REFUNDED


def test_releasing_gives_the_reservation_back() -> None:
    p, _ = succeeded(100).reserve_refund(30, NOW)
    p, _ = p.reserve_refund(50, NOW)
    released = p.release_refund(50, LATER)
    assert (released.amount_refunded, released.amount_refunding, released.refundable) == (0, 30, 70)
    assert released.status is PaymentStatus.SUCCEEDED
    assert released.updated_at == LATER


# -- refunds ----------------------------------------------------------------------------------------


def test_a_pending_refund_settles_with_the_provider_reference() -> None:
    r = refund()
    done = r.settled("re_1", LATER)
    assert done.status is RefundStatus.SUCCEEDED
    assert done.provider_reference == "re_1"
    assert done.updated_at == LATER
    assert (done.failure_reason, done.failure_message) == (None, None)
    assert r.status is RefundStatus.PENDING


def test_a_pending_refund_fails_with_the_reason() -> None:
    failed = refund().failed(Failure(reason=FailureReason.REFUND_REJECTED, message="Too much."), LATER)
    assert failed.status is RefundStatus.FAILED
    assert failed.failure_reason is FailureReason.REFUND_REJECTED
    assert failed.failure_message == "Too much."
    assert failed.provider_reference is None
    assert failed.updated_at == LATER


@pytest.mark.parametrize("status", [RefundStatus.SUCCEEDED, RefundStatus.FAILED])
def test_only_a_pending_refund_settles_or_fails(status: RefundStatus) -> None:
    r = refund(status)
    with pytest.raises(IllegalTransition, match=f"A {status.value} refund cannot be settled."):
        r.settled("re_2", LATER)
    with pytest.raises(IllegalTransition, match=f"A {status.value} refund cannot fail."):
        r.failed(DECLINED, LATER)


# -- provider results -------------------------------------------------------------------------------


def test_a_provider_result_is_a_reference_or_a_failure() -> None:
    assert ProviderResult(reference="ch_1").failure is None
    assert ProviderResult(failure=DECLINED).reference is None


def test_a_provider_result_needs_exactly_one_of_reference_and_failure() -> None:
    with pytest.raises(ValueError, match="reference or a failure"):
        ProviderResult()
    with pytest.raises(ValueError, match="reference or a failure"):
        ProviderResult(reference="ch_1", failure=DECLINED)


# -- currencies -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "expected"),
    [("EUR", "EUR"), ("eur", "EUR"), ("Eur", "EUR"), ("jpy", "JPY"), ("KWD", "KWD"), ("clf", "CLF"), ("usd", "USD")],
)
def test_known_currencies_are_normalized_to_upper_case(code: str, expected: str) -> None:
    assert normalize_currency(code) == expected


@pytest.mark.parametrize("code", ["XAU", "xdr", "XAG", "ABC", "EURO", "EU", "", " EUR", "€"])
def test_unknown_currencies_funds_and_metals_are_refused(code: str) -> None:
    assert normalize_currency(code) is None


def test_minor_units_of_some_currencies() -> None:
    assert (MINOR_UNITS["EUR"], MINOR_UNITS["JPY"], MINOR_UNITS["KWD"], MINOR_UNITS["CLF"]) == (2, 0, 3, 4)


@pytest.mark.parametrize(
    ("amount", "currency", "expected"),
    [
        (1234, "EUR", "12.34 EUR"),
        (5, "EUR", "0.05 EUR"),
        (0, "EUR", "0.00 EUR"),
        (100, "USD", "1.00 USD"),
        (1234, "JPY", "1234 JPY"),
        (0, "JPY", "0 JPY"),
        (1234, "KWD", "1.234 KWD"),
        (5, "KWD", "0.005 KWD"),
        (12345, "CLF", "1.2345 CLF"),
        (7, "CLF", "0.0007 CLF"),
        (-1234, "EUR", "-12.34 EUR"),
        (-5, "EUR", "-0.05 EUR"),
        (-1234, "KWD", "-1.234 KWD"),
        (-1234, "JPY", "-1234 JPY"),
    ],
)
def test_format_amount(amount: int, currency: str, expected: str) -> None:
    assert format_amount(amount, currency) == expected


# -- idempotency keys -------------------------------------------------------------------------------


def test_capture_and_refund_keys_are_derived_from_the_id() -> None:
    pid, other = new_id(), new_id()
    assert capture_key(pid) == capture_key(uuid.UUID(str(pid))) == f"keel-capture-{pid}"
    assert refund_key(pid) == f"keel-refund-{pid}"
    assert capture_key(pid) != capture_key(other)
    assert capture_key(pid) != refund_key(pid)
