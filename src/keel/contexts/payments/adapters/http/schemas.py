from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

import msgspec
from msgspec import Meta

from keel.contexts.payments.domain.model import (
    MAX_AMOUNT,
    MAX_METADATA_KEY_LENGTH,
    MAX_METADATA_KEYS,
    MAX_METADATA_VALUE_LENGTH,
    FailureReason,
    Payment,
    PaymentStatus,
    Refund,
    RefundReason,
    RefundStatus,
)
from keel.platform.adapters.http.schemas import OPTIONAL_TEXT_PATTERN, Email, StrictInput, whole

Amount = Annotated[
    int,
    Meta(
        ge=1,
        le=MAX_AMOUNT,
        description="In the currency's minor unit (cents for EUR, yen for JPY).",
        examples=[2500],
    ),
]
Currency = Annotated[
    str, Meta(pattern=whole("[A-Za-z]{3}"), description="ISO 4217 code (case-insensitive).", examples=["EUR"])
]
PaymentMethod = Annotated[
    str,
    Meta(
        min_length=3,
        max_length=255,
        pattern=whole("[A-Za-z0-9_]+"),
        description=(
            "The provider's token for the card. The sandbox answers by test token: `pm_card_visa` succeeds, "
            "`pm_card_chargeDeclined` and `pm_card_chargeDeclinedInsufficientFunds` are declined, "
            "`pm_card_providerUnavailable` fails transiently twice and then succeeds."
        ),
        examples=["pm_card_visa"],
    ),
]
Description = Annotated[str, Meta(max_length=500, pattern=OPTIONAL_TEXT_PATTERN, examples=["Order #1042"])]
MetadataKey = Annotated[str, Meta(min_length=1, max_length=MAX_METADATA_KEY_LENGTH, pattern=whole(r"[A-Za-z0-9_.\-]+"))]
MetadataValue = Annotated[str, Meta(max_length=MAX_METADATA_VALUE_LENGTH, pattern=OPTIONAL_TEXT_PATTERN)]
Metadata = Annotated[
    dict[MetadataKey, MetadataValue],
    Meta(
        max_length=MAX_METADATA_KEYS,
        description=f"Up to {MAX_METADATA_KEYS} string pairs for your own references; sent with webhooks.",
        examples=[{"order_id": "1042"}],
    ),
]


class PaymentIn(StrictInput, frozen=True, kw_only=True, forbid_unknown_fields=True):
    amount: Amount
    currency: Currency
    payment_method: PaymentMethod
    description: Description = ""
    customer_email: Email | None = None
    metadata: Metadata = msgspec.field(default_factory=dict)


class RefundIn(StrictInput, frozen=True, kw_only=True, forbid_unknown_fields=True):
    amount: Amount | msgspec.UnsetType = msgspec.UNSET  # unset: everything not yet refunded
    reason: RefundReason | msgspec.UnsetType = msgspec.UNSET


class PaymentOut(msgspec.Struct, frozen=True, kw_only=True):
    id: uuid.UUID
    amount: int
    amount_refunded: int
    amount_refundable: int
    currency: str
    status: PaymentStatus
    payment_method: str
    description: str
    customer_email: str | None
    metadata: dict[str, str]
    provider: str
    provider_reference: str | None
    failure_reason: FailureReason | None
    failure_message: str | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, p: Payment) -> PaymentOut:
        return cls(
            id=p.id,
            amount=p.amount,
            amount_refunded=p.amount_refunded,
            amount_refundable=p.refundable,
            currency=p.currency,
            status=p.status,
            payment_method=p.payment_method,
            description=p.description,
            customer_email=p.customer_email,
            metadata=dict(p.metadata),
            provider=p.provider,
            provider_reference=p.provider_reference,
            failure_reason=p.failure_reason,
            failure_message=p.failure_message,
            created_at=p.created_at,
            updated_at=p.updated_at,
        )


class PaymentList(msgspec.Struct, frozen=True):
    items: list[PaymentOut]
    next_cursor: str | None


class RefundOut(msgspec.Struct, frozen=True, kw_only=True):
    id: uuid.UUID
    payment_id: uuid.UUID
    amount: int
    currency: str
    reason: RefundReason | None
    status: RefundStatus
    provider_reference: str | None
    failure_reason: FailureReason | None
    failure_message: str | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, r: Refund) -> RefundOut:
        return cls(
            id=r.id,
            payment_id=r.payment_id,
            amount=r.amount,
            currency=r.currency,
            reason=r.reason,
            status=r.status,
            provider_reference=r.provider_reference,
            failure_reason=r.failure_reason,
            failure_message=r.failure_message,
            created_at=r.created_at,
            updated_at=r.updated_at,
        )


class RefundList(msgspec.Struct, frozen=True):
    items: list[RefundOut]
    next_cursor: str | None


class PaymentAccepted(msgspec.Struct, frozen=True, kw_only=True):
    payment: PaymentOut
    job_id: str
    status_url: str


class RefundAccepted(msgspec.Struct, frozen=True, kw_only=True):
    refund: RefundOut
    job_id: str
    status_url: str
