"""The composition root's object graph: adapters chosen by settings, services wired to ports."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import redis as redis_sync
from loguru import logger
from opentelemetry.trace import TracerProvider
from redis.asyncio import Redis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from keel.contexts.accounts.adapters.sql.repositories import SqlAccountsUnitOfWork
from keel.contexts.accounts.domain import caching as accounts_caching
from keel.contexts.accounts.domain.services import AccountsService
from keel.contexts.accounts.public import PUBLIC_EVENTS as ACCOUNT_EVENTS
from keel.contexts.accounts.public import AccountsDirectory
from keel.contexts.analytics.adapters import jobs as analytics_jobs
from keel.contexts.analytics.adapters.http.request_counting import RequestCounter
from keel.contexts.analytics.adapters.memory.tally import InMemoryRequestTally
from keel.contexts.analytics.adapters.redis.tally import RedisRequestTally
from keel.contexts.analytics.adapters.sql.repositories import SqlAnalyticsUnitOfWork
from keel.contexts.analytics.domain.services import TRIGGERS as ANALYTICS_TRIGGERS
from keel.contexts.analytics.domain.services import AnalyticsService
from keel.contexts.analytics.ports.tally import RequestTally
from keel.contexts.media.adapters import jobs as media_jobs
from keel.contexts.media.adapters.filesystem_blobs import FilesystemBlobStore
from keel.contexts.media.adapters.pillow_images import PillowImageProcessor
from keel.contexts.media.adapters.sql.repositories import SqlMediaUnitOfWork
from keel.contexts.media.domain.services import TRIGGERS as MEDIA_TRIGGERS
from keel.contexts.media.domain.services import MediaService
from keel.contexts.notifications.adapters import jobs as notifications_jobs
from keel.contexts.notifications.adapters.mailers import FileMailer, SmtpMailer
from keel.contexts.notifications.adapters.sql.repositories import SqlNotificationsUnitOfWork
from keel.contexts.notifications.adapters.templates import JinjaTemplateRenderer
from keel.contexts.notifications.domain.services import SEND_JOB, TRIGGERS, NotificationsService
from keel.contexts.notifications.ports.repositories import Mailer
from keel.contexts.payments.adapters import jobs as payments_jobs
from keel.contexts.payments.adapters.sql.repositories import SqlPaymentsUnitOfWork
from keel.contexts.payments.adapters.sql.sandbox import SandboxPaymentProvider
from keel.contexts.payments.adapters.stripe_provider import StripePaymentProvider
from keel.contexts.payments.domain import caching as payments_caching
from keel.contexts.payments.domain.services import TRIGGERS as PAYMENT_TRIGGERS
from keel.contexts.payments.domain.services import PaymentsService
from keel.contexts.payments.ports.provider import PaymentProvider
from keel.contexts.payments.public import PUBLIC_EVENTS as PAYMENT_EVENTS
from keel.contexts.payments.public import PaymentsDirectory
from keel.contexts.webhooks.adapters import jobs as webhooks_jobs
from keel.contexts.webhooks.adapters.httpx_sender import HttpxWebhookSender
from keel.contexts.webhooks.adapters.sql.repositories import SqlWebhooksUnitOfWork
from keel.contexts.webhooks.domain.services import FAN_OUT_JOB, WebhooksService
from keel.main.health import HealthProbe
from keel.main.rate_limit import RateLimitStats
from keel.main.settings import Settings
from keel.platform.adapters.clock import SystemClock
from keel.platform.adapters.jobs.execution import JobRegistry
from keel.platform.adapters.jobs.in_process import InProcessJobQueue
from keel.platform.adapters.jobs.rq_queue import RqJobQueue
from keel.platform.adapters.limits_rate_limiter import LimitsRateLimiter
from keel.platform.adapters.memory.cache import InMemoryCache
from keel.platform.adapters.memory.idempotency import InMemoryIdempotencyStore
from keel.platform.adapters.redis.cache import RedisCache
from keel.platform.adapters.redis.health import RedisHealthCheck
from keel.platform.adapters.redis.idempotency import RedisIdempotencyStore
from keel.platform.adapters.redis.rate_limiter import RedisRateLimiter
from keel.platform.adapters.redis.tracked_cache import TrackedRedisCache
from keel.platform.adapters.sql.engine import create_engine, session_factory
from keel.platform.adapters.sql.health import SqlHealthCheck
from keel.platform.adapters.sql.outbox import SqlOutboxRelay, outbox_jobs
from keel.platform.cache import ReadThroughCache
from keel.platform.domain.events import ANY_EVENT, Event, EventDispatcher, event_job_id, event_to_args
from keel.platform.ports.cache import Cache
from keel.platform.ports.clock import Clock
from keel.platform.ports.health import HealthCheck
from keel.platform.ports.idempotency import IdempotencyStore
from keel.platform.ports.jobs import JobQueue, PeriodicJob
from keel.platform.ports.rate_limit import RateLimiter


@dataclass
class Container:
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    clock: Clock
    events: EventDispatcher
    relay: SqlOutboxRelay
    job_registry: JobRegistry
    jobs: JobQueue
    periodic: list[PeriodicJob]
    cache: ReadThroughCache
    limiter: RateLimiter
    rate_limit_stats: RateLimitStats
    idempotency: IdempotencyStore
    accounts: AccountsService
    webhooks: WebhooksService
    notifications: NotificationsService
    payments: PaymentsService
    media: MediaService
    analytics: AnalyticsService
    request_counter: RequestCounter
    health: HealthProbe
    webhook_sender: HttpxWebhookSender
    payment_provider: PaymentProvider
    redis: Redis | None = None
    redis_sync: redis_sync.Redis | None = None
    # The in-process tier of the Redis cache: off (every read goes to Redis) until start() turns its
    # key tracking on, so workers and one-shot commands never hold entries they would not hear about.
    local_cache: TrackedRedisCache | None = None
    _closed: bool = field(default=False, repr=False)

    def trace_jobs(self, provider: TracerProvider) -> None:
        """Jobs run in this process (the embedded default) report their spans to the app's provider."""
        if isinstance(self.jobs, InProcessJobQueue):
            self.jobs.tracer_provider = provider

    async def start(self) -> None:
        """Background work of an API process: the embedded default runs jobs (and their periodic
        schedule) here; with Redis, ``keel worker`` and ``keel cron`` do."""
        if isinstance(self.jobs, InProcessJobQueue):
            self.jobs.start()
        self.request_counter.start()
        if self.local_cache is not None:
            self.local_cache.start()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.request_counter.stop()  # the last second's counts reach the tally
        if isinstance(self.jobs, InProcessJobQueue):
            # The embedded tally lives in this process: store it now rather than lose it with the process.
            try:
                await self.analytics.flush_requests()
            except Exception as exc:  # noqa: BLE001 - shutting down regardless
                logger.warning("request counts not stored at shutdown: {!r}", exc)
        if isinstance(self.jobs, InProcessJobQueue):
            await self.jobs.stop()
        await self.webhook_sender.aclose()
        if self.local_cache is not None:
            await self.local_cache.stop()
        if isinstance(self.payment_provider, StripePaymentProvider):
            await self.payment_provider.aclose()
        if self.redis is not None:
            await self.redis.aclose()
        if self.redis_sync is not None:
            self.redis_sync.close()
        await self.engine.dispose()


