"""Soak: minutes of mixed, paced load against Keel's production topology, checking that nothing drifts.

The question is stability, not peak throughput: the load is paced below what the machine serves, so the jobs it
causes keep up, and the run checks promises rather than measuring speed. Everything runs on 127.0.0.1 and every
process started here is ended in ``finally`` blocks, on errors and on the time limit too:

- a throwaway Postgres and Redis (tests/support/servers.py); the database is migrated, ten tenants sign up
  through the API, users and a history of payments are bulk-inserted (the load benchmark's ``seed``), and the
  seeded payments and refunds left ``pending`` are settled in SQL, so the payments safety net has nothing old
  to resume: every job afterwards comes from the soak itself;
- ``keel serve --workers N`` (granian, production configuration, log level WARNING, rate limits out of the
  way), two ``keel worker`` (forking a work horse per job, as in production; ``--simple`` runs jobs in the
  worker processes) and one ``keel cron``;
- a webhook receiver in this process (tests/support/receivers.py); each tenant registers one endpoint on it
  for ``payment.*`` and ``user.updated`` (``KEEL_WEBHOOKS_ALLOW_PRIVATE=true``);
- ``wrk`` running a request mix (``MIX``) for ``--minutes``, one connection per thread so that each answer
  belongs to its thread's last request, every thread paced to its share of ``--rate`` (slots missed behind a
  slow answer are dropped, never caught up in a burst): cached ``GET /v1/users/{id}``, user and payment lists,
  reads of the thread's own payments and of their capture jobs, ``PATCH /v1/users/{id}``, ``POST /v1/payments``
  with a unique ``Idempotency-Key`` (5 % declined cards, 5 % a provider that fails twice before it succeeds,
  so retries go through RQ's scheduler; a quarter with a customer email, hence receipts) and refunds, half of
  them partial, of the thread's card payments once they are ``--refund-after`` seconds old.

Every 10 s: CPU used by the API, the workers (work horses included), Postgres and the rest, and by the whole
machine; requests and errors so far (each wrk thread writes its counters to a file once a second); RSS of each
granian worker and each ``keel worker`` process; RQ queue depths (queued per queue, running, scheduled
retries); Postgres connections to the database; webhooks received. After the load, up to ``--drain`` seconds
for the queues to empty and every payment, refund, outbox event and webhook delivery to reach a final state.

Promises (PASS/FAIL; exit code 1 if any fails):

1. no errors: every answer has its request's status (200; 202 for payments and refunds; a refund may also be
   409 while its payment is still pending: the documented answer, counted apart), no socket errors, no answer
   slower than ``--timeout``;
2. the RSS of each API worker process grows by at most 5 % over the second half of the load, and no worker
   was replaced;
3. the queues return to 0 after the load (their largest depth is reported) and no job ends failed;
4. every write the API accepted (payment, refund, user change) is in the database, plus at most the requests
   still unanswered when the load stopped (the server may have done them); every payment reached a final state
   (succeeded, failed, refunded, partially_refunded), and so did every refund;
5. the webhooks received (distinct ``webhook-id``, signatures checked with the official ``standardwebhooks``
   package as they arrive) are exactly those the run's events owe: one per payment created, per payment that
   succeeded or failed, per refund settled or failed, and per ``user.updated`` event;
6. the receipts sent are those owed (each succeeded payment and settled refund with a customer email);
7. every process ran to the end and ``/healthz`` answers 200 afterwards.

The report (Markdown) is printed and written to ``$KEEL_DATA_DIR/bench/soak-<UTC time>.md`` (``./var`` by
default).

    uv run --no-sync python -m tests.benchmarks.soak [--minutes 10] [--workers 2] [--simple] [--rate R]
        [--connections 4] [--timeout 5] [--refund-after 20] [--drain 120]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from redis import Redis
from rq import Queue, Worker
from rq.serializers import JSONSerializer
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from standardwebhooks.webhooks import Webhook

from keel.main import db
from keel.main.logging import configure_logging
from keel.platform.domain.jobs import QUEUES
from tests.benchmarks.analytics import engine_for, signup
from tests.benchmarks.load import (
    TENANTS,
    WRK_DIR,
    WRK_INSTALL,
    Servers,
    Tenant,
    WrkResult,
    keel_env,
    machine_facts,
    parse_wrk,
    publish,
    read_every_profile,
    rss_mb,
    seed,
    server_workers,
    start_api,
    within_deadline,
)
from tests.cluster.processes import stop_all
from tests.support.receivers import Receiver, webhook_receiver
from tests.support.servers import PostgresServer, admin_sql, free_port

DATABASE = "keel_soak"
RQ_WORKERS = 2
WORKER_PREFIX = "soak-worker-"
SAMPLE_EVERY = 10.0
# Default paces, well within what the workers sustain on 2 shared cores: a forking worker spends some 35 ms of CPU
# on each work horse before the job itself runs (and Postgres a new backend for it), a simple worker about 3 ms per
# job; at 20 req/s of this mix the forking workers already need most of a core.
FORKING_RATE = 15.0
SIMPLE_RATE = 60.0
RSS_GROWTH_LIMIT = 5.0  # per cent, over the second half of the load
MARK = "Soak order"  # the description of every payment the load creates (the seeded ones differ)
EVENT_TYPES = [
    "payment.created",
    "payment.succeeded",
    "payment.failed",
    "payment.refunded",
    "payment.refund_failed",
    "user.updated",
]
FINAL = ("succeeded", "failed", "refunded", "partially_refunded")
# Request kinds and their weights (per cent of the requests).
MIX = {
    "user_get": 58,
    "user_list": 6,
    "payment_list": 6,
    "payment_get": 8,
    "job_get": 4,
    "user_patch": 7,
    "payment_create": 8,
    "refund_create": 3,
}
TITLES = {
    "user_get": "`GET /v1/users/{id}` (cached)",
    "user_list": "`GET /v1/users?limit=20`",
    "payment_list": "`GET /v1/payments?limit=20` (half with `status=succeeded`)",
    "payment_get": "`GET /v1/payments/{id}` (the thread's own)",
    "job_get": "`GET /v1/jobs/{id}` (a payment's capture job)",
    "user_patch": "`PATCH /v1/users/{id}` (a new name)",
    "payment_create": "`POST /v1/payments`",
    "refund_create": "`POST /v1/payments/{id}/refunds`",
}

# The request mix, written next to the other files of the run (a template: @COMMON@ is common.lua's path).
# wrk calls request(), then response() with its answer, then delay(), in turn on each connection; with one
# connection per thread, every response() answers the thread's last request.
LUA = r"""
dofile("@COMMON@")  -- setup() numbers the threads (tid); done() prints the KEEL_RESULT line

