"""The worker protocol's requests: small frozen dataclasses, registered with their wire kind.

A request is encoded as ``[kind, release, *fields]``: ``release`` lists object ids the sender
no longer points to (freed lazily, piggybacked on the next request). Each field's annotation
says what it must be (`fedsecure.wire.fields`); decoding checks every field before a worker
sees it, so a hostile message fails here with `ProtocolError` and never reaches an executor.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Annotated, ClassVar, TypeVar

import torch

from fedsecure.errors import ProtocolError
from fedsecure.wire import fields as wf
from fedsecure.wire.codec import decode, encode
from fedsecure.wire.fields import (
    Blobs,
    Bool,
    Id,
    Ids,
    Int,
    Items,
    Map,
    Str,
    Strs,
    Tensor,
    Tensors,
    Terms,
    Text,
    Value,
    anything,
)


@dataclass(frozen=True, slots=True)
class Request:
    """Base of every request; subclasses declare ``KIND`` and annotate their fields.

    ``release`` belongs to the envelope, not to the request: the client fills it in when it
    sends (`WorkerClient.request`), so callers never pass it; it is keyword-only, and first on
    the wire. Requests are checked where they cross the trust boundary, in `decode_request`,
    not on construction: the sender builds them from its own values, and checking twice
    doubled the cost of a message.
    """

    KIND: ClassVar[int]
    FIELDS: ClassVar[tuple[str, ...]]
    CHECKS: ClassVar[tuple[wf.Check, ...]]  # each field's, from its annotation
    WHERE: ClassVar[tuple[str, ...]]  # each field's name in errors ("Put.tags")
    PEER_ONLY: ClassVar[bool] = False
    release: Ids = field(default_factory=list, kw_only=True)


REQUESTS: dict[int, type[Request]] = {}
R = TypeVar("R", bound=Request)


def _request(kind: int, peer_only: bool = False) -> Callable[[type[R]], type[R]]:
    """Register a request class under its wire ``kind``, with the checks of its fields."""

    def register(cls: type[R]) -> type[R]:
        cls.FIELDS = tuple(f.name for f in fields(cls))  # type: ignore[arg-type]
        assert cls.FIELDS[0] == "release", cls
        cls.KIND, cls.PEER_ONLY = kind, peer_only
        cls.CHECKS, cls.WHERE = wf.checks(cls)
        REQUESTS[kind] = cls
        return cls

    return register


@_request(1)
@dataclass(frozen=True, slots=True)
class Call(Request):
    """Run the allow-listed op ``op`` on stored objects; store a tensor result at ``result_id``."""

    op: Str
    args: Items
    kwargs: Map
    result_id: Id
    grad_enabled: Bool


@_request(2)
@dataclass(frozen=True, slots=True)
class CallModule(Request):
    """Run a stored module's forward pass (the whole pass is one message)."""

    module_id: Id
    args: Items
    kwargs: Map
    result_id: Id
    grad_enabled: Bool
    training: Bool


@_request(3)
@dataclass(frozen=True, slots=True)
class Put(Request):
    """Store a tensor sent by the model owner (``private`` simulates the owner's own data), findable
    by ``tags`` and by words of ``description`` (`Search`)."""

    object_id: Id
    value: Tensor
    requires_grad: Bool
    private: Bool
    tags: Strs
    description: Text = ""


@_request(4)
@dataclass(frozen=True, slots=True)
class PutModule(Request):
    """Build a module from an allow-listed architecture description and its weights."""

    module_id: Id
    spec: Map
    tensors: Tensors
    ids: Ids
    private: Bool


@_request(5)
@dataclass(frozen=True, slots=True)
class PutRef(Request):
    """Store a pointer to an object on another worker (a pointer to a pointer)."""

    object_id: Id
    location: Str
    ref_id: Id
    shape: Items
    dtype: Str


@_request(6)
@dataclass(frozen=True, slots=True)
class Get(Request):
    """Release an object to the caller and delete it, if the release policy allows."""

    object_id: Id


@_request(7)
@dataclass(frozen=True, slots=True)
class GetModule(Request):
    """Release a model's tensors (and, with ``grads``, its parameters' gradients) and delete it."""

    module_id: Id
    grads: Bool = False


@_request(8)
@dataclass(frozen=True, slots=True)
class Count(Request):
    """Nothing but the envelope: frees what ``release`` lists; the reply counts the caller's objects."""


@_request(9)
@dataclass(frozen=True, slots=True)
class Search(Request):
    """The tensors matching ``tag`` and every item of ``also``; an item matches an object's tag
    ("#x" and "x" alike) or occurs in its description."""

    tag: Str
    also: Terms = field(default_factory=list)


@_request(10)
@dataclass(frozen=True, slots=True)
class Move(Request):
    """Send an object straight to another worker; the caller sends only this instruction."""

    object_id: Id
    destination: Str
    new_id: Id


