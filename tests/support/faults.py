"""Fault injection against real Keel processes: ``keel serve``/``worker``/``cron`` subprocesses on 127.0.0.1, a
bounded background load that records every answer with its timing, direct SQL on the database, a webhook
receiver that accepts connections and never answers, and a TCP proxy that can swallow a client's traffic."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import redis
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.serializers import JSONSerializer

from tests.cluster.topology import FAST_WORKER
from tests.support.app import UNLIMITED
from tests.support.processes import descendants
from tests.support.servers import PostgresServer, free_port

KEEL = str(Path(sys.executable).parent / "keel")


def keel_env(database_url: str, redis_url: str, data_dir: Path, **extra: str) -> dict[str, str]:
    """The production configuration every process of one deployment shares, with short dependency timeouts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEEL_", "OTEL_"))}
    return env | {
        "KEEL_DATABASE_URL": database_url,
        "KEEL_REDIS_URL": redis_url,
        "KEEL_DATA_DIR": str(data_dir),
        "KEEL_HOST": "127.0.0.1",
        "KEEL_MIGRATE_ON_START": "false",
        "KEEL_WEBHOOKS_ALLOW_PRIVATE": "true",
        "KEEL_HEALTH_TIMEOUT": "0.5",
        "KEEL_REDIS_TIMEOUT": "0.3",
        "KEEL_LOG_JSON": "true",
        "KEEL_LOG_LEVEL": "WARNING",
        **UNLIMITED,
        **extra,
    }


# -- processes -----------------------------------------------------------------------------------------


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


@dataclass
class KeelProcess:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    url: str | None = None  # an API's base URL

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def tree(self) -> list[int]:
        return [self.proc.pid, *descendants(self.proc.pid)] if self.alive else []

    def kill(self) -> list[int]:
        """SIGKILL the process and every descendant at once, as a lost machine or an OOM kill would: frozen
        first, so none of them sees another die and reacts. Returns the pids."""
        pids = self.tree()
        _signal_all(pids, signal.SIGSTOP)
        _signal_all(pids, signal.SIGKILL)
        self.proc.wait(10)
        return pids

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM to its process group, then SIGKILL for anything of its tree still there after ``grace``."""
        pids = self.tree()
        if pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        _signal_all(pids, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.text().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out


class Deployment:
    """Every Keel process a test starts, each in its own session, its output in ``logs``; ``stop_all`` ends
    them all, process trees included."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.logs.mkdir(parents=True, exist_ok=True)
        self.processes: list[KeelProcess] = []

    def spawn(self, name: str, env: dict[str, str], *args: str) -> KeelProcess:
        log = self.logs / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [KEEL, *args], env=env, cwd=self.logs, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        process = KeelProcess(name, proc, log)
        self.processes.append(process)
        return process

    def spawn_api(self, name: str, env: dict[str, str]) -> KeelProcess:
        """``keel serve`` on a free port (not ready yet: see ``ready``)."""
        port = free_port()
        process = self.spawn(name, env | {"KEEL_PORT": str(port)}, "serve")
        process.url = f"http://127.0.0.1:{port}"
        return process

    async def ready(self, process: KeelProcess, within: float = 60.0) -> KeelProcess:
        """Once ``/healthz`` of the API answers 200."""
        assert process.url is not None
        deadline = time.monotonic() + within
        async with httpx.AsyncClient(base_url=process.url, timeout=2) as http:
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get("/healthz")).status_code == 200:
                        return process
                if not process.alive or time.monotonic() > deadline:
                    raise RuntimeError(f"keel serve ({process.name}) did not become ready:\n{self.tail()}")
                await asyncio.sleep(0.1)

    async def api(self, name: str, env: dict[str, str], within: float = 60.0) -> KeelProcess:
        return await self.ready(self.spawn_api(name, env), within)

    def worker(self, name: str, env: dict[str, str], *args: str) -> KeelProcess:
        return self.spawn(name, env, "worker", "--name", name, *FAST_WORKER, *args)

    def tail(self, lines: int = 30) -> str:
        out = []
        for p in self.processes:
            out.append(f"--- {p.name} ({'running' if p.alive else f'exit {p.proc.returncode}'}) ---")
            out.extend(p.text().splitlines()[-lines:])
        return "\n".join(out)

    def stop_all(self) -> None:
        for p in self.processes:
            p.stop(grace=2.0)


