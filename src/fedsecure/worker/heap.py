"""Freed memory back to the operating system, now and then.

glibc's allocator keeps memory a process has freed for later use, and raises the size from
which it maps large blocks on their own each time one is freed. A worker that trains and moves
models of a few MB each therefore holds the freed blocks of earlier requests in its heap. In a
Ray simulation of McMahan's CNN (``benchmarks/vs_flower/fedsecure_run.py --mode ray``, 12,000
images, runs one after the other) the process tree's peak PSS was 1807-1866 MB, and 1660-1697 MB
with this trim, at the same time per round. Fixing the threshold instead
(``MALLOC_MMAP_THRESHOLD_=4194304``: every block of 4 MB and more mapped on its own) gave
1470-1483 MB but cost 15-20% of the time per round: each training step then maps, zeroes and
unmaps the first linear layer's gradient.

A trim takes about 1 ms, so a process trims after a request at most once a second (a
cross-device round in one process handles hundreds of requests a second). A request whose trim
falls within that second leaves one to be made once requests have stopped for a tenth of a second,
or when the second is over, so that what the last requests of a round freed goes back too,
instead of waiting in the heap for the next round's first request. Made at the end of the second
only, it took the tree's peak of the same benchmark's Ray run with one actor training two owners
at a time from 1208-1248 MB in three runs to 1168-1194 MB in four; that peak came at the end of a
round's fit, before the trim. Made once requests stop, with
the heap limit below in place: 1098-1149 MB in four runs against 1128-1152 MB in two before. Elsewhere
than glibc it does nothing.

What a trim cannot give back: the free top of a thread's own heap. glibc returns it only once it
exceeds the trim threshold, twice the largest block it has mapped on its own and then freed (up to
64 MB). In the model owner's process of that Ray run, whose evaluation frees 25 MB blocks, the
threads' heaps held 24-91 MB so (one-off; benchmarks/vs_flower/README.md, "Where fedsecure-ray's
memory is"); only a threshold fixed for the whole process returns it, at a cost to that process's
own evaluation, so it is left to the user (the benchmark's ``fedsecure-ray-fixed`` measures it).
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time
from collections.abc import Callable

INTERVAL_S = 1.0
QUIET_S = 0.1  # a host that had no request for this long gives back what its last ones freed


def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


_trim = _malloc_trim()
_lock = threading.Lock()
_pending = threading.Lock()
_last = [0.0]  # when this process last trimmed
_skipped = [0.0]  # when a request last skipped its trim
_later: list[threading.Timer] = []  # the trim a skipped one left, while it waits


def trim_now_and_then() -> bool:
    """Give the heap's free memory back to the system unless this process did so within the last
    `INTERVAL_S` (or another thread is doing it now); whether it did. When it did not, a trim
    follows once no request has skipped one for `QUIET_S`, or once the interval is over."""
    if trim(within=INTERVAL_S):
        return True
    if _trim is not None:
        with _pending:
            _skipped[0] = time.monotonic()
            if not _later:
                _wait(QUIET_S)
    return False


def _wait(seconds: float) -> None:
    """Make the deferred trim in ``seconds`` (the caller holds `_pending`)."""
    timer = threading.Timer(seconds, _deferred)
    timer.daemon = True
    _later.append(timer)
    timer.start()


def _deferred() -> None:
    with _pending:
        _later.clear()
        now = time.monotonic()
        quiet, due = now - _skipped[0], _last[0] + INTERVAL_S - now
        if quiet < QUIET_S and due > 0:  # requests still come, and the interval is not over
            _wait(min(QUIET_S - quiet, due))
            return
    trim()


def trim(within: float = 0.0) -> bool:
    """Give the heap's free memory back to the system now (with ``within``: unless this process
    did so within the last ``within`` seconds), unless another thread is doing it; whether it did.
    The engine trims after a round's models are released and before the central evaluation
    allocates its own, and after the evaluation (`fedsecure.fl.engine`): the requests that freed
    them came less than a second after the trim of the one before."""
    now = time.monotonic()
    if _trim is None or now - _last[0] < within or not _lock.acquire(blocking=False):
        return False
    try:
        _last[0] = now
        _trim(0)
        return True
    finally:
        _lock.release()


def arena_limit(threads: int) -> dict[str, str]:
    """The environment for a process whose ``threads`` threads train at the same time: glibc's
    ``MALLOC_ARENA_MAX`` at ``threads + 1``, unless this process's environment sets it (then
    inherited as it is). glibc gives threads up to eight heaps ("arenas") per core, and each keeps
    its own freed blocks: a simulation host's request threads (gRPC's pool) each left a few MB of
    models' blocks in a heap of their own, held between rounds. It goes in the environment a host
    starts with: set from within a Ray actor (``mallopt``) it changed nothing, as glibc fixes the
    limit once a process has more than eight heaps, and Ray's own threads come first.

    In the Ray runs of `benchmarks/vs_flower` (two runs each, after the trim below): one actor
    training two owners at a time peaked at 1128-1152 MB instead of 1168-1194 MB, two actors of one
    owner at a time at 1282-1302 MB instead of 1366-1403 MB, at the same time per round within the
    noise. ``threads`` heaps instead of ``threads + 1`` saved little more and ran slower in one run."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return {}
    return {"MALLOC_ARENA_MAX": str(max(1, threads) + 1)}