@_request(11)
@dataclass(frozen=True, slots=True)
class MoveModule(Request):
    module_id: Id
    destination: Str
    new_module_id: Id
    new_ids: Ids


@_request(12)
@dataclass(frozen=True, slots=True)
class CopyModule(Request):
    module_id: Id
    new_module_id: Id
    new_ids: Ids


@_request(13)
@dataclass(frozen=True, slots=True)
class Aggregate(Request):
    """The aggregator's own fixed function: (weighted) mean of received tensors."""

    ids: Ids
    weighted: Bool
    result_id: Id


@_request(14)
@dataclass(frozen=True, slots=True)
class AggregateModules(Request):
    module_ids: Ids
    weighted: Bool
    new_module_id: Id
    new_ids: Ids


@_request(15)
@dataclass(frozen=True, slots=True)
class Batch(Request):
    """Requests the sender did not wait for (in-place ops), then the one it waits for.

    The worker runs them in order and stops at the first failure, which it reports,
    naming the op, as the reply to the whole batch.
    """

    requests: Blobs


@_request(16)
@dataclass(frozen=True, slots=True)
class Owners(Request):
    """Which data owners' private data an object derives from (the worker's labels)."""

    object_id: Id


@_request(17)
@dataclass(frozen=True, slots=True)
class MakeOptimizer(Request):
    """Build an allow-listed torch optimizer over stored parameters, next to them.

    ``groups``: one map per parameter group, ``{"params": [ids], hyperparameter: value}``.
    """

    optimizer_id: Id
    kind: Str
    groups: Items


@_request(18)
@dataclass(frozen=True, slots=True)
class OptimizerCall(Request):
    """``step`` (with each group's current hyperparameters) or ``zero_grad`` of a stored optimizer."""

    optimizer_id: Id
    method: Str
    groups: Items


@_request(20, peer_only=True)
@dataclass(frozen=True, slots=True)
class Deliver(Request):
    """Worker to worker: a moved tensor with its provenance labels."""

    object_id: Id
    value: Annotated[torch.Tensor, anything]  # checked by the receiver
    labels: Items
    samples: Int
    requires_grad: Bool
    owner: Str  # the model owner who ordered the move: the object is its own here too
    attestation: Items = field(default_factory=list)  # the source's (`fedsecure.worker.attest`)


@_request(21, peer_only=True)
@dataclass(frozen=True, slots=True)
class DeliverModule(Request):
    """Worker to worker: a moved module, its weights and each weight's labels."""

    module_id: Id
    spec: Map
    tensors: Tensors
    ids: Ids
    labels: Items
    samples: Int
    owner: Str
    attestation: Items = field(default_factory=list)


@_request(22)
@dataclass(frozen=True, slots=True)
class Fit(Request):
    """Train a stored module on this worker's data found by tags: one message per round.

    ``config`` is `fedsecure.fl.LocalTraining.to_wire()`; the worker checks every setting
    against its allow-lists. The trained module stays here, labelled with the data's owner.
    """

    module_id: Id
    x_tag: Str
    y_tag: Str
    config: Map
    seed: Int


@_request(23)
@dataclass(frozen=True, slots=True)
class Evaluate(Request):
    """Evaluate a stored module on data found by tags; the sums ``[loss, correct, count]``
    are stored at ``result_id`` (labelled: only an aggregate of several workers leaves)."""

    module_id: Id
    x_tag: Str
    y_tag: Str
    config: Map
    result_id: Id


@_request(24)
@dataclass(frozen=True, slots=True)
class AggregateUpdates(Request):
    """The aggregator's fixed rule over models' differences from ``reference_id`` (the global
    model): clipping, a robust rule or the mean, noise; the result is reference + rule."""

    module_ids: Ids
    reference_id: Id
    rule: Map
    new_module_id: Id
    new_ids: Ids


@_request(25)
@dataclass(frozen=True, slots=True)
class SecAgg(Request):
    """One phase of secure aggregation ("advertise", "share", "mask", "consistency" (only with the
    consistency check), "unmask") for this worker's
    client ``client_id`` of ``session``: ``payload`` is the server's message (bytes); in the "mask"
    phase the worker masks the update ``module_id`` - ``reference_id`` (weighted by its own sample
    count when ``weighted``), after clipping it to ``privacy["clip_norm"]`` and adding Gaussian
    noise of standard deviation ``privacy["noise_std"]`` when given (distributed DP: the noises of
    all workers add up in the sum). The reply is the client's message (bytes)."""

    session: Str
    phase: Str
    client_id: Int
    payload: Value
    module_id: Id
    reference_id: Id
    weighted: Bool
    privacy: Map


