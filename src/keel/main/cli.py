"""The ``keel`` command: serve, worker, cron, migrate."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from keel.main.settings import Settings, settings_or_exit


def _positive(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return value


def _serve(args: argparse.Namespace) -> int:
    from granian import Granian
    from granian.constants import Interfaces, Loops
    from granian.http import HTTP1Settings
    from loguru import logger

    from keel.main import db
    from keel.main.logging import configure_logging

    settings = settings_or_exit()
    workers = args.workers or settings.workers
    if (problem := settings.workers_problem(workers)) is not None:
        print(f"keel: invalid configuration: {problem.replace('KEEL_WORKERS', '--workers')}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_json)
    if settings.should_migrate_on_start:
        if settings.is_embedded_db:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
        db.upgrade(settings.database_url)
        logger.info("database migrated to head")
    host = args.host or settings.host
    port = args.port if args.port is not None else settings.port
    logger.info("serving Keel on http://{}:{} ({} worker(s)); docs at /docs", host, port, workers)
    Granian(
        "keel.main.asgi:create_app",
        factory=True,
        address=host,
        port=port,
        interface=Interfaces.ASGI,
        # The standard loop, whatever else is installed (granian would pick uvloop if it were). Measured:
        # uvloop made a bare handler 40 % faster but gave Keel's routes nothing (cached read and payments
        # within noise), so the server does not change with the environment.
        loop=Loops.asyncio,
        workers=workers,
        log_access=False,
        respawn_failed_workers=True,
        # A client has this long to send its headers (slowloris); BodyDeadlineMiddleware bounds the body.
        http1_settings=HTTP1Settings(header_read_timeout=int(settings.header_read_timeout * 1000)),
        # Route the server's own records through loguru so every line shares one format.
        log_dictconfig={
            "version": 1,
            "disable_existing_loggers": False,
            "handlers": {"loguru": {"class": "keel.main.logging.InterceptHandler"}},
            "loggers": {
                "_granian": {"handlers": ["loguru"], "level": "INFO", "propagate": False},
                "granian.access": {"handlers": ["loguru"], "level": "WARNING", "propagate": False},
            },
        },
        reload=args.reload,
    ).serve()
    return 0


def _needs_redis(settings: Settings, command: str) -> bool:
    if settings.redis_url is None:
        print(
            f"keel: `keel {command}` needs KEEL_REDIS_URL; the embedded default runs jobs inside `keel serve`",
            file=sys.stderr,
        )
        return False
    return True


def _worker(args: argparse.Namespace) -> int:
    from keel.platform.domain.jobs import QUEUES

    settings = settings_or_exit()
    if not _needs_redis(settings, "worker"):
        return 2
    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    if not queues or any(q not in QUEUES for q in queues):
        print(f"keel: --queues: a comma-separated list of {', '.join(QUEUES)}", file=sys.stderr)
        return 2
    from keel.main.worker import run_worker  # after the checks: it imports the whole application

    run_worker(
        settings,
        queues=queues,
        burst=args.burst,
        simple=args.simple,
        name=args.name,
        maintenance_interval=args.maintenance_interval,
        monitoring_interval=args.monitoring_interval,
        heartbeat_grace=args.heartbeat_grace,
        worker_ttl=args.worker_ttl,
    )
    return 0


def _cron(args: argparse.Namespace) -> int:
    settings = settings_or_exit()
    if not _needs_redis(settings, "cron"):
        return 2
    from keel.main.worker import run_cron

    run_cron(settings)
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from alembic import command

    from keel.main import db
    from keel.main.logging import configure_logging

    settings = settings_or_exit()
    configure_logging(settings.log_level, settings.log_json)
    if settings.is_embedded_db:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    cfg = db.alembic_config(settings.database_url)
    match args.action:
        case "upgrade":
            command.upgrade(cfg, args.revision or "head")
        case "downgrade":
            command.downgrade(cfg, args.revision or "-1")
        case "current":
            command.current(cfg, verbose=True)
        case "history":
            command.history(cfg)
        case "check":
            command.check(cfg)
        case "revision":
            command.revision(cfg, message=args.message, autogenerate=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="keel", description="Keel: multi-tenant SaaS API backbone.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the HTTP API (granian)")
    serve.add_argument("--host", help="bind address (default KEEL_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default KEEL_PORT or 8000)")
    serve.add_argument("--workers", type=int, help="server worker processes (default KEEL_WORKERS or 1)")
    serve.add_argument("--reload", action="store_true", help="restart on code changes (development)")
    serve.set_defaults(func=_serve)

    worker = sub.add_parser("worker", help="run jobs from the RQ queues (with the retry/delay scheduler)")
    worker.add_argument(
        "--queues", default="high,default,low", help="queues in priority order (default high,default,low)"
    )
    worker.add_argument("--burst", action="store_true", help="quit when the queues are empty")
    worker.add_argument(
        "--simple",
        action="store_true",
        help="run jobs in this process instead of forking per job (faster, less isolated)",
    )
    worker.add_argument("--name", help="worker name (default: host, pid and a random suffix)")
    worker.add_argument(
        "--maintenance-interval",
        type=_positive,
        default=600,
        metavar="S",
        help="seconds between registry clean-ups, which find abandoned jobs (default 600)",
    )
    worker.add_argument(
        "--monitoring-interval",
        type=_positive,
        default=30,
        metavar="S",
        help="seconds between heartbeats of a running job (default 30)",
    )
    worker.add_argument(
        "--heartbeat-grace",
        type=_positive,
        default=60,
        metavar="S",
        help="seconds after a missed heartbeat before a job counts as abandoned (default 60)",
    )
    worker.add_argument(
        "--worker-ttl",
        type=_positive,
        default=420,
        metavar="S",
        help="seconds a silent worker stays registered; idle workers wake every TTL-15 s (default 420)",
    )
    worker.set_defaults(func=_worker)

    cron = sub.add_parser("cron", help="enqueue periodic jobs (outbox sweep, webhook safety net) on schedule")
    cron.set_defaults(func=_cron)

    migrate = sub.add_parser("migrate", help="apply or inspect database migrations")
    migrate.add_argument(
        "action",
        nargs="?",
        default="upgrade",
        choices=["upgrade", "downgrade", "current", "history", "check", "revision"],
    )
    migrate.add_argument("revision", nargs="?", help="target revision (upgrade: head, downgrade: -1)")
    migrate.add_argument("-m", "--message", default="change", help="message for a new revision")
    migrate.set_defaults(func=_migrate)

    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
