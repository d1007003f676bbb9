from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from advanced_alchemy.types import GUID, DateTimeUTC, JsonB
from sqlalchemy import BigInteger, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from keel.platform.adapters.sql.base import Base


class PaymentRow(Base):
    __tablename__ = "payments"
    __table_args__ = (
        Index("ix_payments_tenant_id", "tenant_id", "id"),
        Index("ix_payments_tenant_status_id", "tenant_id", "status", "id"),
        Index("ix_payments_tenant_created", "tenant_id", "created_at"),
        Index("ix_payments_status_updated", "status", "updated_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(GUID, primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(GUID)
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    payment_method: Mapped[str] = mapped_column(String(255))
    description: Mapped[str] = mapped_column(String(500))
    customer_email: Mapped[str | None] = mapped_column(String(320), nullable=True)
    # Named for the column: ``metadata`` is reserved on SQLAlchemy models.
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JsonB)
    status: Mapped[str] = mapped_column(String(20))
    provider: Mapped[str] = mapped_column(String(20))
    provider_reference: Mapped[str | None] = mapped_column(String(255), nullable=True)
    amount_refunded: Mapped[int] = mapped_column(BigInteger)
    amount_refunding: Mapped[int] = mapped_column(BigInteger)
    failure_reason: Mapped[str | None] = mapped_column(String(40), nullable=True)
    failure_message: Mapped[str | None] = mapped_column(String(500), nullable=True)
    version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTimeUTC(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTimeUTC(timezone=True))


class RefundRow(Base):
    __tablename__ = "payment_refunds"
    __table_args__ = (
        Index("ix_payment_refunds_tenant_payment_id", "tenant_id", "payment_id", "id"),
        Index("ix_payment_refunds_status_updated", "status", "updated_at"),
        Index("ix_payment_refunds_tenant_created", "tenant_id", "created_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(GUID, primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(GUID)
    # No foreign key: payments are never deleted, and the pair is always read tenant-scoped.
    payment_id: Mapped[uuid.UUID] = mapped_column(GUID)
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    reason: Mapped[str | None] = mapped_column(String(40), nullable=True)
    status: Mapped[str] = mapped_column(String(20))
    provider_reference: Mapped[str | None] = mapped_column(String(255), nullable=True)
    failure_reason: Mapped[str | None] = mapped_column(String(40), nullable=True)
    failure_message: Mapped[str | None] = mapped_column(String(500), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTimeUTC(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTimeUTC(timezone=True))


class SandboxOperationRow(Base):
    """The sandbox provider's own ledger (a stand-in for the provider's servers): one row per
    idempotency key, so every worker process sees the same charges and refunds."""

    __tablename__ = "payments_sandbox_ledger"
    __table_args__ = (Index("ix_payments_sandbox_ledger_charge", "charge_reference"),)

    idempotency_key: Mapped[str] = mapped_column(String(255), primary_key=True)
    kind: Mapped[str] = mapped_column(String(10))  # charge | refund
    reference: Mapped[str] = mapped_column(String(64))
    charge_reference: Mapped[str | None] = mapped_column(String(64), nullable=True)  # refunds: what they refund
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    calls: Mapped[int] = mapped_column(Integer)
    outcome: Mapped[str | None] = mapped_column(String(40), nullable=True)  # None until definitive
    created_at: Mapped[datetime] = mapped_column(DateTimeUTC(timezone=True))
