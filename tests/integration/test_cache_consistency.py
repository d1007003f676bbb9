"""Caching across API processes: a change made through one instance is visible through every other on the
very next request, because invalidation goes through the shared Redis right after commit; Redis going
away degrades to database reads (never errors) and its return is picked up without a restart.

Each "instance" is a full app with its own container (engine, Redis clients, ReadThroughCache); all share
one Postgres database and one Redis. SQL statements are counted per instance, so the tests prove that
reads are really served from the cache before checking that they are not stale.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy import event

from keel.main.container import Container
from keel.main.settings import Settings
from tests.support.app import client_for, make_settings, signup
from tests.support.servers import RedisServer


class Instance:
    """One API process, with the SQL it runs recorded."""

    def __init__(self, client: AsyncTestClient[Litestar]) -> None:
        self.client = client
        self.container: Container = client.app.state["container"]
        self.sql: list[str] = []
        event.listen(self.container.engine.sync_engine, "before_cursor_execute", self._record)

    def _record(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        self.sql.append(statement)

    async def request(self, method: str, path: str, headers: dict[str, str], **kw: Any) -> tuple[httpx.Response, int]:
        """The response, and how many SQL statements this instance ran to produce it."""
        before = len(self.sql)
        r = await self.client.request(method, path, headers=headers, **kw)
        return r, len(self.sql) - before

    async def get(self, path: str, headers: dict[str, str]) -> tuple[httpx.Response, int]:
        return await self.request("GET", path, headers)

    @property
    def hits(self) -> int:
        return self.container.cache.stats.hits


@asynccontextmanager
async def instances(settings: Settings, n: int = 2) -> AsyncIterator[list[Instance]]:
    async with AsyncExitStack() as stack:
        yield [Instance(await stack.enter_async_context(client_for(settings))) for _ in range(n)]


def shared(pg_url: str, redis_url: str, tmp_path: Path) -> Settings:
    return make_settings(
        pg_url, tmp_path, KEEL_REDIS_URL=redis_url, KEEL_REDIS_TIMEOUT="0.3", KEEL_HEALTH_TIMEOUT="0.5"
    )


async def warm(instance: Instance, path: str, headers: dict[str, str]) -> httpx.Response:
    """Read until served entirely from the cache; returns that cached response."""
    first, _ = await instance.get(path, headers)
    assert first.status_code == 200, first.text
    hits = instance.hits
    cached, statements = await instance.get(path, headers)
    assert cached.status_code == 200, cached.text
    assert statements == 0, "a warm read still went to the database: nothing is being cached"
    assert instance.hits > hits
    assert cached.json() == first.json()  # a cached answer is the same as one read from the database
    local = instance.container.local_cache
    if local is not None:
        # With Redis, the in-process tier now holds the entries: the next read must be served from
        # process memory, so the checks that follow prove that tier is never stale either.
        async with asyncio.timeout(5):
            await local.tracking.wait_ready()
        before = local.local_hits
        for _ in range(10):  # reads racing an invalidation of their own fill go to Redis
            again, statements = await instance.get(path, headers)
            assert statements == 0
            assert again.json() == first.json()
            if local.local_hits > before:
                break
        assert local.local_hits > before, "the in-process tier served nothing"
    return cached


# -- two processes on Postgres + Redis --------------------------------------------------------------------


async def test_a_user_change_on_one_instance_is_seen_at_once_on_the_other(
    pg_url: str, redis_url: str, tmp_path: Path
) -> None:
    async with instances(shared(pg_url, redis_url, tmp_path)) as (one, two):
        tenant = await signup(one.client)
        h = tenant["headers"]
        path = f"/v1/users/{tenant['user']['id']}"
        assert (await warm(two, path, h)).json()["name"] == "Owner"

        r, _ = await one.request("PATCH", path, h, json={"name": "Renamed", "email": "new@acme.test"})
        assert r.status_code == 200, r.text

        r, statements = await two.get(path, h)
        assert r.status_code == 200
        assert (r.json()["name"], r.json()["email"]) == ("Renamed", "new@acme.test")
        assert statements > 0  # reloaded from the database ...
        again = await warm(two, path, h)  # ... and cached again, fresh
        assert again.json()["name"] == "Renamed"

        # Deleting is a change too: the other instance must not keep serving the deleted user.
        r, _ = await one.request("POST", "/v1/users", h, json={"email": "bob@acme.test", "name": "Bob"})
        bob = f"/v1/users/{r.json()['id']}"
        await warm(two, bob, h)
        r, _ = await one.request("DELETE", bob, h)
        assert r.status_code == 204
        r, _ = await two.get(bob, h)
        assert r.status_code == 404


async def test_a_key_revoked_on_one_instance_is_refused_at_once_by_the_other(
    pg_url: str, redis_url: str, tmp_path: Path
) -> None:
    async with instances(shared(pg_url, redis_url, tmp_path)) as (one, two):
        tenant = await signup(one.client)
        h = tenant["headers"]
        r, _ = await one.request("POST", "/v1/api-keys", h, json={"name": "ci"})
        assert r.status_code == 201, r.text
        key = r.json()
        h2 = {"Authorization": f"Bearer {key['token']}"}
        await warm(two, "/v1/tenant", h2)  # the key's lookup is cached on instance two

        r, _ = await one.request("DELETE", f"/v1/api-keys/{key['id']}", h)
        assert r.status_code == 204

        r, _ = await two.get("/v1/tenant", h2)
        assert r.status_code == 401, r.text
        r, _ = await one.get("/v1/tenant", h2)
        assert r.status_code == 401
        # The other key is untouched.
        r, _ = await two.get("/v1/tenant", h)
        assert r.status_code == 200


async def test_a_tenant_config_change_on_one_instance_is_seen_at_once_on_the_other(
    pg_url: str, redis_url: str, tmp_path: Path
) -> None:
    async with instances(shared(pg_url, redis_url, tmp_path)) as (one, two):
        tenant = await signup(one.client)
        h = tenant["headers"]
        before = (await warm(two, "/v1/tenant", h)).json()
        assert before["config"]["display_name"] == "Acme"

        change = {"display_name": "Acme Ltd", "timezone": "Europe/Paris", "rate_limit_per_minute": 1000}
        r, _ = await one.request("PATCH", "/v1/tenant/config", h, json=change)
        assert r.status_code == 200, r.text

        r, _ = await two.get("/v1/tenant", h)
        assert r.status_code == 200
        config = r.json()["config"]
        assert (config["display_name"], config["timezone"], config["rate_limit_per_minute"]) == (
            "Acme Ltd",
            "Europe/Paris",
            1000,
        )
        # The tenant's own quota (read through the same cached tenant) applies at once as well.
        assert '"default";q=1000;' in r.headers["ratelimit-policy"]


async def test_every_instance_shares_one_cache(pg_url: str, redis_url: str, tmp_path: Path) -> None:
    """What one instance loaded, the others read without touching the database."""
    async with instances(shared(pg_url, redis_url, tmp_path), n=3) as (one, two, three):
        tenant = await signup(one.client)
        h = tenant["headers"]
        path = f"/v1/users/{tenant['user']['id']}"
        r, statements = await one.get(path, h)
        assert r.status_code == 200
        assert statements > 0
        for other in (two, three):
            r2, statements = await other.get(path, h)
            assert r2.json() == r.json()
            assert statements == 0


async def test_an_instance_with_the_cache_switched_off_still_invalidates_for_the_others(
    pg_url: str, redis_url: str, tmp_path: Path
) -> None:
    settings_on = shared(pg_url, redis_url, tmp_path)
    settings_off = make_settings(pg_url, tmp_path, KEEL_REDIS_URL=redis_url, KEEL_CACHE_ENABLED="false")
    async with instances(settings_off, n=1) as (off,), instances(settings_on, n=1) as (on,):
        tenant = await signup(off.client)
        h = tenant["headers"]
        path = f"/v1/users/{tenant['user']['id']}"
        await warm(on, path, h)
        for _ in range(2):
            r, statements = await off.get(path, h)
            assert r.status_code == 200
            assert statements > 0  # switched off: every read goes to the database
        assert off.hits == 0

        r, _ = await off.request("PATCH", path, h, json={"name": "Renamed"})
        assert r.status_code == 200
        r, _ = await on.get(path, h)
        assert r.json()["name"] == "Renamed"


# -- Redis going away and coming back ---------------------------------------------------------------------


async def test_reads_survive_a_redis_outage_and_caching_resumes_by_itself(
    pg_url: str, redis_url: str, redis_proc: RedisServer, tmp_path: Path
) -> None:
    async with instances(shared(pg_url, redis_url, tmp_path)) as (one, two):
        tenant = await signup(one.client)
        h = tenant["headers"]
        path = f"/v1/users/{tenant['user']['id']}"
        await warm(two, path, h)

        redis_proc.stop()
        try:
            for _ in range(3):
                r, statements = await two.get(path, h)
                assert r.status_code == 200, r.text
                assert r.json()["name"] == "Owner"
                assert statements > 0  # answered from the database
            r, _ = await two.get("/v1/tenant", h)
            assert r.status_code == 200
            assert two.container.cache.stats.errors > 0
            assert not two.container.cache.available

            # Writes still commit (their invalidation is left to the outbox) and reads see them.
            r, _ = await one.request("PATCH", path, h, json={"name": "During outage"})
            assert r.status_code == 200, r.text
            r, _ = await two.get(path, h)
            assert r.status_code == 200
            assert r.json()["name"] == "During outage"

            health = await two.client.get("/healthz")
            assert health.status_code == 503
            assert health.json()["checks"]["redis:responseTime"][0]["status"] == "fail"
            assert (await two.client.get("/livez")).status_code == 200
        finally:
            redis_proc.start()

        # Back without restarting anything: readiness passes again within a few seconds ...
        deadline = time.monotonic() + 10
        while (await two.client.get("/healthz")).status_code != 200:
            assert time.monotonic() < deadline, "/healthz did not recover after Redis came back"
            await asyncio.sleep(0.1)
        # ... and once the circuit has closed, reads are cached again (fills use a script Redis forgot).
        while not (one.container.cache.available and two.container.cache.available):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        cached = await warm(two, path, h)
        assert cached.json()["name"] == "During outage"
        assert (await warm(one, path, h)).json()["name"] == "During outage"

        # Invalidation across instances works again too.
        r, _ = await one.request("PATCH", path, h, json={"name": "After outage"})
        assert r.status_code == 200
        r, _ = await two.get(path, h)
        assert r.json()["name"] == "After outage"


# -- the embedded default: SQLite and the in-process cache ----------------------------------------------------


async def test_embedded_default_caches_and_serves_fresh_data_after_a_change(sqlite_url: str, tmp_path: Path) -> None:
    async with instances(make_settings(sqlite_url, tmp_path), n=1) as (app,):
        assert app.container.redis is None
        tenant = await signup(app.client)
        h = tenant["headers"]
        path = f"/v1/users/{tenant['user']['id']}"

        await warm(app, path, h)
        r, _ = await app.request("PATCH", path, h, json={"name": "Renamed"})
        assert r.status_code == 200
        r, _ = await app.get(path, h)
        assert r.json()["name"] == "Renamed"
        assert (await warm(app, path, h)).json()["name"] == "Renamed"

        await warm(app, "/v1/tenant", h)
        r, _ = await app.request("PATCH", "/v1/tenant/config", h, json={"display_name": "Acme Ltd"})
        assert r.status_code == 200
        r, _ = await app.get("/v1/tenant", h)
        assert r.json()["config"]["display_name"] == "Acme Ltd"

        r, _ = await app.request("POST", "/v1/api-keys", h, json={"name": "ci"})
        key = r.json()
        h2 = {"Authorization": f"Bearer {key['token']}"}
        await warm(app, "/v1/tenant", h2)
        r, _ = await app.request("DELETE", f"/v1/api-keys/{key['id']}", h)
        assert r.status_code == 204
        r, _ = await app.get("/v1/tenant", h2)
        assert r.status_code == 401