async def worker_registered(redis_url: str, name: str, within: float = 60.0) -> None:
    """Until RQ lists the worker ``name`` (it is then listening on its queues)."""
    conn = redis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + within
        while not conn.exists(f"rq:worker:{name}"):
            if time.monotonic() > deadline:
                raise AssertionError(f"worker {name} did not register within {within:.0f} s")
            await asyncio.sleep(0.1)
    finally:
        conn.close()


def expire_scheduler_locks(redis_url: str) -> None:
    """A SIGKILLed worker's scheduler keeps RQ's scheduler locks for 60 s past its last heartbeat (RQ's fixed
    TTL); until they expire, no retry is moved onto its queue. Expire them rather than wait a minute."""
    conn = redis.Redis.from_url(redis_url)
    try:
        for key in conn.scan_iter(match="rq:scheduler-lock:*"):
            conn.delete(key)
    finally:
        conn.close()


# -- background load -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """One request of the load: when it started and ended (monotonic seconds) and what came back."""

    client: str
    n: int
    started: float
    ended: float
    status: int | None  # None: no HTTP answer (connection refused or reset, timeout)
    content_type: str
    body: str
    headers: dict[str, str]
    error: str | None = None

    def json(self) -> dict[str, Any]:
        try:
            value = json.loads(self.body)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}


RequestFn = Callable[[httpx.AsyncClient, int], Awaitable[httpx.Response]]


@dataclass
class Load:
    """A few concurrent clients, each repeating its request (``n`` counts its requests) with ``pause``
    seconds between them, until ``stop()`` or ``within`` seconds, whichever comes first."""

    base_url: str
    within: float = 60.0
    timeout: float = 10.0
    answers: list[Answer] = field(default_factory=list)
    _clients: list[tuple[str, RequestFn, float]] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, client: str, request: RequestFn, pause: float = 0.01) -> None:
        self._clients.append((client, request, pause))

    def start(self) -> None:
        deadline = time.monotonic() + self.within
        self._tasks = [asyncio.create_task(self._run(c, fn, pause, deadline)) for c, fn, pause in self._clients]

    async def _run(self, client: str, request: RequestFn, pause: float, deadline: float) -> None:
        async with httpx.AsyncClient(base_url=self.base_url, timeout=self.timeout) as http:
            n = 0
            while not self._stop.is_set() and time.monotonic() < deadline:
                started = time.monotonic()
                try:
                    r = await request(http, n)
                    answer = Answer(
                        client=client,
                        n=n,
                        started=started,
                        ended=time.monotonic(),
                        status=r.status_code,
                        content_type=r.headers.get("content-type", ""),
                        body=r.text,
                        headers=dict(r.headers),
                    )
                except httpx.TransportError as exc:
                    answer = Answer(client, n, started, time.monotonic(), None, "", "", {}, error=repr(exc))
                self.answers.append(answer)
                n += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), pause)

    async def stop(self) -> list[Answer]:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        return list(self.answers)

    def of(self, client: str) -> list[Answer]:
        """Answers of every client whose label starts with ``client``."""
        return [a for a in self.answers if a.client.startswith(client)]

    async def until(self, probe: Callable[[], bool], what: str, within: float = 15.0) -> float:
        """Wait (bounded) until ``probe()`` holds on the answers so far; returns the monotonic time it did."""
        deadline = time.monotonic() + within
        while not probe():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {within:.0f} s ({len(self.answers)} answers so far)")
            if all(t.done() for t in self._tasks):
                raise AssertionError(f"{what}: the load ended first")
            await asyncio.sleep(0.02)
        return time.monotonic()


