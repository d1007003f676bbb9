from __future__ import annotations

import uuid
from datetime import date, datetime

from advanced_alchemy.types import GUID, DateTimeUTC
from sqlalchemy import BigInteger, Date, String
from sqlalchemy.orm import Mapped, mapped_column

from keel.platform.adapters.sql.base import Base


class DailyFigureRow(Base):
    """One figure of one tenant's day. Money metrics have a row per currency and status; the others
    use empty strings there (part of the key, so they cannot be NULL)."""

    __tablename__ = "analytics_daily_figures"

    tenant_id: Mapped[uuid.UUID] = mapped_column(GUID, primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    metric: Mapped[str] = mapped_column(String(20), primary_key=True)
    currency: Mapped[str] = mapped_column(String(3), primary_key=True)
    status: Mapped[str] = mapped_column(String(20), primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger)
    amount: Mapped[int] = mapped_column(BigInteger)


class RolledUpDayRow(Base):
    """A day a rollup has covered: its recomputed figures are stored (a day without activity too)."""

    __tablename__ = "analytics_rolled_up_days"

    tenant_id: Mapped[uuid.UUID] = mapped_column(GUID, primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    computed_at: Mapped[datetime] = mapped_column(DateTimeUTC(timezone=True))


class RequestBatchRow(Base):
    """A batch of request counts already added, so a retried flush cannot add it twice."""

    __tablename__ = "analytics_request_batches"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    added_at: Mapped[datetime] = mapped_column(DateTimeUTC(timezone=True), index=True)
