"""The worker protocol's messages: small frozen dataclasses, validated on construction.

A request is encoded as ``[kind, release, *fields]``: ``release`` lists object ids
the sender no longer points to (freed lazily, piggybacked on the next request).
A reply is ``[0, value]`` or ``[1, error_kind, message, detail]``.

Decoding validates every field's type before a worker sees it, so a hostile
message fails here with `ProtocolError` and never reaches an executor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, NoReturn, TypeVar

import torch

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

_U64 = 2**64


def _is_id(v: Any) -> bool:
    return type(v) is int and 0 <= v < _U64


def _is_str(v: Any) -> bool:
    return isinstance(v, str) and len(v) <= 256


MAX_TEXT = 8192  # characters of a free-text field (an object's description)
MAX_TERMS = 64  # items of a search query beyond the first


# field type -> its check; a decoded request is checked field by field before use
CHECKS: dict[str, Callable[[Any], bool]] = {
    "id": _is_id,
    "ids": lambda v: isinstance(v, list) and all(map(_is_id, v)),
    "str": _is_str,
    "strs": lambda v: isinstance(v, list) and all(_is_str(x) for x in v),
    "text": lambda v: isinstance(v, str) and len(v) <= MAX_TEXT,
    "terms": lambda v: isinstance(v, list) and len(v) <= MAX_TERMS and all(_is_str(x) for x in v),
    "bool": lambda v: type(v) is bool,
    "int": lambda v: type(v) is int,
    "list": lambda v: isinstance(v, list | tuple),
    "dict": lambda v: isinstance(v, dict),
    "tensor": lambda v: isinstance(v, torch.Tensor),
    "tensors": lambda v: isinstance(v, list) and all(isinstance(x, torch.Tensor) for x in v),
    "any": lambda v: True,
    "blobs": lambda v: isinstance(v, list) and len(v) <= 4096 and all(isinstance(x, bytes) for x in v),
}


class Request:
    """Base of every request; subclasses declare ``KIND`` and the types of their fields.

    Requests are checked where they cross the trust boundary, in `decode_request`,
    not on construction: the sender builds them from its own values, and checking
    twice doubled the cost of a message.
    """

    KIND: ClassVar[int]
    SPEC: ClassVar[tuple[str, ...]]
    FIELDS: ClassVar[tuple[str, ...]]
    CHECK_FNS: ClassVar[tuple[Callable[[Any], bool], ...]]
    PEER_ONLY: ClassVar[bool] = False
    release: list[int]


REQUESTS: dict[int, type[Request]] = {}
R = TypeVar("R", bound=Request)


def _request(
    kind: int, spec: tuple[str, ...], peer_only: bool = False
) -> Callable[[type[R]], type[R]]:
    """Register a request class under its wire ``kind`` with its field types."""

    def register(cls: type[R]) -> type[R]:
        names = tuple(f.name for f in fields(cls))  # type: ignore[arg-type]
        assert names[0] == "release" and len(names) == len(spec) + 1, cls
        cls.KIND, cls.SPEC, cls.FIELDS, cls.PEER_ONLY = kind, ("ids", *spec), names, peer_only
        cls.CHECK_FNS = tuple(CHECKS[k] for k in cls.SPEC)
        REQUESTS[kind] = cls
        return cls

    return register


@_request(1, ("str", "list", "dict", "id", "bool"))
@dataclass(frozen=True, slots=True)
class Call(Request):
    """Run the allow-listed op ``op`` on stored objects; store a tensor result at ``result_id``."""

    release: list[int]
    op: str
    args: list[Any]
    kwargs: dict[str, Any]
    result_id: int
    grad_enabled: bool


@_request(2, ("id", "list", "dict", "id", "bool", "bool"))
@dataclass(frozen=True, slots=True)
class CallModule(Request):
    """Run a stored module's forward pass (the whole pass is one message)."""

    release: list[int]
    module_id: int
    args: list[Any]
    kwargs: dict[str, Any]
    result_id: int
    grad_enabled: bool
    training: bool


@_request(3, ("id", "tensor", "bool", "bool", "strs", "text"))
@dataclass(frozen=True, slots=True)
class Put(Request):
    """Store a tensor sent by the model owner (``private`` simulates the owner's own data), findable
    by ``tags`` and by words of ``description`` (`Search`)."""

    release: list[int]
    object_id: int
    value: torch.Tensor
    requires_grad: bool
    private: bool
    tags: list[str]
    description: str = ""


@_request(4, ("id", "dict", "tensors", "ids", "bool"))
@dataclass(frozen=True, slots=True)
class PutModule(Request):
    """Build a module from an allow-listed architecture description and its weights."""

    release: list[int]
    module_id: int
    spec: dict[str, Any]
    tensors: list[torch.Tensor]
    ids: list[int]
    private: bool


