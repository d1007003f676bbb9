"""What the payments core needs from storage. Every read and write is tenant-scoped, except the
cross-tenant scans of the periodic safety-net job."""

from __future__ import annotations

import builtins
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from keel.contexts.payments.domain.model import DailyTotal, Payment, PaymentStatus, Refund
from keel.platform.domain.paging import Page, PageRequest
from keel.platform.ports.uow import UnitOfWork


@dataclass(frozen=True, slots=True, kw_only=True)
class PaymentFilter:
    status: PaymentStatus | None = None
    created_from: datetime | None = None  # inclusive
    created_to: datetime | None = None  # exclusive


class PaymentRepository(Protocol):
    async def add(self, payment: Payment) -> None: ...

    async def get(self, tenant_id: uuid.UUID, payment_id: uuid.UUID) -> Payment | None: ...

    async def list(self, tenant_id: uuid.UUID, where: PaymentFilter, page: PageRequest) -> Page[Payment]:
        """Newest first."""
        ...

    async def save(self, payment: Payment) -> bool:
        """Write a changed payment only if the stored one is the version it was derived from
        (``payment.version - 1``); False, with nothing written, when someone else changed it first."""
        ...

    async def stale_pending(self, updated_before: datetime, limit: int) -> builtins.list[Payment]:
        """Across tenants: payments still pending since before ``updated_before``."""
        ...

    async def daily_totals(self, tenant_id: uuid.UUID, start: datetime, end: datetime) -> builtins.list[DailyTotal]:
        """Payments created in [start, end), grouped by UTC day, currency and status (any order)."""
        ...


class RefundRepository(Protocol):
    async def add(self, refund: Refund) -> None: ...

    async def get(self, tenant_id: uuid.UUID, refund_id: uuid.UUID) -> Refund | None: ...

    async def list(self, tenant_id: uuid.UUID, payment_id: uuid.UUID, page: PageRequest) -> Page[Refund]:
        """Newest first."""
        ...

    async def update(self, refund: Refund) -> None: ...

    async def stale_pending(self, updated_before: datetime, limit: int) -> builtins.list[Refund]:
        """Across tenants: refunds still pending since before ``updated_before``."""
        ...

    async def daily_totals(self, tenant_id: uuid.UUID, start: datetime, end: datetime) -> builtins.list[DailyTotal]:
        """Refunds created in [start, end), grouped by UTC day, currency and status (any order)."""
        ...


class PaymentsUnitOfWork(UnitOfWork, Protocol):
    @property
    def payments(self) -> PaymentRepository: ...

    @property
    def refunds(self) -> RefundRepository: ...