local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } keel_soak_timespec;
int clock_gettime(int clock_id, keel_soak_timespec *tp);
]]
local CLOCK_MONOTONIC = 1
local clock = ffi.new("keel_soak_timespec")

local function now_ms()
   ffi.C.clock_gettime(CLOCK_MONOTONIC, clock)
   return tonumber(clock.tv_sec) * 1000 + tonumber(clock.tv_nsec) / 1e6
end

local EXPECTED = {
   user_get = 200, user_list = 200, payment_list = 200, payment_get = 200, job_get = 200,
   user_patch = 200, payment_create = 202, refund_create = 202,
}
local KINDS = {
   "user_get", "user_list", "payment_list", "payment_get", "job_get", "user_patch", "payment_create",
   "refund_create",
}
local RECENT = 256  -- payments of this thread remembered for reads

local users = {}
local mix, total_weight = {}, 0
local nonce, interval, refund_after = "", 100, 20000
local progress, progress_tmp = "", ""
local counts = {}
local recent, recent_n = {}, 0
local refundable, refund_head = {}, 1
local counter, current, sending, in_flight = 0, "user_get", nil, false
local verified = false
local next_at, last_write = 0, 0
report = ""
pending_kind = ""  -- the kind of the request awaiting its answer, if any: read when the run ends

local threads = {}
local base_setup = setup
function setup(thread)
   base_setup(thread)
   table.insert(threads, thread)
end

