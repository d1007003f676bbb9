"""Ending Keel's processes for good: RQ's work horses leave the worker's process group (``setpgrp``),
so stopping the group, as ``Servers.stop`` does, can leave a horse behind mid-job."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterable

from tests.benchmarks.load import Servers
from tests.support.processes import descendants


def tree(proc: subprocess.Popen[bytes]) -> list[int]:
    return [proc.pid, *descendants(proc.pid)] if proc.poll() is None else []


def kill_tree(proc: subprocess.Popen[bytes]) -> list[int]:
    """SIGKILL a process and all its descendants at once, as a lost machine or an OOM kill would: frozen
    first, so none of them sees another die and reacts (a worker reaping its horse, say). Returns the pids."""
    pids = tree(proc)
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
    proc.wait(10)
    return pids


def stop_all(groups: Iterable[Servers]) -> None:
    """Stop every process of ``groups`` (SIGTERM, then SIGKILL after 10 s), then SIGKILL whatever of their
    process trees is still there."""
    groups = list(groups)
    leftovers = [pid for g in groups for p in g.procs.values() for pid in tree(p)]
    for g in groups:
        with contextlib.suppress(Exception):
            g.stop()
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
