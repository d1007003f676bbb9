"""Webhook use cases: endpoint management for tenants, and the jobs that fan events out to
deliveries and make each delivery attempt."""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from keel.contexts.webhooks.domain.commands import ChangeEndpoint, CreateEndpoint
from keel.contexts.webhooks.domain.errors import (
    DeliveryInProgress,
    DeliveryNotFound,
    EndpointNotFound,
    UnknownEventType,
)
from keel.contexts.webhooks.domain.model import (
    CLAIM_LEASE,
    DISABLE_AFTER,
    RETRY_SCHEDULE,
    Attempt,
    Delivery,
    DeliveryStatus,
    Endpoint,
    Outcome,
    check_url,
    new_secret,
    outcome,
    payload_of,
    retry_delay,
)
from keel.contexts.webhooks.ports.repositories import WebhookSender, WebhooksUnitOfWork
from keel.platform.domain.events import Event
from keel.platform.domain.ids import new_id
from keel.platform.domain.paging import Page, PageRequest
from keel.platform.domain.tenancy import Principal
from keel.platform.ports.clock import Clock
from keel.platform.ports.jobs import JobQueue

DELIVER_JOB = "webhooks.deliver"
FAN_OUT_JOB = "webhooks.fan_out"
REQUEUE_JOB = "webhooks.requeue_overdue"
# A retry whose job has not started this long after it was due is considered lost and re-enqueued.
OVERDUE_SLACK = timedelta(minutes=2)

# Which fields of each event type's data a webhook may carry (the rest is internal).
EventCatalogue = Mapping[str, Sequence[str]]


@dataclass(frozen=True, slots=True)
class DeliveryView:
    delivery: Delivery
    attempts: list[Attempt]

    @property
    def id(self) -> uuid.UUID:
        return self.delivery.id


