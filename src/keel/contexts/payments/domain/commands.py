from __future__ import annotations

import msgspec

from keel.contexts.payments.domain.model import RefundReason


class CreatePayment(msgspec.Struct, frozen=True, kw_only=True):
    amount: int
    currency: str
    payment_method: str
    description: str = ""
    customer_email: str | None = None
    metadata: dict[str, str] = msgspec.field(default_factory=dict)


class CreateRefund(msgspec.Struct, frozen=True, kw_only=True):
    amount: int | None = None  # None: everything not yet refunded
    reason: RefundReason | None = None
