"""Frames a server keeps for a caller, so that a large tensor sent again is named, not resent.

A model owner sends each round's model to every owner it samples. Where many owners share one
server (simulation hosts, Ray actors, a worker server hosting several), the same bytes crossed
the same connection once per owner: with two Ray actors, sending McMahan's CNN (6.7 MB) took
13.9 ms an owner against 0.85 ms in one process (docs/fl.md, "Cross-device"). Now a frame of
`KEEP_MIN` bytes or more that a caller sends a second time goes with a request to keep it, and
from then on the caller names it by its BLAKE3 digest while the server holds it.

A frame manifest entry (`fedsecure.transport.frames`) is one of::

    [dtype, shape]           its bytes follow
    [dtype, shape, true]     its bytes follow, and the server keeps a copy of them
    [dtype, shape, digest]   no bytes follow: the server's copy of the frame this caller
                             sent with that 32-byte BLAKE3 digest

The caller (`Reuse`, one per link: one server, one set of credentials) names a frame only while
the server holds it for sure: after a request that kept it succeeded, and within `IDLE_S` minus a
margin of its last use. The server (`Kept`) names what it keeps by the digest of the bytes it
received (it never takes a caller's word for it), keeps each caller's frames apart, at most
`BUDGET` bytes of them (least recently used first out), and drops a frame `IDLE_S` after its last
use. Where it holds no such frame (it restarted, or dropped it), it refuses the request before it
reads its frames (`Missing`, gRPC's FAILED_PRECONDITION), and the caller sends it again in full.

What it changes for privacy: nothing crosses between callers. A caller can name only frames it
sent itself, so it learns nothing it did not know; a worker receives the same tensor, a copy of
its own, as if the bytes had come again, and hashes the model it trains (`worker.attest`)
itself as before.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import blake3
import torch

from fedsecure.errors import ProtocolError
from fedsecure.wire import codec
from fedsecure.worker import heap

KEEP_MIN = 1 << 20  # bytes: smaller frames are sent every time (their copies cost less than a hash)
IDLE_S = 2.0  # seconds a kept frame stays unused before its server drops it
MARGIN_S = 0.5  # the caller names a frame only if it used it this much sooner than IDLE_S
BUDGET = 256 << 20  # bytes a server keeps for one caller at most
SEEN = 64  # digests a caller remembers having sent in full (a second send asks to keep it)

SEND, KEEP, NAME = "send", "keep", "name"


class Missing(ProtocolError):
    """A request named a frame its server does not hold (any more)."""


def digest(tensor: torch.Tensor) -> bytes:
    """BLAKE3 (32 bytes) of a contiguous CPU tensor's bytes."""
    return blake3.blake3(codec.tensor_bytes(tensor)).digest()


class Reuse:
    """The calling side, for one link: which frames to send, to send and keep, or to name."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: OrderedDict[bytes, None] = OrderedDict()  # sent in full, not kept
        self._held: dict[bytes, float] = {}  # kept by the server, and when last used

    def plan(self, tensors: Sequence[torch.Tensor], *, naming: bool = True) -> list[tuple[str, bytes | None]]:
        """How to send each of ``tensors``: (`SEND`, None), (`KEEP`, digest) or (`NAME`, digest).
        ``naming`` False: send every frame (after the server said it holds one no longer)."""
        out: list[tuple[str, bytes | None]] = []
        now = time.monotonic()
        for t in tensors:
            if not KEEP_MIN <= t.nbytes <= BUDGET:  # small, or more than a server keeps
                out.append((SEND, None))
                continue
            d = digest(t)
            with self._lock:
                used = self._held.get(d)
                if naming and used is not None and now - used < IDLE_S - MARGIN_S:
                    out.append((NAME, d))
                elif d in self._seen or used is not None:
                    out.append((KEEP, d))
                else:
                    self._seen[d] = None
                    while len(self._seen) > SEEN:
                        self._seen.popitem(last=False)
                    out.append((SEND, None))
        return out

    def done(self, plan: list[tuple[str, bytes | None]], sent: float) -> None:
        """The request sent at ``sent`` (`time.monotonic`) went through: the frames it kept or
        named are held, used last no sooner than then (the server used them after)."""
        now = time.monotonic()
        with self._lock:
            for how, d in plan:
                if how != SEND and d is not None:
                    self._seen.pop(d, None)
                    self._held[d] = sent
            for d in [d for d, used in self._held.items() if now - used >= IDLE_S]:
                del self._held[d]

    def missed(self) -> None:
        """The server holds none of what this link thought it kept: send each again, to be kept."""
        with self._lock:
            for d in self._held:
                self._seen[d] = None
            self._held.clear()


class Announced(Protocol):
    """A frame as a request's head announces it (`fedsecure.transport.frames.Frame`)."""

    @property
    def dtype(self) -> torch.dtype: ...
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def name(self) -> bytes | None: ...