class WebhooksService:
    def __init__(
        self,
        uow: Callable[[], WebhooksUnitOfWork],
        jobs: JobQueue,
        clock: Clock,
        sender: WebhookSender,
        catalogue: EventCatalogue,
        *,
        allow_private: bool = False,
        retry_schedule: Sequence[float] = RETRY_SCHEDULE,
        rng: random.Random | None = None,
    ) -> None:
        if not retry_schedule:
            raise ValueError("the retry schedule needs at least one delay")
        self._schedule = tuple(retry_schedule)
        self._max_attempts = 1 + len(self._schedule)
        self._uow = uow
        self._jobs = jobs
        self._clock = clock
        self._sender = sender
        self._catalogue = catalogue
        self._allow_private = allow_private
        self._rng = rng or random.Random()

    @property
    def event_types(self) -> list[str]:
        return sorted(self._catalogue)

    # -- endpoints ------------------------------------------------------------------------------

    def _event_types(self, types: Sequence[str]) -> tuple[str, ...]:
        for i, t in enumerate(types):
            if t not in self._catalogue:
                raise UnknownEventType(t, i)
        return tuple(sorted(set(types)))

    async def create_endpoint(self, who: Principal, cmd: CreateEndpoint) -> Endpoint:
        now = self._clock.now()
        endpoint = Endpoint(
            id=new_id(),
            tenant_id=who.tenant_id,
            url=check_url(cmd.url, allow_private=self._allow_private),
            description=cmd.description,
            event_types=self._event_types(cmd.event_types),
            enabled=cmd.enabled,
            secret=new_secret(),
            created_at=now,
            updated_at=now,
        )
        async with self._uow() as uow:
            await uow.endpoints.add(endpoint)
            await uow.commit()
        return endpoint

    async def get_endpoint(self, who: Principal, endpoint_id: uuid.UUID) -> Endpoint:
        async with self._uow() as uow:
            endpoint = await uow.endpoints.get(who.tenant_id, endpoint_id)
        if endpoint is None:
            raise EndpointNotFound
        return endpoint

    async def list_endpoints(self, who: Principal, page: PageRequest) -> Page[Endpoint]:
        async with self._uow() as uow:
            return await uow.endpoints.list(who.tenant_id, page)

    async def change_endpoint(self, who: Principal, endpoint_id: uuid.UUID, cmd: ChangeEndpoint) -> Endpoint:
        async with self._uow() as uow:
            endpoint = await uow.endpoints.get(who.tenant_id, endpoint_id)
            if endpoint is None:
                raise EndpointNotFound
            changed = endpoint
            if cmd.url is not None:
                changed = replace(changed, url=check_url(cmd.url, allow_private=self._allow_private))
            if cmd.event_types is not None:
                changed = replace(changed, event_types=self._event_types(cmd.event_types))
            if cmd.description is not None:
                changed = replace(changed, description=cmd.description)
            if cmd.enabled is not None and cmd.enabled != endpoint.enabled:
                # Re-enabling starts afresh: the reason and the failure streak belong to the past.
                reason = None if cmd.enabled else "Disabled by the tenant."
                changed = replace(changed, enabled=cmd.enabled, disabled_reason=reason, failing_since=None)
            if changed != endpoint:
                changed = replace(changed, updated_at=self._clock.now())
                await uow.endpoints.update(changed)
                await uow.commit()
        return changed

    async def delete_endpoint(self, who: Principal, endpoint_id: uuid.UUID) -> None:
        async with self._uow() as uow:
            if not await uow.endpoints.delete(who.tenant_id, endpoint_id):
                raise EndpointNotFound
            await uow.commit()

    async def rotate_secret(self, who: Principal, endpoint_id: uuid.UUID) -> Endpoint:
        async with self._uow() as uow:
            endpoint = await uow.endpoints.get(who.tenant_id, endpoint_id)
            if endpoint is None:
                raise EndpointNotFound
            rotated = endpoint.rotated(self._clock.now())
            await uow.endpoints.update(rotated)
            await uow.commit()
        return rotated

    # -- deliveries -----------------------------------------------------------------------------

    async def list_deliveries(self, who: Principal, endpoint_id: uuid.UUID, page: PageRequest) -> Page[DeliveryView]:
        async with self._uow() as uow:
            if await uow.endpoints.get(who.tenant_id, endpoint_id) is None:
                raise EndpointNotFound
            deliveries = await uow.deliveries.list(who.tenant_id, endpoint_id, page)
            attempts = await uow.attempts.for_deliveries(who.tenant_id, [d.id for d in deliveries.items])
        by_delivery: dict[uuid.UUID, list[Attempt]] = {}
        for a in attempts:
            by_delivery.setdefault(a.delivery_id, []).append(a)
        views = [DeliveryView(d, by_delivery.get(d.id, [])) for d in deliveries.items]
        return Page(items=views, next_after=deliveries.next_after)

    async def get_delivery(self, who: Principal, endpoint_id: uuid.UUID, delivery_id: uuid.UUID) -> DeliveryView:
        async with self._uow() as uow:
            delivery = await uow.deliveries.get(who.tenant_id, delivery_id)
            if delivery is None or delivery.endpoint_id != endpoint_id:
                raise DeliveryNotFound
            attempts = await uow.attempts.for_deliveries(who.tenant_id, [delivery.id])
        return DeliveryView(delivery, attempts)

    async def retry_delivery(self, who: Principal, endpoint_id: uuid.UUID, delivery_id: uuid.UUID) -> str:
        """Schedule one more attempt now; returns the job id."""
        now = self._clock.now()
        async with self._uow() as uow:
            delivery = await uow.deliveries.get(who.tenant_id, delivery_id)
            if delivery is None or delivery.endpoint_id != endpoint_id:
                raise DeliveryNotFound
            if delivery.status in (DeliveryStatus.PENDING, DeliveryStatus.SENDING):
                raise DeliveryInProgress
            await uow.deliveries.update(
                replace(
                    delivery,
                    status=DeliveryStatus.PENDING,
                    next_attempt_at=now,
                    attempt_budget=delivery.attempts + 1,
                    updated_at=now,
                )
            )
            await uow.commit()
        return await self._jobs.enqueue(
            DELIVER_JOB, {"tenant_id": str(who.tenant_id), "delivery_id": str(delivery_id)}, tenant_id=who.tenant_id
        )

    # -- jobs -----------------------------------------------------------------------------------

    async def fan_out(self, event: Event) -> int:
        """One delivery per subscribed endpoint, then one attempt job each. Safe to run again for the
        same event: deliveries are unique per (endpoint, event) and attempts are claimed."""
        fields = self._catalogue.get(event.type)
        if fields is None:
            return 0
        data = {k: event.data[k] for k in fields if k in event.data}
        body = json.dumps(payload_of(event.type, event.occurred_at, data), separators=(",", ":"), ensure_ascii=False)
        now = self._clock.now()
        async with self._uow() as uow:
            endpoints = await uow.endpoints.subscribed(event.tenant_id, event.type)
            if not endpoints:
                return 0  # the common case: a tenant without endpoints costs one query
            for endpoint in endpoints:
                # A delivery this event already has (an earlier run) is left as it is.
                await uow.deliveries.add(
                    Delivery(
                        id=new_id(),
                        tenant_id=event.tenant_id,
                        endpoint_id=endpoint.id,
                        event_id=event.id,
                        event_type=event.type,
                        payload=body,
                        status=DeliveryStatus.PENDING,
                        attempts=0,
                        next_attempt_at=now,
                        created_at=now,
                        updated_at=now,
                        attempt_budget=self._max_attempts,
                    )
                )
            await uow.commit()
            waiting = [
                d
                for d in await uow.deliveries.for_event(event.tenant_id, event.id)
                if d.status is DeliveryStatus.PENDING and d.attempts == 0
            ]
        for d in waiting:
            await self._enqueue_attempt(d, delay=0.0)
        return len(waiting)

    async def _enqueue_attempt(self, delivery: Delivery, delay: float) -> str:
        return await self._jobs.enqueue(
            DELIVER_JOB,
            {"tenant_id": str(delivery.tenant_id), "delivery_id": str(delivery.id)},
            tenant_id=delivery.tenant_id,
            delay=delay,
        )

    async def attempt(self, tenant_id: uuid.UUID, delivery_id: uuid.UUID, claimer: str) -> str:
        """Make one attempt of a delivery, if it is due and nobody else is making it; returns the outcome."""
        now = self._clock.now()
        async with self._uow() as uow:
            delivery = await uow.deliveries.claim(tenant_id, delivery_id, claimer, now, now - CLAIM_LEASE)
            endpoint = await uow.endpoints.get(tenant_id, delivery.endpoint_id) if delivery else None
            await uow.commit()
        if delivery is None:
            return "skipped"
        if endpoint is None or not endpoint.enabled:
            await self._finish_without_sending(delivery, "The endpoint is disabled.")
            return Outcome.GIVE_UP.value
        result = await self._sender.send(
            endpoint.url, message_id=str(delivery.id), body=delivery.payload, secrets=endpoint.signing_secrets(now)
        )
        attempts = delivery.attempts + 1
        verdict = outcome(result, attempts, delivery.attempt_budget)
        ended = self._clock.now()
        delay = retry_delay(attempts, result, self._rng, self._schedule) if verdict is Outcome.RETRY else 0.0
        status = {
            Outcome.SUCCEEDED: DeliveryStatus.SUCCEEDED,
            Outcome.RETRY: DeliveryStatus.PENDING,
        }.get(verdict, DeliveryStatus.FAILED)
        updated = replace(
            delivery,
            status=status,
            attempts=attempts,
            last_status_code=result.status_code,
            last_error=result.error,
            next_attempt_at=ended + timedelta(seconds=delay) if verdict is Outcome.RETRY else None,
            updated_at=ended,
        )
        async with self._uow() as uow:
            if not await uow.deliveries.finish(updated):
                # A newer run of this job took the delivery over (this worker was presumed dead):
                # its outcome stands; this one is dropped, with no retry of its own.
                return "superseded"
            await uow.attempts.add(
                Attempt(
                    id=new_id(),
                    delivery_id=delivery.id,
                    tenant_id=tenant_id,
                    number=attempts,
                    started_at=now,
                    latency_ms=result.latency_ms,
                    status_code=result.status_code,
                    error=result.error,
                )
            )
            current = await uow.endpoints.get(tenant_id, endpoint.id)
            if current is not None:
                health = self._endpoint_health(current, verdict, ended)
                if health != current:
                    await uow.endpoints.update(health)
            await uow.commit()
        if verdict is Outcome.RETRY:
            await self._enqueue_attempt(updated, delay)
        return verdict.value

    def _endpoint_health(self, endpoint: Endpoint, verdict: Outcome, now: datetime) -> Endpoint:
        if verdict is Outcome.SUCCEEDED:
            return replace(endpoint, failing_since=None) if endpoint.failing_since else endpoint
        if verdict is Outcome.GONE:
            return endpoint.disabled("The receiver answered 410 Gone.", now)
        failing_since = endpoint.failing_since or now
        if now - failing_since >= DISABLE_AFTER:
            return endpoint.disabled(f"No successful delivery since {failing_since.isoformat()}.", now)
        return endpoint if endpoint.failing_since else replace(endpoint, failing_since=now)

    async def _finish_without_sending(self, delivery: Delivery, reason: str) -> None:
        now = self._clock.now()
        async with self._uow() as uow:
            failed = replace(
                delivery, status=DeliveryStatus.FAILED, last_error=reason, next_attempt_at=None, updated_at=now
            )
            if await uow.deliveries.finish(failed):
                await uow.commit()

    async def requeue_overdue(self, limit: int = 500) -> int:
        """Safety net for attempts whose job was lost (queue outage, expired job): enqueue them again."""
        now = self._clock.now()
        async with self._uow() as uow:
            overdue = await uow.deliveries.overdue(now - OVERDUE_SLACK, now - CLAIM_LEASE, limit)
        for d in overdue:
            await self._enqueue_attempt(d, delay=0.0)
        return len(overdue)
