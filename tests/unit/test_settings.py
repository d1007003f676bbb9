"""Settings: defaults, normalisation, and one clear line naming the variable for every bad value."""

from __future__ import annotations

import inspect
import io
import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from keel.main.settings import Secret, Settings, SettingsError, load_settings, settings_or_exit
from tests.support.app import client_for, make_settings, signup

KEEL_BIN = Path(sys.executable).parent / "keel"


def test_defaults_with_empty_env() -> None:
    s = load_settings({})
    assert s.database_url == "sqlite+aiosqlite:///var/keel.db"
    assert s.is_embedded_db
    assert s.redis_url is None
    assert s.host == "127.0.0.1"
    assert s.port == 8000
    assert s.workers == 1
    assert s.data_dir == Path("var")
    assert s.log_level == "INFO"
    assert s.log_json is None
    assert s.webhooks_allow_private is False
    assert s.migrate_on_start is None
    assert s.should_migrate_on_start is True
    assert s.max_body_bytes == 1024 * 1024
    assert s.db_pool_size == 10
    assert s.db_max_overflow == 10
    assert s.db_pool_timeout == 5.0
    assert s.health_timeout == 1.0
    assert s.otel_endpoint is None
    assert s.service_name == "keel"
    assert s.payments_provider == "sandbox"
    assert s.payments_sandbox_latency == 0.0
    assert s.stripe_secret_key is None
    assert s.stripe_api_base is None
    assert s.media_max_pixels == 40_000_000


def test_empty_strings_count_as_unset() -> None:
    env = dict.fromkeys(
        ("KEEL_DATABASE_URL", "KEEL_PORT", "KEEL_WORKERS", "KEEL_LOG_LEVEL", "KEEL_REDIS_URL", "KEEL_MEDIA_MAX_PIXELS"),
        "",
    )
    assert load_settings(env) == load_settings({})


def test_load_settings_reads_process_env_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_PORT", "9123")
    assert load_settings().port == 9123
    monkeypatch.setenv("KEEL_PORT", "nope")
    with pytest.raises(SettingsError, match="KEEL_PORT"):
        load_settings()


def test_sqlite_url_follows_data_dir() -> None:
    s = load_settings({"KEEL_DATA_DIR": "/srv/keel"})
    assert s.data_dir == Path("/srv/keel")
    assert s.database_url == "sqlite+aiosqlite:////srv/keel/keel.db"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("postgres://u:p@db:5432/keel", "postgresql+asyncpg://u:p@db:5432/keel"),
        ("postgresql://u:p@db:5432/keel", "postgresql+asyncpg://u:p@db:5432/keel"),
        ("postgres://db/keel", "postgresql+asyncpg://db/keel"),
        ("postgresql+asyncpg://u@db/keel", "postgresql+asyncpg://u@db/keel"),
        ("sqlite+aiosqlite:///tmp/x.db", "sqlite+aiosqlite:///tmp/x.db"),
    ],
)
def test_database_url_normalisation(raw: str, expected: str) -> None:
    assert load_settings({"KEEL_DATABASE_URL": raw}).database_url == expected


@pytest.mark.parametrize("query", ["sslmode=require", "sslmode=disable"])
def test_libpq_url_with_sslmode_is_usable_by_the_driver(query: str) -> None:
    """``postgres://...?sslmode=require`` (the spelling hosting platforms hand out) must reach asyncpg as
    ``ssl=require``: asyncpg has no ``sslmode`` argument and would fail the first connection with a TypeError.
    """
    url = f"postgres://u:p@db.example:5432/keel?{query}"
    try:
        s = load_settings({"KEEL_DATABASE_URL": url})
    except SettingsError as exc:
        rejected: str | None = str(exc)
    else:
        rejected = None
    if rejected is not None:  # rejecting it up front, naming the variable, is an acceptable fix too
        assert rejected.startswith("KEEL_DATABASE_URL:")
        return
    engine = create_async_engine(s.database_url)
    _, kwargs = engine.dialect.create_connect_args(make_url(s.database_url))
    accepted = set(inspect.signature(asyncpg.connect).parameters)
    assert set(kwargs) <= accepted, f"asyncpg.connect() does not accept {set(kwargs) - accepted}"


