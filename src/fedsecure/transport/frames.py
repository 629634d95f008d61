"""One message on a gRPC stream: a head, then the bytes of its tensor frames in chunks.

The head carries the msgpack body of a `codec.Framed` message and announces its frames
(dtype and shape each); the frames' bytes follow as chunk messages, read straight from
tensor storage on one end and written straight into new tensors on the other::

    head     := u16 len(worker) | worker (utf-8) | u32 len(manifest) | manifest | body
    manifest := msgpack [[dtype name, [dim, ...]], ...]   (a third field: `fedsecure.transport.kept`)

``worker`` names the hosted worker a request is for (empty in replies). A chunk holds at
most `CHUNK` bytes and never spans two frames. The receiver checks the announced sizes
against the dtype and shape and its own maximum before it reads a chunk, and allocates a
frame's tensor only when the frame's first chunk arrives.

Chunks are 1 MiB: 256 KiB to 16 MiB chunks were measured on loopback here (100 MiB over a
gRPC stream between two processes, and send/get/move in benchmarks/transport.py); 1 MiB
was among the fastest everywhere and 16 MiB the slowest: a 1 MiB chunk's copies stay in
the CPU's cache, and gRPC's per-message cost (tens of microseconds) is small against it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
import torch

from fedsecure.errors import ProtocolError
from fedsecure.transport import kept
from fedsecure.wire import codec

CHUNK = 1 << 20
MAX_FRAMES = 1 << 16
_WORKER = struct.Struct(">H")
_MANIFEST = struct.Struct(">I")


class TooLarge(ProtocolError):
    """A message over the receiver's maximum size."""


def too_large(what: str, size: int, limit: int) -> str:
    return (
        f"{what} of {size} bytes exceeds the maximum of {limit} bytes; raise it on both ends "
        "(max_message=..., fedsecure worker serve --max-message)"
    )


