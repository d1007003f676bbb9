"""The migration history on both backends: it applies to an empty database, reverses cleanly, and
matches the models exactly (no drift between ``all_metadata()`` and what the migrations build).

These tests start from empty databases, never from the migrated templates in ``tests/conftest.py``.
"""

from __future__ import annotations

import ast
import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from advanced_alchemy.types import GUID, DateTimeUTC
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import JSON, BigInteger, Column, Date, Integer, MetaData, String, Table, inspect, select, text
from sqlalchemy.engine import Connection

from keel.main import db
from keel.platform.adapters.sql.engine import create_engine
from tests.support.servers import PostgresServer, admin_sql

APP_TABLES = set(db.all_metadata().tables)
ANALYTICS_TABLES = {"analytics_daily_figures", "analytics_rolled_up_days", "analytics_request_batches"}
VERSION_TABLE = "alembic_version"
ENV_PY = db.migrations_dir() / "env.py"


# -- fixtures: empty databases ----------------------------------------------------------------


@pytest.fixture
def empty_sqlite_url(tmp_path: Path) -> str:
    path = tmp_path / "empty.db"
    assert not path.exists()
    return f"sqlite+aiosqlite:///{path}"


@pytest.fixture
async def empty_pg_url(pg: PostgresServer) -> AsyncIterator[str]:
    """A brand-new database cloned from template0: nothing migrated, nothing from the keel template."""
    name = f"m_{uuid.uuid4().hex[:12]}"
    await admin_sql(pg, f'CREATE DATABASE "{name}" TEMPLATE template0')
    yield pg.url(name)
    await admin_sql(pg, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue("empty_sqlite_url" if request.param == "sqlite" else "empty_pg_url"))


# -- helpers ----------------------------------------------------------------------------------


async def _with_connection(url: str, fn: Callable[[Connection], Any]) -> Any:
    """Run ``fn`` on a sync connection of the same async engine the app and env.py use."""
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(fn)
    finally:
        await engine.dispose()


async def table_names(url: str) -> set[str]:
    return await _with_connection(url, lambda c: set(inspect(c).get_table_names()))


async def current_revision(url: str) -> str | None:
    return await _with_connection(url, lambda c: MigrationContext.configure(c).get_current_revision())


def script_directory() -> ScriptDirectory:
    return ScriptDirectory.from_config(db.alembic_config("sqlite://"))


def head_revision() -> str:
    head = script_directory().get_current_head()
    assert head is not None
    return head


def _env_compare_type() -> Callable[..., bool | None]:
    """migrations/env.py's own ``_compare_type`` (env.py cannot be imported: it runs migrations on import)."""
    tree = ast.parse(ENV_PY.read_text(), filename=str(ENV_PY))
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_compare_type")
    namespace: dict[str, Any] = {"GUID": GUID, "DateTimeUTC": DateTimeUTC}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(ENV_PY), "exec"), namespace)
    return namespace["_compare_type"]  # type: ignore[no-any-return]


compare_type = _env_compare_type()


async def schema_diffs(url: str, metadata: MetaData | None = None) -> list[Any]:
    """Autogenerate's differences between the database and the models, configured as env.py does."""
    target = metadata if metadata is not None else db.all_metadata()

    def compare(conn: Connection) -> list[Any]:
        ctx = MigrationContext.configure(
            connection=conn,
            opts={
                "target_metadata": target,
                "render_as_batch": True,
                "compare_type": compare_type,
                "user_module_prefix": "advanced_alchemy.types.",
            },
        )
        return list(compare_metadata(ctx, target))

    return await _with_connection(url, compare)


async def assert_at_head(url: str) -> None:
    assert await table_names(url) == APP_TABLES | {VERSION_TABLE}
    assert await current_revision(url) == head_revision()


async def assert_at_base(url: str) -> None:
    # Alembic keeps its (empty) version table; every application table is gone.
    assert await table_names(url) - {VERSION_TABLE} == set()
    assert await current_revision(url) is None


# -- upgrade / downgrade ----------------------------------------------------------------------