def test_postgres_does_not_migrate_on_start_by_default() -> None:
    s = load_settings({"KEEL_DATABASE_URL": "postgres://db/keel"})
    assert not s.is_embedded_db
    assert s.should_migrate_on_start is False


@pytest.mark.parametrize(
    ("url", "flag", "expected"),
    [
        ("postgres://db/keel", "true", True),
        ("postgres://db/keel", "1", True),
        ("postgres://db/keel", "false", False),
        ("sqlite+aiosqlite:///x.db", "off", False),
        ("sqlite+aiosqlite:///x.db", "YES", True),
    ],
)
def test_migrate_on_start_override(url: str, flag: str, expected: bool) -> None:
    s = load_settings({"KEEL_DATABASE_URL": url, "KEEL_MIGRATE_ON_START": flag})
    assert s.should_migrate_on_start is expected


def test_all_valid_overrides() -> None:
    s = load_settings(
        {
            "KEEL_DATABASE_URL": "postgresql://db/keel",
            "KEEL_REDIS_URL": "rediss://cache:6380/1",
            "KEEL_HOST": "0.0.0.0",
            "KEEL_PORT": "65535",
            "KEEL_WORKERS": "64",
            "KEEL_LOG_LEVEL": "debug",
            "KEEL_LOG_JSON": "false",
            "KEEL_WEBHOOKS_ALLOW_PRIVATE": "on",
            "KEEL_MAX_BODY_BYTES": "1024",
            "KEEL_DB_POOL_SIZE": "1",
            "KEEL_DB_MAX_OVERFLOW": "0",
            "KEEL_DB_POOL_TIMEOUT": "0.1",
            "KEEL_HEALTH_TIMEOUT": "30",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://otel:4318/v1/traces",
            "OTEL_SERVICE_NAME": "keel-eu",
            "KEEL_PAYMENTS_PROVIDER": "stripe",
            "KEEL_PAYMENTS_SANDBOX_LATENCY": "30",
            "KEEL_STRIPE_SECRET_KEY": "sk_test_abc123",
            "KEEL_STRIPE_API_BASE": "https://stripe-proxy.internal:8443/",
            "KEEL_MEDIA_MAX_PIXELS": "200000000",
        }
    )
    assert s == Settings(
        database_url="postgresql+asyncpg://db/keel",
        redis_url="rediss://cache:6380/1",
        host="0.0.0.0",
        port=65535,
        workers=64,
        log_level="DEBUG",
        log_json=False,
        webhooks_allow_private=True,
        max_body_bytes=1024,
        db_pool_size=1,
        db_max_overflow=0,
        db_pool_timeout=0.1,
        health_timeout=30.0,
        otel_endpoint="http://otel:4318/v1/traces",
        service_name="keel-eu",
        payments_provider="stripe",
        payments_sandbox_latency=30.0,
        stripe_secret_key=Secret("sk_test_abc123"),
        stripe_api_base="https://stripe-proxy.internal:8443",
        media_max_pixels=200_000_000,
    )


def test_log_json_auto_means_detect() -> None:
    assert load_settings({"KEEL_LOG_JSON": "auto"}).log_json is None
    assert load_settings({"KEEL_LOG_JSON": "AUTO"}).log_json is None
    assert load_settings({"KEEL_LOG_JSON": "1"}).log_json is True


def test_generic_otlp_endpoint_wins_over_traces_endpoint() -> None:
    s = load_settings(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4318", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://b:4318"}
    )
    assert s.otel_endpoint == "http://a:4318"


@pytest.mark.parametrize("scheme", ["redis://localhost:6379/0", "rediss://h:1/2", "unix:///run/redis.sock"])
def test_valid_redis_schemes(scheme: str) -> None:
    assert load_settings({"KEEL_REDIS_URL": scheme}).redis_url == scheme


