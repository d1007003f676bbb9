from __future__ import annotations

import uuid
from datetime import datetime
from typing import Protocol

from keel.contexts.notifications.domain.model import (
    EmailKind,
    EmailRecord,
    OutgoingEmail,
    Rendered,
    TemplateVars,
)
from keel.platform.ports.uow import UnitOfWork


class EmailLog(Protocol):
    async def find(self, event_id: uuid.UUID, kind: EmailKind, recipient: str) -> EmailRecord | None: ...

    async def add(self, record: EmailRecord) -> bool:
        """False when a record for the same (event, kind, recipient) already exists."""
        ...

    async def mark_sent(self, record_id: uuid.UUID, at: datetime) -> None: ...


class NotificationsUnitOfWork(UnitOfWork, Protocol):
    @property
    def emails(self) -> EmailLog: ...


class Mailer(Protocol):
    """Hands a message to a mail transport; raises when it could not (the job retries)."""

    async def send(self, email: OutgoingEmail) -> None: ...


class TemplateRenderer(Protocol):
    def render(self, kind: EmailKind, values: TemplateVars) -> Rendered: ...
