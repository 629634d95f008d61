"""The calling side of the stream protocol: shared channels, pooled streams, deadlines.

Requests travel on long-lived bidirectional gRPC streams: on loopback here one message
and its reply on an open stream took about 290 us, a unary call (which opens an HTTP/2
stream each time) about 480 us. One `Link` (a channel and its idle streams) serves every
transport to the same address with the same credentials, so a process that talks to a
thousand workers hosted by one server holds one stream per thread that talks to it, not
one per worker: each open stream takes one of the server's threads. A thread takes an
idle stream or opens one, so concurrent callers never queue behind one another; a stream
left unused for `IDLE` seconds is closed.

gRPC cannot bound the wait for the next message of an open stream, so a watchdog thread
cancels a stream whose request is past its deadline, and the caller raises.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import grpc

from fedsecure.transport import frames, kept

IDLE = 10.0  # seconds an unused stream stays open


class Expired(Exception):
    """The request's deadline passed before its reply came."""


class Closed(Exception):
    """The server ended the stream without a reply (it is shutting down, say)."""


class _Outbox:
    """The request iterator of a stream: gRPC's sending thread drains it, message by message;
    a request's chunks are made (one copy each) only as they are sent."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Iterator[bytes] | None] = queue.SimpleQueue()
        self._current: Iterator[bytes] | None = None

    def put(self, messages: Iterator[bytes]) -> None:
        self._queue.put(messages)

    def close(self) -> None:
        self._queue.put(None)

    def __iter__(self) -> _Outbox:
        return self

    def __next__(self) -> bytes:
        while True:
            if self._current is not None:
                message = next(self._current, None)
                if message is not None:
                    return message
            self._current = self._queue.get()
            if self._current is None:
                raise StopIteration


class Stream:
    """One open bidirectional stream: a request, then its reply, at a time."""

    def __init__(self, link: Link, timeout: float | None) -> None:
        self.link = link
        self._outbox = _Outbox()
        self._replies: Any = link.method(self._outbox, metadata=link.metadata, timeout=timeout)
        self.due: float | None = None  # the deadline of the request in flight
        self.last_used = time.monotonic()
        self.expired = False
        self.closed = False

    def alive(self) -> bool:
        return not (self.closed or self.expired) and bool(self._replies.is_active())

    def exchange(self, worker: str, data: bytes, deadline: float, limit: int,
                 plan: list[tuple[str, bytes | None]] | None = None) -> bytes:
        head, views = frames.outgoing(worker, data, plan)
        self.due = due = time.monotonic() + deadline
        WATCHDOG.watch(self)
        try:
            self._outbox.put(frames.chunks(head, views))
            reply = next(self._replies, None)
            if reply is None:
                raise Closed()
            _, rest = frames.split_head(reply)
            announced, body = frames.read_manifest(rest, limit=limit, what=f"a reply from {worker!r}")
            message = frames.body_and_frames(body, frames.receive(announced, self._replies))
            if time.monotonic() > due:  # late, before the watchdog's thread had its turn
                self.expired = True
                raise Expired()
            return message
        except grpc.RpcError:
            if self.expired:
                raise Expired() from None
            raise
        finally:
            self.due = None
            self.last_used = time.monotonic()

    def expire(self) -> None:
        self.expired = True
        self._replies.cancel()

    def close(self, *, cancel: bool = False) -> None:
        """End the stream: a half-close lets the server finish it; ``cancel`` drops it."""
        if not self.closed:
            self.closed = True
            self._outbox.close()
            if cancel:
                self._replies.cancel()


class Link:
    """A channel to one server, for one set of credentials, and its idle streams."""

    def __init__(self, channel: grpc.Channel, method: str, metadata: Sequence[tuple[str, str]]) -> None:
        self._channel = channel
        self.method = channel.stream_stream(method)
        self.metadata = tuple(metadata)
        self._idle: list[Stream] = []
        self._lock = threading.Lock()
        self.reuse = kept.Reuse()

    def exchange(self, worker: str, data: bytes, *, deadline: float, limit: int, keep: bool,
                 reuse: bool = False) -> bytes:
        """Send one request to ``worker`` and return its reply; ``keep``: on a pooled
        stream, else on one opened for this request alone; ``reuse``: large frames sent
        before are kept by the server and then named (`fedsecure.transport.kept`)."""
        tensors = getattr(data, "frames", None) if reuse else None
        plan = self.reuse.plan(tensors) if tensors else None
        sent = time.monotonic()
        try:
            reply = self._exchange(worker, data, deadline, limit, keep, plan)
        except grpc.RpcError as exc:
            named = plan is not None and any(how == kept.NAME for how, _ in plan)
            if not named or getattr(exc, "code", lambda: None)() != grpc.StatusCode.FAILED_PRECONDITION:
                raise  # not a kept.Missing
            self.reuse.missed()  # the server dropped them (or restarted): send them again
            plan = self.reuse.plan(tensors, naming=False)  # type: ignore[arg-type]
            sent = time.monotonic()
            reply = self._exchange(worker, data, deadline, limit, keep, plan)
        if plan is not None:
            self.reuse.done(plan, sent)
        return reply

    def _exchange(self, worker: str, data: bytes, deadline: float, limit: int, keep: bool,
                  plan: list[tuple[str, bytes | None]] | None) -> bytes:
        stream = self._take() if keep else None
        if stream is None:
            stream = Stream(self, None if keep else deadline)
        done = False
        try:
            reply = stream.exchange(worker, data, deadline, limit, plan)
            done = True
            return reply
        finally:
            if done and keep:
                with self._lock:
                    self._idle.append(stream)
            else:  # after a failure the stream's state is unknown: drop it
                stream.close(cancel=not done)

    def _take(self) -> Stream | None:
        while True:
            with self._lock:
                if not self._idle:
                    return None
                stream = self._idle.pop()
            if stream.alive():
                return stream
            stream.close(cancel=True)

    def retire(self, stream: Stream) -> None:
        """Close ``stream`` if it is idle (the watchdog's call)."""
        with self._lock:
            if stream not in self._idle:
                return
            self._idle.remove(stream)
        stream.close()

    def close_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for stream in idle:
            stream.close()


class Watchdog:
    """One thread per process: cancels streams past their request's deadline and closes
    streams left idle. A request costs it a set insertion; it wakes the thread only when
    the request's deadline comes before the thread's next wake-up."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._streams: set[Stream] = set()
        self._wake_at = math.inf
        self._thread: threading.Thread | None = None

    def watch(self, stream: Stream) -> None:
        with self._cv:
            self._streams.add(stream)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fedsecure-deadlines", daemon=True)
                self._thread.start()
            if stream.due is not None and stream.due < self._wake_at:
                self._cv.notify()

    def _run(self) -> None:
        with self._cv:
            while True:
                now = time.monotonic()
                wake = now + IDLE
                for stream in list(self._streams):
                    due = stream.due
                    if stream.closed:
                        self._streams.discard(stream)
                    elif due is not None and due <= now:
                        self._streams.discard(stream)
                        stream.expire()
                    elif due is not None:
                        wake = min(wake, due)
                    elif now - stream.last_used >= IDLE:
                        self._streams.discard(stream)
                        stream.link.retire(stream)
                    else:
                        wake = min(wake, stream.last_used + IDLE)
                self._wake_at = wake
                self._cv.wait(max(0.0, wake - now))


WATCHDOG = Watchdog()
