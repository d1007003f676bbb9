from __future__ import annotations

from typing import Protocol

from keel.contexts.payments.domain.model import ChargeOrder, ProviderResult, RefundOrder


class PaymentProvider(Protocol):
    """A payment service provider. Both operations are idempotent on the order's ``idempotency_key``:
    asking again returns the first answer and moves no money twice. A definitive refusal is a
    ``ProviderResult`` with a failure; anything that is not definitive raises ``ProviderUnavailable``."""

    @property
    def name(self) -> str: ...

    async def capture(self, order: ChargeOrder) -> ProviderResult: ...

    async def refund(self, order: RefundOrder) -> ProviderResult: ...
