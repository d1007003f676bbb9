"""The webhooks use cases, driven through the in-memory fakes, a scripted sender and a manual clock.

Jobs are recorded, not run: a test "runs" a delivery job by calling ``attempt`` itself, when it wants,
which makes retries, leases and overdue scans deterministic.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from keel.contexts.webhooks.domain.commands import ChangeEndpoint, CreateEndpoint
from keel.contexts.webhooks.domain.errors import (
    DeliveryInProgress,
    DeliveryNotFound,
    EndpointNotFound,
    UnknownEventType,
    UnsafeUrl,
)
from keel.contexts.webhooks.domain.model import (
    CLAIM_LEASE,
    DISABLE_AFTER,
    MAX_ATTEMPTS,
    MAX_RETRY_AFTER,
    Delivery,
    DeliveryStatus,
    Endpoint,
)
from keel.contexts.webhooks.domain.services import (
    DELIVER_JOB,
    OVERDUE_SLACK,
    WebhooksService,
)
from keel.platform.domain.events import Event
from keel.platform.domain.ids import new_id
from keel.platform.domain.paging import PageRequest
from keel.platform.domain.tenancy import Principal
from tests.fakes.clock import ManualClock
from tests.fakes.webhooks import (
    FakeWebhookSender,
    InMemoryWebhooksUnitOfWork,
    RecordingJobQueue,
    WebhooksState,
    reply,
    webhooks_service,
)

START = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
SCHEDULE = (5.0, 60.0, 600.0)  # a short schedule: 4 attempts in all


@pytest.fixture
def state() -> WebhooksState:
    return WebhooksState()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
def sender() -> FakeWebhookSender:
    return FakeWebhookSender()


@pytest.fixture
def jobs() -> RecordingJobQueue:
    return RecordingJobQueue()


@pytest.fixture
def service(
    state: WebhooksState, clock: ManualClock, sender: FakeWebhookSender, jobs: RecordingJobQueue
) -> WebhooksService:
    return webhooks_service(state, clock, sender, jobs, retry_schedule=SCHEDULE)


def who(tenant_id: uuid.UUID | None = None) -> Principal:
    return Principal(tenant_id=tenant_id or new_id(), api_key_id=new_id())


ACME = who()
GLOBEX = who()


async def create(
    service: WebhooksService,
    *types: str,
    principal: Principal = ACME,
    url: str = "https://example.com/hooks",
    enabled: bool = True,
) -> Endpoint:
    return await service.create_endpoint(
        principal, CreateEndpoint(url=url, event_types=list(types or ["user.created"]), enabled=enabled)
    )


def user_created(tenant: Principal = ACME, at: datetime = START, **extra: object) -> Event:
    data = {"user_id": str(new_id()), "email": "zoe@acme.test", "name": "Zo\u00eb", "role": "member", **extra}
    return Event(type="user.created", tenant_id=tenant.tenant_id, occurred_at=at, data=data)


def deliveries(state: WebhooksState, endpoint: Endpoint | None = None) -> list[Delivery]:
    return sorted(
        (d for d in state.deliveries.values() if endpoint is None or d.endpoint_id == endpoint.id), key=lambda d: d.id
    )


def only(state: WebhooksState, endpoint: Endpoint | None = None) -> Delivery:
    found = deliveries(state, endpoint)
    assert len(found) == 1, found
    return found[0]


async def run_delivery_jobs(service: WebhooksService, jobs: RecordingJobQueue, claimer: str = "job") -> list[str]:
    """Run (and forget) every recorded delivery job, as a worker would once they are due."""
    pending, jobs.jobs = jobs.named(DELIVER_JOB), [j for j in jobs.jobs if j.name != DELIVER_JOB]
    return [
        await service.attempt(uuid.UUID(j.args["tenant_id"]), uuid.UUID(j.args["delivery_id"]), f"{claimer}-{j.id}")
        for j in pending
    ]


# -- endpoints --------------------------------------------------------------------------------------


async def test_create_endpoint_issues_a_secret_and_normalises_event_types(
    service: WebhooksService, state: WebhooksState
) -> None:
    e = await service.create_endpoint(
        ACME,
        CreateEndpoint(
            url="https://example.com/hooks",
            event_types=["user.deleted", "user.created", "user.deleted"],
            description="CRM sync",
        ),
    )
    assert e.secret.startswith("whsec_")
    assert e.event_types == ("user.created", "user.deleted")
    assert e.enabled
    assert e.tenant_id == ACME.tenant_id
    assert (e.created_at, e.updated_at) == (START, START)
    assert state.endpoints[e.id] == e
    assert await service.get_endpoint(ACME, e.id) == e
    other = await create(service)
    assert other.secret != e.secret


async def test_create_endpoint_rejects_unknown_types_and_unsafe_urls_without_storing(
    service: WebhooksService, state: WebhooksState
) -> None:
    with pytest.raises(UnknownEventType) as info:
        await create(service, "user.created", "user.exploded")
    assert info.value.pointer == "#/event_types/1"
    with pytest.raises(UnknownEventType):
        await create(service, "*")
    for url in ("http://example.com/x", "https://127.0.0.1/x", "https://10.0.0.1/x", "https://u:p@example.com/"):
        with pytest.raises(UnsafeUrl) as unsafe:
            await create(service, url=url)
        assert unsafe.value.pointer == "#/url"
    assert state.endpoints == {}


async def test_private_targets_are_accepted_when_allowed(
    state: WebhooksState, clock: ManualClock, sender: FakeWebhookSender, jobs: RecordingJobQueue
) -> None:
    lax = webhooks_service(state, clock, sender, jobs, allow_private=True)
    e = await create(lax, url="http://127.0.0.1:9000/hooks")
    assert e.url == "http://127.0.0.1:9000/hooks"


async def test_endpoints_are_invisible_to_other_tenants(service: WebhooksService) -> None:
    e = await create(service)
    with pytest.raises(EndpointNotFound):
        await service.get_endpoint(GLOBEX, e.id)
    with pytest.raises(EndpointNotFound):
        await service.change_endpoint(GLOBEX, e.id, ChangeEndpoint(description="pwned"))
    with pytest.raises(EndpointNotFound):
        await service.rotate_secret(GLOBEX, e.id)
    with pytest.raises(EndpointNotFound):
        await service.delete_endpoint(GLOBEX, e.id)
    with pytest.raises(EndpointNotFound):
        await service.list_deliveries(GLOBEX, e.id, PageRequest())
    assert (await service.list_endpoints(GLOBEX, PageRequest())).items == []
    assert await service.get_endpoint(ACME, e.id) == e


async def test_change_endpoint_applies_only_what_is_given(service: WebhooksService, clock: ManualClock) -> None:
    e = await create(service, "user.created")
    clock.advance(minutes=5)
    unchanged = await service.change_endpoint(ACME, e.id, ChangeEndpoint())
    assert unchanged == e
    changed = await service.change_endpoint(
        ACME, e.id, ChangeEndpoint(url="https://example.org/v2", event_types=["api_key.created"], description="v2")
    )
    assert (changed.url, changed.event_types, changed.description) == (
        "https://example.org/v2",
        ("api_key.created",),
        "v2",
    )
    assert changed.secret == e.secret
    assert changed.updated_at == START + timedelta(minutes=5)
    assert await service.get_endpoint(ACME, e.id) == changed
    with pytest.raises(UnsafeUrl):
        await service.change_endpoint(ACME, e.id, ChangeEndpoint(url="https://169.254.169.254/"))
    with pytest.raises(UnknownEventType):
        await service.change_endpoint(ACME, e.id, ChangeEndpoint(event_types=["nope"]))
    assert await service.get_endpoint(ACME, e.id) == changed


async def test_disabling_and_re_enabling_an_endpoint(
    service: WebhooksService, sender: FakeWebhookSender, jobs: RecordingJobQueue, clock: ManualClock
) -> None:
    e = await create(service)
    off = await service.change_endpoint(ACME, e.id, ChangeEndpoint(enabled=False))
    assert (off.enabled, off.disabled_reason) == (False, "Disabled by the tenant.")
    assert await service.fan_out(user_created()) == 0
    # Keel disabled it after a failure streak; re-enabling clears the reason and the streak.
    sender.answer(reply(500))
    on = await service.change_endpoint(ACME, e.id, ChangeEndpoint(enabled=True))
    assert (on.enabled, on.disabled_reason, on.failing_since) == (True, None, None)
    await service.fan_out(user_created())
    await run_delivery_jobs(service, jobs)
    assert (await service.get_endpoint(ACME, e.id)).failing_since == START
    clock.advance(hours=1)
    await service.change_endpoint(ACME, e.id, ChangeEndpoint(enabled=False))
    again = await service.change_endpoint(ACME, e.id, ChangeEndpoint(enabled=True))
    assert again.failing_since is None


async def test_list_endpoints_pages(service: WebhooksService) -> None:
    created = [await create(service) for _ in range(5)]
    await create(service, principal=GLOBEX)
    first = await service.list_endpoints(ACME, PageRequest(limit=3))
    rest = await service.list_endpoints(ACME, PageRequest(limit=3, after=first.next_after))
    assert [e.id for e in [*first.items, *rest.items]] == [e.id for e in created]
    assert rest.next_after is None


async def test_delete_endpoint_takes_its_history(
    service: WebhooksService, state: WebhooksState, jobs: RecordingJobQueue
) -> None:
    e = await create(service)
    await service.fan_out(user_created())
    await run_delivery_jobs(service, jobs)
    assert state.attempts
    await service.delete_endpoint(ACME, e.id)
    assert (state.endpoints, state.deliveries, state.attempts) == ({}, {}, {})
    with pytest.raises(EndpointNotFound):
        await service.delete_endpoint(ACME, e.id)


async def test_rotation_signs_with_both_secrets_for_24_hours(
    service: WebhooksService, sender: FakeWebhookSender, jobs: RecordingJobQueue, clock: ManualClock
) -> None:
    e = await create(service)
    clock.advance(hours=2)
    rotated = await service.rotate_secret(ACME, e.id)
    assert rotated.secret != e.secret
    assert rotated.previous_secret == e.secret
    assert rotated.previous_secret_expires_at == START + timedelta(hours=26)
    assert (await service.get_endpoint(ACME, e.id)).secret == rotated.secret

    await service.fan_out(user_created(at=clock.now()))
    await run_delivery_jobs(service, jobs)
    assert sender.sent[-1].secrets == (rotated.secret, e.secret)

    clock.advance(hours=23, minutes=59)
    await service.fan_out(user_created(at=clock.now()))
    await run_delivery_jobs(service, jobs)
    assert sender.sent[-1].secrets == (rotated.secret, e.secret)

    clock.advance(minutes=1)
    await service.fan_out(user_created(at=clock.now()))
    await run_delivery_jobs(service, jobs)
    assert sender.sent[-1].secrets == (rotated.secret,)


# -- fan-out ----------------------------------------------------------------------------------------


async def test_fan_out_makes_one_delivery_per_subscribed_endpoint_and_enqueues_its_attempt(
    service: WebhooksService, state: WebhooksState, jobs: RecordingJobQueue
) -> None:
    a = await create(service, "user.created")
    b = await create(service, "user.created", "user.deleted")
    await create(service, "user.deleted")
    await create(service, "user.created", enabled=False)
    await create(service, "user.created", principal=GLOBEX)
    event = user_created()
    assert await service.fan_out(event) == 2
    made = deliveries(state)
    assert {d.endpoint_id for d in made} == {a.id, b.id}
    for d in made:
        assert (d.status, d.attempts, d.next_attempt_at, d.event_id, d.tenant_id) == (
            DeliveryStatus.PENDING,
            0,
            START,
            event.id,
            ACME.tenant_id,
        )
        assert d.attempt_budget == 1 + len(SCHEDULE)
    assert sorted((j.args["delivery_id"], j.delay, j.tenant_id) for j in jobs.named(DELIVER_JOB)) == sorted(
        (str(d.id), 0.0, ACME.tenant_id) for d in made
    )
    # Every subscriber gets the very same bytes.
    assert len({d.payload for d in made}) == 1


async def test_fan_out_is_idempotent_for_the_same_event(
    service: WebhooksService, state: WebhooksState, jobs: RecordingJobQueue, sender: FakeWebhookSender
) -> None:
    await create(service)
    await create(service)
    event = user_created()
    assert await service.fan_out(event) == 2
    first = deliveries(state)
    # Published again (outbox at-least-once) before any attempt ran: no new delivery; the attempt jobs are
    # enqueued again, which is harmless because attempts are claimed.
    assert await service.fan_out(event) == 2
    assert deliveries(state) == first
    outcomes = await run_delivery_jobs(service, jobs)
    assert sorted(outcomes) == ["skipped", "skipped", "succeeded", "succeeded"]
    assert len(sender.sent) == 2
    # Once attempted, a re-run enqueues nothing at all.
    assert await service.fan_out(event) == 0
    assert jobs.named(DELIVER_JOB) == []
    assert len(state.deliveries) == 2


async def test_fan_out_reaches_an_endpoint_added_between_two_runs_of_the_same_event(
    service: WebhooksService, state: WebhooksState
) -> None:
    await create(service)
    event = user_created()
    await service.fan_out(event)
    late = await create(service)
    await service.fan_out(event)
    assert len(state.deliveries) == 2
    assert late.id in {d.endpoint_id for d in state.deliveries.values()}


@pytest.mark.parametrize("event_type", ["user.password_reset", "internal.cache_flushed", "*", ""])
async def test_unknown_event_types_are_ignored(
    service: WebhooksService, state: WebhooksState, jobs: RecordingJobQueue, event_type: str
) -> None:
    await create(service)
    event = Event(type=event_type, tenant_id=ACME.tenant_id, occurred_at=START, data={"user_id": "x"})
    assert await service.fan_out(event) == 0
    assert state.deliveries == {}
    assert jobs.jobs == []


async def test_payload_carries_only_the_public_fields_of_the_event(
    service: WebhooksService, state: WebhooksState
) -> None:
    await create(service, "api_key.created", "user.created")
    key_event = Event(
        type="api_key.created",
        tenant_id=ACME.tenant_id,
        occurred_at=datetime(2026, 1, 1, 12, 0, 0, 123456, tzinfo=UTC),
        data={
            "api_key_id": "k1",
            "name": "CI",
            "secret_hash": "deadbeef" * 8,
            "token": "keel_live_secret",
            "display_prefix": "keel_abc",
        },
    )
    await service.fan_out(key_event)
    body = only(state).payload
    payload = json.loads(body)
    assert payload == {
        "type": "api_key.created",
        "timestamp": "2026-01-01T12:00:00.123456+00:00",
        "data": {"api_key_id": "k1", "name": "CI"},
    }
    for secret in ("secret_hash", "deadbeef", "keel_live_secret", "display_prefix", "keel_abc"):
        assert secret not in body
    # The user payload keeps non-ASCII as is and drops what the catalogue does not list (role).
    user_event = user_created()
    await service.fan_out(user_event)
    user_body = next(d.payload for d in state.deliveries.values() if d.event_type == "user.created")
    assert json.loads(user_body)["data"] == {k: user_event.data[k] for k in ("user_id", "email", "name")}
    assert "Zo\u00eb" in user_body
    assert "role" not in user_body


async def test_a_missing_optional_field_is_left_out(service: WebhooksService, state: WebhooksState) -> None:
    await create(service, "user.updated")
    event = Event(type="user.updated", tenant_id=ACME.tenant_id, occurred_at=START, data={"user_id": "u1"})
    await service.fan_out(event)
    assert json.loads(only(state).payload)["data"] == {"user_id": "u1"}


# -- attempts ---------------------------------------------------------------------------------------


async def test_a_successful_attempt(
    service: WebhooksService, state: WebhooksState, sender: FakeWebhookSender, jobs: RecordingJobQueue
) -> None:
    e = await create(service)
    await service.fan_out(user_created())
    d = only(state)
    sender.answer(reply(204, latency_ms=31))
    assert await run_delivery_jobs(service, jobs) == ["succeeded"]
    assert sender.sent[0].url == e.url
    assert sender.sent[0].message_id == str(d.id)
    assert sender.sent[0].body == d.payload
    assert sender.sent[0].secrets == (e.secret,)
    done = only(state)
    assert (done.status, done.attempts, done.next_attempt_at, done.last_status_code, done.last_error) == (
        DeliveryStatus.SUCCEEDED,
        1,
        None,
        204,
        None,
    )
    view = await service.get_delivery(ACME, e.id, d.id)
    assert [(a.number, a.status_code, a.latency_ms, a.error, a.started_at) for a in view.attempts] == [
        (1, 204, 31, None, START)
    ]
    assert jobs.jobs == []
    # A finished delivery is not attempted again by a duplicate job.
    assert await service.attempt(ACME.tenant_id, d.id, "late-duplicate") == "skipped"
    assert len(sender.sent) == 1


async def test_failures_are_retried_on_schedule_with_the_same_message_until_success(
    service: WebhooksService,
    state: WebhooksState,
    sender: FakeWebhookSender,
    jobs: RecordingJobQueue,
    clock: ManualClock,
) -> None:
    e = await create(service)
    await service.fan_out(user_created())
    sender.answer(reply(500), reply(None, error="No response within 15s."), reply(200))
    assert await run_delivery_jobs(service, jobs) == ["retry"]
    d = only(state)
    assert (d.status, d.attempts, d.last_status_code, d.last_error) == (DeliveryStatus.PENDING, 1, 500, "HTTP 500")
    assert d.next_attempt_at is not None
    wait = (d.next_attempt_at - START).total_seconds()
    assert 5 * 0.8 <= wait <= 5 * 1.2
    [job] = jobs.named(DELIVER_JOB)
    assert job.delay == pytest.approx(wait)
    assert (await service.get_endpoint(ACME, e.id)).failing_since == START

    # The job fires early (clock skew, a duplicate): not due yet, nothing is sent.
    assert await service.attempt(ACME.tenant_id, d.id, "early") == "skipped"
    assert len(sender.sent) == 1

    clock.advance(seconds=wait)
    assert await run_delivery_jobs(service, jobs) == ["retry"]
    d = only(state)
    assert (d.attempts, d.last_status_code, d.last_error) == (2, None, "No response within 15s.")
    assert d.next_attempt_at is not None
    wait = (d.next_attempt_at - clock.now()).total_seconds()
    assert 60 * 0.8 <= wait <= 60 * 1.2

    clock.advance(seconds=wait)
    assert await run_delivery_jobs(service, jobs) == ["succeeded"]
    d = only(state)
    assert (d.status, d.attempts, d.next_attempt_at) == (DeliveryStatus.SUCCEEDED, 3, None)
    assert len({s.message_id for s in sender.sent}) == 1
    assert len({s.body for s in sender.sent}) == 1
    view = await service.get_delivery(ACME, e.id, d.id)
    assert [(a.number, a.status_code) for a in view.attempts] == [(1, 500), (2, None), (3, 200)]
    # Success ends the failure streak.
    assert (await service.get_endpoint(ACME, e.id)).failing_since is None


async def test_the_delivery_gives_up_when_the_schedule_is_exhausted(
    service: WebhooksService,
    state: WebhooksState,
    sender: FakeWebhookSender,
    jobs: RecordingJobQueue,
    clock: ManualClock,
) -> None:
    await create(service)
    await service.fan_out(user_created())
    sender.then = reply(503)
    verdicts: list[str] = []
    for _ in range(10):
        verdicts += await run_delivery_jobs(service, jobs)
        if not jobs.named(DELIVER_JOB):
            break
        clock.advance(hours=1)
    assert verdicts == ["retry", "retry", "retry", "give-up"]
    d = only(state)
    assert (d.status, d.attempts, d.next_attempt_at, d.last_status_code) == (DeliveryStatus.FAILED, 4, None, 503)
    assert len(sender.sent) == 4


async def test_the_default_schedule_makes_eight_attempts(
    state: WebhooksState, clock: ManualClock, sender: FakeWebhookSender, jobs: RecordingJobQueue
) -> None:
    service = webhooks_service(state, clock, sender, jobs)
    await create(service)
    await service.fan_out(user_created())
    sender.then = reply(500)
    for _ in range(20):
        await run_delivery_jobs(service, jobs)
        clock.advance(hours=12)
    assert len(sender.sent) == MAX_ATTEMPTS == 8
    assert only(state).status is DeliveryStatus.FAILED


@pytest.mark.parametrize(("status", "honoured"), [(429, True), (503, True), (500, False), (404, False)])
async def test_retry_after_sets_the_next_attempt_for_throttling_answers(
    service: WebhooksService,
    state: WebhooksState,
    sender: FakeWebhookSender,
    jobs: RecordingJobQueue,
    status: int,
    honoured: bool,
) -> None:
    await create(service)
    await service.fan_out(user_created())
    sender.answer(reply(status, retry_after=3600.0))
    assert await run_delivery_jobs(service, jobs) == ["retry"]
    d = only(state)
    assert d.next_attempt_at is not None
    wait = (d.next_attempt_at - START).total_seconds()
    if honoured:
        assert wait == 3600
    else:
        assert wait <= 6
    assert jobs.named(DELIVER_JOB)[0].delay == pytest.approx(wait)


async def test_a_huge_retry_after_is_capped(
    service: WebhooksService, state: WebhooksState, sender: FakeWebhookSender, jobs: RecordingJobQueue
) -> None:
    await create(service)
    await service.fan_out(user_created())
    sender.answer(reply(429, retry_after=10 * 365 * 86400.0))
    await run_delivery_jobs(service, jobs)
    assert only(state).next_attempt_at == START + timedelta(seconds=MAX_RETRY_AFTER)


async def test_a_refused_target_is_given_up_at_once(
    service: WebhooksService, state: WebhooksState, sender: FakeWebhookSender, jobs: RecordingJobQueue
) -> None:
    e = await create(service)
    await service.fan_out(user_created())
    sender.answer(reply(None, error="Target refused: private address.", refused=True))
    assert await run_delivery_jobs(service, jobs) == ["give-up"]
    d = only(state)
    assert (d.status, d.attempts, d.last_error) == (DeliveryStatus.FAILED, 1, "Target refused: private address.")
    assert jobs.jobs == []
    assert (await service.get_endpoint(ACME, e.id)).enabled


async def test_410_gone_fails_the_delivery_and_disables_the_endpoint(
    service: WebhooksService,
    state: WebhooksState,
    sender: FakeWebhookSender,
    jobs: RecordingJobQueue,
    clock: ManualClock,
) -> None:
    e = await create(service)
    await service.fan_out(user_created())
    sender.answer(reply(410))
    clock.advance(seconds=3)
    assert await run_delivery_jobs(service, jobs) == ["gone"]
    assert only(state).status is DeliveryStatus.FAILED
    gone = await service.get_endpoint(ACME, e.id)
    assert not gone.enabled
    assert gone.disabled_reason is not None
    assert "410" in gone.disabled_reason
    assert gone.updated_at == START + timedelta(seconds=3)
    # No more deliveries to it.
    assert await service.fan_out(user_created()) == 0
    assert len(sender.sent) == 1


async def test_an_endpoint_failing_for_five_days_is_disabled(
    service: WebhooksService,
    state: WebhooksState,
    sender: FakeWebhookSender,
    jobs: RecordingJobQueue,
    clock: ManualClock,
) -> None:
    e = await create(service)
    sender.then = reply(500)
    assert timedelta(days=5) == DISABLE_AFTER

    async def one_delivery() -> None:
        await service.fan_out(user_created(at=clock.now()))
        await run_delivery_jobs(service, jobs)
        jobs.clear()  # the retries are not the point here

    await one_delivery()
    assert (await service.get_endpoint(ACME, e.id)).failing_since == START
    clock.advance(days=4, hours=23)
    await one_delivery()
    still = await service.get_endpoint(ACME, e.id)
    assert (still.enabled, still.failing_since) == (True, START)
    clock.advance(hours=1)
    await one_delivery()
    off = await service.get_endpoint(ACME, e.id)
    assert not off.enabled
    assert off.disabled_reason is not None
    assert START.isoformat() in off.disabled_reason
    assert await service.fan_out(user_created()) == 0


async def test_a_success_resets_the_five_day_streak(
    service: WebhooksService, sender: FakeWebhookSender, jobs: RecordingJobQueue, clock: ManualClock
) -> None:
    e = await create(service)

    async def one_delivery(status: int) -> None:
        sender.answer(reply(status))
        await service.fan_out(user_created(at=clock.now()))
        await run_delivery_jobs(service, jobs)
        jobs.clear()

    await one_delivery(500)
    clock.advance(days=4)
    await one_delivery(200)
    assert (await service.get_endpoint(ACME, e.id)).failing_since is None
    clock.advance(days=2)
    await one_delivery(500)
    after = await service.get_endpoint(ACME, e.id)
    assert (after.enabled, after.failing_since) == (True, clock.now())


async def test_an_attempt_for_a_disabled_endpoint_fails_without_sending(
    service: WebhooksService, state: WebhooksState, sender: FakeWebhookSender, jobs: RecordingJobQueue
) -> None:
    e = await create(service)
    await service.fan_out(user_created())
    await service.change_endpoint(ACME, e.id, ChangeEndpoint(enabled=False))
    assert await run_delivery_jobs(service, jobs) == ["give-up"]
    d = only(state)
    assert (d.status, d.attempts, d.last_error) == (DeliveryStatus.FAILED, 0, "The endpoint is disabled.")
    assert sender.sent == []


async def test_an_attempt_for_a_deleted_endpoint_is_skipped(
    service: WebhooksService, state: WebhooksState, sender: FakeWebhookSender, jobs: RecordingJobQueue
) -> None:
    e = await create(service)
    await service.fan_out(user_created())
    await service.delete_endpoint(ACME, e.id)
    assert await run_delivery_jobs(service, jobs) == ["skipped"]
    assert sender.sent == []


async def test_an_attempt_of_another_tenant_is_skipped(
    service: WebhooksService, state: WebhooksState, sender: FakeWebhookSender
) -> None:
    await create(service)
    await service.fan_out(user_created())
    assert await service.attempt(GLOBEX.tenant_id, only(state).id, "job") == "skipped"
    assert sender.sent == []


async def test_a_duplicate_job_during_an_attempt_in_flight_sends_nothing(
    service: WebhooksService, state: WebhooksState, sender: FakeWebhookSender, jobs: RecordingJobQueue
) -> None:
    await create(service)
    await service.fan_out(user_created())
    d = only(state)
    seen: list[str] = []

    async def duplicate() -> None:
        seen.append(await service.attempt(ACME.tenant_id, d.id, "duplicate-job"))

    sender.during_send = duplicate
    assert await service.attempt(ACME.tenant_id, d.id, "first-job") == "succeeded"
    assert seen == ["skipped"]
    assert len(sender.sent) == 1


async def test_an_attempt_whose_worker_vanished_is_taken_over_after_the_lease(
    service: WebhooksService,
    state: WebhooksState,
    sender: FakeWebhookSender,
    clock: ManualClock,
    jobs: RecordingJobQueue,
) -> None:
    await create(service)
    await service.fan_out(user_created())
    d = only(state)
    # A worker claimed it and died before recording anything.
    async with InMemoryWebhooksUnitOfWork(state) as u:
        assert await u.deliveries.claim(ACME.tenant_id, d.id, "dead-job", START, START - CLAIM_LEASE) is not None
        await u.commit()
    clock.advance(seconds=30)
    assert await service.attempt(ACME.tenant_id, d.id, "other-job") == "skipped"
    # The same job, retried by the queue, carries on at once.
    assert await service.attempt(ACME.tenant_id, d.id, "dead-job") == "succeeded"
    assert len(sender.sent) == 1

    await service.fan_out(user_created())
    d2 = next(x for x in deliveries(state) if x.status is DeliveryStatus.PENDING)
    async with InMemoryWebhooksUnitOfWork(state) as u:
        assert await u.deliveries.claim(ACME.tenant_id, d2.id, "dead-job-2", clock.now(), clock.now()) is not None
        await u.commit()
    clock.advance(seconds=61)
    assert await service.attempt(ACME.tenant_id, d2.id, "rescuer") == "succeeded"
    assert len(sender.sent) == 2
    assert [a.number for a in (await service.get_delivery(ACME, d2.endpoint_id, d2.id)).attempts] == [1]


# -- delivery history and manual retries --------------------------------------------------------------


async def test_delivery_history_is_newest_first_with_attempts(
    service: WebhooksService, sender: FakeWebhookSender, jobs: RecordingJobQueue, clock: ManualClock
) -> None:
    e = await create(service)
    sender.answer(reply(500), reply(200))
    events = [user_created() for _ in range(3)]
    for ev in events:
        await service.fan_out(ev)
        await run_delivery_jobs(service, jobs)
    page = await service.list_deliveries(ACME, e.id, PageRequest(limit=2))
    rest = await service.list_deliveries(ACME, e.id, PageRequest(limit=2, after=page.next_after))
    views = [*page.items, *rest.items]
    assert [v.delivery.event_id for v in views] == [ev.id for ev in reversed(events)]
    assert rest.next_after is None
    assert [len(v.attempts) for v in views] == [1, 1, 1]
    assert views[-1].attempts[0].status_code == 500


async def test_get_delivery_needs_the_right_endpoint_and_tenant(service: WebhooksService, state: WebhooksState) -> None:
    e = await create(service)
    other = await create(service)
    await service.fan_out(Event(type="user.deleted", tenant_id=ACME.tenant_id, occurred_at=START, data={}))
    await service.fan_out(user_created())
    d = only(state, e)
    assert (await service.get_delivery(ACME, e.id, d.id)).id == d.id
    with pytest.raises(DeliveryNotFound):
        await service.get_delivery(ACME, other.id, d.id)
    with pytest.raises(DeliveryNotFound):
        await service.get_delivery(GLOBEX, e.id, d.id)
    with pytest.raises(DeliveryNotFound):
        await service.get_delivery(ACME, e.id, new_id())


async def test_manual_retry_is_refused_while_an_attempt_is_pending(
    service: WebhooksService, state: WebhooksState, sender: FakeWebhookSender, jobs: RecordingJobQueue
) -> None:
    e = await create(service)
    await service.fan_out(user_created())
    d = only(state)
    with pytest.raises(DeliveryInProgress):
        await service.retry_delivery(ACME, e.id, d.id)
    sender.answer(reply(500))
    await run_delivery_jobs(service, jobs)
    assert only(state).status is DeliveryStatus.PENDING
    with pytest.raises(DeliveryInProgress):
        await service.retry_delivery(ACME, e.id, d.id)


async def test_manual_retry_of_a_failed_delivery_makes_exactly_one_more_attempt(
    service: WebhooksService,
    state: WebhooksState,
    sender: FakeWebhookSender,
    jobs: RecordingJobQueue,
    clock: ManualClock,
) -> None:
    e = await create(service)
    await service.fan_out(user_created())
    sender.answer(reply(None, error="refused", refused=True))
    await run_delivery_jobs(service, jobs)
    failed = only(state)
    assert (failed.status, failed.attempts) == (DeliveryStatus.FAILED, 1)

    clock.advance(minutes=10)
    job_id = await service.retry_delivery(ACME, e.id, failed.id)
    [job] = jobs.named(DELIVER_JOB)
    assert job.id == job_id
    assert job.args == {"tenant_id": str(ACME.tenant_id), "delivery_id": str(failed.id)}
    assert job.tenant_id == ACME.tenant_id
    queued = only(state)
    assert (queued.status, queued.attempt_budget, queued.next_attempt_at) == (
        DeliveryStatus.PENDING,
        2,
        clock.now(),
    )
    # A retry while that one is waiting is a conflict.
    with pytest.raises(DeliveryInProgress):
        await service.retry_delivery(ACME, e.id, failed.id)

    # It fails again: no automatic retries follow a manual one.
    sender.answer(reply(500))
    assert await run_delivery_jobs(service, jobs) == ["give-up"]
    again = only(state)
    assert (again.status, again.attempts) == (DeliveryStatus.FAILED, 2)
    assert jobs.jobs == []

    # Once more, and this time it works.
    await service.retry_delivery(ACME, e.id, failed.id)
    assert await run_delivery_jobs(service, jobs) == ["succeeded"]
    done = only(state)
    assert (done.status, done.attempts, done.attempt_budget) == (DeliveryStatus.SUCCEEDED, 3, 3)
    view = await service.get_delivery(ACME, e.id, failed.id)
    assert [(a.number, a.status_code) for a in view.attempts] == [(1, None), (2, 500), (3, 200)]
    assert len({s.message_id for s in sender.sent}) == 1


async def test_a_succeeded_delivery_can_be_sent_again(
    service: WebhooksService, state: WebhooksState, sender: FakeWebhookSender, jobs: RecordingJobQueue
) -> None:
    e = await create(service)
    await service.fan_out(user_created())
    await run_delivery_jobs(service, jobs)
    d = only(state)
    await service.retry_delivery(ACME, e.id, d.id)
    assert await run_delivery_jobs(service, jobs) == ["succeeded"]
    assert only(state).attempts == 2
    assert len(sender.sent) == 2


async def test_manual_retry_needs_the_right_endpoint_and_tenant(
    service: WebhooksService, state: WebhooksState, jobs: RecordingJobQueue
) -> None:
    e = await create(service)
    other = await create(service, "user.deleted")
    await service.fan_out(user_created())
    await run_delivery_jobs(service, jobs)
    d = only(state)
    for principal, endpoint_id, delivery_id in [
        (GLOBEX, e.id, d.id),
        (ACME, other.id, d.id),
        (ACME, e.id, new_id()),
    ]:
        with pytest.raises(DeliveryNotFound):
            await service.retry_delivery(principal, endpoint_id, delivery_id)
    assert jobs.jobs == []
    assert only(state) == d


async def test_requeue_overdue_enqueues_lost_attempts_only(
    service: WebhooksService,
    state: WebhooksState,
    sender: FakeWebhookSender,
    jobs: RecordingJobQueue,
    clock: ManualClock,
) -> None:
    await create(service)
    await create(service, principal=GLOBEX)
    lost = user_created()
    lost_elsewhere = user_created(GLOBEX)
    await service.fan_out(lost)
    await service.fan_out(lost_elsewhere)
    jobs.clear()  # the queue lost these jobs
    assert await service.requeue_overdue() == 0  # due, but not overdue yet

    clock.advance(seconds=OVERDUE_SLACK.total_seconds() + 1)
    fresh = user_created()
    await service.fan_out(fresh)  # due now: its job is on its way
    jobs.clear()
    assert await service.requeue_overdue() == 2
    requeued = {j.args["delivery_id"] for j in jobs.named(DELIVER_JOB)}
    assert requeued == {str(d.id) for d in deliveries(state) if d.event_id in (lost.id, lost_elsewhere.id)}
    assert all(j.delay == 0 for j in jobs.jobs)
    assert {j.tenant_id for j in jobs.jobs} == {ACME.tenant_id, GLOBEX.tenant_id}

    # Running them (and a duplicate of one) delivers each once.
    jobs.jobs.append(jobs.jobs[0])
    outcomes = await run_delivery_jobs(service, jobs)
    assert sorted(outcomes) == ["skipped", "succeeded", "succeeded"]

    # An attempt stuck in "sending" (its worker died) is requeued once its lease is over.
    fresh_delivery = next(d for d in deliveries(state) if d.event_id == fresh.id)
    async with InMemoryWebhooksUnitOfWork(state) as u:
        await u.deliveries.claim(ACME.tenant_id, fresh_delivery.id, "dead", clock.now(), clock.now())
        await u.commit()
    jobs.clear()
    assert await service.requeue_overdue() == 0
    clock.advance(seconds=CLAIM_LEASE.total_seconds() + 1)
    assert await service.requeue_overdue() == 1
    assert await run_delivery_jobs(service, jobs) == ["succeeded"]
    assert len(sender.sent) == 3


async def test_event_types_are_the_catalogue(service: WebhooksService) -> None:
    assert service.event_types == sorted(service.event_types)
    assert "user.created" in service.event_types
    assert "api_key.created" in service.event_types


def test_an_empty_retry_schedule_is_refused(
    state: WebhooksState, clock: ManualClock, sender: FakeWebhookSender, jobs: RecordingJobQueue
) -> None:
    with pytest.raises(ValueError, match="at least one"):
        webhooks_service(state, clock, sender, jobs, retry_schedule=())
