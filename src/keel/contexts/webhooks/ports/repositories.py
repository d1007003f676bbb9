"""What the webhooks core needs from storage and from the network. Reads and writes are tenant-scoped."""

from __future__ import annotations

import builtins
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

from keel.contexts.webhooks.domain.model import Attempt, Delivery, Endpoint, SendResult
from keel.platform.domain.paging import Page, PageRequest
from keel.platform.ports.uow import UnitOfWork


class EndpointRepository(Protocol):
    async def add(self, endpoint: Endpoint) -> None: ...

    async def get(self, tenant_id: uuid.UUID, endpoint_id: uuid.UUID) -> Endpoint | None: ...

    async def list(self, tenant_id: uuid.UUID, page: PageRequest) -> Page[Endpoint]: ...

    async def subscribed(self, tenant_id: uuid.UUID, event_type: str) -> builtins.list[Endpoint]:
        """Enabled endpoints of the tenant that subscribe to ``event_type``."""
        ...

    async def update(self, endpoint: Endpoint) -> None: ...

    async def delete(self, tenant_id: uuid.UUID, endpoint_id: uuid.UUID) -> bool:
        """Deletes the endpoint with its deliveries and attempts."""
        ...


class DeliveryRepository(Protocol):
    async def add(self, delivery: Delivery) -> bool:
        """False (and nothing written) when the endpoint already has a delivery for this event."""
        ...

    async def get(self, tenant_id: uuid.UUID, delivery_id: uuid.UUID) -> Delivery | None: ...

    async def for_event(self, tenant_id: uuid.UUID, event_id: uuid.UUID) -> builtins.list[Delivery]: ...

    async def list(self, tenant_id: uuid.UUID, endpoint_id: uuid.UUID, page: PageRequest) -> Page[Delivery]:
        """Newest first."""
        ...

    async def claim(
        self, tenant_id: uuid.UUID, delivery_id: uuid.UUID, claimer: str, now: datetime, stale_before: datetime
    ) -> Delivery | None:
        """Atomically mark the delivery as sending for ``claimer`` if it is due (pending and
        ``next_attempt_at <= now``), already claimed by ``claimer`` (a retried job whose worker died), or
        claimed by someone before ``stale_before``; None when another attempt owns it or it is not due.
        The returned delivery carries a fresh ``claim_token``."""
        ...

    async def update(self, delivery: Delivery) -> None: ...

    async def finish(self, delivery: Delivery) -> bool:
        """Write the outcome of an attempt, only if ``delivery.claim_token`` still holds the claim;
        False (nothing written) when a newer run took the delivery over."""
        ...

    async def overdue(self, due_before: datetime, stale_before: datetime, limit: int) -> builtins.list[Delivery]:
        """Across tenants: pending deliveries due before ``due_before`` and sending ones claimed
        before ``stale_before``: attempts whose job was lost."""
        ...


class AttemptRepository(Protocol):
    async def add(self, attempt: Attempt) -> None: ...

    async def for_deliveries(self, tenant_id: uuid.UUID, delivery_ids: Sequence[uuid.UUID]) -> builtins.list[Attempt]:
        """Ordered by delivery, then attempt number."""
        ...


class WebhooksUnitOfWork(UnitOfWork, Protocol):
    @property
    def endpoints(self) -> EndpointRepository: ...

    @property
    def deliveries(self) -> DeliveryRepository: ...

    @property
    def attempts(self) -> AttemptRepository: ...


class WebhookSender(Protocol):
    """Sends one signed attempt. Never raises for what the receiver or the network does."""

    async def send(self, url: str, *, message_id: str, body: str, secrets: Sequence[str]) -> SendResult: ...
