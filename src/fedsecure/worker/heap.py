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

A trim takes about 1 ms, so a process trims at most once a second (a cross-device round in one
process handles hundreds of requests a second). Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import sys
import threading
import time
from collections.abc import Callable

INTERVAL_S = 1.0


def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


_trim = _malloc_trim()
_lock = threading.Lock()
_last = [0.0]


def trim_now_and_then() -> bool:
    """Give the heap's free memory back to the system unless this process did so within the last
    `INTERVAL_S` (or another thread is doing it now); whether it did."""
    return trim(within=INTERVAL_S)


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
