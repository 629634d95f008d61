"""The worker protocol's replies: ``[0, value]``, or ``[1, error_kind, message, detail]``.

A worker's typed errors become error replies and turn back into the same typed exceptions
where the reply arrives (`reply_value`), so a model owner catches `PermissionDenied` whether
its worker is virtual or remote.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedsecure.errors import (
    FedsecureError,
    ObjectNotFound,
    OperationNotAllowed,
    PermissionDenied,
    ProtocolError,
    RemoteError,
    WorkerMismatch,
    WorkerUnavailable,
)
from fedsecure.wire.codec import decode, encode


@dataclass(frozen=True, slots=True)
class Reply:
    """``error`` is None on success; otherwise (kind, message, detail) of the failure."""

    value: Any = None
    error: tuple[str, str, str] | None = None


def encode_reply(reply: Reply, *, framed: bool = False) -> bytes:
    if reply.error is None:
        return encode([0, reply.value], framed=framed)
    return encode([1, *reply.error])


def decode_reply(data: bytes | bytearray) -> Reply:
    raw = decode(data)
    if isinstance(raw, list) and len(raw) == 2 and raw[0] == 0:
        return Reply(raw[1])
    if (
        isinstance(raw, list)
        and len(raw) == 4
        and raw[0] == 1
        and all(isinstance(x, str) for x in raw[1:])
    ):
        return Reply(None, (raw[1], raw[2], raw[3]))
    raise ProtocolError("malformed reply")


# Errors on the wire: (kind, message, detail); detail is the rule or the op.
ERROR_KINDS: dict[type[FedsecureError], str] = {
    PermissionDenied: "permission",
    OperationNotAllowed: "not_allowed",
    ObjectNotFound: "not_found",
    ProtocolError: "protocol",
    RemoteError: "remote",
    WorkerMismatch: "mismatch",
    WorkerUnavailable: "unavailable",
}


def error_reply(exc: FedsecureError) -> Reply:
    kind = next((k for cls, k in ERROR_KINDS.items() if isinstance(exc, cls)), "internal")
    detail = getattr(exc, "rule", None) or getattr(exc, "op", None) or ""
    return Reply(None, (kind, str(exc), detail))


def reply_value(data: bytes | bytearray, *, worker: str) -> Any:
    """The value of a reply from ``worker``; an error reply raises its typed exception."""
    reply = decode_reply(data)
    if reply.error is None:
        return reply.value
    kind, message, detail = reply.error
    if kind == "permission":
        raise PermissionDenied(message, rule=detail)
    if kind == "not_allowed":
        raise OperationNotAllowed(message, op=detail)
    if kind == "remote":
        raise RemoteError(message, op=detail, worker=worker)
    simple = {"not_found": ObjectNotFound, "protocol": ProtocolError, "mismatch": WorkerMismatch,
              "unavailable": WorkerUnavailable}
    if kind in simple:
        raise simple[kind](message)
    raise RemoteError(f"internal error on {worker!r}: {message}", op="", worker=worker)
