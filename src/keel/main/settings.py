"""Settings from the environment, validated once at start-up.

A bad value stops the process with one line naming the variable; no traceback.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import msgspec

from keel.contexts.media.domain.model import MAX_PIXELS
from keel.contexts.webhooks.domain.model import RETRY_SCHEDULE

N = TypeVar("N", int, float)

LogLevel = Literal["TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"]


class SettingsError(ValueError):
    pass


class Secret(str):
    """A setting that must never be printed: its repr (and so the settings' repr) hides it."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "'***'"


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    database_url: str
    redis_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    data_dir: Path = Path("var")
    log_level: LogLevel = "INFO"
    log_json: bool | None = None  # None: JSON when stderr is not a TTY
    webhooks_allow_private: bool = False
    # Delays (seconds) before each webhook retry; the default is the Standard Webhooks example schedule.
    webhooks_retry_schedule: tuple[float, ...] = tuple(RETRY_SCHEDULE)
    # Applied on `keel serve`; on by default only for the embedded SQLite database, because with
    # Postgres several processes start at once and migrations belong to a one-shot `keel migrate`.
    migrate_on_start: bool | None = None
    max_body_bytes: int = 1024 * 1024
    db_pool_size: int = 10
    db_max_overflow: int = 10
    db_pool_timeout: float = 5.0
    health_timeout: float = 1.0
    redis_timeout: float = 0.5
    cache_enabled: bool = True
    cache_local_mb: int = 32
    rate_limit_per_minute: int = 600
    signup_rate_limit_per_hour: int = 20
    trusted_proxies: tuple[str, ...] = ()
    header_read_timeout: float = 15.0
    body_read_timeout: float = 60.0
    jobs_concurrency: int = 4  # in-process job runners (embedded default only)
    smtp_url: str | None = None  # unset: emails are written as .eml files under the data directory
    mail_from: str = "Keel <no-reply@keel.localhost>"
    payments_provider: Literal["sandbox", "stripe"] = "sandbox"
    payments_sandbox_latency: float = 0.0  # seconds the sandbox provider takes per call
    stripe_secret_key: Secret | None = None
    stripe_api_base: str | None = None  # default: Stripe's own API; a local stub in tests
    media_max_pixels: int = MAX_PIXELS  # larger images are refused at upload (decompression bombs)
    otel_endpoint: str | None = None
    service_name: str = "keel"

    @property
    def is_embedded_db(self) -> bool:
        return self.database_url.startswith("sqlite")

    def workers_problem(self, workers: int) -> str | None:
        """Why ``workers`` processes cannot run on these settings, if they cannot."""
        if workers > 1 and self.redis_url is None:
            # In-process caches, limits and idempotency keys cannot be shared between processes.
            return "KEEL_WORKERS: more than 1 worker needs KEEL_REDIS_URL (shared cache and limits)"
        return None

    @property
    def should_migrate_on_start(self) -> bool:
        return self.is_embedded_db if self.migrate_on_start is None else self.migrate_on_start


_BOOL_TRUE = {"1", "true", "yes", "on"}
_BOOL_FALSE = {"0", "false", "no", "off"}


def _bool(name: str, raw: str) -> bool:
    v = raw.strip().lower()
    if v in _BOOL_TRUE:
        return True
    if v in _BOOL_FALSE:
        return False
    raise SettingsError(f"{name}: expected true or false, got {raw!r}")


def _number(name: str, raw: str, kind: type[N], lo: N, hi: N) -> N:
    try:
        v = kind(raw)
    except ValueError:
        expected = "an integer" if kind is int else "a number"
        raise SettingsError(f"{name}: expected {expected}, got {raw!r}") from None
    if not lo <= v <= hi:
        raise SettingsError(f"{name}: must be between {lo} and {hi}, got {v}")
    return v


def _int(name: str, raw: str, lo: int, hi: int) -> int:
    return _number(name, raw, int, lo, hi)


def _float(name: str, raw: str, lo: float, hi: float) -> float:
    return _number(name, raw, float, lo, hi)


def _schedule(name: str, raw: str) -> tuple[float, ...]:
    parts = [p.strip() for p in raw.split(",")]
    if not 1 <= len(parts) <= 20:
        raise SettingsError(f"{name}: expected 1 to 20 comma-separated delays in seconds, got {raw!r}")
    return tuple(_float(name, p, 0.01, 7 * 24 * 3600) for p in parts)


def _networks(name: str, raw: str) -> tuple[str, ...]:
    parts = [p.strip() for p in raw.split(",") if p.strip()]
    for part in parts:
        try:
            ipaddress.ip_network(part, strict=False)
        except ValueError:
            raise SettingsError(f"{name}: expected addresses or networks (CIDR), got {part!r}") from None
    return tuple(parts)


_DB_SCHEMES = ("sqlite+aiosqlite://", "postgresql+asyncpg://")


def _asyncpg_query(url: str) -> str:
    """asyncpg spells libpq's ``sslmode`` as ``ssl``; translate so platform-issued URLs just work."""
    parts = urlsplit(url)
    if not parts.query:
        return url
    query = [("ssl" if k == "sslmode" else k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)]
    return urlunsplit(parts._replace(query=urlencode(query)))


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build settings from ``env`` (default: the process environment); raise ``SettingsError``."""
    e = os.environ if env is None else env

    def get(name: str) -> str | None:
        v = e.get(name)
        return v if v not in (None, "") else None

    data_dir = Path(get("KEEL_DATA_DIR") or "var")
    database_url = get("KEEL_DATABASE_URL")
    if database_url is None:
        database_url = f"sqlite+aiosqlite:///{(data_dir / 'keel.db').as_posix()}"
    elif database_url.startswith(("postgres://", "postgresql://")):
        # Accept the libpq spelling most platforms hand out and pick the async driver for it.
        database_url = "postgresql+asyncpg://" + database_url.split("://", 1)[1]
    if not database_url.startswith(_DB_SCHEMES):
        raise SettingsError(f"KEEL_DATABASE_URL: must start with one of {', '.join(_DB_SCHEMES)}")
    if database_url.startswith("postgresql+asyncpg://"):
        database_url = _asyncpg_query(database_url)

    redis_url = get("KEEL_REDIS_URL")
    if redis_url is not None and not redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise SettingsError("KEEL_REDIS_URL: must start with redis://, rediss:// or unix://")

    kwargs: dict[str, object] = {"database_url": database_url, "redis_url": redis_url, "data_dir": data_dir}
    if (v := get("KEEL_HOST")) is not None:
        kwargs["host"] = v
    if (v := get("KEEL_PORT")) is not None:
        kwargs["port"] = _int("KEEL_PORT", v, 1, 65535)
    if (v := get("KEEL_WORKERS")) is not None:
        kwargs["workers"] = _int("KEEL_WORKERS", v, 1, 64)
    if (v := get("KEEL_LOG_LEVEL")) is not None:
        level = v.upper()
        if level not in LogLevel.__args__:  # type: ignore[attr-defined]
            raise SettingsError(f"KEEL_LOG_LEVEL: expected one of {', '.join(LogLevel.__args__)}, got {v!r}")  # type: ignore[attr-defined]
        kwargs["log_level"] = level
    if (v := get("KEEL_LOG_JSON")) is not None and v.lower() != "auto":
        kwargs["log_json"] = _bool("KEEL_LOG_JSON", v)
    if (v := get("KEEL_WEBHOOKS_ALLOW_PRIVATE")) is not None:
        kwargs["webhooks_allow_private"] = _bool("KEEL_WEBHOOKS_ALLOW_PRIVATE", v)
    if (v := get("KEEL_WEBHOOKS_RETRY_SCHEDULE")) is not None:
        kwargs["webhooks_retry_schedule"] = _schedule("KEEL_WEBHOOKS_RETRY_SCHEDULE", v)
    if (v := get("KEEL_MIGRATE_ON_START")) is not None:
        kwargs["migrate_on_start"] = _bool("KEEL_MIGRATE_ON_START", v)
    if (v := get("KEEL_MAX_BODY_BYTES")) is not None:
        kwargs["max_body_bytes"] = _int("KEEL_MAX_BODY_BYTES", v, 1024, 1024**3)
    if (v := get("KEEL_DB_POOL_SIZE")) is not None:
        kwargs["db_pool_size"] = _int("KEEL_DB_POOL_SIZE", v, 1, 1000)
    if (v := get("KEEL_DB_MAX_OVERFLOW")) is not None:
        kwargs["db_max_overflow"] = _int("KEEL_DB_MAX_OVERFLOW", v, 0, 1000)
    if (v := get("KEEL_DB_POOL_TIMEOUT")) is not None:
        kwargs["db_pool_timeout"] = _float("KEEL_DB_POOL_TIMEOUT", v, 0.1, 300)
    if (v := get("KEEL_HEALTH_TIMEOUT")) is not None:
        kwargs["health_timeout"] = _float("KEEL_HEALTH_TIMEOUT", v, 0.05, 30)
    if (v := get("KEEL_REDIS_TIMEOUT")) is not None:
        kwargs["redis_timeout"] = _float("KEEL_REDIS_TIMEOUT", v, 0.01, 30)
    if (v := get("KEEL_CACHE_ENABLED")) is not None:
        kwargs["cache_enabled"] = _bool("KEEL_CACHE_ENABLED", v)
    if (v := get("KEEL_CACHE_LOCAL_MB")) is not None:
        kwargs["cache_local_mb"] = _int("KEEL_CACHE_LOCAL_MB", v, 0, 4096)
    if (v := get("KEEL_RATE_LIMIT_PER_MINUTE")) is not None:
        kwargs["rate_limit_per_minute"] = _int("KEEL_RATE_LIMIT_PER_MINUTE", v, 1, 1_000_000)
    if (v := get("KEEL_SIGNUP_RATE_LIMIT_PER_HOUR")) is not None:
        kwargs["signup_rate_limit_per_hour"] = _int("KEEL_SIGNUP_RATE_LIMIT_PER_HOUR", v, 1, 1_000_000)
    if (v := get("KEEL_HEADER_READ_TIMEOUT")) is not None:
        kwargs["header_read_timeout"] = _float("KEEL_HEADER_READ_TIMEOUT", v, 1, 600)
    if (v := get("KEEL_BODY_READ_TIMEOUT")) is not None:
        kwargs["body_read_timeout"] = _float("KEEL_BODY_READ_TIMEOUT", v, 1, 3600)
    if (v := get("KEEL_TRUSTED_PROXIES")) is not None:
        kwargs["trusted_proxies"] = _networks("KEEL_TRUSTED_PROXIES", v)
    if (v := get("KEEL_JOBS_CONCURRENCY")) is not None:
        kwargs["jobs_concurrency"] = _int("KEEL_JOBS_CONCURRENCY", v, 1, 256)
    if (v := get("KEEL_SMTP_URL")) is not None:
        if not v.startswith(("smtp://", "smtps://")):
            raise SettingsError("KEEL_SMTP_URL: must start with smtp:// or smtps://")
        kwargs["smtp_url"] = v
    if (v := get("KEEL_MAIL_FROM")) is not None:
        kwargs["mail_from"] = v
    if (v := get("KEEL_PAYMENTS_PROVIDER")) is not None:
        if v not in ("sandbox", "stripe"):
            raise SettingsError(f"KEEL_PAYMENTS_PROVIDER: expected sandbox or stripe, got {v!r}")
        kwargs["payments_provider"] = v
    if (v := get("KEEL_PAYMENTS_SANDBOX_LATENCY")) is not None:
        kwargs["payments_sandbox_latency"] = _float("KEEL_PAYMENTS_SANDBOX_LATENCY", v, 0, 30)
    if (v := get("KEEL_STRIPE_SECRET_KEY")) is not None:
        if not v.startswith(("sk_", "rk_")):
            raise SettingsError("KEEL_STRIPE_SECRET_KEY: expected a Stripe secret or restricted key (sk_… or rk_…)")
        kwargs["stripe_secret_key"] = Secret(v)
    if (v := get("KEEL_STRIPE_API_BASE")) is not None:
        if not v.startswith(("https://", "http://")):
            raise SettingsError("KEEL_STRIPE_API_BASE: must be an http(s) URL")
        kwargs["stripe_api_base"] = v.rstrip("/")
    if kwargs.get("payments_provider") == "stripe" and "stripe_secret_key" not in kwargs:
        raise SettingsError("KEEL_PAYMENTS_PROVIDER=stripe needs KEEL_STRIPE_SECRET_KEY")
    if (v := get("KEEL_MEDIA_MAX_PIXELS")) is not None:
        kwargs["media_max_pixels"] = _int("KEEL_MEDIA_MAX_PIXELS", v, 1, 200_000_000)
    kwargs["otel_endpoint"] = get("OTEL_EXPORTER_OTLP_ENDPOINT") or get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if (v := get("OTEL_SERVICE_NAME")) is not None:
        kwargs["service_name"] = v
    settings = Settings(**kwargs)  # type: ignore[arg-type]
    if (problem := settings.workers_problem(settings.workers)) is not None:
        raise SettingsError(problem)
    return settings


def settings_or_exit(env: Mapping[str, str] | None = None) -> Settings:
    try:
        return load_settings(env)
    except SettingsError as exc:
        print(f"keel: invalid configuration: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
