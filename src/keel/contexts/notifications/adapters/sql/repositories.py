from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from keel.contexts.notifications.adapters.sql.models import EmailRow
from keel.contexts.notifications.domain.model import EmailKind, EmailRecord, EmailStatus
from keel.platform.adapters.sql.errors import insert_unless_exists
from keel.platform.adapters.sql.uow import SqlUnitOfWork


def _record(row: EmailRow) -> EmailRecord:
    return EmailRecord(
        id=row.id,
        tenant_id=row.tenant_id,
        event_id=row.event_id,
        kind=EmailKind(row.kind),
        recipient=row.recipient,
        message_id=row.message_id,
        status=EmailStatus(row.status),
        created_at=row.created_at,
        sent_at=row.sent_at,
    )


class SqlEmailLog:
    def __init__(self, session: AsyncSession) -> None:
        self._s = session

    async def find(self, event_id: uuid.UUID, kind: EmailKind, recipient: str) -> EmailRecord | None:
        stmt = select(EmailRow).where(
            EmailRow.event_id == event_id, EmailRow.kind == kind.value, EmailRow.recipient == recipient
        )
        row = (await self._s.execute(stmt)).scalar_one_or_none()
        return _record(row) if row is not None else None

    async def add(self, record: EmailRecord) -> bool:
        values = {
            "id": record.id,
            "tenant_id": record.tenant_id,
            "event_id": record.event_id,
            "kind": record.kind.value,
            "recipient": record.recipient,
            "message_id": record.message_id,
            "status": record.status.value,
            "created_at": record.created_at,
            "sent_at": record.sent_at,
        }
        return await insert_unless_exists(self._s, EmailRow, values, ("event_id", "kind", "recipient"))

    async def mark_sent(self, record_id: uuid.UUID, at: datetime) -> None:
        stmt = update(EmailRow).where(EmailRow.id == record_id).values(status=EmailStatus.SENT.value, sent_at=at)
        await self._s.execute(stmt)


class SqlNotificationsUnitOfWork(SqlUnitOfWork):
    emails: SqlEmailLog

    def _bind(self, session: AsyncSession) -> None:
        self.emails = SqlEmailLog(session)
