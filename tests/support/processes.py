"""Process trees from /proc: RQ's work horse calls ``setpgrp()``, so a worker's process group does not
hold everything it started."""

from __future__ import annotations

from pathlib import Path


def _parents() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # The command name (field 2) may hold spaces and parentheses: the parent id follows its last ")".
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def children(pid: int) -> list[int]:
    return sorted(_parents().get(pid, []))


def descendants(pid: int) -> list[int]:
    """Children, grandchildren... of ``pid``, from one pass over /proc."""
    tree = _parents()
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in tree.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found