async def test_upgrade_downgrade_upgrade(empty_url: str) -> None:
    assert await table_names(empty_url) == set()
    assert await current_revision(empty_url) is None

    db.upgrade(empty_url, "head")
    await assert_at_head(empty_url)

    db.downgrade(empty_url, "base")
    await assert_at_base(empty_url)

    db.upgrade(empty_url, "head")
    await assert_at_head(empty_url)
    assert await schema_diffs(empty_url) == []


async def test_upgrade_creates_expected_columns_indexes_and_constraints(empty_url: str) -> None:
    db.upgrade(empty_url, "head")

    def describe(conn: Connection) -> dict[str, Any]:
        insp = inspect(conn)
        return {
            t: {
                "columns": {c["name"]: c["nullable"] for c in insp.get_columns(t)},
                "pk": insp.get_pk_constraint(t)["constrained_columns"],
                "indexes": {i["name"]: list(i["column_names"]) for i in insp.get_indexes(t)},
                "uniques": {tuple(u["column_names"]) for u in insp.get_unique_constraints(t)},
                "fks": {(tuple(f["constrained_columns"]), f["referred_table"]) for f in insp.get_foreign_keys(t)},
            }
            for t in APP_TABLES
        }

    schema = await _with_connection(empty_url, describe)
    assert schema["tenants"]["columns"] == {
        "id": False,
        "name": False,
        "config": False,
        "created_at": False,
        "updated_at": False,
    }
    assert schema["api_keys"]["columns"]["revoked_at"] is True
    assert set(schema["api_keys"]["columns"]) == {
        "id",
        "tenant_id",
        "name",
        "display_prefix",
        "secret_hash",
        "created_at",
        "revoked_at",
    }
    assert schema["users"]["columns"] == {
        "id": False,
        "tenant_id": False,
        "email": False,
        "name": False,
        "role": False,
        "avatar_url": True,  # 0005: set by the media context once an avatar exists
        "created_at": False,
        "updated_at": False,
    }
    keyed_otherwise = {"payments_sandbox_ledger", "avatars", *ANALYTICS_TABLES} - {"analytics_request_batches"}
    for t in APP_TABLES - keyed_otherwise:
        assert schema[t]["pk"] == ["id"], t
    assert schema["users"]["indexes"]["ix_users_tenant_id_id"] == ["tenant_id", "id"]
    assert schema["api_keys"]["indexes"]["ix_api_keys_tenant_id_id"] == ["tenant_id", "id"]
    assert ("tenant_id", "email") in schema["users"]["uniques"]
    assert ("secret_hash",) in schema["api_keys"]["uniques"]
    assert schema["users"]["fks"] == {(("tenant_id",), "tenants")}
    assert schema["api_keys"]["fks"] == {(("tenant_id",), "tenants")}
    assert schema["outbox"]["indexes"]["ix_outbox_unpublished"] == ["occurred_at"]

    # 0004: payments, their refunds and the sandbox provider's ledger.
    assert {"payments", "payment_refunds", "payments_sandbox_ledger"} <= APP_TABLES
    assert schema["payments"]["columns"] == {
        "id": False,
        "tenant_id": False,
        "amount": False,
        "currency": False,
        "payment_method": False,
        "description": False,
        "customer_email": True,
        "metadata": False,
        "status": False,
        "provider": False,
        "provider_reference": True,
        "amount_refunded": False,
        "amount_refunding": False,
        "failure_reason": True,
        "failure_message": True,
        "version": False,
        "created_at": False,
        "updated_at": False,
    }
    assert schema["payments"]["indexes"] == {
        "ix_payments_tenant_id": ["tenant_id", "id"],
        "ix_payments_tenant_status_id": ["tenant_id", "status", "id"],
        "ix_payments_tenant_created": ["tenant_id", "created_at"],
        "ix_payments_status_updated": ["status", "updated_at"],
    }
    assert schema["payment_refunds"]["columns"] == {
        "id": False,
        "tenant_id": False,
        "payment_id": False,
        "amount": False,
        "currency": False,
        "reason": True,
        "status": False,
        "provider_reference": True,
        "failure_reason": True,
        "failure_message": True,
        "created_at": False,
        "updated_at": False,
    }
    assert schema["payment_refunds"]["indexes"] == {
        "ix_payment_refunds_tenant_payment_id": ["tenant_id", "payment_id", "id"],
        "ix_payment_refunds_status_updated": ["status", "updated_at"],
        "ix_payment_refunds_tenant_created": ["tenant_id", "created_at"],  # 0006: daily totals of refunds
    }
    assert schema["payments_sandbox_ledger"]["columns"] == {
        "idempotency_key": False,
        "kind": False,
        "reference": False,
        "charge_reference": True,
        "amount": False,
        "currency": False,
        "calls": False,
        "outcome": True,
        "created_at": False,
    }
    # One ledger row per idempotency key: the key is the primary key.
    assert schema["payments_sandbox_ledger"]["pk"] == ["idempotency_key"]
    assert schema["payments_sandbox_ledger"]["indexes"] == {"ix_payments_sandbox_ledger_charge": ["charge_reference"]}
    # Payments are never deleted and always read tenant-scoped: no foreign keys, no unique constraints.
    for t in ("payments", "payment_refunds", "payments_sandbox_ledger"):
        assert schema[t]["fks"] == set(), t
        assert schema[t]["uniques"] == set(), t

    # 0005: one avatar per user (user ids are unique across tenants), its variants as JSON.
    assert "avatars" in APP_TABLES
    assert schema["avatars"]["columns"] == {
        "user_id": False,
        "tenant_id": False,
        "upload_id": False,
        "status": False,
        "original_key": False,
        "original_type": False,
        "variants": False,
        "error": True,
        "created_at": False,
        "updated_at": False,
    }
    assert schema["avatars"]["pk"] == ["user_id"]
    assert schema["avatars"]["fks"] == set()
    assert schema["avatars"]["uniques"] == set()

    # 0006: analytics. A figure is keyed by tenant, day, metric, currency and status (money metrics have
    # one per currency and status, the others empty strings there: never NULL); a rolled-up day by tenant
    # and day; a batch of request counts by its id, with an index to forget old batches by.
    assert ANALYTICS_TABLES <= APP_TABLES
    assert schema["analytics_daily_figures"]["columns"] == {
        "tenant_id": False,
        "day": False,
        "metric": False,
        "currency": False,
        "status": False,
        "count": False,
        "amount": False,
    }
    assert schema["analytics_daily_figures"]["pk"] == ["tenant_id", "day", "metric", "currency", "status"]
    assert schema["analytics_daily_figures"]["indexes"] == {}
    assert schema["analytics_rolled_up_days"]["columns"] == {"tenant_id": False, "day": False, "computed_at": False}
    assert schema["analytics_rolled_up_days"]["pk"] == ["tenant_id", "day"]
    assert schema["analytics_rolled_up_days"]["indexes"] == {}
    assert schema["analytics_request_batches"]["columns"] == {"id": False, "added_at": False}
    assert schema["analytics_request_batches"]["pk"] == ["id"]
    assert schema["analytics_request_batches"]["indexes"] == {"ix_analytics_request_batches_added_at": ["added_at"]}
    for t in ANALYTICS_TABLES:
        assert schema[t]["fks"] == set(), t
        assert schema[t]["uniques"] == set(), t
    # Rollups read users and refunds by tenant and creation time (payments had that index already).
    assert schema["users"]["indexes"]["ix_users_tenant_created"] == ["tenant_id", "created_at"]

    def types(conn: Connection) -> dict[str, dict[str, Any]]:
        insp = inspect(conn)
        return {t: {c["name"]: c["type"] for c in insp.get_columns(t)} for t in ("users", "avatars", *ANALYTICS_TABLES)}

    columns = await _with_connection(empty_url, types)
    assert isinstance(columns["users"]["avatar_url"], String)
    assert columns["users"]["avatar_url"].length == 300
    for name, length in [("status", 20), ("original_key", 300), ("original_type", 50), ("error", 500)]:
        assert isinstance(columns["avatars"][name], String), name
        assert columns["avatars"][name].length == length, name
    figures = columns["analytics_daily_figures"]
    for name, length in [("metric", 20), ("currency", 3), ("status", 20)]:
        assert isinstance(figures[name], String), name
        assert figures[name].length == length, name
    # Sums of minor units over many payments outgrow 32 bits.
    for name in ("count", "amount"):
        assert isinstance(figures[name], BigInteger), name
    assert isinstance(figures["day"], Date)
    assert isinstance(columns["analytics_request_batches"]["id"], String)
    assert columns["analytics_request_batches"]["id"].length == 64