INVALID = [
    ("KEEL_PORT", "abc"),
    ("KEEL_PORT", "80.5"),
    ("KEEL_PORT", "-1"),
    ("KEEL_PORT", "65536"),
    ("KEEL_PORT", "100000"),
    ("KEEL_WORKERS", "0"),
    ("KEEL_WORKERS", "65"),
    ("KEEL_WORKERS", "many"),
    ("KEEL_LOG_JSON", "maybe"),
    ("KEEL_WEBHOOKS_ALLOW_PRIVATE", "2"),
    ("KEEL_MIGRATE_ON_START", "yep"),
    ("KEEL_LOG_LEVEL", "LOUD"),
    ("KEEL_LOG_LEVEL", "warn"),
    ("KEEL_DATABASE_URL", "mysql://db/keel"),
    ("KEEL_DATABASE_URL", "sqlite:///sync.db"),
    ("KEEL_DATABASE_URL", "postgresql+psycopg://db/keel"),
    ("KEEL_DATABASE_URL", "not a url"),
    ("KEEL_REDIS_URL", "http://cache:6379"),
    ("KEEL_REDIS_URL", "localhost:6379"),
    ("KEEL_MAX_BODY_BYTES", "1023"),
    ("KEEL_MAX_BODY_BYTES", "1mb"),
    ("KEEL_DB_POOL_SIZE", "0"),
    ("KEEL_DB_MAX_OVERFLOW", "-1"),
    ("KEEL_DB_POOL_TIMEOUT", "fast"),
    ("KEEL_DB_POOL_TIMEOUT", "0"),
    ("KEEL_DB_POOL_TIMEOUT", "301"),
    ("KEEL_DB_POOL_TIMEOUT", "nan"),
    ("KEEL_DB_POOL_TIMEOUT", "inf"),
    ("KEEL_HEALTH_TIMEOUT", "-1"),
    ("KEEL_HEALTH_TIMEOUT", "1s"),
    ("KEEL_HEALTH_TIMEOUT", "nan"),
    ("KEEL_HEALTH_TIMEOUT", "31"),
    ("KEEL_PAYMENTS_PROVIDER", "paypal"),
    ("KEEL_PAYMENTS_PROVIDER", "Stripe"),
    ("KEEL_PAYMENTS_PROVIDER", "sandbox,stripe"),
    ("KEEL_PAYMENTS_SANDBOX_LATENCY", "-0.1"),
    ("KEEL_PAYMENTS_SANDBOX_LATENCY", "30.5"),
    ("KEEL_PAYMENTS_SANDBOX_LATENCY", "slow"),
    ("KEEL_PAYMENTS_SANDBOX_LATENCY", "nan"),
    ("KEEL_PAYMENTS_SANDBOX_LATENCY", "inf"),
    ("KEEL_STRIPE_SECRET_KEY", "pk_live_publishable"),
    ("KEEL_STRIPE_SECRET_KEY", "whsec_signing"),
    ("KEEL_STRIPE_SECRET_KEY", "SK_live_upper"),
    ("KEEL_STRIPE_SECRET_KEY", "sk-live-dash"),
    ("KEEL_STRIPE_API_BASE", "ftp://stripe.example"),
    ("KEEL_STRIPE_API_BASE", "api.stripe.com"),
    ("KEEL_STRIPE_API_BASE", "//api.stripe.com"),
    ("KEEL_MEDIA_MAX_PIXELS", "0"),
    ("KEEL_MEDIA_MAX_PIXELS", "-1"),
    ("KEEL_MEDIA_MAX_PIXELS", "200000001"),
    ("KEEL_MEDIA_MAX_PIXELS", "1e6"),
    ("KEEL_MEDIA_MAX_PIXELS", "40M"),
    ("KEEL_MEDIA_MAX_PIXELS", "4000x4000"),
    ("KEEL_MEDIA_MAX_PIXELS", "1.5"),
    ("KEEL_MEDIA_MAX_PIXELS", "lots"),
    ("KEEL_CACHE_LOCAL_MB", "-1"),
    ("KEEL_CACHE_LOCAL_MB", "32MB"),
    ("KEEL_CACHE_LOCAL_MB", "4097"),
    ("KEEL_TRUSTED_PROXIES", "proxy.internal"),
    ("KEEL_TRUSTED_PROXIES", "10.0.0.0/33"),
    ("KEEL_TRUSTED_PROXIES", "127.0.0.1,*"),
    ("KEEL_HEADER_READ_TIMEOUT", "0"),
    ("KEEL_HEADER_READ_TIMEOUT", "10s"),
    ("KEEL_BODY_READ_TIMEOUT", "0.5"),
    ("KEEL_BODY_READ_TIMEOUT", "3601"),
]


