"""The sandbox payment provider: the embedded default, and what tests and benchmarks charge.

It behaves like a remote provider: answers are decided by the test card token (the same tokens as
Stripe's test mode, plus one for outages), each idempotency key gets one answer forever, and the
ledger it keeps lives in the database so that every worker process sees the same charges.
"""

from __future__ import annotations

import asyncio
import uuid

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from keel.contexts.payments.adapters.sql.models import SandboxOperationRow
from keel.contexts.payments.domain.model import (
    ChargeOrder,
    Failure,
    FailureReason,
    ProviderResult,
    ProviderUnavailable,
    RefundOrder,
)
from keel.platform.adapters.sql.errors import insert_unless_exists
from keel.platform.ports.clock import Clock

SUCCEEDS = "pm_card_visa"
DECLINED = "pm_card_chargeDeclined"
INSUFFICIENT_FUNDS = "pm_card_chargeDeclinedInsufficientFunds"
UNAVAILABLE_TWICE = "pm_card_providerUnavailable"  # sandbox only: two outages, then success
_UNAVAILABLE_CALLS = 2

_DECLINES = {
    DECLINED: Failure(reason=FailureReason.CARD_DECLINED, message="Your card was declined."),
    INSUFFICIENT_FUNDS: Failure(reason=FailureReason.INSUFFICIENT_FUNDS, message="Your card has insufficient funds."),
}
_SUCCEEDED = "succeeded"
# What a real provider does with a key reused for other parameters: refuse, and move no money.
_KEY_REUSED = ProviderResult(
    failure=Failure(
        reason=FailureReason.PROVIDER_ERROR, message="The idempotency key was used for a different request."
    )
)


class SandboxPaymentProvider:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], clock: Clock, *, latency: float = 0.0) -> None:
        self._sessions = sessions
        self._clock = clock
        self._latency = latency

    @property
    def name(self) -> str:
        return "sandbox"

    async def capture(self, order: ChargeOrder) -> ProviderResult:
        await self._wait()
        async with self._sessions() as s:
            row = await self._call(s, order.idempotency_key, "charge", order.amount, order.currency, None)
            if row is None:
                return _KEY_REUSED
            if row.outcome is None:
                if order.payment_method == UNAVAILABLE_TWICE and row.calls <= _UNAVAILABLE_CALLS:
                    await s.commit()  # the call counts, like a request that reached a failing provider
                    raise ProviderUnavailable(f"sandbox outage {row.calls} of {_UNAVAILABLE_CALLS}")
                row.outcome = self._charge_outcome(order.payment_method)
            await s.commit()
            return _result(row)

    async def refund(self, order: RefundOrder) -> ProviderResult:
        await self._wait()
        async with self._sessions() as s:
            row = await self._call(
                s, order.idempotency_key, "refund", order.amount, order.currency, order.charge_reference
            )
            if row is None:
                return _KEY_REUSED
            if row.outcome is None:
                row.outcome = await self._refund_outcome(s, order)
            await s.commit()
            return _result(row)

    async def _wait(self) -> None:
        if self._latency:
            await asyncio.sleep(self._latency)

    async def _call(
        self, s: AsyncSession, key: str, kind: str, amount: int, currency: str, charge: str | None
    ) -> SandboxOperationRow | None:
        """The ledger row of this idempotency key, created on first use; counts the call. None when
        the key was first used for a different operation."""
        values = {
            "idempotency_key": key,
            "kind": kind,
            "reference": f"{'ch' if kind == 'charge' else 're'}_sandbox_{uuid.uuid4().hex[:24]}",
            "charge_reference": charge,
            "amount": amount,
            "currency": currency,
            "calls": 1,
            "outcome": None,
            "created_at": self._clock.now(),
        }
        if not await insert_unless_exists(s, SandboxOperationRow, values, ("idempotency_key",)):
            await s.execute(
                update(SandboxOperationRow)
                .where(SandboxOperationRow.idempotency_key == key)
                .values(calls=SandboxOperationRow.calls + 1)
            )
        row = (
            await s.execute(
                select(SandboxOperationRow)
                .where(SandboxOperationRow.idempotency_key == key)
                .execution_options(populate_existing=True)
            )
        ).scalar_one()
        if (row.kind, row.amount, row.currency, row.charge_reference) != (kind, amount, currency, charge):
            return None
        return row

    @staticmethod
    def _charge_outcome(token: str) -> str:
        if token in _DECLINES:
            return _DECLINES[token].reason.value
        if token.startswith(("pm_card_", "tok_")):  # pm_card_visa, pm_card_providerUnavailable, ...
            return _SUCCEEDED
        return FailureReason.INVALID_PAYMENT_METHOD.value

    @staticmethod
    async def _refund_outcome(s: AsyncSession, order: RefundOrder) -> str:
        charge = (
            await s.execute(
                select(SandboxOperationRow).where(
                    SandboxOperationRow.kind == "charge",
                    SandboxOperationRow.reference == order.charge_reference,
                )
            )
        ).scalar_one_or_none()
        if charge is None or charge.outcome != _SUCCEEDED:
            return FailureReason.REFUND_REJECTED.value
        refunded = (
            await s.execute(
                select(func.coalesce(func.sum(SandboxOperationRow.amount), 0)).where(
                    SandboxOperationRow.kind == "refund",
                    SandboxOperationRow.charge_reference == order.charge_reference,
                    SandboxOperationRow.outcome == _SUCCEEDED,
                )
            )
        ).scalar_one()
        return _SUCCEEDED if refunded + order.amount <= charge.amount else FailureReason.REFUND_REJECTED.value


_MESSAGES = {
    FailureReason.INVALID_PAYMENT_METHOD: "No such payment method.",
    FailureReason.REFUND_REJECTED: "The refund exceeds what is left of the charge.",
}


def _result(row: SandboxOperationRow) -> ProviderResult:
    if row.outcome == _SUCCEEDED:
        return ProviderResult(reference=row.reference)
    reason = FailureReason(row.outcome or FailureReason.PROVIDER_ERROR)
    decline = next((f for f in _DECLINES.values() if f.reason is reason), None)
    message = decline.message if decline else _MESSAGES.get(reason, "The provider refused the request.")
    return ProviderResult(failure=Failure(reason=reason, message=message))
