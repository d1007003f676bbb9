from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

import msgspec
from msgspec import Meta

from keel.contexts.webhooks.domain.model import MAX_URL_LENGTH, Attempt, DeliveryStatus, Endpoint
from keel.contexts.webhooks.domain.services import DeliveryView
from keel.platform.adapters.http.schemas import OPTIONAL_TEXT_PATTERN, StrictInput, whole

Url = Annotated[
    str,
    Meta(
        min_length=8,
        max_length=MAX_URL_LENGTH,
        pattern=whole(r"https?://[^\s\x00-\x1f\x7f]+"),
        description="Where deliveries are POSTed (https; private addresses are refused).",
        examples=["https://example.com/webhooks/keel"],
    ),
]
EventType = Annotated[str, Meta(min_length=1, max_length=100, examples=["user.created"])]
EventTypes = Annotated[list[EventType], Meta(min_length=1, max_length=50)]
Description = Annotated[str, Meta(max_length=500, pattern=OPTIONAL_TEXT_PATTERN, examples=["CRM sync"])]


class EndpointIn(StrictInput, frozen=True, kw_only=True, forbid_unknown_fields=True):
    url: Url
    event_types: EventTypes
    description: Description = ""
    enabled: bool = True


class EndpointPatch(StrictInput, frozen=True, kw_only=True, forbid_unknown_fields=True):
    url: Url | msgspec.UnsetType = msgspec.UNSET
    event_types: EventTypes | msgspec.UnsetType = msgspec.UNSET
    description: Description | msgspec.UnsetType = msgspec.UNSET
    enabled: bool | msgspec.UnsetType = msgspec.UNSET


class EndpointOut(msgspec.Struct, frozen=True, kw_only=True):
    id: uuid.UUID
    url: str
    description: str
    event_types: list[str]
    enabled: bool
    disabled_reason: str | None
    previous_secret_expires_at: datetime | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, e: Endpoint) -> EndpointOut:
        return cls(
            id=e.id,
            url=e.url,
            description=e.description,
            event_types=list(e.event_types),
            enabled=e.enabled,
            disabled_reason=e.disabled_reason,
            previous_secret_expires_at=e.previous_secret_expires_at,
            created_at=e.created_at,
            updated_at=e.updated_at,
        )


class EndpointCreatedOut(EndpointOut, frozen=True, kw_only=True):
    secret: str

    @classmethod
    def created(cls, e: Endpoint) -> EndpointCreatedOut:
        return cls(**msgspec.structs.asdict(EndpointOut.of(e)), secret=e.secret)


class EndpointList(msgspec.Struct, frozen=True):
    items: list[EndpointOut]
    next_cursor: str | None


class SecretOut(msgspec.Struct, frozen=True, kw_only=True):
    secret: str
    previous_secret_expires_at: datetime | None


class AttemptOut(msgspec.Struct, frozen=True, kw_only=True):
    number: int
    started_at: datetime
    status_code: int | None
    latency_ms: int
    error: str | None

    @classmethod
    def of(cls, a: Attempt) -> AttemptOut:
        return cls(
            number=a.number, started_at=a.started_at, status_code=a.status_code, latency_ms=a.latency_ms, error=a.error
        )


class DeliveryOut(msgspec.Struct, frozen=True, kw_only=True):
    id: uuid.UUID
    event_id: uuid.UUID
    event_type: str
    status: DeliveryStatus
    attempt_count: int
    next_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    attempts: list[AttemptOut]

    @classmethod
    def of(cls, v: DeliveryView) -> DeliveryOut:
        d = v.delivery
        return cls(
            id=d.id,
            event_id=d.event_id,
            event_type=d.event_type,
            status=d.status,
            attempt_count=d.attempts,
            next_attempt_at=d.next_attempt_at,
            last_status_code=d.last_status_code,
            last_error=d.last_error,
            created_at=d.created_at,
            updated_at=d.updated_at,
            attempts=[AttemptOut.of(a) for a in v.attempts],
        )


class DeliveryList(msgspec.Struct, frozen=True):
    items: list[DeliveryOut]
    next_cursor: str | None


class EventTypeList(msgspec.Struct, frozen=True):
    items: list[str]
