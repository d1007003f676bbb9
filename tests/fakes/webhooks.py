"""In-memory webhooks storage with real state and real transaction semantics (stage, then commit), a
scripted webhook sender that records what it was asked to send, and a job queue that records jobs."""

from __future__ import annotations

import builtins
import random
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from keel.contexts.accounts.public import PUBLIC_EVENTS
from keel.contexts.webhooks.domain.model import RETRY_SCHEDULE, Attempt, Delivery, DeliveryStatus, Endpoint, SendResult
from keel.contexts.webhooks.domain.services import WebhooksService
from keel.platform.domain.events import Event
from keel.platform.domain.ids import new_id
from keel.platform.domain.jobs import JobInfo, JobStatus
from keel.platform.domain.paging import Page, PageRequest
from keel.platform.ports.clock import Clock
from keel.platform.ports.jobs import JobArgs
from tests.fakes.uow import InMemoryUnitOfWork


@dataclass
class Claim:
    claimer: str
    at: datetime


@dataclass
class WebhooksState:
    endpoints: dict[uuid.UUID, Endpoint] = field(default_factory=dict)
    deliveries: dict[uuid.UUID, Delivery] = field(default_factory=dict)
    # Who is making the current attempt of a sending delivery (SQL: claimed_by / claimed_at columns).
    claims: dict[uuid.UUID, Claim] = field(default_factory=dict)
    attempts: dict[uuid.UUID, Attempt] = field(default_factory=dict)
    outbox: list[Event] = field(default_factory=list)


class InMemoryEndpointRepository:
    def __init__(self, state: WebhooksState) -> None:
        self._s = state

    async def add(self, endpoint: Endpoint) -> None:
        if endpoint.id in self._s.endpoints:
            raise ValueError("duplicate endpoint id")
        self._s.endpoints[endpoint.id] = endpoint

    async def get(self, tenant_id: uuid.UUID, endpoint_id: uuid.UUID) -> Endpoint | None:
        e = self._s.endpoints.get(endpoint_id)
        return e if e is not None and e.tenant_id == tenant_id else None

    async def list(self, tenant_id: uuid.UUID, page: PageRequest) -> Page[Endpoint]:
        rows = sorted((e for e in self._s.endpoints.values() if e.tenant_id == tenant_id), key=lambda e: e.id)
        if page.after is not None:
            rows = [e for e in rows if e.id > page.after]
        return Page.from_overfetch(rows[: page.fetch], page)

    async def subscribed(self, tenant_id: uuid.UUID, event_type: str) -> builtins.list[Endpoint]:
        return [e for e in self._s.endpoints.values() if e.tenant_id == tenant_id and e.subscribes_to(event_type)]

    async def update(self, endpoint: Endpoint) -> None:
        current = self._s.endpoints.get(endpoint.id)
        if current is None or current.tenant_id != endpoint.tenant_id:
            return
        # Like the SQL adapter: identity and creation time are never rewritten.
        self._s.endpoints[endpoint.id] = replace(endpoint, created_at=current.created_at)

    async def delete(self, tenant_id: uuid.UUID, endpoint_id: uuid.UUID) -> bool:
        e = self._s.endpoints.get(endpoint_id)
        if e is None or e.tenant_id != tenant_id:
            return False
        gone = {d.id for d in self._s.deliveries.values() if d.endpoint_id == endpoint_id}
        for a in [a for a in self._s.attempts.values() if a.delivery_id in gone]:
            del self._s.attempts[a.id]
        for d in gone:
            del self._s.deliveries[d]
            self._s.claims.pop(d, None)
        del self._s.endpoints[endpoint_id]
        return True