def _log_cache_error(op: str, exc: Exception) -> None:
    logger.warning("cache {} failed, reading the database instead for a moment: {!r}", op, exc)


def subscribe_cache_invalidation(events: EventDispatcher, cache: ReadThroughCache) -> None:
    """Mutations invalidate through events; each context says which of its keys an event touches."""

    async def invalidate(event: Event) -> None:
        keys = [*accounts_caching.keys_to_invalidate(event), *payments_caching.keys_to_invalidate(event)]
        if keys:
            await cache.invalidate(*keys)

    events.subscribe(ANY_EVENT, invalidate)


# Every event a webhook may carry, with the fields of its data that may leave Keel.
PUBLIC_EVENTS = {**ACCOUNT_EVENTS, **PAYMENT_EVENTS}


def _payment_provider(settings: Settings, sessions: async_sessionmaker[AsyncSession], clock: Clock) -> PaymentProvider:
    if settings.payments_provider == "stripe":
        assert settings.stripe_secret_key is not None  # checked with the settings
        return StripePaymentProvider(str(settings.stripe_secret_key), api_base=settings.stripe_api_base)
    return SandboxPaymentProvider(sessions, clock, latency=settings.payments_sandbox_latency)


def subscribe_jobs(events: EventDispatcher, jobs: JobQueue) -> None:
    """Events that owe slow work become jobs. The job id is derived from the event, so an event the
    outbox publishes twice still makes one job."""

    def enqueue(job_name: str) -> Callable[[Event], Awaitable[None]]:
        async def handler(event: Event) -> None:
            job_id = event_job_id(event.id, job_name)
            await jobs.enqueue(job_name, {"event": event_to_args(event)}, tenant_id=event.tenant_id, job_id=job_id)

        return handler

    for event_type in PUBLIC_EVENTS:
        events.subscribe(event_type, enqueue(FAN_OUT_JOB))
    for event_type in TRIGGERS:
        events.subscribe(event_type, enqueue(SEND_JOB))
    for event_type, job_name in {**PAYMENT_TRIGGERS, **MEDIA_TRIGGERS}.items():
        events.subscribe(event_type, enqueue(job_name))