@dataclass(slots=True)
class _Copy:
    tensor: torch.Tensor
    used: float  # `time.monotonic` of its last use


class Kept:
    """The serving side: each caller's kept frames, by digest."""

    def __init__(self, budget: int = BUDGET) -> None:
        self.budget = budget
        self._lock = threading.Lock()
        self._frames: dict[bytes, OrderedDict[bytes, _Copy]] = {}  # caller -> digest -> copy, oldest use first
        self._timer: threading.Timer | None = None
        self.named = 0  # frames served from a copy kept here

    def copies(self, caller: bytes, frames: Sequence[Announced]) -> dict[int, torch.Tensor]:
        """A copy of each frame a request names, by its place among ``frames``, each marked as used
        now; `Missing` unless every one is held for ``caller`` with the announced dtype and shape
        (called before any of the request's bytes are read)."""
        out: dict[int, torch.Tensor] = {}
        if all(frame.name is None for frame in frames):  # most requests
            return out
        with self._lock:
            held = self._frames.get(caller, OrderedDict())
            for i, frame in enumerate(frames):
                if frame.name is None:
                    continue
                kept = held.get(frame.name)
                if kept is None or kept.tensor.dtype != frame.dtype or tuple(kept.tensor.shape) != frame.shape:
                    raise Missing(f"this server holds no frame {frame.name.hex()[:16]} of "
                                  f"{codec.dtype_name(frame.dtype)} {list(frame.shape)} for this caller "
                                  f"(it keeps one {IDLE_S:g} s after its last use)")
                kept.used = time.monotonic()
                held.move_to_end(frame.name)
                out[i] = kept.tensor
            self.named += len(out)
        return {i: t.clone() for i, t in out.items()}  # outside the lock; each frame a tensor of its own

    def keep(self, caller: bytes, tensor: torch.Tensor) -> None:
        """Keep a copy of ``tensor`` for ``caller`` under the digest of its bytes."""
        if tensor.nbytes > self.budget:
            return
        d = digest(tensor)
        with self._lock:
            held = self._frames.setdefault(caller, OrderedDict())
            if d in held:
                held[d].used = time.monotonic()
                held.move_to_end(d)
            else:
                held[d] = _Copy(tensor.clone(), time.monotonic())
                while self._held(caller) > self.budget:
                    self._drop(caller, next(iter(held)))  # the least recently used first
            self._schedule()

    def held(self, caller: bytes) -> int:
        """Bytes kept for ``caller``."""
        with self._lock:
            return self._held(caller)

    def _held(self, caller: bytes) -> int:
        return sum(c.tensor.nbytes for c in self._frames.get(caller, {}).values())

    def _drop(self, caller: bytes, d: bytes) -> None:
        del self._frames[caller][d]
        if not self._frames[caller]:
            del self._frames[caller]

    def _schedule(self) -> None:
        """A timer for the next drop (the caller holds the lock)."""
        if self._timer is None and self._frames:
            oldest = min(c.used for held in self._frames.values() for c in held.values())
            self._timer = threading.Timer(max(0.01, oldest + IDLE_S - time.monotonic()), self._expire)
            self._timer.daemon = True
            self._timer.start()

    def _expire(self) -> None:
        now, dropped = time.monotonic(), False
        with self._lock:
            self._timer = None
            for caller in list(self._frames):
                for d in [d for d, c in self._frames[caller].items() if now - c.used >= IDLE_S]:
                    self._drop(caller, d)
                    dropped = True
            self._schedule()
        if dropped:
            heap.trim()  # the dropped copies go back to the system now

    def clear(self) -> None:
        with self._lock:
            self._frames.clear()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