@_request(26)
@dataclass(frozen=True, slots=True)
class Share(Request):
    """Split a value into additive shares in Z_(2^64), one delivered to each worker of
    ``destinations`` (at ``new_ids``); the value never leaves whole.

    With ``reference_id`` 0 the value is the tensor ``object_id``; otherwise it is the update
    ``object_id`` - ``reference_id`` of two stored models, flattened, weighted by this worker's
    sample count when ``weighted`` (the count appended), clipped and noised by ``privacy`` as in
    `SecAgg`. ``frac_bits``: the fixed point's fractional bits."""

    object_id: Id
    reference_id: Id
    weighted: Bool
    privacy: Map
    destinations: Strs
    new_ids: Ids
    frac_bits: Int


@_request(27, peer_only=True)
@dataclass(frozen=True, slots=True)
class DeliverShare(Request):
    """Worker to worker: one additive share (int64) with the labels of the value it shares."""

    object_id: Id
    value: Tensor
    labels: Items
    samples: Int
    frac_bits: Int
    owner: Str
    attestation: Items = field(default_factory=list)


@_request(28)
@dataclass(frozen=True, slots=True)
class AggregateShares(Request):
    """The share holder's fixed function: the sum in Z_(2^64) of shares it holds, one per data
    owner, stored at ``result_id``; the inputs are consumed (each share joins one sum)."""

    ids: Ids
    result_id: Id


@_request(29)
@dataclass(frozen=True, slots=True)
class FoldModule(Request):
    """The aggregator's mean, folded as models arrive: add the model ``module_id`` (weighted by its
    sample count when ``weighted``) into the sealed sum ``sum_id``, which the first fold makes. The
    model is consumed. No request reads a sum; `CloseSum` turns sums into their mean."""

    sum_id: Id
    module_id: Id
    weighted: Bool


@_request(30)
@dataclass(frozen=True, slots=True)
class CloseSum(Request):
    """Close the sums ``sum_ids`` together (added in that order): with the checks of
    `AggregateModules` over every model folded into them, their mean becomes the model
    ``new_module_id`` (its tensors at ``new_ids``); the sums are gone whether the checks pass or not."""

    sum_ids: Ids
    new_module_id: Id
    new_ids: Ids


@_request(31)
@dataclass(frozen=True, slots=True)
class MoveFold(Request):
    """`MoveModule` and the destination's `FoldModule` in one request: send the model ``module_id``
    straight into the sealed sum ``sum_id`` on ``destination``, which folds it as it arrives
    (`DeliverFold`) and never stores it. The model is consumed here, as by a move."""

    module_id: Id
    destination: Str
    sum_id: Id
    weighted: Bool


@_request(32, peer_only=True)
@dataclass(frozen=True, slots=True)
class DeliverFold(Request):
    """Worker to worker: a moved module (as `DeliverModule`) to fold at once into the sum ``sum_id``
    (`MoveFold`). Its tensors are read during the request and kept by nothing: within one process
    they arrive as views of the sender's, not copies (`fedsecure.worker.core`)."""

    sum_id: Id
    weighted: Bool
    spec: Map
    tensors: Tensors
    labels: Items
    samples: Int
    owner: Str
    attestation: Items = field(default_factory=list)


BORROWS_FRAMES = frozenset({DeliverFold.KIND})
"""Peer requests whose handler only reads the tensors that came beside it, during the request."""


def peek_kind(data: bytes) -> int | None:
    """The kind of an encoded request, from its first bytes (a MessagePack array whose first item
    is a small int), without decoding it; None where the bytes do not start that way."""
    if len(data) >= 2 and 0x90 <= data[0] <= 0x9F and data[1] < 0x80:  # fixarray, positive fixint
        return data[1]
    if len(data) >= 4 and data[0] == 0xDC and data[3] < 0x80:  # array 16
        return data[3]
    return None


def encode_request(msg: Request, *, framed: bool = False, release: list[int] | None = None) -> bytes:
    """``framed``: large tensors travel beside the body (`codec.Framed`), for transports
    that carry them. ``release``: the envelope's list of freed ids, added to the request's own."""
    freed = msg.release if not release else [*msg.release, *release]
    return encode([msg.KIND, freed, *[getattr(msg, name) for name in msg.FIELDS[1:]]], framed=framed)


def decode_request(data: bytes) -> Request:
    raw = decode(data)
    if not isinstance(raw, list) or not raw or type(raw[0]) is not int:
        raise ProtocolError("a request must be a list starting with its kind")
    cls = REQUESTS.get(raw[0])
    if cls is None:
        raise ProtocolError(f"unknown request kind {raw[0]}")
    if len(raw) != len(cls.CHECKS) + 1:
        raise ProtocolError(f"{cls.__name__} needs {len(cls.CHECKS)} fields, got {len(raw) - 1}")
    release, *values = map(operator.call, cls.CHECKS, raw[1:], cls.WHERE)
    return cls(*values, release=release)
