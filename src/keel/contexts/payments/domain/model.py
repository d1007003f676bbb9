"""Payments and refunds as values, with the state machine that governs them.

A payment is created ``pending``; the capture job moves it to ``succeeded`` or ``failed``. Refunds
are requested against a succeeded payment and settled by the refund job; while one is in flight its
amount is *reserved*, so concurrent refunds can never add up to more than was captured.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import date, datetime

from keel.contexts.payments.domain.errors import IllegalTransition, RefundExceedsPayment

MAX_AMOUNT = 99_999_999  # minor units; the largest amount card networks accept in one charge
MAX_METADATA_KEYS = 20
MAX_METADATA_KEY_LENGTH = 40
MAX_METADATA_VALUE_LENGTH = 500


class PaymentStatus(enum.StrEnum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    PARTIALLY_REFUNDED = "partially_refunded"
    REFUNDED = "refunded"


REFUNDABLE = frozenset({PaymentStatus.SUCCEEDED, PaymentStatus.PARTIALLY_REFUNDED})


class FailureReason(enum.StrEnum):
    """Why a provider refused an operation. Only ``PROVIDER_UNAVAILABLE`` is worth retrying, and the
    jobs retry it themselves; it is recorded only once their retries are exhausted."""

    CARD_DECLINED = "card_declined"
    INSUFFICIENT_FUNDS = "insufficient_funds"
    INVALID_PAYMENT_METHOD = "invalid_payment_method"
    AUTHENTICATION_REQUIRED = "authentication_required"
    REFUND_REJECTED = "refund_rejected"
    PROVIDER_ERROR = "provider_error"  # the provider refused the request for another reason
    PROVIDER_UNAVAILABLE = "provider_unavailable"


@dataclass(frozen=True, slots=True, kw_only=True)
class Failure:
    reason: FailureReason
    message: str


class RefundReason(enum.StrEnum):
    REQUESTED_BY_CUSTOMER = "requested_by_customer"
    DUPLICATE = "duplicate"
    FRAUDULENT = "fraudulent"


class RefundStatus(enum.StrEnum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True, slots=True, kw_only=True)
class Payment:
    id: uuid.UUID
    tenant_id: uuid.UUID
    amount: int  # minor units of ``currency``
    currency: str  # ISO 4217, upper case
    payment_method: str  # the provider's token for the card (never card data)
    description: str
    customer_email: str | None
    metadata: Mapping[str, str]
    status: PaymentStatus
    provider: str
    created_at: datetime
    updated_at: datetime
    amount_refunded: int = 0  # settled refunds
    amount_refunding: int = 0  # refunds requested and not settled yet
    provider_reference: str | None = None
    failure_reason: FailureReason | None = None
    failure_message: str | None = None
    version: int = 1  # optimistic concurrency: each change increments it

    @property
    def refundable(self) -> int:
        """What a new refund may still take: nothing unless the payment was captured."""
        if self.status not in REFUNDABLE:
            return 0
        return self.amount - self.amount_refunded - self.amount_refunding

    def _changed(self, now: datetime, **changes: object) -> Payment:
        return replace(self, updated_at=now, version=self.version + 1, **changes)  # type: ignore[arg-type]

    def _require(self, allowed: frozenset[PaymentStatus] | set[PaymentStatus], action: str) -> None:
        if self.status not in allowed:
            raise IllegalTransition(f"A {self.status.value} payment cannot be {action}.")

    def succeed(self, reference: str, now: datetime) -> Payment:
        self._require({PaymentStatus.PENDING}, "marked succeeded")
        return self._changed(now, status=PaymentStatus.SUCCEEDED, provider_reference=reference)

    def fail(self, failure: Failure, now: datetime) -> Payment:
        self._require({PaymentStatus.PENDING}, "marked failed")
        return self._changed(
            now, status=PaymentStatus.FAILED, failure_reason=failure.reason, failure_message=failure.message
        )

    def reserve_refund(self, amount: int | None, now: datetime) -> tuple[Payment, int]:
        """Set ``amount`` aside for a new refund (``None``: everything left); returns the amount."""
        self._require(REFUNDABLE, "refunded")
        wanted = self.refundable if amount is None else amount
        if wanted <= 0 or wanted > self.refundable:
            raise RefundExceedsPayment(wanted, self.refundable)
        return self._changed(now, amount_refunding=self.amount_refunding + wanted), wanted

    def _require_reserved(self, amount: int) -> None:
        self._require(REFUNDABLE, "refunded")
        if not 0 < amount <= self.amount_refunding:
            raise IllegalTransition("No refund of that amount is in progress on this payment.")

    def settle_refund(self, amount: int, now: datetime) -> Payment:
        self._require_reserved(amount)
        refunded = self.amount_refunded + amount
        status = PaymentStatus.REFUNDED if refunded >= self.amount else PaymentStatus.PARTIALLY_REFUNDED
        return self._changed(
            now, amount_refunding=self.amount_refunding - amount, amount_refunded=refunded, status=status
        )

    def release_refund(self, amount: int, now: datetime) -> Payment:
        self._require_reserved(amount)
        return self._changed(now, amount_refunding=self.amount_refunding - amount)


@dataclass(frozen=True, slots=True, kw_only=True)
class Refund:
    id: uuid.UUID
    tenant_id: uuid.UUID
    payment_id: uuid.UUID
    amount: int
    currency: str
    reason: RefundReason | None
    status: RefundStatus
    created_at: datetime
    updated_at: datetime
    provider_reference: str | None = None
    failure_reason: FailureReason | None = None
    failure_message: str | None = None

    def settled(self, reference: str, now: datetime) -> Refund:
        if self.status is not RefundStatus.PENDING:
            raise IllegalTransition(f"A {self.status.value} refund cannot be settled.")
        return replace(self, status=RefundStatus.SUCCEEDED, provider_reference=reference, updated_at=now)

    def failed(self, failure: Failure, now: datetime) -> Refund:
        if self.status is not RefundStatus.PENDING:
            raise IllegalTransition(f"A {self.status.value} refund cannot fail.")
        return replace(
            self,
            status=RefundStatus.FAILED,
            failure_reason=failure.reason,
            failure_message=failure.message,
            updated_at=now,
        )


# -- what the provider port speaks -------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ChargeOrder:
    """Authorize and capture ``amount`` in one step. ``idempotency_key`` is derived from the payment,
    so a retried capture is the same charge to the provider, never a second one."""

    idempotency_key: str
    amount: int
    currency: str
    payment_method: str
    description: str = ""
    customer_email: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class RefundOrder:
    idempotency_key: str
    charge_reference: str
    amount: int
    currency: str
    reason: RefundReason | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ProviderResult:
    """A definitive answer: the provider's reference, or why it refused (a permanent failure)."""

    reference: str | None = None
    failure: Failure | None = None

    def __post_init__(self) -> None:
        if (self.reference is None) == (self.failure is None):
            raise ValueError("a provider result has a reference or a failure")


class ProviderUnavailable(Exception):
    """The provider could not give a definitive answer (network, 5xx, rate limit): retry with the same
    idempotency key."""


def capture_key(payment_id: uuid.UUID) -> str:
    return f"keel-capture-{payment_id}"


def refund_key(refund_id: uuid.UUID) -> str:
    return f"keel-refund-{refund_id}"


@dataclass(frozen=True, slots=True, kw_only=True)
class DailyTotal:
    """Payments (or refunds) created on one UTC day in one currency, by their current status."""

    day: date
    currency: str
    status: str
    count: int
    amount: int  # minor units