def test_trusted_proxies_and_the_local_cache_size_are_read() -> None:
    settings = load_settings({"KEEL_TRUSTED_PROXIES": " 10.0.0.0/8, 127.0.0.1 ,fd00::/8,", "KEEL_CACHE_LOCAL_MB": "0"})
    assert settings.trusted_proxies == ("10.0.0.0/8", "127.0.0.1", "fd00::/8")
    assert settings.cache_local_mb == 0
    assert load_settings({}).trusted_proxies == ()


@pytest.mark.parametrize(("name", "value"), INVALID)
def test_invalid_value_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError) as exc:
        load_settings({name: value})
    assert str(exc.value).startswith(f"{name}:")
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize(("name", "value"), INVALID)
def test_settings_or_exit_prints_one_line(name: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        settings_or_exit({name: value})
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert err.endswith("\n")
    assert name in lines[0]
    assert "Traceback" not in err


def test_settings_or_exit_escapes_newlines_in_values(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        settings_or_exit({"KEEL_PORT": "80\n81"})
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_settings_or_exit_returns_settings_when_valid(capsys: pytest.CaptureFixture[str]) -> None:
    assert settings_or_exit({"KEEL_PORT": "8080"}).port == 8080
    assert capsys.readouterr() == ("", "")


def test_cli_exits_2_with_one_line_on_bad_setting(tmp_path: Path) -> None:
    assert KEEL_BIN.exists(), KEEL_BIN
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEEL_", "OTEL_"))}
    env["KEEL_PORT"] = "abc"
    env["KEEL_DATA_DIR"] = str(tmp_path / "data")
    proc = subprocess.run(
        [str(KEEL_BIN), "migrate", "current"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert "KEEL_PORT" in lines[0]
    # It stopped before touching the database.
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("latency", ["0", "0.25", "30"])
def test_sandbox_latency_range(latency: str) -> None:
    assert load_settings({"KEEL_PAYMENTS_SANDBOX_LATENCY": latency}).payments_sandbox_latency == float(latency)


@pytest.mark.parametrize("pixels", [1, 1_000_000, 40_000_000, 200_000_000])
def test_media_max_pixels_range(pixels: int) -> None:
    assert load_settings({"KEEL_MEDIA_MAX_PIXELS": str(pixels)}).media_max_pixels == pixels
    # Surrounding whitespace (a value pasted into an env file) is fine, like every other integer setting.
    assert load_settings({"KEEL_MEDIA_MAX_PIXELS": f" {pixels}\n"}).media_max_pixels == pixels


def test_media_max_pixels_errors_say_the_bounds() -> None:
    with pytest.raises(SettingsError, match=r"^KEEL_MEDIA_MAX_PIXELS: must be between 1 and 200000000, got 0$"):
        load_settings({"KEEL_MEDIA_MAX_PIXELS": "0"})
    with pytest.raises(SettingsError, match=r"^KEEL_MEDIA_MAX_PIXELS: expected an integer, got 'many'$"):
        load_settings({"KEEL_MEDIA_MAX_PIXELS": "many"})


@pytest.mark.parametrize("key", ["sk_test_abc123", "sk_live_abc123", "rk_live_restricted"])
@pytest.mark.parametrize("base", ["https://api.stripe.com", "http://127.0.0.1:12111"])
def test_stripe_provider_takes_a_secret_or_restricted_key_and_an_http_base(key: str, base: str) -> None:
    s = load_settings({"KEEL_PAYMENTS_PROVIDER": "stripe", "KEEL_STRIPE_SECRET_KEY": key, "KEEL_STRIPE_API_BASE": base})
    assert s.payments_provider == "stripe"
    assert s.stripe_secret_key == key
    assert str(s.stripe_secret_key) == key  # usable as the key it is
    assert s.stripe_api_base == base


def test_the_stripe_provider_needs_a_secret_key() -> None:
    with pytest.raises(SettingsError, match=r"^KEEL_PAYMENTS_PROVIDER.*KEEL_STRIPE_SECRET_KEY") as exc:
        load_settings({"KEEL_PAYMENTS_PROVIDER": "stripe"})
    assert "\n" not in str(exc.value)
    with pytest.raises(SettingsError, match="KEEL_STRIPE_SECRET_KEY"):
        load_settings({"KEEL_PAYMENTS_PROVIDER": "stripe", "KEEL_STRIPE_SECRET_KEY": ""})  # empty is unset
    # A key without the Stripe provider is kept (switching providers is one variable), and the sandbox runs.
    s = load_settings({"KEEL_STRIPE_SECRET_KEY": "sk_test_abc123"})
    assert (s.payments_provider, s.stripe_secret_key) == ("sandbox", "sk_test_abc123")


def test_the_stripe_secret_key_is_never_printed(capsys: pytest.CaptureFixture[str]) -> None:
    key = "sk_live_51TOPSECRETabcdefghijklmnop"
    s = load_settings({"KEEL_PAYMENTS_PROVIDER": "stripe", "KEEL_STRIPE_SECRET_KEY": key})
    for shown in (repr(s), str(s), f"{s!r}", repr(s.stripe_secret_key)):
        assert key not in shown
        assert "TOPSECRET" not in shown
    assert "stripe_secret_key='***'" in repr(s)
    # A malformed key is not echoed in the error either: it may be a real key pasted into the wrong variable.
    pasted = "pk_live_51TOPSECRETabcdefghijklmnop"
    with pytest.raises(SystemExit):
        settings_or_exit({"KEEL_STRIPE_SECRET_KEY": pasted})
    err = capsys.readouterr().err
    assert "KEEL_STRIPE_SECRET_KEY" in err
    assert "TOPSECRET" not in err


def test_several_workers_need_redis() -> None:
    with pytest.raises(SettingsError, match=r"^KEEL_WORKERS: .*KEEL_REDIS_URL"):
        load_settings({"KEEL_WORKERS": "2"})
    shared = load_settings({"KEEL_WORKERS": "2", "KEEL_REDIS_URL": "redis://127.0.0.1:6379/0"})
    assert shared.workers == 2
    assert shared.workers_problem(4) is None
    assert load_settings({}).workers_problem(3) is not None


def test_serve_refuses_several_workers_without_redis_before_touching_anything(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEEL_")} | {"KEEL_DATA_DIR": str(tmp_path / "d")}
    done = subprocess.run(
        [str(Path(sys.executable).parent / "keel"), "serve", "--workers", "3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "keel: invalid configuration: --workers: more than 1 worker needs KEEL_REDIS_URL (shared cache and limits)"
    ]
    assert not (tmp_path / "d").exists()


def _png(width: int, height: int) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("L", (width, height), 128).save(out, format="PNG")
    return out.getvalue()


async def test_media_max_pixels_reaches_the_upload_check(sqlite_url: str, tmp_path: Path) -> None:
    """The setting is what the composition root gives the image decoder: an image one pixel over it is
    refused at upload, one at it is accepted."""
    settings = make_settings(sqlite_url, tmp_path, KEEL_MEDIA_MAX_PIXELS="100")
    async with client_for(settings) as client:
        tenant = await signup(client)
        path = f"/v1/users/{tenant['user']['id']}/avatar"
        headers = {**tenant["headers"], "Content-Type": "image/png"}
        r = await client.put(path, headers=headers, content=_png(101, 1))
        assert r.status_code == 422, r.text
        assert r.json()["type"] == "/problems/invalid-image"
        assert "101x1" in r.json()["detail"]
        assert "100" in r.json()["detail"]
        r = await client.put(path, headers=headers, content=_png(10, 10))
        assert r.status_code == 202, r.text
