"""Processes as the tests see them through /proc (Linux): whether one still runs, waiting for some
to end, a process's children, and the same walk as source for the scripts that tests run."""

from __future__ import annotations

import time
from pathlib import Path


def running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except (OSError, IndexError):
        return False


def still_running(pids: list[int], within: float = 20.0) -> list[int]:
    """Those of ``pids`` still running after at most ``within`` seconds (none: sooner)."""
    deadline = time.monotonic() + within
    while (alive := [pid for pid in pids if running(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def children(pid: int) -> list[int]:
    return [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]


TREE = '''
import os
def descendants():
    """Every process below this one."""
    parent = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            parent[int(pid)] = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            pass
    mine, grew = {os.getpid()}, True
    while grew:
        more = {p for p, q in parent.items() if q in mine} - mine
        mine, grew = mine | more, bool(more)
    return mine - {os.getpid()}
def command(pid):
    """A process's command line, its words joined by spaces."""
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\\0", b" ").decode()
    except OSError:
        return ""
'''
"""`descendants()` and `command(pid)`, for a script that a test runs (``TREE + script``)."""
