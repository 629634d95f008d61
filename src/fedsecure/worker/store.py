"""A worker's state: its object store with provenance labels, its policy and quotas, and the small
steps every handler takes on them (find an object, admit a new one, send to a peer).

The handlers (`fedsecure.worker.ops`, `objects`, `optimizers`, `rounds`, `moves`, `aggregator`,
`sharing`) are functions over a `WorkerState`; `fedsecure.worker.core.WorkerCore` is the state with
the protocol (decode, dispatch, reply) on top.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from fedsecure.errors import (
    ObjectNotFound,
    OperationNotAllowed,
    PermissionDenied,
    ProtocolError,
    WorkerUnavailable,
)
from fedsecure.wire import codec
from fedsecure.wire import messages as m
from fedsecure.wire.ids import new_id
from fedsecure.worker import device as dev
from fedsecure.worker import dp_sgd
from fedsecure.worker import labels as lb
from fedsecure.worker.attest import Attestation, model_digest
from fedsecure.worker.modules import on_meta, state_tensors
from fedsecure.worker.secure import SecAggIdentity, SecureSessions

PeerSend = Callable[[str, bytes], bytes]


@dataclass(frozen=True, slots=True)
class Sender:
    """Who sent a request, as the transport authenticated it."""

    kind: Literal["client", "peer"]
    id: str


@dataclass(frozen=True, slots=True)
class RemoteRecord:
    """A pointer held by this worker to an object on another worker."""

    location: str
    ref_id: int
    shape: list[int]
    dtype: str


CLIENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("fedsecure_client", default=None)
"""The model owner on whose behalf the current request runs; every object it creates is its own,
and invisible to other model owners of the same worker."""
MAX_REPLY: contextvars.ContextVar[int | None] = contextvars.ContextVar("fedsecure_max_reply", default=None)
"""The largest reply of the request being answered, where its transport gives it per request
(None: the worker's own ``max_reply``). Per request, so that concurrent requests never see each
other's."""


@dataclass(slots=True)
class Entry:
    obj: Any  # torch.Tensor | nn.Module | RemoteRecord
    owner: str | None = field(default_factory=CLIENT.get, kw_only=True)  # None: the worker's own
    tags: frozenset[str] = frozenset()
    aggregate: bool = False  # the output of this worker's own aggregation function
    source: str | None = None  # the worker it was moved from
    version: int = -1  # the tensor's version when received (strict mode checks it is unmodified)
    samples: int = 0  # sample count its source reported
    share: int | None = None  # an additive share in Z_(2^64): its fixed point's fractional bits
    attestation: Attestation | None = None  # this worker's own Fit/Evaluate made it (or the source's did)
    attested_version: int = -1  # its version then: a later change voids the attestation
    digest: tuple[int, bytes] | None = None  # (version, model digest), cached by `WorkerState.digest`
    nbytes: int = 0  # what it costs its owner's memory quota (set by the store)
    description: str = ""  # free text from whoever stored it; `Search` matches words of it


def cost(obj: Any) -> int:
    """Bytes an object holds, for the memory quota: a tensor's storage (twice, when a gradient may
    join it); a module's tensors are entries of their own; an optimizer's state is charged when it
    is made (`fedsecure.worker.optimizers.make_optimizer`)."""
    if isinstance(obj, torch.Tensor):
        size = obj.untyped_storage().nbytes()
        return 2 * size if obj.requires_grad else size
    return 0


class Store(dict[int, Entry]):
    """id -> entry; an id taken by one model owner cannot be taken over by another. With
    ``accounting`` on (a worker with a memory quota), keeps the bytes each model owner holds (`used`)."""

    def __init__(self) -> None:
        super().__init__()
        self.used: dict[str | None, int] = {}
        self._accounting = False

    @property
    def accounting(self) -> bool:
        return self._accounting

    @accounting.setter
    def accounting(self, on: bool) -> None:
        """Switched on, it counts what the store already holds."""
        if on and not self._accounting:
            for entry in self.values():
                entry.nbytes = entry.nbytes or cost(entry.obj)
                self._charge(entry.owner, entry.nbytes)
        elif not on:
            self.used.clear()
        self._accounting = on

    def __setitem__(self, obj_id: int, entry: Entry) -> None:
        existing = self.get(obj_id)
        if existing is not None:
            if existing.owner != entry.owner:
                raise ProtocolError(f"object id {obj_id:#x} is in use")
            if self._accounting:
                self._charge(existing.owner, -existing.nbytes)
        if self._accounting:
            entry.nbytes = entry.nbytes or cost(entry.obj)
            self._charge(entry.owner, entry.nbytes)
        super().__setitem__(obj_id, entry)

    def __delitem__(self, obj_id: int) -> None:
        entry = dict.pop(self, obj_id)
        if self._accounting:
            self._charge(entry.owner, -entry.nbytes)

    def pop(self, obj_id: int, default: Any = None) -> Any:  # type: ignore[override]
        if obj_id in self:
            entry = self[obj_id]
            del self[obj_id]
            return entry
        return default

    def _charge(self, owner: str | None, nbytes: int) -> None:
        if nbytes:
            self.used[owner] = self.used.get(owner, 0) + nbytes

    def release(self, ids: list[int], owner: str | None) -> None:
        for obj_id in ids:
            entry = self.get(obj_id)
            if entry is not None and entry.owner == owner:
                del self[obj_id]


class WorkerState:
    """One worker's objects, policy and limits, with the steps every handler shares."""

    def __init__(
        self,
        id: str,
        *,
        policy: lb.Policy | None = None,
        send_to_peer: PeerSend | None = None,
        secagg_identity: SecAggIdentity | None = None,
        memory_quota: int | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        """``memory_quota``: bytes of tensors each model owner may hold here (None: no limit); a
        request that would go over it is refused before anything is allocated.
        ``secagg_identity``: this worker's signing key and the federation's verification keys,
        from its operator (never from a model owner); with it the worker takes part only in secure
        aggregation with the consistency check (`fedsecure.worker.secure`).
        ``device``: where this owner trains and evaluates (`fedsecure.worker.device`: "cpu",
        "cuda", "cuda:N", "mps" or "auto"); its private data is kept there."""
        self.device = dev.resolve(device)
        self.id = id
        self.policy = policy or lb.Policy()
        self.objects = Store()
        self.memory_quota = memory_quota
        self.samples = 0  # rows of private data, reported with moved updates
        self.max_reply: int | None = None  # the transport's limit: a Get that cannot leave stays
        self.framed = False  # the transport carries large tensors beside messages (codec.Framed)
        self._send_to_peer = send_to_peer
        self.secure = SecureSessions(secagg_identity)
        # DP-SGD steps run on this worker's data, per model owner (None: the worker's own client).
        self.dp_ledgers: dict[str | None, dp_sgd.Ledger] = {}
        self.dp_lock = threading.Lock()  # a budget check and its charge are one step
        # Folds into sealed sums and their close are one at a time (a served aggregator answers
        # several requests at once): a close checks exactly the models whose values are in its sums.
        self.sums_lock = threading.Lock()

    @property
    def memory_quota(self) -> int | None:
        return self._memory_quota

    @memory_quota.setter
    def memory_quota(self, quota: int | None) -> None:
        if quota is not None and quota < 0:
            raise ValueError("memory_quota must be a number of bytes >= 0 (None: no limit)")
        self._memory_quota = quota
        self.objects.accounting = quota is not None  # the store counts bytes only where they are limited

    # -- the data owner's own side (not reachable by messages) ---------------------------

    @property
    def own_label(self) -> lb.Label:
        return self.policy.label_for(self.id)

    def load(self, tensor: torch.Tensor, tags: tuple[str, ...] = ()) -> int:
        """Hold ``tensor`` as this owner's private data, findable by ``tags`` (on its device), with the
        strides of a tensor made fresh. Those of a size-1 dimension are free: 1-channel images taken
        with an index can have a channel stride of 1, torch's convolutions then answer channels-last,
        and a model's ``view`` that the dry run (on fresh zeros) accepted would fail on the values."""
        t = tensor.detach()
        if t.device == self.device or t.stride() != dev.dense_strides(t.shape):
            t = t.clone(memory_format=torch.contiguous_format)  # a copy of the owner's own, in any case
        if t.device != self.device:
            t = dev.to_device(t, self.device)
        lb.add_labels(t, frozenset({self.own_label}))
        obj_id = new_id()
        self.objects[obj_id] = Entry(t, tags=frozenset(tag(x) for x in tags))
        if t.dim() > 0:
            self.samples = max(self.samples, t.shape[0])
        return obj_id

    # -- finding objects -----------------------------------------------------------------

    def entry(self, obj_id: int) -> Entry:
        entry = self.objects.get(obj_id)
        if entry is not None and entry.owner in (None, CLIENT.get()):
            return entry
        # Another model owner's object does not exist for this one.
        raise ObjectNotFound(
            f"worker {self.id!r} holds no object {obj_id:#x} (it was freed, moved or "
            "fetched with get(), or never sent here)"
        )

    def tensor(self, obj_id: int) -> torch.Tensor:
        obj = self.entry(obj_id).obj
        if not isinstance(obj, torch.Tensor):
            raise OperationNotAllowed(
                f"object {obj_id:#x} on {self.id!r} is a {type(obj).__name__}, not a tensor",
                op="resolve",
            )
        return obj

    def module(self, obj_id: int) -> tuple[Entry, nn.Module]:
        entry = self.entry(obj_id)
        if not isinstance(entry.obj, nn.Module):
            raise OperationNotAllowed(f"object {obj_id:#x} on {self.id!r} is not a model", op="call")
        return entry, entry.obj

    def samples_of(self, entry: Entry) -> int:
        """The sample count reported with ``entry``: its source's, or this worker's own rows."""
        return entry.samples if entry.source is not None or entry.samples else self.samples

    def digest(self, module_id: int) -> bytes:
        """The model digest of a stored model, kept while it is unchanged (secure aggregation asks for
        the reference's in each of its phases)."""
        entry, module = self.module(module_id)
        now = version(module)
        if entry.digest is None or entry.digest[0] != now:
            entry.digest = (now, model_digest(module))
        return entry.digest[1]

    # -- new objects ---------------------------------------------------------------------

    def admit(self, nbytes: int, *, what: str, private: bool = False) -> None:
        """The checks every new object passes, however it is made (a tensor or a model sent, a result,
        a delivery from a peer, an optimizer's state): data labelled as this owner's own only where
        the policy accepts it, and the model owner's memory quota, before anything is allocated."""
        if private and not self.policy.private_sends:
            raise PermissionDenied(
                f"{self.id!r} does not accept data sent as its owner's own (private=True): "
                "only its owner loads its private data",
                rule="private-sends",
            )
        quota = self._memory_quota
        if quota is not None:
            used = self.objects.used.get(CLIENT.get(), 0)
            if used + nbytes > quota:
                raise PermissionDenied(
                    f"{what} would take {nbytes} bytes on {self.id!r}, which holds {used} bytes for this model "
                    f"owner already: over its memory quota of {quota} bytes. Free objects you no longer need "
                    "(drop their pointers) or ask the worker's operator for a larger --memory-quota",
                    rule="memory-quota",
                )

    def predicted_size(self, spec: Any) -> int:
        """Bytes a model of ``spec`` holds, from its module on the meta device (no memory, and built
        once per description: `fedsecure.worker.modules.on_meta`), when a quota needs it."""
        if self._memory_quota is None:
            return 0
        module, _ = on_meta(spec)  # read only
        return sum(cost(t) for _, t in state_tensors(module))

    def install_module(self, module: nn.Module, module_id: int, ids: list[int], entry: Entry) -> list[torch.Tensor]:
        """Store ``module`` under ``module_id`` and each of its tensors under one of ``ids``."""
        own = [t for _, t in state_tensors(module)]
        if len(ids) != len(own):
            raise ProtocolError(f"the model has {len(own)} tensors, {len(ids)} ids were given")
        self.objects[module_id] = entry
        for obj_id, t in zip(ids, own, strict=True):
            self.objects[obj_id] = Entry(t, aggregate=entry.aggregate)
        return own

    def fresh(self, *ids: int) -> None:
        if any(i in self.objects for i in ids):
            raise ProtocolError("a delivery must not replace an existing object")

    # -- leaving ---------------------------------------------------------------------------

    def check_reply_size(self, size: int) -> None:
        limit = MAX_REPLY.get()
        limit = self.max_reply if limit is None else limit
        if limit is not None and size > limit:
            raise ProtocolError(
                f"the value is {size} bytes, over this worker's maximum message of "
                f"{limit} bytes; it stays on {self.id!r} (raise --max-message)"
            )

    def peer(self, destination: str, msg: m.Request) -> None:
        """Send ``msg`` to the worker ``destination`` directly; its error, if any, is raised here."""
        if self._send_to_peer is None:
            raise WorkerUnavailable(f"{self.id!r} has no link to other workers")
        data = m.encode_request(msg, framed=self.framed)
        m.reply_value(self._send_to_peer(destination, data), worker=destination)


def meta(obj_id: int, t: torch.Tensor) -> dict[str, Any]:
    """What the model owner learns of a stored tensor: public metadata and whose data it holds."""
    return {
        "id": obj_id,
        "shape": list(t.shape),
        "dtype": codec.dtype_name(t.dtype),
        "requires_grad": t.requires_grad,
        "owners": lb.owners(lb.labels_of(t)),
    }


def tag(name: str) -> str:
    return name[1:] if name.startswith("#") else name


def version(obj: Any) -> int:
    """A tensor's version, or the sum of a module's tensors' versions: it changes with every write."""
    if isinstance(obj, nn.Module):
        return sum(t._version for _, t in state_tensors(obj))
    return int(obj._version) if isinstance(obj, torch.Tensor) else -1