class InMemoryDeliveryRepository:
    def __init__(self, state: WebhooksState) -> None:
        self._s = state

    async def add(self, delivery: Delivery) -> bool:
        if any(d.endpoint_id == delivery.endpoint_id and d.event_id == delivery.event_id for d in self._all()):
            return False
        if delivery.id in self._s.deliveries:
            raise ValueError("duplicate delivery id")
        self._s.deliveries[delivery.id] = delivery
        return True

    def _all(self) -> builtins.list[Delivery]:
        return list(self._s.deliveries.values())

    async def get(self, tenant_id: uuid.UUID, delivery_id: uuid.UUID) -> Delivery | None:
        d = self._s.deliveries.get(delivery_id)
        return d if d is not None and d.tenant_id == tenant_id else None

    async def for_event(self, tenant_id: uuid.UUID, event_id: uuid.UUID) -> builtins.list[Delivery]:
        return [d for d in self._all() if d.tenant_id == tenant_id and d.event_id == event_id]

    async def list(self, tenant_id: uuid.UUID, endpoint_id: uuid.UUID, page: PageRequest) -> Page[Delivery]:
        rows = sorted(
            (d for d in self._all() if d.tenant_id == tenant_id and d.endpoint_id == endpoint_id),
            key=lambda d: d.id,
            reverse=True,
        )
        if page.after is not None:
            rows = [d for d in rows if d.id < page.after]
        return Page.from_overfetch(rows[: page.fetch], page)

    async def claim(
        self, tenant_id: uuid.UUID, delivery_id: uuid.UUID, claimer: str, now: datetime, stale_before: datetime
    ) -> Delivery | None:
        d = await self.get(tenant_id, delivery_id)
        if d is None:
            return None
        claim = self._s.claims.get(d.id)
        due = d.status is DeliveryStatus.PENDING and d.next_attempt_at is not None and d.next_attempt_at <= now
        mine_or_stale = (
            d.status is DeliveryStatus.SENDING
            and claim is not None
            and (claim.claimer == claimer or claim.at < stale_before)
        )
        if not (due or mine_or_stale):
            return None
        claimed = replace(d, status=DeliveryStatus.SENDING, claim_token=str(uuid.uuid4()))
        self._s.deliveries[d.id] = claimed
        self._s.claims[d.id] = Claim(claimer, now)
        return claimed

    async def update(self, delivery: Delivery) -> None:
        current = self._s.deliveries.get(delivery.id)
        if current is None or current.tenant_id != delivery.tenant_id:
            return
        self._store(delivery, current)

    def _store(self, delivery: Delivery, current: Delivery) -> None:
        if delivery.status is not DeliveryStatus.SENDING:
            self._s.claims.pop(delivery.id, None)
            delivery = replace(delivery, claim_token=None)
        self._s.deliveries[delivery.id] = replace(delivery, created_at=current.created_at)

    async def finish(self, delivery: Delivery) -> bool:
        current = self._s.deliveries.get(delivery.id)
        if (
            current is None
            or current.tenant_id != delivery.tenant_id
            or current.status is not DeliveryStatus.SENDING
            or delivery.claim_token is None
            or current.claim_token != delivery.claim_token
        ):
            return False
        self._store(delivery, current)
        return True

    async def overdue(self, due_before: datetime, stale_before: datetime, limit: int) -> builtins.list[Delivery]:
        def is_overdue(d: Delivery) -> bool:
            if d.status is DeliveryStatus.PENDING:
                return d.next_attempt_at is not None and d.next_attempt_at < due_before
            claim = self._s.claims.get(d.id)
            return d.status is DeliveryStatus.SENDING and claim is not None and claim.at < stale_before

        rows = [d for d in self._all() if is_overdue(d)]
        rows.sort(key=lambda d: (d.next_attempt_at is None, d.next_attempt_at or datetime.min))
        return rows[:limit]


class InMemoryAttemptRepository:
    def __init__(self, state: WebhooksState) -> None:
        self._s = state

    async def add(self, attempt: Attempt) -> None:
        if attempt.delivery_id not in self._s.deliveries:
            # The SQL schema has a foreign key from attempts to deliveries.
            raise ValueError("attempt of an unknown delivery")
        self._s.attempts[attempt.id] = attempt

    async def for_deliveries(self, tenant_id: uuid.UUID, delivery_ids: Sequence[uuid.UUID]) -> builtins.list[Attempt]:
        wanted = set(delivery_ids)
        rows = [a for a in self._s.attempts.values() if a.tenant_id == tenant_id and a.delivery_id in wanted]
        return sorted(rows, key=lambda a: (a.delivery_id, a.number))


