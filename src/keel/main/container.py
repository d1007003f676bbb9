"""The composition root's object graph: adapters chosen by settings, services wired to ports."""

from __future__ import annotations

from dataclasses import dataclass, field

from loguru import logger
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from keel.contexts.accounts.adapters.sql.repositories import SqlAccountsUnitOfWork
from keel.contexts.accounts.domain import caching as accounts_caching
from keel.contexts.accounts.domain.services import AccountsService
from keel.main.health import HealthProbe
from keel.main.rate_limit import RateLimitStats
from keel.main.settings import Settings
from keel.platform.adapters.clock import SystemClock
from keel.platform.adapters.limits_rate_limiter import LimitsRateLimiter
from keel.platform.adapters.memory.cache import InMemoryCache
from keel.platform.adapters.memory.idempotency import InMemoryIdempotencyStore
from keel.platform.adapters.redis.cache import RedisCache
from keel.platform.adapters.redis.health import RedisHealthCheck
from keel.platform.adapters.redis.idempotency import RedisIdempotencyStore
from keel.platform.adapters.sql.engine import create_engine, session_factory
from keel.platform.adapters.sql.health import SqlHealthCheck
from keel.platform.adapters.sql.outbox import OutboxSweeper, SqlOutboxRelay
from keel.platform.cache import ReadThroughCache
from keel.platform.domain.events import ANY_EVENT, Event, EventDispatcher
from keel.platform.ports.cache import Cache
from keel.platform.ports.clock import Clock
from keel.platform.ports.health import HealthCheck
from keel.platform.ports.idempotency import IdempotencyStore
from keel.platform.ports.rate_limit import RateLimiter


@dataclass
class Container:
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    clock: Clock
    events: EventDispatcher
    relay: SqlOutboxRelay
    sweeper: OutboxSweeper
    cache: ReadThroughCache
    limiter: RateLimiter
    rate_limit_stats: RateLimitStats
    idempotency: IdempotencyStore
    accounts: AccountsService
    health: HealthProbe
    redis: Redis | None = None
    _closed: bool = field(default=False, repr=False)

    async def start(self) -> None:
        self.sweeper.start()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.sweeper.stop()
        if self.redis is not None:
            await self.redis.aclose()
        await self.engine.dispose()


def _log_cache_error(op: str, exc: Exception) -> None:
    logger.warning("cache {} failed, reading the database instead for a moment: {!r}", op, exc)


def subscribe_cache_invalidation(events: EventDispatcher, cache: ReadThroughCache) -> None:
    """Mutations invalidate through events; each context says which of its keys an event touches."""

    async def invalidate(event: Event) -> None:
        await cache.invalidate(*accounts_caching.keys_to_invalidate(event))

    events.subscribe(ANY_EVENT, invalidate)


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
    store: Cache
    limiter: RateLimiter
    idempotency: IdempotencyStore
    if settings.redis_url is not None:
        redis = Redis.from_url(
            settings.redis_url,
            socket_connect_timeout=settings.health_timeout,
            socket_timeout=settings.redis_timeout,
            health_check_interval=15,
        )
        checks.append(RedisHealthCheck(redis))
        store = RedisCache(redis)
        limiter = LimitsRateLimiter.redis(settings.redis_url, settings.redis_timeout)
        idempotency = RedisIdempotencyStore(redis)
    else:
        store = InMemoryCache(clock)
        limiter = LimitsRateLimiter.in_memory()
        idempotency = InMemoryIdempotencyStore()
    cache = ReadThroughCache(store, on_error=_log_cache_error, enabled=settings.cache_enabled)

    events = EventDispatcher()
    relay = SqlOutboxRelay(sessions, events, clock)

    subscribe_cache_invalidation(events, cache)

    accounts = AccountsService(lambda: SqlAccountsUnitOfWork(sessions, relay), clock, cache)
    return Container(
        settings=settings,
        engine=engine,
        sessions=sessions,
        clock=clock,
        events=events,
        relay=relay,
        sweeper=OutboxSweeper(relay),
        cache=cache,
        limiter=limiter,
        rate_limit_stats=RateLimitStats(),
        idempotency=idempotency,
        accounts=accounts,
        health=HealthProbe(checks, settings.health_timeout),
        redis=redis,
    )