# -- the database, read directly ---------------------------------------------------------------------------


def _dsn(database_url: str) -> str:
    return database_url.replace("postgresql+asyncpg://", "postgresql://", 1)


async def sql(database_url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(_dsn(database_url))
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def connection(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """One connection of the test's own, for holding locks across steps."""
    conn = await asyncpg.connect(_dsn(database_url))
    try:
        yield conn
    finally:
        await conn.close()


# -- a receiver that never answers ---------------------------------------------------------------------------


@dataclass
class HangingReceiver:
    """Accepts every connection and reads the request, then says nothing until the test ends."""

    url: str = ""
    requests: list[tuple[float, bytes]] = field(default_factory=list)  # (monotonic time, bytes read)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    def header(self, index: int, name: str) -> str | None:
        with self._lock:
            raw = self.requests[index][1]
        for line in raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
            key, _, value = line.decode("latin-1").partition(":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None


@contextlib.contextmanager
def hanging_receiver() -> Iterator[HangingReceiver]:
    receiver = HangingReceiver()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    receiver.url = f"http://127.0.0.1:{listener.getsockname()[1]}/hooks"
    held: list[socket.socket] = []
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            held.append(conn)
            conn.settimeout(2)
            data = b""
            with contextlib.suppress(OSError):
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            with receiver._lock:
                receiver.requests.append((time.monotonic(), data))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        done.set()
        thread.join(5)
        for conn in held:
            conn.close()
        listener.close()


async def wait_for(probe: Callable[[], bool], what: str, within: float) -> float:
    """Poll a synchronous condition (bounded); returns the monotonic time it held."""
    deadline = time.monotonic() + within
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within:.0f} s")
        await asyncio.sleep(0.02)
    return time.monotonic()


def begin_smart_shutdown(server: PostgresServer) -> None:
    """Ask Postgres to stop once its sessions end, without waiting: until then it refuses new connections
    ("the database system is shutting down"), as it does briefly during every restart."""
    subprocess.run(
        [*server.as_user, str(server.bindir / "pg_ctl"), "-D", str(server.base / "data"), "stop", "-m", "smart", "-W"],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=30,
    )


# -- a TCP proxy that can swallow everything ---------------------------------------------------------------------


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to 127.0.0.1:``target``. Once ``blackholed`` is set, it reads what either side
    sends and drops it: the connections stay open and nothing arrives, as on a network partition. A command a
    client sends then never reaches the server (a frozen server would still run it when it resumed)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.blackholed = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = int(self._listener.getsockname()[1])
        self._closing = threading.Event()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def _thread(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def start(self) -> None:
        self._thread(self._accept)

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=2)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            self._thread(self._pump, client, upstream)
            self._thread(self._pump, upstream, client)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if not self.blackholed.is_set():
                    dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._closing.set()
        self._listener.close()
        with self._lock:
            sockets, threads = list(self._sockets), list(self._threads)
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        for thread in threads:
            thread.join(5)


@contextlib.contextmanager
def tcp_proxy(target: int) -> Iterator[TcpProxy]:
    proxy = TcpProxy(target)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.close()


def rq_jobs(redis_url: str, name: str | None = None) -> list[Job]:
    """Every Keel job RQ holds (named ``name``, if given), whatever its state, read without any registry clean-up."""
    conn = redis.Redis.from_url(redis_url)
    try:
        jobs = []
        for key in conn.scan_iter(match="rq:job:*"):
            job_id = key.decode().removeprefix("rq:job:")
            if ":" in job_id:
                continue  # a job's auxiliary keys (executions, dependents)
            with contextlib.suppress(NoSuchJobError):
                job = Job.fetch(job_id, connection=conn, serializer=JSONSerializer)
                if job.meta.get("name") and (name is None or job.meta["name"] == name):
                    jobs.append(job)
        return jobs
    finally:
        conn.close()