async def test_the_payments_revision_adds_and_removes_only_its_tables(empty_url: str) -> None:
    payments = {"payments", "payment_refunds", "payments_sandbox_ledger"}
    db.upgrade(empty_url, "0003")
    before = await table_names(empty_url)
    assert not before & payments
    db.upgrade(empty_url, "0004")
    assert await table_names(empty_url) == before | payments
    db.downgrade(empty_url, "0003")
    assert await table_names(empty_url) == before
    assert await current_revision(empty_url) == "0003"
    db.upgrade(empty_url, "head")
    await assert_at_head(empty_url)
    assert await schema_diffs(empty_url) == []


async def test_the_media_revision_adds_and_removes_only_avatars_and_the_avatar_url(empty_url: str) -> None:
    db.upgrade(empty_url, "0004")
    before = await table_names(empty_url)
    assert "avatars" not in before
    assert "avatar_url" not in await user_columns(empty_url)
    db.upgrade(empty_url, "0005")
    assert await table_names(empty_url) == before | {"avatars"}
    assert "avatar_url" in await user_columns(empty_url)
    db.downgrade(empty_url, "0004")
    assert await table_names(empty_url) == before
    assert "avatar_url" not in await user_columns(empty_url)
    assert await current_revision(empty_url) == "0004"
    db.upgrade(empty_url, "head")
    await assert_at_head(empty_url)
    assert await schema_diffs(empty_url) == []


