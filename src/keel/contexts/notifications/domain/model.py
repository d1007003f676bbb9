"""Emails as values. Rendering and transport are ports; the domain decides who gets what, once."""

from __future__ import annotations

import enum
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


class EmailKind(enum.StrEnum):
    WELCOME = "welcome"  # to the owner, when a tenant signs up
    USER_INVITE = "user_invite"  # to a user added to a tenant
    PAYMENT_RECEIPT = "payment_receipt"  # to the payment's customer, once it succeeded
    REFUND_RECEIPT = "refund_receipt"  # to the payment's customer, for each settled refund


@dataclass(frozen=True, slots=True, kw_only=True)
class Rendered:
    subject: str
    text: str
    html: str


@dataclass(frozen=True, slots=True, kw_only=True)
class OutgoingEmail:
    to: str
    subject: str
    text: str
    html: str
    # Derived from the event: a resend carries the same Message-ID, so mail systems can fold duplicates.
    message_id: str
    headers: Mapping[str, str] = field(default_factory=dict)


class EmailStatus(enum.StrEnum):
    SENDING = "sending"
    SENT = "sent"


@dataclass(frozen=True, slots=True, kw_only=True)
class EmailRecord:
    """One email owed for one event: the ledger that makes sending idempotent."""

    id: uuid.UUID
    tenant_id: uuid.UUID
    event_id: uuid.UUID
    kind: EmailKind
    recipient: str
    message_id: str
    status: EmailStatus
    created_at: datetime
    sent_at: datetime | None = None


def message_id(event_id: uuid.UUID, kind: EmailKind, domain: str) -> str:
    return f"<{event_id}.{kind.value}@{domain}>"


TemplateVars = Mapping[str, Any]
