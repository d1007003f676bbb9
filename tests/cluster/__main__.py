"""``just cluster``: the production topology from local binaries, on 127.0.0.1, proving what only several
processes can show, then serving until Ctrl-C.

    uv run --no-sync python -m tests.cluster [--check] [--seconds N] [--rounds 20] [--rate-limit 10]
        [--payments 8] [--kill-payments 6] [--latency 1.0] [--log-level WARNING]

A throwaway Postgres and Redis (tests/support/servers.py), ``keel migrate``, two ``keel serve`` on their own
ports, two forking ``keel worker`` and one ``keel cron`` (tests/cluster/topology.py). The proofs
(tests/cluster/proofs.py) print a PASS/FAIL table; the exit code is 1 if any failed. ``--check`` stops
there. Otherwise the worker killed by proof 4 is replaced and the cluster keeps running, its URLs printed,
until Ctrl-C or ``--seconds``. Every process is ended on the way out, however the run ends.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.cluster.proofs import Options, prove, table
from tests.cluster.topology import APIS, WORKERS, Cluster, cluster
from tests.support.servers import PostgresServer, admin_sql, postgres_server, redis_server

DATABASE = "keel_cluster"


def describe(c: Cluster, pg: PostgresServer) -> str:
    lines = ["Keel cluster on 127.0.0.1:"]
    for i, url in enumerate(c.api_urls, 1):
        lines.append(f"  API {i}      {url}   (docs {url}/docs, pid {c.servers.pid(f'api-{i}')})")
    for name, proc in c.workers.items():
        lines.append(f"  worker     {name}   (forking, pid {c.servers.pid(proc)})")
    lines += [
        f"  cron       keel cron   (pid {c.servers.pid('cron')})",
        f"  Postgres   {c.database_url}   (psql -h 127.0.0.1 -p {pg.port} -U postgres {DATABASE})",
        f"  Redis      {c.redis_url}",
        f"  logs       {c.servers.logs}/*.log",
        f"  more processes: KEEL_DATABASE_URL={c.database_url} KEEL_REDIS_URL={c.redis_url} keel worker",
    ]
    return "\n".join(lines)


async def serve_until(c: Cluster, seconds: float | None) -> int:
    """Keep the cluster up until Ctrl-C (the caller sees KeyboardInterrupt) or ``seconds``; 1 if a process
    exits meanwhile."""
    deadline = None if seconds is None else time.monotonic() + seconds
    print(f"Running until Ctrl-C{'' if seconds is None else f' or {seconds:g} s'}.", flush=True)
    while deadline is None or time.monotonic() < deadline:
        try:
            c.servers.check_alive()
        except RuntimeError as exc:
            print(f"A process exited: {exc}", file=sys.stderr, flush=True)
            return 1
        await asyncio.sleep(1)
    return 0


async def run(args: argparse.Namespace, pg: PostgresServer, redis_url: str, base: Path) -> int:
    options = Options(
        rounds=args.rounds,
        rate_limit=args.rate_limit,
        payments=args.payments,
        kill_payments=args.kill_payments,
        sandbox_latency=args.latency,
    )
    await admin_sql(pg, f'CREATE DATABASE "{DATABASE}"')
    print(f"Starting {APIS} APIs, {WORKERS} workers and cron (logs in {base})...", flush=True)
    started = time.monotonic()
    async with cluster(pg.url(DATABASE), redis_url, base, sandbox_latency=args.latency, log_level=args.log_level) as c:
        print(f"Ready in {time.monotonic() - started:.1f} s.\n{describe(c, pg)}\n", flush=True)
        proofs = await prove(c, options)
        print(table(proofs), flush=True)
        failed = not all(p.passed for p in proofs)
        if failed:
            print(f"\nLast log lines:\n{c.tail()}", flush=True)
        if args.check:
            return int(failed)
        replacement = c.spawn_worker()
        print(f"\n{replacement} started in place of the killed worker.\n{describe(c, pg)}", flush=True)
        return max(int(failed), await serve_until(c, args.seconds))


def main(argv: Any = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="run the proofs, then stop (exit 1 if any failed)")
    parser.add_argument("--seconds", type=float, help="without --check: stop after this long instead of Ctrl-C")
    parser.add_argument("--rounds", type=int, default=Options.rounds, help="proof 1: update-then-read rounds")
    parser.add_argument("--rate-limit", type=int, default=Options.rate_limit, help="proof 2: requests per minute")
    parser.add_argument("--payments", type=int, default=Options.payments, help="proof 3: payments to spread")
    parser.add_argument("--kill-payments", type=int, default=Options.kill_payments, help="proof 4: payments in flight")
    parser.add_argument(
        "--latency", type=float, default=Options.sandbox_latency, help="seconds each sandbox capture takes"
    )
    parser.add_argument("--log-level", default="WARNING", help="KEEL_LOG_LEVEL of every process")
    parser.add_argument("--max-seconds", type=float, default=600, help="--check: give up after this long")
    args = parser.parse_args(argv)
    if args.rate_limit < 1 or args.rounds < 1 or args.payments < 2 or args.kill_payments < 1 or args.latency < 0.2:
        parser.error("--rate-limit and --rounds >= 1, --payments >= 2, --kill-payments >= 1, --latency >= 0.2")

    # SIGTERM ends the run like Ctrl-C: through the finally blocks that stop every process.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    base = Path(tempfile.mkdtemp(prefix="keel-cluster-"))
    try:
        with postgres_server() as pg, redis_server() as redis:
            coro = run(args, pg, redis.url, base)
            if args.check:
                coro = asyncio.wait_for(coro, args.max_seconds)
            return asyncio.run(coro)
    except KeyboardInterrupt:
        print("\nStopped.", flush=True)
        return 0
    except TimeoutError:
        print(f"No result within {args.max_seconds:g} s (raise --max-seconds).", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