@_request(5, ("id", "str", "id", "list", "str"))
@dataclass(frozen=True, slots=True)
class PutRef(Request):
    """Store a pointer to an object on another worker (a pointer to a pointer)."""

    release: list[int]
    object_id: int
    location: str
    ref_id: int
    shape: list[int]
    dtype: str


@_request(6, ("id",))
@dataclass(frozen=True, slots=True)
class Get(Request):
    """Release an object to the caller and delete it, if the release policy allows."""

    release: list[int]
    object_id: int


@_request(7, ("id", "bool"))
@dataclass(frozen=True, slots=True)
class GetModule(Request):
    """Release a model's tensors (and, with ``grads``, its parameters' gradients) and delete it."""

    release: list[int]
    module_id: int
    grads: bool = False


@_request(8, ())
@dataclass(frozen=True, slots=True)
class Count(Request):
    release: list[int]


@_request(9, ("str", "terms"))
@dataclass(frozen=True, slots=True)
class Search(Request):
    """The tensors matching ``tag`` and every item of ``also``; an item matches an object's tag
    ("#x" and "x" alike) or occurs in its description."""

    release: list[int]
    tag: str
    also: list[str] = field(default_factory=list)


@_request(10, ("id", "str", "id"))
@dataclass(frozen=True, slots=True)
class Move(Request):
    """Send an object straight to another worker; the caller sends only this instruction."""

    release: list[int]
    object_id: int
    destination: str
    new_id: int


@_request(11, ("id", "str", "id", "ids"))
@dataclass(frozen=True, slots=True)
class MoveModule(Request):
    release: list[int]
    module_id: int
    destination: str
    new_module_id: int
    new_ids: list[int]


@_request(12, ("id", "id", "ids"))
@dataclass(frozen=True, slots=True)
class CopyModule(Request):
    release: list[int]
    module_id: int
    new_module_id: int
    new_ids: list[int]


@_request(13, ("ids", "bool", "id"))
@dataclass(frozen=True, slots=True)
class Aggregate(Request):
    """The aggregator's own fixed function: (weighted) mean of received tensors."""

    release: list[int]
    ids: list[int]
    weighted: bool
    result_id: int


@_request(14, ("ids", "bool", "id", "ids"))
@dataclass(frozen=True, slots=True)
class AggregateModules(Request):
    release: list[int]
    module_ids: list[int]
    weighted: bool
    new_module_id: int
    new_ids: list[int]


@_request(15, ("blobs",))
@dataclass(frozen=True, slots=True)
class Batch(Request):
    """Requests the sender did not wait for (in-place ops), then the one it waits for.

    The worker runs them in order and stops at the first failure, which it reports,
    naming the op, as the reply to the whole batch.
    """

    release: list[int]
    requests: list[bytes]


@_request(16, ("id",))
@dataclass(frozen=True, slots=True)
class Owners(Request):
    """Which data owners' private data an object derives from (the worker's labels)."""

    release: list[int]
    object_id: int


@_request(17, ("id", "str", "list"))
@dataclass(frozen=True, slots=True)
class MakeOptimizer(Request):
    """Build an allow-listed torch optimizer over stored parameters, next to them.

    ``groups``: one map per parameter group, ``{"params": [ids], hyperparameter: value}``.
    """

    release: list[int]
    optimizer_id: int
    kind: str
    groups: list[Any]


@_request(18, ("id", "str", "list"))
@dataclass(frozen=True, slots=True)
class OptimizerCall(Request):
    """``step`` (with each group's current hyperparameters) or ``zero_grad`` of a stored optimizer."""

    release: list[int]
    optimizer_id: int
    method: str
    groups: list[Any]


@_request(20, ("id", "any", "list", "int", "bool", "str", "list"), peer_only=True)
@dataclass(frozen=True, slots=True)
class Deliver(Request):
    """Worker to worker: a moved tensor with its provenance labels."""

    release: list[int]
    object_id: int
    value: torch.Tensor
    labels: list[Any]
    samples: int
    requires_grad: bool
    owner: str  # the model owner who ordered the move: the object is its own here too
    attestation: list[Any] = field(default_factory=list)  # the source's (`fedsecure.worker.attest`)


@_request(21, ("id", "dict", "tensors", "ids", "list", "int", "str", "list"), peer_only=True)
@dataclass(frozen=True, slots=True)
class DeliverModule(Request):
    """Worker to worker: a moved module, its weights and each weight's labels."""

    release: list[int]
    module_id: int
    spec: dict[str, Any]
    tensors: list[torch.Tensor]
    ids: list[int]
    labels: list[Any]
    samples: int
    owner: str
    attestation: list[Any] = field(default_factory=list)


@_request(22, ("id", "str", "str", "dict", "int"))
@dataclass(frozen=True, slots=True)
class Fit(Request):
    """Train a stored module on this worker's data found by tags: one message per round.

    ``config`` is `fedsecure.fl.LocalTraining.to_wire()`; the worker checks every setting
    against its allow-lists. The trained module stays here, labelled with the data's owner.
    """

    release: list[int]
    module_id: int
    x_tag: str
    y_tag: str
    config: dict[str, Any]
    seed: int


