"""Who may run on a served `WorkerCore` now: one request at a time, with one exception.

A core is not safe to share between threads (its store, torch's autograd), so a server
runs one request on it at a time. A request that moves a value to another worker waits,
holding the core, for that worker's reply; if that worker is at the same moment moving
a value here, each would wait for the other until the deadline. So while the request
holding a core waits for a peer (`Gate.waiting_for_peer`), one delivery from a peer may
run on it as a guest. A delivery only adds new objects: it cannot change the value the
waiting request is sending, and no client request runs until that request is done.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from fedsecure.errors import ProtocolError
from fedsecure.worker.store import Sender


class Gate:
    """Admission to one core (see the module's docstring)."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._holder: int | None = None  # the thread running a request on the core
        self._waiting = False  # the holder waits for a peer's reply
        self._guest = False  # a peer's delivery runs meanwhile

    @contextlib.contextmanager
    def enter(self, sender: Sender) -> Iterator[bool]:
        """Run one request from ``sender``; yields True when it holds the core, False when
        it runs as a guest (a peer's delivery while the holder waits for a peer)."""
        with self._cv:
            if sender.kind == "peer":
                while self._holder is not None and not (self._waiting and not self._guest):
                    self._cv.wait()
            else:
                while self._holder is not None:
                    self._cv.wait()
            holds = self._holder is None
            if holds:
                self._holder = threading.get_ident()
            else:
                self._guest = True
        try:
            yield holds
        finally:
            with self._cv:
                if holds:
                    self._holder, self._waiting = None, False
                else:
                    self._guest = False
                self._cv.notify_all()

    @contextlib.contextmanager
    def waiting_for_peer(self) -> Iterator[None]:
        """The holder sends to a peer and waits for its reply: a delivery may run meanwhile."""
        with self._cv:
            if self._holder != threading.get_ident():
                raise ProtocolError("only a request that holds the worker can send to a peer")
            self._waiting = True
            self._cv.notify_all()
        try:
            yield
        finally:
            with self._cv:
                while self._guest:  # the guest finishes before the holder goes on
                    self._cv.wait()
                self._waiting = False