class InMemoryWebhooksUnitOfWork(InMemoryUnitOfWork[WebhooksState]):
    def _bind(self, staged: WebhooksState) -> None:
        self.endpoints = InMemoryEndpointRepository(staged)
        self.deliveries = InMemoryDeliveryRepository(staged)
        self.attempts = InMemoryAttemptRepository(staged)


# -- the network ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    url: str
    message_id: str
    body: str
    secrets: tuple[str, ...]


class FakeWebhookSender:
    """Answers with ``script`` in order, then ``then`` forever; records every call. ``during_send``, if
    set, is awaited while a send is "in flight" (to act concurrently with an attempt)."""

    def __init__(self, script: Sequence[SendResult] = (), then: SendResult | None = None) -> None:
        self.script = list(script)
        self.then = then or SendResult(latency_ms=12, status_code=200)
        self.sent: list[Sent] = []
        self.during_send: Callable[[], Awaitable[None]] | None = None

    def answer(self, *results: SendResult) -> None:
        self.script.extend(results)

    async def send(self, url: str, *, message_id: str, body: str, secrets: Sequence[str]) -> SendResult:
        self.sent.append(Sent(url, message_id, body, tuple(secrets)))
        if self.during_send is not None:
            hook, self.during_send = self.during_send, None
            await hook()
        return self.script.pop(0) if self.script else self.then


def reply(status: int | None = 200, **kw: Any) -> SendResult:
    """A SendResult the way the real sender builds one."""
    error = kw.pop("error", None if status is not None and 200 <= status < 300 else f"HTTP {status}")
    return SendResult(latency_ms=kw.pop("latency_ms", 7), status_code=status, error=error, **kw)


# -- jobs -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Enqueued:
    id: str
    name: str
    args: dict[str, Any]
    tenant_id: uuid.UUID | None
    delay: float


class RecordingJobQueue:
    """Enqueues nothing for real: the test decides when a job "runs" by calling the service."""

    def __init__(self) -> None:
        self.jobs: list[Enqueued] = []

    async def enqueue(
        self,
        name: str,
        args: JobArgs,
        *,
        tenant_id: uuid.UUID | None = None,
        delay: float = 0.0,
        job_id: str | None = None,
    ) -> str:
        if job_id is not None and any(j.id == job_id for j in self.jobs):
            return job_id
        job = Enqueued(job_id or str(new_id()), name, dict(args), tenant_id, delay)
        self.jobs.append(job)
        return job.id

    async def get(self, job_id: str) -> JobInfo | None:
        job = next((j for j in self.jobs if j.id == job_id), None)
        if job is None:
            return None
        return JobInfo(
            id=job.id,
            name=job.name,
            queue="high",
            status=JobStatus.QUEUED,
            tenant_id=job.tenant_id,
            progress=0,
            attempts=0,
            result=None,
            error=None,
            enqueued_at=None,
            started_at=None,
            ended_at=None,
            meta={},
        )

    def named(self, name: str) -> list[Enqueued]:
        return [j for j in self.jobs if j.name == name]

    def clear(self) -> None:
        self.jobs.clear()


def webhooks_service(
    state: WebhooksState,
    clock: Clock,
    sender: FakeWebhookSender,
    jobs: RecordingJobQueue,
    *,
    allow_private: bool = False,
    retry_schedule: Sequence[float] = RETRY_SCHEDULE,
    seed: int = 7,
) -> WebhooksService:
    """The webhooks service as the composition root wires it, on in-memory adapters."""
    return WebhooksService(
        lambda: InMemoryWebhooksUnitOfWork(state),
        jobs,
        clock,
        sender,
        PUBLIC_EVENTS,
        allow_private=allow_private,
        retry_schedule=retry_schedule,
        rng=random.Random(seed),
    )