@dataclass(frozen=True, slots=True)
class Frame:
    """One announced tensor: its dtype, shape and size in bytes."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    keep: bool = False  # the receiver keeps a copy (`fedsecure.transport.kept`)
    name: bytes | None = None  # no bytes follow: the receiver's kept frame with this digest


def outgoing(worker: str, message: bytes, plan: list[tuple[str, bytes | None]] | None = None
             ) -> tuple[bytes, list[memoryview]]:
    """The head of ``message`` (a `codec.Framed` one or plain bytes) for ``worker``, and
    its frames' bytes (views of tensor storage, not copies). ``plan``: for each frame, whether
    to send it, send and keep it, or name it (`kept.Reuse.plan`); by default, send each."""
    tensors = getattr(message, "frames", [])
    plan = plan or [(kept.SEND, None)] * len(tensors)
    entries: list[list[Any]] = []
    for t, (how, d) in zip(tensors, plan, strict=True):
        entry: list[Any] = [codec.dtype_name(t.dtype), list(t.shape)]
        entries.append(entry if how == kept.SEND else [*entry, True if how == kept.KEEP else d])
    manifest = msgpack.packb(entries)
    name = worker.encode()
    head = b"".join(
        (_WORKER.pack(len(name)), name, _MANIFEST.pack(len(manifest)), manifest, message)
    )
    return head, [codec.tensor_bytes(t) for t, (how, _) in zip(tensors, plan, strict=True) if how != kept.NAME]


def chunks(head: bytes, views: list[memoryview]) -> Iterator[bytes]:
    """The gRPC messages of one message: its head, then each frame in chunks.

    Each chunk is copied once, into the bytes object gRPC takes, when the iterator reaches it (a
    server takes them all while it holds the worker, then sends them without holding it)."""
    yield head
    for view in views:
        for start in range(0, len(view), CHUNK):
            yield bytes(view[start : start + CHUNK])


def split_head(head: bytes) -> tuple[str, memoryview]:
    """The worker a head names, and the rest of it (read with `read_manifest`)."""
    view = memoryview(head)
    if len(view) < _WORKER.size:
        raise ProtocolError("truncated message head")
    (n,) = _WORKER.unpack_from(view)
    if len(view) < _WORKER.size + n:
        raise ProtocolError("truncated message head")
    try:
        worker = str(view[_WORKER.size : _WORKER.size + n], "utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("the worker's name in the message head is not UTF-8") from None
    return worker, view[_WORKER.size + n :]


def read_manifest(rest: memoryview, *, limit: int, what: str) -> tuple[list[Frame], bytes]:
    """The frames a head announces, checked, and the message body.

    Raises `ProtocolError` for a malformed manifest and `TooLarge` when the body and the
    frames together exceed ``limit`` bytes."""
    if len(rest) < _MANIFEST.size:
        raise ProtocolError("truncated message head")
    (n,) = _MANIFEST.unpack_from(rest)
    if len(rest) < _MANIFEST.size + n:
        raise ProtocolError("truncated message head")
    try:
        entries = msgpack.unpackb(rest[_MANIFEST.size : _MANIFEST.size + n], raw=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"malformed frame manifest: {exc}") from None
    if not isinstance(entries, list) or len(entries) > MAX_FRAMES:
        raise ProtocolError(f"the frame manifest must be a list of at most {MAX_FRAMES} frames")
    body = rest[_MANIFEST.size + n :]
    frames, total = [], len(body)
    for entry in entries:
        if not isinstance(entry, list) or len(entry) not in (2, 3):
            raise ProtocolError("each frame is announced as [dtype, shape] or [dtype, shape, true or a 32-byte digest]")
        dtype = codec.parse_dtype(entry[0])
        nbytes = codec.check_shape(entry[1]) * codec.itemsize(dtype)
        if nbytes == 0:
            raise ProtocolError("an empty tensor travels inside the message, not as a frame")
        extra = entry[2] if len(entry) == 3 else False
        if extra is not False and extra is not True and not (isinstance(extra, bytes) and len(extra) == 32):
            raise ProtocolError("a frame's third field is true (keep it) or a 32-byte digest (a kept frame)")
        total += nbytes
        if total > limit:
            raise TooLarge(too_large(what, total, limit))
        frames.append(Frame(dtype, tuple(entry[1]), nbytes, keep=extra is True,
                            name=extra if isinstance(extra, bytes) else None))
    if total > limit:
        raise TooLarge(too_large(what, total, limit))
    return frames, bytes(body)


def receive(frames: list[Frame], messages: Iterator[bytes],
            named: Mapping[int, torch.Tensor] | None = None) -> list[torch.Tensor]:
    """The announced frames' tensors, filled chunk by chunk from ``messages``; a named frame is
    ``named[its place]``, a copy of the receiver's kept one (`kept.Kept.copies`; none may be
    named where ``named`` is None).

    A frame's tensor is allocated when its first chunk arrives, so a sender that stops
    early costs no more memory than it sent (pages are touched as they are written).
    """
    tensors = []
    for i, frame in enumerate(frames):
        if frame.name is not None:
            if named is None:
                raise ProtocolError("a reply cannot name a kept frame: only requests do")
            tensors.append(named[i])
            continue
        tensor: torch.Tensor | None = None
        view = memoryview(b"")
        at = 0
        while at < frame.nbytes:
            chunk = next(messages, None)
            if chunk is None:
                raise ProtocolError(f"the message ended {frame.nbytes - at} bytes into a tensor")
            if not chunk or at + len(chunk) > frame.nbytes:
                raise ProtocolError("a chunk runs past the end of its tensor's announced size")
            if tensor is None:
                tensor = torch.empty(frame.shape, dtype=frame.dtype)
                view = codec.tensor_bytes(tensor)
            view[at : at + len(chunk)] = chunk
            at += len(chunk)
        assert tensor is not None
        tensors.append(tensor)
    return tensors


def body_and_frames(body: bytes, tensors: list[torch.Tensor]) -> bytes:
    """A received message as `WorkerCore.handle` and the client read it."""
    return codec.Framed(body, tensors) if tensors else body