def tenants_and_users() -> tuple[Table, Table]:
    """The tenants and users tables as 0004 and 0005 leave them (just the columns the round trips
    write), in the app's portable types."""
    meta = MetaData()
    tenants = Table(
        "tenants",
        meta,
        Column("id", GUID),
        Column("name", String),
        Column("config", JSON),
        Column("created_at", DateTimeUTC(timezone=True)),
        Column("updated_at", DateTimeUTC(timezone=True)),
    )
    users = Table(
        "users",
        meta,
        *(Column(name, GUID) for name in ("id", "tenant_id")),
        *(Column(name, String) for name in ("email", "name", "role")),
        *(Column(name, DateTimeUTC(timezone=True)) for name in ("created_at", "updated_at")),
    )
    return tenants, users


def insert_tenant_and_user(
    conn: Connection, tenants: Table, users: Table, tenant_id: uuid.UUID, user_id: uuid.UUID, now: datetime
) -> None:
    conn.execute(tenants.insert().values(id=tenant_id, name="Acme", config={}, created_at=now, updated_at=now))
    values = {"email": "a@acme.test", "name": "A", "role": "member", "created_at": now, "updated_at": now}
    conn.execute(users.insert().values(id=user_id, tenant_id=tenant_id, **values))


async def test_the_media_revision_keeps_users_and_their_avatar_urls_across_a_round_trip(empty_url: str) -> None:
    """Users written before 0005 read back with a null avatar_url; going down drops only the column (the
    users survive), and going up again gives them a null one."""
    db.upgrade(empty_url, "0004")
    tenant_id, user_id = uuid.uuid4(), uuid.uuid4()

    tenants, users = tenants_and_users()
    now = datetime(2026, 1, 1, tzinfo=UTC)

    def seed(conn: Connection) -> None:
        insert_tenant_and_user(conn, tenants, users, tenant_id, user_id, now)
        conn.commit()

    def read(conn: Connection) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in conn.execute(text("SELECT email, avatar_url FROM users")).all()]

    def set_url(conn: Connection) -> None:
        conn.execute(text("UPDATE users SET avatar_url = :a"), {"a": f"/v1/users/{user_id}/avatar"})
        conn.commit()

    await _with_connection(empty_url, seed)
    db.upgrade(empty_url, "0005")
    assert await _with_connection(empty_url, read) == [("a@acme.test", None)]
    await _with_connection(empty_url, set_url)
    assert await _with_connection(empty_url, read) == [("a@acme.test", f"/v1/users/{user_id}/avatar")]
    db.downgrade(empty_url, "0004")
    assert "avatar_url" not in await user_columns(empty_url)
    db.upgrade(empty_url, "0005")
    assert await _with_connection(empty_url, read) == [("a@acme.test", None)]