function init(args)
   local file = assert(io.open(args[1], "r"))
   for line in file:lines() do
      local token, user = line:match("^(%S+)\t(%S+)$")
      if token then
         users[#users + 1] = { token = token, id = user }
      end
   end
   file:close()
   assert(#users > 0, "no users in " .. args[1])
   progress = args[2] .. "/thread-" .. tid .. ".txt"
   progress_tmp = progress .. ".tmp"
   nonce = args[3]
   interval = 1000 / tonumber(args[4])
   for kind, weight in args[5]:gmatch("([%w_]+)=(%d+)") do
      assert(EXPECTED[kind], "unknown request kind " .. kind)
      total_weight = total_weight + tonumber(weight)
      mix[#mix + 1] = { kind = kind, upto = total_weight }
   end
   refund_after = tonumber(args[6]) * 1000
   for _, kind in ipairs(KINDS) do
      counts[kind] = { n = 0, ok = 0, conflict = 0, bad = 0, lost = 0 }
   end
   -- LuaJIT seeds every state alike: without this, all threads would send the same sequence.
   math.randomseed(7919 * (tid + 1))
   -- The threads' first requests are spread over one interval rather than sent at once.
   next_at = now_ms() - interval + math.random() * interval
end

local function update_report()
   local parts = {}
   for i, kind in ipairs(KINDS) do
      local c = counts[kind]
      parts[i] = string.format("%s=%d,%d,%d,%d,%d", kind, c.n, c.ok, c.conflict, c.bad, c.lost)
   end
   report = table.concat(parts, " ")
   local now = now_ms()
   if now - last_write >= 1000 then
      -- Written aside, then renamed: the reader never sees half a line.
      last_write = now
      local f = io.open(progress_tmp, "w")
      if f then
         f:write(report, "\n")
         f:close()
         os.rename(progress_tmp, progress)
      end
   end
end

local function auth(token)
   return { ["Authorization"] = "Bearer " .. token }
end

local function key()
   return string.format("%s-%d-%d", nonce, tid, counter)
end

local function pick()
   local r = math.random(total_weight)
   for _, m in ipairs(mix) do
      if r <= m.upto then
         return m.kind
      end
   end
   return mix[#mix].kind
end

local function build(kind)
   counter = counter + 1
   if kind == "user_get" then
      local u = users[math.random(#users)]
      return kind, wrk.format("GET", "/v1/users/" .. u.id, auth(u.token))
   elseif kind == "user_list" then
      local u = users[math.random(#users)]
      return kind, wrk.format("GET", "/v1/users?limit=20", auth(u.token))
   elseif kind == "payment_list" then
      local u = users[math.random(#users)]
      local path = counter % 2 == 0 and "/v1/payments?limit=20" or "/v1/payments?status=succeeded&limit=20"
      return kind, wrk.format("GET", path, auth(u.token))
   elseif kind == "payment_get" or kind == "job_get" then
      if recent_n == 0 then
         return build("user_get")
      end
      local p = recent[math.random(math.min(recent_n, RECENT))]
      local path = kind == "payment_get" and "/v1/payments/" .. p.id or "/v1/jobs/" .. p.job
      return kind, wrk.format("GET", path, auth(p.token))
   elseif kind == "user_patch" then
      local u = users[math.random(#users)]
      local headers = auth(u.token)
      headers["Content-Type"] = "application/json"
      local body = string.format('{"name":"Soak %s %d-%d"}', nonce, tid, counter)
      return kind, wrk.format("PATCH", "/v1/users/" .. u.id, headers, body)
   elseif kind == "refund_create" then
      local p = refundable[refund_head]
      if p == nil or now_ms() - p.at < refund_after then
         return build("payment_get")
      end
      refundable[refund_head] = nil
      refund_head = refund_head + 1
      local headers = auth(p.token)
      headers["Idempotency-Key"] = key()
      local body = ""  -- no body: refund everything
      if counter % 2 == 0 then
         headers["Content-Type"] = "application/json"
         body = '{"amount":50}'
      end
      return kind, wrk.format("POST", "/v1/payments/" .. p.id .. "/refunds", headers, body)
   end
   -- payment_create
   local u = users[math.random(#users)]
   local method = "pm_card_visa"
   if counter % 20 == 7 then
      method = "pm_card_chargeDeclined"
   elseif counter % 20 == 13 then
      method = "pm_card_providerUnavailable"
   end
   local email = ""
   if counter % 4 == 1 then
      email = string.format(',"customer_email":"buyer-%d-%d@soak.test"', tid, counter)
   end
   local headers = auth(u.token)
   headers["Content-Type"] = "application/json"
   headers["Idempotency-Key"] = key()
   local body = string.format(
      '{"amount":%d,"currency":"EUR","payment_method":"%s","description":"@MARK@ %d-%d"%s}',
      100 + counter % 5000, method, tid, counter, email
   )
   sending = { token = u.token, refundable = method == "pm_card_visa" }
   return kind, wrk.format("POST", "/v1/payments", headers, body)
end

function request()
   if tid == 0 and not verified then
      -- wrk builds one request on thread 0 before the run to check it parses; it is never sent.
      verified = true
      return wrk.format("GET", "/livez")
   end
   if in_flight then
      -- The last request got no answer: a socket error, after which wrk reconnected.
      counts[current].lost = counts[current].lost + 1
      update_report()
   end
   local kind, req = build(pick())
   current, in_flight, pending_kind = kind, true, kind
   return req
end

local function remember(body)
   local id = body:match('"payment":{"id":"([^"]+)"')
   local job = body:match('"job_id":"([^"]+)"')
   if id == nil or job == nil then
      return false
   end
   recent[recent_n % RECENT + 1] = { id = id, job = job, token = sending.token }
   recent_n = recent_n + 1
   if sending.refundable then
      refundable[#refundable + 1] = { id = id, token = sending.token, at = now_ms() }
   end
   return true
end

function response(status, headers, body)
   in_flight, pending_kind = false, ""
   local c = counts[current]
   c.n = c.n + 1
   if status == EXPECTED[current] and (current ~= "payment_create" or remember(body)) then
      c.ok = c.ok + 1
   elseif current == "refund_create" and status == 409 then
      -- The payment is still pending (its capture has not run yet): the documented answer.
      c.conflict = c.conflict + 1
   else
      c.bad = c.bad + 1
      unexpected = unexpected + 1
      if sample == "" then
         sample = current .. " " .. status .. " " .. string.sub(body or "", 1, 300)
      end
   end
   update_report()
end

function delay()
   local now = now_ms()
   next_at = next_at + interval
   if next_at < now - interval then
      next_at = now
   end
   return math.max(0, math.floor(next_at - now))
end

local base_done = done
function done(summary, latency, requests)
   base_done(summary, latency, requests)
   for _, thread in ipairs(threads) do
      local pending = thread:get("pending_kind") or ""
      io.write("KEEL_SOAK " .. (thread:get("report") or "") .. " in_flight=" .. pending .. "\n")
   end
end
"""


# -- counting ---------------------------------------------------------------------------------------


@dataclass
class Tally:
    """One kind of request: answers, answers as expected, 409s allowed for refunds, other answers, requests
    that got no answer."""

    answered: int = 0
    ok: int = 0
    conflicts: int = 0
    bad: int = 0
    lost: int = 0

    def add(self, other: Tally) -> None:
        self.answered += other.answered
        self.ok += other.ok
        self.conflicts += other.conflicts
        self.bad += other.bad
        self.lost += other.lost


def tally(lines: list[str]) -> dict[str, Tally]:
    """Sum the threads' counter lines (``kind=answered,ok,conflicts,bad,lost ...``)."""
    totals = {kind: Tally() for kind in MIX}
    for line in lines:
        for part in line.split():
            kind, _, raw = part.partition("=")
            values = raw.split(",")
            if kind in totals and len(values) == 5 and all(v.isdigit() for v in values):
                totals[kind].add(Tally(*(int(v) for v in values)))
    return totals


def in_flight(lines: list[str]) -> Counter[str]:
    """The requests still awaiting their answer when wrk stopped, by kind (one per thread at most): the server
    may have done them."""
    found: Counter[str] = Counter()
    for line in lines:
        for part in line.split():
            if part.startswith("in_flight=") and (kind := part.removeprefix("in_flight=")):
                found[kind] += 1
    return found


def progress(directory: Path) -> dict[str, Tally]:
    return tally([p.read_text() for p in sorted(directory.glob("thread-*.txt"))])


@dataclass
class QueueState:
    queued: dict[str, int]
    running: int
    scheduled: int
    failed: int

    @property
    def depth(self) -> int:
        return sum(self.queued.values()) + self.running + self.scheduled


def queue_state(redis: Redis) -> QueueState:
    queued: dict[str, int] = {}
    running = scheduled = failed = 0
    for name in QUEUES:
        q = Queue(name, connection=redis)
        queued[name] = q.count
        # Counted without RQ's clean-up: the workers' maintenance does that, an observer should not.
        running += int(q.started_job_registry.get_job_count(cleanup=False))
        scheduled += int(q.scheduled_job_registry.get_job_count(cleanup=False))
        failed += int(q.failed_job_registry.get_job_count(cleanup=False))
    return QueueState(queued, running, scheduled, failed)


class Hooks:
    """What the receiver got, checked as it arrives: the Standard Webhooks signature (whose timestamp must be
    within 5 minutes, hence checked every few seconds rather than at the end), distinct ids, event types."""

    def __init__(self, receiver: Receiver, secrets: dict[str, str]) -> None:
        self.receiver = receiver
        self.verifiers = {path: Webhook(secret) for path, secret in secrets.items()}
        self.checked = 0
        self.ids: set[str] = set()
        self.by_type: Counter[str] = Counter()
        self.duplicates = 0
        self.invalid: list[str] = []

    def check(self) -> int:
        new = self.receiver.received[self.checked :]
        self.checked += len(new)
        for r in new:
            verifier = self.verifiers.get(r.path)
            try:
                if verifier is None:
                    raise ValueError(f"no endpoint at {r.path}")
                payload = verifier.verify(r.body, r.headers)
            except Exception as exc:
                self.invalid.append(f"{r.path} {r.headers.get('webhook-id')}: {exc}")
                continue
            webhook_id = r.headers["webhook-id"]
            if webhook_id in self.ids:
                self.duplicates += 1
                continue
            self.ids.add(webhook_id)
            self.by_type[payload["type"]] += 1
        return len(self.ids)


@dataclass
class Outcome:
    """The database after (or during) the load: the soak's payments and refunds by status (and how many of
    them have a customer email), webhook deliveries by status, unpublished outbox events, receipts."""

    payments: Counter[str]
    payments_email: Counter[str]
    refunds: Counter[str]
    refunds_email: Counter[str]
    deliveries: Counter[str]
    unpublished: int
    user_updates: int  # user.updated events in the outbox (the seed and the signups make none)
    receipts: Counter[str]  # kind -> sent

    @property
    def created(self) -> int:
        return sum(self.payments.values())

    @property
    def unsettled(self) -> int:
        return self.created - sum(self.payments[s] for s in FINAL) + self.refunds["pending"]

    def expected_hooks(self) -> dict[str, int]:
        """What the events owe: one delivery per event of a subscribed type (one endpoint per tenant)."""
        p, r = self.payments, self.refunds
        return {
            "payment.created": self.created,
            "payment.succeeded": p["succeeded"] + p["partially_refunded"] + p["refunded"],
            "payment.failed": p["failed"],
            "payment.refunded": r["succeeded"],
            "payment.refund_failed": r["failed"],
            "user.updated": self.user_updates,
        }

    def expected_receipts(self) -> dict[str, int]:
        p = self.payments_email
        return {
            "payment_receipt": p["succeeded"] + p["partially_refunded"] + p["refunded"],
            "refund_receipt": self.refunds_email["succeeded"],
        }


async def outcome(engine: AsyncEngine) -> Outcome:
    async with engine.connect() as conn:

        async def rows(sql: str, **params: Any) -> list[Any]:
            return list((await conn.execute(text(sql), params)).all())

        payments = await rows(
            "SELECT status, count(*), count(customer_email) FROM payments WHERE description LIKE :m GROUP BY status",
            m=f"{MARK} %",
        )
        refunds = await rows(
            "SELECT r.status, count(*), count(p.customer_email) FROM payment_refunds r "
            "JOIN payments p ON p.id = r.payment_id WHERE p.description LIKE :m GROUP BY r.status",
            m=f"{MARK} %",
        )
        deliveries = await rows("SELECT status, count(*) FROM webhook_deliveries GROUP BY status")
        unpublished = await rows("SELECT count(*) FROM outbox WHERE published_at IS NULL")
        user_updates = await rows("SELECT count(*) FROM outbox WHERE type = 'user.updated'")
        receipts = await rows(
            "SELECT kind, count(*) FROM emails WHERE status = 'sent' "
            "AND kind IN ('payment_receipt', 'refund_receipt') GROUP BY kind"
        )
    return Outcome(
        payments=Counter({s: n for s, n, _ in payments}),
        payments_email=Counter({s: e for s, _, e in payments}),
        refunds=Counter({s: n for s, n, _ in refunds}),
        refunds_email=Counter({s: e for s, _, e in refunds}),
        deliveries=Counter(dict(deliveries)),
        unpublished=int(unpublished[0][0]),
        user_updates=int(user_updates[0][0]),
        receipts=Counter(dict(receipts)),
    )


async def pg_connections(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        found = await conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE datname = :d"), {"d": DATABASE})
        return int(found.scalar_one())


# -- the run ----------------------------------------------------------------------------------------


def _mb(rss: dict[int, float] | list[float]) -> str:
    return "/".join(f"{mb:.0f}" for mb in (rss.values() if isinstance(rss, dict) else rss))


def cpu_seconds(groups: dict[str, list[int]]) -> dict[str, float]:
    """CPU time used by each group of processes with all their descendants: user and system time of each live
    process plus that of its children already waited for (work horses end between samples; their time moves to
    their worker). A process under several groups counts in the first. One pass over /proc."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            # The command name (field 2) may hold spaces and parentheses: the other fields follow its last ")".
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            pid = int(entry.name)
            parents[pid] = int(fields[1])
            ticks[pid] = sum(int(v) for v in fields[11:15])  # utime, stime, cutime, cstime
    out: dict[str, float] = {}
    claimed: set[int] = set()
    for name, roots in groups.items():
        tree = set(roots)
        while found := {pid for pid, parent in parents.items() if parent in tree} - tree:
            tree |= found
        tree -= claimed
        claimed |= tree
        out[name] = sum(ticks.get(pid, 0) for pid in tree) / os.sysconf("SC_CLK_TCK")
    return out


def _cores(cores: dict[str, float]) -> str:
    return "/".join(f"{c:.2f}" for c in cores.values())


def cpu_times() -> tuple[int, int]:
    """(busy, total) clock ticks of the whole machine since boot, from /proc/stat."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = ticks[3] + ticks[4]  # idle and iowait
    return sum(ticks) - idle, sum(ticks)


@dataclass
class Tick:
    """One sample, ``at`` seconds after the load began."""

    at: float
    requests: int
    errors: int
    rss: dict[int, float]  # granian worker pid -> MB
    worker_rss: list[float]  # each `keel worker` process (not its work horses), MB
    cpu: float  # per cent of the machine busy since the previous sample, whatever keeps it busy
    cores: dict[str, float]  # CPU the soak's processes used since then, in cores, per group (Run.cpu_groups)
    queues: QueueState
    pg_connections: int
    webhooks: int


@dataclass
class Run:
    args: argparse.Namespace
    servers: Servers
    engine: AsyncEngine
    redis: Redis
    hooks: Hooks
    base: Path
    ticks: list[Tick] = field(default_factory=list)
    deaths: list[str] = field(default_factory=list)
    load_seconds: float = 0.0
    # The API, the workers, Postgres, then the rest under this process (wrk, Redis, cron, the receiver).
    cpu_groups: dict[str, list[int]] = field(default_factory=dict)
    cpu: tuple[int, int] = (0, 0)  # machine (busy, total) clock ticks at the last sample
    soak_cpu: tuple[dict[str, float], float] = ({}, 0.0)  # (CPU seconds per group, monotonic time) last sample

    def check_processes(self, at: float) -> None:
        for name, proc in self.servers.procs.items():
            code = proc.poll()
            if code is not None and not any(d.startswith(f"{name} ") for d in self.deaths):
                self.deaths.append(f"{name} exited with {code} at {at:.0f} s")
                print(f"  !! {self.deaths[-1]}", flush=True)

    async def tick(self, at: float, tallies: dict[str, Tally]) -> Tick:
        self.check_processes(at)
        api = self.servers.pid("serve")
        # CPU figures cover the interval since the previous sample: the first sample only sets the baselines.
        busy, total = cpu_times()
        cpu = (busy - self.cpu[0]) / max(1, total - self.cpu[1]) * 100 if self.ticks else 0.0
        self.cpu = (busy, total)
        used, now = cpu_seconds(self.cpu_groups), time.monotonic()
        before, then = self.soak_cpu
        cores = {k: (v - before[k]) / max(1e-3, now - then) if self.ticks else 0.0 for k, v in used.items()}
        self.soak_cpu = (used, now)
        t = Tick(
            at=at,
            requests=sum(c.answered + c.lost for c in tallies.values()),
            errors=sum(c.bad + c.lost for c in tallies.values()),
            rss={pid: rss_mb(pid) for pid in server_workers(api)},
            worker_rss=[rss_mb(self.servers.pid(f"worker-{i}")) for i in range(1, RQ_WORKERS + 1)],
            cpu=cpu,
            cores=cores,
            queues=queue_state(self.redis),
            pg_connections=await pg_connections(self.engine),
            webhooks=self.hooks.check(),
        )
        self.ticks.append(t)
        q = t.queues
        queued = "/".join(str(q.queued[name]) for name in QUEUES)
        print(
            f"  {at:5.0f} s  CPU cores {_cores(t.cores)} (machine {t.cpu:3.0f} %)  requests {t.requests:7,}  "
            f"errors {t.errors}  API RSS {_mb(t.rss)} MB  worker RSS {_mb(t.worker_rss)} MB  queued {queued} "
            f"(running {q.running}, scheduled {q.scheduled})  PG connections {t.pg_connections}  "
            f"webhooks {t.webhooks:,}",
            flush=True,
        )
        return t


def start_wrk(cmd: list[str], out: Path) -> subprocess.Popen[bytes]:
    with out.open("wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def end_wrk(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


async def drive(run: Run, wrk: str, users_file: Path) -> tuple[WrkResult, dict[str, Tally], Counter[str]]:
    """The load for ``--minutes``, sampled every 10 s; returns wrk's summary, the per-kind counts and the
    requests left without an answer when it stopped."""
    a = run.args
    seconds = round(a.minutes * 60)
    progress_dir = run.base / "progress"
    progress_dir.mkdir()
    script = run.base / "soak.lua"
    script.write_text(LUA.replace("@COMMON@", str(WRK_DIR / "common.lua")).replace("@MARK@", MARK))
    mix = ",".join(f"{k}={w}" for k, w in MIX.items())
    nonce = uuid.uuid4().hex[:8]
    cmd = [wrk, "-t", str(a.connections), "-c", str(a.connections), "-d", f"{seconds}s", "--timeout"]
    cmd += [f"{a.timeout}s", "-s", str(script), run.servers.base_url, "--", str(users_file), str(progress_dir)]
    cmd += [nonce, f"{a.rate / a.connections:.4f}", mix, str(a.refund_after)]
    out = run.base / "wrk.out"
    print(
        f"Load: {a.minutes:g} min at up to {a.rate:g} req/s over {a.connections} connections; every "
        f"{SAMPLE_EVERY:.0f} s: CPU cores used by the API/workers/Postgres/the rest, requests, errors, RSS, queues, "
        "Postgres connections, webhooks received.",
        flush=True,
    )
    proc = start_wrk(cmd, out)
    began = time.monotonic()
    try:
        await run.tick(0, {})
        next_tick = SAMPLE_EVERY
        while proc.poll() is None:
            elapsed = time.monotonic() - began
            if elapsed > seconds + 30:
                raise RuntimeError(f"wrk still running {elapsed:.0f} s into a {seconds} s run")
            # The last sample is taken once wrk has ended (its final counters), not at a racing boundary.
            if elapsed >= next_tick and next_tick < seconds - 1:
                await run.tick(next_tick, progress(progress_dir))
                next_tick += SAMPLE_EVERY
            await asyncio.sleep(0.2)
        run.load_seconds = time.monotonic() - began
    finally:
        end_wrk(proc)
    output = out.read_text(errors="replace")
    if proc.returncode != 0 or "KEEL_RESULT" not in output:
        raise RuntimeError(f"wrk exited with {proc.returncode}:\n{output[-3000:]}")
    result = parse_wrk(output)
    lines = [line.removeprefix("KEEL_SOAK ") for line in output.splitlines() if line.startswith("KEEL_SOAK")]
    tallies = tally(lines)
    await run.tick(run.load_seconds, tallies)
    return result, tallies, in_flight(lines)


async def drain(run: Run) -> tuple[float | None, Outcome, QueueState]:
    """Poll (bounded by ``--drain``) until nothing is left to do: queues empty, every payment and refund final,
    every outbox event published, no delivery pending, every owed webhook received. Returns the seconds it
    took (None if it did not happen in time) and the last state seen."""
    began = time.monotonic()
    while True:
        q = queue_state(run.redis)
        o = await outcome(run.engine)
        delivered = run.hooks.check()
        open_deliveries = o.deliveries["pending"] + o.deliveries["sending"]
        owed = sum(o.expected_hooks().values())
        receipts_owed = o.expected_receipts()
        done = (
            q.depth == 0
            and o.unsettled == 0
            and o.unpublished == 0
            and open_deliveries == 0
            and delivered >= owed
            and all(o.receipts[k] >= n for k, n in receipts_owed.items())
        )
        elapsed = time.monotonic() - began
        if done:
            return elapsed, o, q
        if elapsed > run.args.drain:
            return None, o, q
        await asyncio.sleep(1)


async def settle_seeded(engine: AsyncEngine) -> None:
    """The seed writes some payments and refunds ``pending`` (as a live history has): without their jobs, the
    payments safety net would resume them mid-run, and their events would be owed webhooks the soak does not
    count. They are settled as declined here, before any load."""
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE payment_refunds SET status = 'failed', failure_reason = 'refund_rejected', "
                "failure_message = 'Settled before the soak' WHERE status = 'pending'"
            )
        )
        await conn.execute(text("UPDATE payments SET amount_refunding = 0 WHERE amount_refunding <> 0"))
        await conn.execute(
            text(
                "UPDATE payments SET status = 'failed', failure_reason = 'card_declined', "
                "failure_message = 'Settled before the soak' WHERE status = 'pending'"
            )
        )


async def subscribe(base_url: str, tenants: list[Tenant], receiver: Receiver) -> dict[str, str]:
    """One endpoint per tenant on the receiver (its own path); returns path -> signing secret."""
    secrets = {}
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        for i, t in enumerate(tenants):
            url = f"{receiver.url}/{i}"
            r = await client.post(
                "/v1/webhook-endpoints",
                json={"url": url, "event_types": EVENT_TYPES, "description": "soak"},
                headers={"Authorization": f"Bearer {t.token}"},
            )
            if r.status_code != 201:
                raise RuntimeError(f"endpoint registration answered {r.status_code}: {r.text[:500]}")
            secrets[httpx.URL(url).path] = r.json()["secret"]
    return secrets


async def until(what: str, probe: Callable[[], bool], servers: Servers, within: float) -> None:
    deadline = time.monotonic() + within
    while not probe():
        servers.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} within {within:.0f} s:\n{servers.tail()}")
        await asyncio.sleep(0.2)


def registered_workers(redis: Redis) -> int:
    found = Worker.all(connection=redis, serializer=JSONSerializer)
    return sum(1 for w in found if w.name.startswith(WORKER_PREFIX))


def write_users(path: Path, tenants: list[Tenant]) -> None:
    path.write_text("".join(f"{t.token}\t{u}\n" for t in tenants for u in t.user_ids))


def log_tail(logs: Path, lines: int = 6, width: int = 400) -> str:
    """The last lines of each process's log, cut short: RQ logs a whole traceback on one line for every job
    that fails an attempt (a provider outage that is retried included)."""
    out = []
    for log in sorted(logs.glob("*.log")):
        last = log.read_text(errors="replace").splitlines()[-lines:]
        out.append(f"--- {log.name} ---\n" + "\n".join(line[:width] for line in last))
    return "\n".join(out)


async def healthz(base_url: str) -> int:
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        try:
            return (await client.get("/healthz")).status_code
        except httpx.TransportError:
            return 0


async def run_soak(args: argparse.Namespace, pg: PostgresServer, redis_url: str, wrk: str, base: Path) -> Report:
    postmaster = int((pg.base / "data" / "postmaster.pid").read_text().split()[0])
    await admin_sql(pg, f'CREATE DATABASE "{DATABASE}"')
    url = pg.url(DATABASE)
    db.upgrade(url)
    redis = Redis.from_url(redis_url)
    port = free_port()
    env = keel_env(url, redis_url, base / "data", port, KEEL_WEBHOOKS_ALLOW_PRIVATE="true")
    servers = Servers(env, base, f"http://127.0.0.1:{port}")
    try:
        with webhook_receiver() as receiver:
            async with engine_for(url) as engine:
                try:
                    return await _run(args, servers, engine, redis, receiver, wrk, base, postmaster)
                finally:
                    stop_all([servers])
    finally:
        redis.close()


async def _run(
    args: argparse.Namespace,
    servers: Servers,
    engine: AsyncEngine,
    redis: Redis,
    receiver: Receiver,
    wrk: str,
    base: Path,
    postmaster: int,
) -> Report:
    async with engine.connect() as conn:
        pg_version = (await conn.execute(text("SHOW server_version"))).scalar_one()
    facts = machine_facts(wrk, pg_version, redis.info("server")["redis_version"])
    mode = ["--simple"] if args.simple else []
    for i in range(1, RQ_WORKERS + 1):
        servers.spawn(f"worker-{i}", "worker", "--name", f"{WORKER_PREFIX}{i}", *mode)
    servers.spawn("cron", "cron")
    await start_api(servers, args.workers)
    await until("the workers did not register", lambda: registered_workers(redis) == RQ_WORKERS, servers, 60)

    async with httpx.AsyncClient(base_url=servers.base_url, timeout=60) as client:
        signed_up = [await signup(client, i) for i in range(TENANTS)]
    t0 = time.monotonic()
    tenants = await seed(engine, signed_up, args.users, args.payments, args.ids_per_tenant)
    await settle_seeded(engine)
    print(f"  seeding took {time.monotonic() - t0:.1f} s", flush=True)
    hooks = Hooks(receiver, await subscribe(servers.base_url, tenants, receiver))
    lengths = await read_every_profile(servers.base_url, tenants)
    print(f"  read all {len(lengths):,} profiles once (filling the cache)", flush=True)
    users_file = base / "users.tsv"
    write_users(users_file, tenants)
    # The signups' jobs (welcome emails, invitations) end before the load begins.
    await until("the signups' jobs did not end", lambda: queue_state(redis).depth == 0, servers, 120)

    groups = {
        "API": [servers.pid("serve")],
        "workers": [servers.pid(f"worker-{i}") for i in range(1, RQ_WORKERS + 1)],
        "Postgres": [postmaster],
        "other": [os.getpid()],
    }
    run = Run(args, servers, engine, redis, hooks, base, cpu_groups=groups)
    result, tallies, unanswered = await drive(run, wrk, users_file)
    print(f"Load over after {run.load_seconds:.0f} s; waiting up to {args.drain:g} s for the work it left...")
    drained, final, queues = await drain(run)
    run.check_processes(run.load_seconds + (drained or args.drain))
    health = await healthz(servers.base_url)
    return Report(args, run, result, tallies, unanswered, drained, final, queues, health, facts, log_tail(base))


# -- report -----------------------------------------------------------------------------------------


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "**FAIL**"


def _counts(c: Counter[str]) -> str:
    return ", ".join(f"{k} {n:,}" for k, n in sorted(c.items()) if n) or "none"


@dataclass
class Report:
    args: argparse.Namespace
    run: Run
    wrk: WrkResult
    tallies: dict[str, Tally]
    in_flight: Counter[str]
    drained: float | None
    final: Outcome
    queues: QueueState
    health: int
    facts: list[str]
    log_tail: str

    def stored_as_accepted(self, kind: str, stored: int) -> bool:
        """Writes of ``kind`` found in the database: the accepted ones, plus at most those whose answer never
        came (in flight when wrk stopped, or lost to a socket error, which fails promise 1 anyway)."""
        c = self.tallies[kind]
        return c.ok <= stored <= c.ok + c.lost + self.in_flight[kind]

    def rss_growth(self) -> tuple[float | None, str]:
        """Largest growth of a worker's RSS from the sample nearest half-time to the end of the load."""
        loaded = [t for t in self.run.ticks if t.at > 0]
        if len(loaded) < 2:
            return None, "too few samples"
        end = loaded[-1]
        half = min(loaded[:-1], key=lambda t: abs(t.at - end.at / 2))
        if set(half.rss) != set(end.rss):
            return None, f"API worker processes changed: {sorted(half.rss)} -> {sorted(end.rss)}"
        growth = max((end.rss[p] - half.rss[p]) / half.rss[p] * 100 for p in end.rss)
        pairs = ", ".join(f"{half.rss[p]:.1f} → {end.rss[p]:.1f}" for p in end.rss)
        return growth, f"{growth:+.1f} % ({pairs} MB, {half.at:.0f} s → {end.at:.0f} s)"

    def promises(self) -> list[tuple[str, str, bool]]:
        t, f, hooks = self.tallies, self.final, self.run.hooks
        out = []
        requests = sum(c.answered + c.lost for c in t.values())
        conflicts = t["refund_create"].conflicts
        errors = self.wrk.errors
        sample = f"; e.g. {self.wrk.samples[0][:200].replace('|', '/')}" if self.wrk.samples else ""
        out.append(
            (
                f"no errors (unexpected statuses, socket errors, answers over {self.args.timeout:g} s)",
                f"{errors} of {requests:,} requests ({self.wrk.unexpected} statuses, {self.wrk.socket_errors} socket "
                f"or timeout){sample}; {conflicts} refunds answered 409 (payment still pending, allowed)",
                errors == 0,
            )
        )
        growth, detail = self.rss_growth()
        out.append(
            (
                f"API RSS growth over the second half ≤ {RSS_GROWTH_LIMIT:g} % per worker, none replaced",
                detail,
                growth is not None and growth <= RSS_GROWTH_LIMIT,
            )
        )
        depths = [tk.queues for tk in self.run.ticks]
        deepest = max(depths, key=lambda q: sum(q.queued.values()))
        per_queue = ", ".join(f"{n} {max(q.queued[n] for q in depths)}" for n in QUEUES)
        back = f"back to 0 {self.drained:.0f} s after the load" if self.drained is not None else "not back to 0"
        out.append(
            (
                "queues back to 0 after the load, no job failed",
                f"largest depth {sum(deepest.queued.values())} queued (per queue at most: {per_queue}); {back} "
                f"(last: depth {self.queues.depth}); {self.queues.failed} failed jobs",
                self.drained is not None and self.queues.depth == 0 and self.queues.failed == 0,
            )
        )
        final_payments = sum(f.payments[s] for s in FINAL)
        refunds = sum(f.refunds.values())
        refunds_final = f.refunds["succeeded"] + f.refunds["failed"]
        unanswered = f"; unanswered when the load stopped: {_counts(self.in_flight)}" if self.in_flight else ""
        out.append(
            (
                "every write accepted is stored; every payment and refund reached a final state",
                f"payments {t['payment_create'].ok:,} accepted, {f.created:,} stored, {final_payments:,} final "
                f"({_counts(f.payments)}); refunds {t['refund_create'].ok:,} accepted, {refunds:,} stored, "
                f"{refunds_final:,} final; user changes {t['user_patch'].ok:,} accepted, {f.user_updates:,} "
                f"`user.updated` events{unanswered}",
                self.stored_as_accepted("payment_create", f.created)
                and self.stored_as_accepted("refund_create", refunds)
                and self.stored_as_accepted("user_patch", f.user_updates)
                and f.created == final_payments
                and refunds == refunds_final,
            )
        )
        owed = f.expected_hooks()
        delivered = len(hooks.ids)
        out.append(
            (
                "webhooks received = owed by the run's events, all correctly signed",
                f"{delivered:,} received of {sum(owed.values()):,} owed ({hooks.duplicates} repeated, "
                f"{len(hooks.invalid)} bad signatures); deliveries: {_counts(f.deliveries)}",
                delivered == sum(owed.values())
                and all(hooks.by_type[k] == n for k, n in owed.items())
                and not hooks.invalid,
            )
        )
        receipts = f.expected_receipts()
        out.append(
            (
                "receipts sent = owed (succeeded payments and settled refunds with a customer email)",
                ", ".join(f"{k} {f.receipts[k]:,} of {n:,}" for k, n in receipts.items()),
                all(f.receipts[k] == n for k, n in receipts.items()),
            )
        )
        out.append(
            (
                "every process ran to the end, `/healthz` 200 afterwards",
                ("; ".join(self.run.deaths) or "all ran") + f"; /healthz {self.health}",
                not self.run.deaths and self.health == 200,
            )
        )
        return out

    @property
    def passed(self) -> bool:
        return all(ok for _, _, ok in self.promises())

    def markdown(self) -> str:
        a, run = self.args, self.run
        worker_mode = "`--simple`, jobs in the worker process" if a.simple else "forking a work horse per job"
        mix = ", ".join(f"{k} {w} %" for k, w in MIX.items())
        lines = [
            f"# Keel soak, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
            "",
            f"{run.load_seconds:.0f} s of mixed load against `keel serve --workers {a.workers}` (granian), "
            f"{RQ_WORKERS} `keel worker` ({worker_mode}), `keel cron`, Postgres and Redis, and a webhook receiver "
            f"subscribed by each of the {TENANTS} tenants; all on 127.0.0.1. wrk: {a.connections} connections "
            f"(one per thread), paced to at most {a.rate:g} req/s; mix: {mix}. Seeded: {TENANTS} tenants x "
            f"{a.users:,} users, {a.payments:,} payments; reads over {a.ids_per_tenant} users per tenant.",
            "",
            "| promise | measured | |",
            "|---|---|---|",
        ]
        lines += [f"| {name} | {got} | {_verdict(ok)} |" for name, got, ok in self.promises()]
        w = self.wrk
        lines += [
            "",
            f"{w.requests:,} requests in {w.seconds:.0f} s ({w.rate:.1f} req/s); latency p50 {w.p50_ms:.1f} ms, "
            f"p99 {w.p99_ms:.1f} ms (all kinds together).",
            "",
            "| request | weight | answered | as expected | 409 allowed | other | no answer |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {TITLES[k]} | {MIX[k]} % | {c.answered:,} | {c.ok:,} | {c.conflicts:,} | {c.bad:,} | {c.lost:,} |"
            for k, c in self.tallies.items()
        ]
        owed = self.final.expected_hooks()
        lines += [
            "",
            "Payments and the reads of payments or jobs fall back to other kinds until the thread has payments "
            "of its own (refunds: old enough ones), so the answered counts differ a little from the weights.",
            "",
            "| webhook event type | owed | received |",
            "|---|---:|---:|",
        ]
        lines += [f"| `{k}` | {n:,} | {run.hooks.by_type[k]:,} |" for k, n in owed.items()]
        lines += [
            "",
            f"Every {SAMPLE_EVERY:.0f} s (queued: {'/'.join(QUEUES)}; running and scheduled over all queues):",
            "",
            "| s | CPU cores API/workers/PG/other | machine CPU % | requests | req/s | errors | API RSS MB "
            "| worker RSS MB | queued | running | scheduled | PG connections | webhooks |",
            "|---:|---:|---:|---:|---:|---:|---|---|---|---:|---:|---:|---:|",
        ]
        previous: Tick | None = None
        for t in run.ticks:
            rate = (t.requests - previous.requests) / (t.at - previous.at) if previous and t.at > previous.at else 0
            q = t.queues
            lines.append(
                f"| {t.at:.0f} | {_cores(t.cores)} | {t.cpu:.0f} | {t.requests:,} | {rate:.0f} | {t.errors} "
                f"| {_mb(t.rss)} | {_mb(t.worker_rss)} | {'/'.join(str(q.queued[n]) for n in QUEUES)} | {q.running} "
                f"| {q.scheduled} | {t.pg_connections} | {t.webhooks:,} |"
            )
            previous = t
        notes = [
            "Postgres connections count every connection to the soak's database, this script's own included. "
            "CPU cores: what the soak's processes used, per group: the API (granian and its workers), the RQ "
            "workers with their work horses, Postgres, and the rest (wrk, Redis, cron, this script with the "
            "webhook receiver); machine CPU counts whatever else runs on the machine too.",
        ]
        if run.hooks.invalid:
            notes.append("Bad signatures, e.g.: " + "; ".join(run.hooks.invalid[:3]))
        lines += ["", *notes, "", "Machine: " + "; ".join(self.facts) + "."]
        if not self.passed:
            lines += ["", "Last log lines of each process:", "", "```", self.log_tail, "```"]
        return "\n".join(lines) + "\n"


def main(argv: Any = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=10, help="minutes of load")
    parser.add_argument("--workers", type=int, default=2, help="granian worker processes of the API")
    parser.add_argument("--simple", action="store_true", help="run jobs in the RQ worker processes (no fork)")
    parser.add_argument(
        "--rate",
        type=float,
        help=f"requests/s at most, over all connections (default {FORKING_RATE:g}; {SIMPLE_RATE:g} with --simple)",
    )
    parser.add_argument("--connections", type=int, default=4, help="wrk connections (one thread each)")
    parser.add_argument("--timeout", type=float, default=5, help="seconds after which an answer counts as an error")
    parser.add_argument("--refund-after", type=float, default=20, help="seconds before a payment may be refunded")
    parser.add_argument("--drain", type=float, default=120, help="seconds to wait for the work left after the load")
    parser.add_argument("--users", type=int, default=2000, help="seeded users per tenant")
    parser.add_argument("--payments", type=int, default=20_000, help="seeded payments over all tenants")
    parser.add_argument("--ids-per-tenant", type=int, default=200, help="users per tenant the load reads and patches")
    parser.add_argument("--max-setup", type=float, default=300, help="seconds allowed besides the load and drain")
    args = parser.parse_args(argv)
    if args.rate is None:
        args.rate = SIMPLE_RATE if args.simple else FORKING_RATE
    if args.minutes <= 0 or args.rate <= 0 or args.connections < 1 or args.workers < 1:
        parser.error("--minutes and --rate > 0, --connections and --workers >= 1")
    wrk = shutil.which("wrk")
    if wrk is None:
        print(f"wrk is not installed: {WRK_INSTALL}", file=sys.stderr)
        return 2
    configure_logging("WARNING", json=True)
    report = within_deadline(
        "soak",
        int(args.max_setup + args.minutes * 60 + args.drain),
        "raise --max-setup",
        lambda pg, redis_url, base: run_soak(args, pg, redis_url, wrk, base),
    )
    publish("soak", report.markdown())
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