@_request(23, ("id", "str", "str", "dict", "id"))
@dataclass(frozen=True, slots=True)
class Evaluate(Request):
    """Evaluate a stored module on data found by tags; the sums ``[loss, correct, count]``
    are stored at ``result_id`` (labelled: only an aggregate of several workers leaves)."""

    release: list[int]
    module_id: int
    x_tag: str
    y_tag: str
    config: dict[str, Any]
    result_id: int


@_request(24, ("ids", "id", "dict", "id", "ids"))
@dataclass(frozen=True, slots=True)
class AggregateUpdates(Request):
    """The aggregator's fixed rule over models' differences from ``reference_id`` (the global
    model): clipping, a robust rule or the mean, noise; the result is reference + rule."""

    release: list[int]
    module_ids: list[int]
    reference_id: int
    rule: dict[str, Any]
    new_module_id: int
    new_ids: list[int]


@_request(25, ("str", "str", "int", "any", "id", "id", "bool", "dict"))
@dataclass(frozen=True, slots=True)
class SecAgg(Request):
    """One phase of secure aggregation ("advertise", "share", "mask", "consistency" (only with the
    consistency check), "unmask") for this worker's
    client ``client_id`` of ``session``: ``payload`` is the server's message (bytes); in the "mask"
    phase the worker masks the update ``module_id`` - ``reference_id`` (weighted by its own sample
    count when ``weighted``), after clipping it to ``privacy["clip_norm"]`` and adding Gaussian
    noise of standard deviation ``privacy["noise_std"]`` when given (distributed DP: the noises of
    all workers add up in the sum). The reply is the client's message (bytes)."""

    release: list[int]
    session: str
    phase: str
    client_id: int
    payload: Any
    module_id: int
    reference_id: int
    weighted: bool
    privacy: dict[str, Any]


@_request(26, ("id", "id", "bool", "dict", "strs", "ids", "int"))
@dataclass(frozen=True, slots=True)
class Share(Request):
    """Split a value into additive shares in Z_(2^64), one delivered to each worker of
    ``destinations`` (at ``new_ids``); the value never leaves whole.

    With ``reference_id`` 0 the value is the tensor ``object_id``; otherwise it is the update
    ``object_id`` - ``reference_id`` of two stored models, flattened, weighted by this worker's
    sample count when ``weighted`` (the count appended), clipped and noised by ``privacy`` as in
    `SecAgg`. ``frac_bits``: the fixed point's fractional bits."""

    release: list[int]
    object_id: int
    reference_id: int
    weighted: bool
    privacy: dict[str, Any]
    destinations: list[str]
    new_ids: list[int]
    frac_bits: int


@_request(27, ("id", "tensor", "list", "int", "int", "str", "list"), peer_only=True)
@dataclass(frozen=True, slots=True)
class DeliverShare(Request):
    """Worker to worker: one additive share (int64) with the labels of the value it shares."""

    release: list[int]
    object_id: int
    value: torch.Tensor
    labels: list[Any]
    samples: int
    frac_bits: int
    owner: str
    attestation: list[Any] = field(default_factory=list)


@_request(28, ("ids", "id"))
@dataclass(frozen=True, slots=True)
class AggregateShares(Request):
    """The share holder's fixed function: the sum in Z_(2^64) of shares it holds, one per data
    owner, stored at ``result_id``; the inputs are consumed (each share joins one sum)."""

    release: list[int]
    ids: list[int]
    result_id: int


def encode_request(msg: Request, *, framed: bool = False) -> bytes:
    """``framed``: large tensors travel beside the body (`codec.Framed`), for transports
    that carry them."""
    return encode([msg.KIND, *[getattr(msg, name) for name in msg.FIELDS]], framed=framed)


def decode_request(data: bytes) -> Request:
    raw = decode(data)
    if not isinstance(raw, list) or not raw or type(raw[0]) is not int:
        raise ProtocolError("a request must be a list starting with its kind")
    cls = REQUESTS.get(raw[0])
    if cls is None:
        raise ProtocolError(f"unknown request kind {raw[0]}")
    values = raw[1:]
    if len(values) != len(cls.SPEC):
        raise ProtocolError(f"{cls.__name__} needs {len(cls.SPEC)} fields, got {len(values)}")
    for check, value in zip(cls.CHECK_FNS, values, strict=True):
        if not check(value):
            _refuse_fields(cls, values)
    return cls(*values)


def _refuse_fields(cls: type[Request], values: list[Any]) -> NoReturn:
    i = next(i for i, (check, value) in enumerate(zip(cls.CHECK_FNS, values, strict=True)) if not check(value))
    raise ProtocolError(f"{cls.__name__}.{cls.FIELDS[i]} must be {cls.SPEC[i]}, got {type(values[i]).__name__}")


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