def build_container(settings: Settings, *, clock: Clock | None = None) -> Container:
    if settings.is_embedded_db:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        settings.database_url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_timeout=settings.db_pool_timeout,
    )
    sessions = session_factory(engine)
    clock = clock or SystemClock()
    checks: list[HealthCheck] = [SqlHealthCheck(engine, "sqlite" if settings.is_embedded_db else "postgres")]

    redis: Redis | None = None
    local_cache: TrackedRedisCache | None = None
    store: Cache
    tally: RequestTally
    limiter: RateLimiter
    idempotency: IdempotencyStore
    if settings.redis_url is not None:
        redis = Redis.from_url(
            settings.redis_url,
            socket_connect_timeout=settings.health_timeout,
            socket_timeout=settings.redis_timeout,
            health_check_interval=15,
            # After Redis restarts, every pooled connection is dead and fails its next command once:
            # retry that once on a fresh connection rather than answer 503 with Redis already back.
            retry=AsyncRetry(NoBackoff(), 1),
            retry_on_error=[RedisConnectionError],
        )
        checks.append(RedisHealthCheck(redis))
        if settings.cache_local_mb > 0:
            local_cache = TrackedRedisCache(
                redis,
                settings.redis_url,
                max_bytes=settings.cache_local_mb * 1024 * 1024,
                connect_timeout=settings.health_timeout,
            )
            store = local_cache
        else:
            store = RedisCache(redis)
        limiter = RedisRateLimiter(redis)
        idempotency = RedisIdempotencyStore(redis)
        tally = RedisRequestTally(redis)
    else:
        store = InMemoryCache(clock)
        limiter = LimitsRateLimiter.in_memory()
        idempotency = InMemoryIdempotencyStore()
        tally = InMemoryRequestTally()
    cache = ReadThroughCache(store, on_error=_log_cache_error, enabled=settings.cache_enabled)

    events = EventDispatcher()
    relay = SqlOutboxRelay(sessions, events, clock)
    subscribe_cache_invalidation(events, cache)

    registry = JobRegistry()
    jobs: JobQueue
    sync_redis: redis_sync.Redis | None = None
    if settings.redis_url is not None:
        sync_redis = redis_sync.Redis.from_url(
            settings.redis_url,
            socket_connect_timeout=settings.health_timeout,
            socket_timeout=settings.redis_timeout,
            retry=Retry(NoBackoff(), 1),
            retry_on_error=[RedisConnectionError],
        )
        jobs = RqJobQueue(sync_redis, registry)
    else:
        jobs = InProcessJobQueue(registry, clock, concurrency=settings.jobs_concurrency)
    subscribe_jobs(events, jobs)

    accounts = AccountsService(lambda: SqlAccountsUnitOfWork(sessions, relay), clock, cache)
    sender = HttpxWebhookSender(allow_private=settings.webhooks_allow_private)
    webhooks = WebhooksService(
        lambda: SqlWebhooksUnitOfWork(sessions, relay),
        jobs,
        clock,
        sender,
        PUBLIC_EVENTS,
        allow_private=settings.webhooks_allow_private,
        retry_schedule=settings.webhooks_retry_schedule,
    )
    mailer: Mailer = (
        SmtpMailer(settings.smtp_url, settings.mail_from)
        if settings.smtp_url
        else FileMailer(settings.data_dir / "mail", settings.mail_from)
    )
    provider = _payment_provider(settings, sessions, clock)
    payments = PaymentsService(lambda: SqlPaymentsUnitOfWork(sessions, relay), provider, jobs, clock, cache)
    directory = AccountsDirectory(accounts)
    media = MediaService(
        lambda: SqlMediaUnitOfWork(sessions, relay),
        FilesystemBlobStore(settings.data_dir / "blobs"),
        PillowImageProcessor(max_pixels=settings.media_max_pixels),
        directory,
        directory,
        clock,
    )
    analytics = AnalyticsService(
        lambda: SqlAnalyticsUnitOfWork(sessions, relay),
        PaymentsDirectory(payments),
        directory,
        tally,
        jobs,
        cache,
        clock,
    )
    for event_type in ANALYTICS_TRIGGERS:
        events.subscribe(event_type, analytics.on_event)
    notifications = NotificationsService(
        lambda: SqlNotificationsUnitOfWork(sessions, relay),
        mailer,
        JinjaTemplateRenderer(),
        directory,
        PaymentsDirectory(payments),
        clock,
    )

    outbox_specs, outbox_periodic = outbox_jobs(relay)
    registry.register(
        *outbox_specs,
        *webhooks_jobs.job_specs(webhooks),
        *notifications_jobs.job_specs(notifications),
        *payments_jobs.job_specs(payments),
        *media_jobs.job_specs(media),
        *analytics_jobs.job_specs(analytics),
    )
    periodic = [*outbox_periodic, *webhooks_jobs.PERIODIC, *payments_jobs.PERIODIC, *analytics_jobs.PERIODIC]
    if isinstance(jobs, InProcessJobQueue):
        jobs.set_periodic(periodic)

    return Container(
        settings=settings,
        engine=engine,
        sessions=sessions,
        clock=clock,
        events=events,
        relay=relay,
        job_registry=registry,
        jobs=jobs,
        periodic=periodic,
        cache=cache,
        limiter=limiter,
        rate_limit_stats=RateLimitStats(),
        idempotency=idempotency,
        accounts=accounts,
        webhooks=webhooks,
        notifications=notifications,
        payments=payments,
        media=media,
        analytics=analytics,
        request_counter=RequestCounter(tally, clock),
        health=HealthProbe(checks, settings.health_timeout),
        webhook_sender=sender,
        payment_provider=provider,
        redis=redis,
        redis_sync=sync_redis,
        local_cache=local_cache,
    )