async def indexes(url: str, table: str) -> set[str]:
    return await _with_connection(url, lambda c: {str(i["name"]) for i in inspect(c).get_indexes(table)})


async def test_the_analytics_revision_adds_and_removes_only_its_tables_and_indexes(empty_url: str) -> None:
    db.upgrade(empty_url, "0005")
    before = await table_names(empty_url)
    assert not before & ANALYTICS_TABLES
    users, refunds = await indexes(empty_url, "users"), await indexes(empty_url, "payment_refunds")
    assert "ix_users_tenant_created" not in users
    assert "ix_payment_refunds_tenant_created" not in refunds
    db.upgrade(empty_url, "0006")
    assert await table_names(empty_url) == before | ANALYTICS_TABLES
    assert await indexes(empty_url, "users") == users | {"ix_users_tenant_created"}
    assert await indexes(empty_url, "payment_refunds") == refunds | {"ix_payment_refunds_tenant_created"}
    db.downgrade(empty_url, "0005")
    assert await table_names(empty_url) == before
    assert (await indexes(empty_url, "users"), await indexes(empty_url, "payment_refunds")) == (users, refunds)
    assert await current_revision(empty_url) == "0005"
    db.upgrade(empty_url, "head")
    await assert_at_head(empty_url)
    assert await schema_diffs(empty_url) == []


async def test_the_analytics_revision_keeps_users_and_refunds_across_a_round_trip(empty_url: str) -> None:
    """0006 indexes two existing tables (on SQLite, in batch mode): their rows survive it both ways."""
    db.upgrade(empty_url, "0005")
    tenant_id, user_id, refund_id, payment_id = uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    tenants, users = tenants_and_users()
    meta = tenants.metadata
    refunds = Table(
        "payment_refunds",
        meta,
        *(Column(name, GUID) for name in ("id", "tenant_id", "payment_id")),
        Column("amount", BigInteger),
        *(Column(name, String) for name in ("currency", "status")),
        *(Column(name, DateTimeUTC(timezone=True)) for name in ("created_at", "updated_at")),
    )
    now = datetime(2026, 1, 1, 23, 59, 59, tzinfo=UTC)

    def seed(conn: Connection) -> None:
        insert_tenant_and_user(conn, tenants, users, tenant_id, user_id, now)
        conn.execute(
            refunds.insert().values(
                id=refund_id,
                tenant_id=tenant_id,
                payment_id=payment_id,
                amount=1000,
                currency="EUR",
                status="succeeded",
                created_at=now,
                updated_at=now,
            )
        )
        conn.commit()

    def read(conn: Connection) -> list[tuple[Any, ...]]:
        return [
            *(tuple(r) for r in conn.execute(select(users.c.id, users.c.email, users.c.created_at))),
            *(tuple(r) for r in conn.execute(select(refunds.c.id, refunds.c.amount, refunds.c.created_at))),
        ]

    await _with_connection(empty_url, seed)
    expected = [(user_id, "a@acme.test", now), (refund_id, 1000, now)]
    assert await _with_connection(empty_url, read) == expected
    db.upgrade(empty_url, "0006")
    assert await _with_connection(empty_url, read) == expected
    db.downgrade(empty_url, "0005")
    assert await _with_connection(empty_url, read) == expected
    db.upgrade(empty_url, "0006")
    assert await _with_connection(empty_url, read) == expected


async def user_columns(url: str) -> set[str]:
    return await _with_connection(url, lambda c: {col["name"] for col in inspect(c).get_columns("users")})


async def test_every_revision_steps_up_and_down(empty_url: str) -> None:
    order = [r.revision for r in reversed(list(script_directory().walk_revisions()))]
    for rev in order:
        db.upgrade(empty_url, rev)
        assert await current_revision(empty_url) == rev
    await assert_at_head(empty_url)
    for expected in [*reversed(order[:-1]), None]:
        db.downgrade(empty_url, "-1")
        assert await current_revision(empty_url) == expected
    await assert_at_base(empty_url)


# -- drift ------------------------------------------------------------------------------------


async def test_no_drift_between_models_and_migrations(empty_url: str) -> None:
    db.upgrade(empty_url, "head")
    assert await schema_diffs(empty_url) == []


async def test_alembic_check_through_env_py_finds_no_drift(empty_url: str) -> None:
    """The same question asked through migrations/env.py itself, as `keel migrate check` does."""
    db.upgrade(empty_url, "head")
    # env.py runs its own event loop, so it cannot run on this one.
    await asyncio.to_thread(command.check, db.alembic_config(empty_url))


async def test_drift_check_is_not_blind(empty_url: str) -> None:
    """Control: the comparison does report differences, so an empty result above means something."""
    db.upgrade(empty_url, "head")

    extra_column = MetaData(naming_convention=db.all_metadata().naming_convention)
    for table in db.all_metadata().tables.values():
        table.to_metadata(extra_column)
    extra_column.tables["users"].append_column(Column("nickname", String(50), nullable=True))
    diffs = await schema_diffs(empty_url, extra_column)
    assert [(d[0], d[2], d[3].name) for d in diffs if isinstance(d, tuple)] == [("add_column", "users", "nickname")]

    extra_table = MetaData(naming_convention=db.all_metadata().naming_convention)
    for table in db.all_metadata().tables.values():
        table.to_metadata(extra_table)
    Table("widgets", extra_table, Column("id", Integer, primary_key=True))
    diffs = await schema_diffs(empty_url, extra_table)
    assert [d[0] for d in diffs if isinstance(d, tuple)] == ["add_table"]

    changed_type = MetaData(naming_convention=db.all_metadata().naming_convention)
    for table in db.all_metadata().tables.values():
        table.to_metadata(changed_type)
    changed_type.tables["users"].c.role.type = Integer()
    diffs = await schema_diffs(empty_url, changed_type)
    flat = [d for group in diffs for d in (group if isinstance(group, list) else [group])]
    assert [(d[0], d[2], d[3]) for d in flat] == [("modify_type", "users", "role")]


def test_env_compare_type_semantics() -> None:
    """advanced-alchemy's portable types count as equal; everything else gets alembic's default comparison."""
    assert compare_type(None, None, None, String(), GUID()) is False
    assert compare_type(None, None, None, String(), DateTimeUTC(timezone=True)) is False
    assert compare_type(None, None, None, String(), String(10)) is None
    assert compare_type(None, None, None, String(), Integer()) is None


# -- history shape ----------------------------------------------------------------------------


def test_single_head_and_linear_history() -> None:
    script = script_directory()
    heads = script.get_heads()
    assert len(heads) == 1, f"multiple heads: {heads}"
    bases = script.get_bases()
    assert len(bases) == 1, f"multiple bases: {bases}"

    revisions = list(script.walk_revisions())
    assert revisions, "no migrations"
    ids = [r.revision for r in revisions]
    assert len(ids) == len(set(ids))
    for rev in revisions:
        assert rev.down_revision is None or isinstance(rev.down_revision, str), f"{rev.revision} is a merge"
        assert not rev.is_merge_point, rev.revision
        assert not rev.is_branch_point, rev.revision
        assert not rev.branch_labels, rev.revision
        assert not rev.dependencies, rev.revision
        assert callable(getattr(rev.module, "upgrade", None)), rev.revision
        assert callable(getattr(rev.module, "downgrade", None)), rev.revision

    # Following down_revision from the head visits every revision exactly once, ending at the base.
    chain: list[str] = []
    current: str | None = heads[0]
    while current is not None:
        chain.append(current)
        current = script.get_revision(current).down_revision  # type: ignore[union-attr,assignment]
    assert chain == ids
    assert chain[-1] == bases[0]


def test_migration_files_are_the_whole_history() -> None:
    """No stray file in versions/ that alembic would silently skip."""
    files = {p.stem for p in (db.migrations_dir() / "versions").glob("*.py") if not p.name.startswith("__")}
    modules = {Path(r.path).stem for r in script_directory().walk_revisions()}
    assert files == modules
