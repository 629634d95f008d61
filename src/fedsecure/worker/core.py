"""The worker's protocol core (sans-I/O): request bytes in, reply bytes out.

`WorkerCore` owns the object store, applies the release policy and runs
allow-listed operations. It owns no socket: `VirtualWorker` calls `handle`
directly, a network server calls it from its servicer, and worker-to-worker
moves leave through the ``send_to_peer`` function it is given.
"""

from __future__ import annotations

import contextvars
import secrets
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from fedsecure.aggregate import rules
from fedsecure.aggregate.shares import FixedPrecision
from fedsecure.errors import (
    FedsecureError,
    FixedPointOverflow,
    ObjectNotFound,
    OperationNotAllowed,
    PermissionDenied,
    ProtocolError,
    RemoteError,
    WorkerUnavailable,
)
from fedsecure.wire import codec
from fedsecure.wire import messages as m
from fedsecure.wire.codec import Ref
from fedsecure.worker import dp_sgd, training
from fedsecure.worker import execute as ex
from fedsecure.worker import labels as lb
from fedsecure.worker.allowlist import ALLOWED, OPTIMIZER_HYPERPARAMETERS, OPTIMIZERS
from fedsecure.worker.attest import Attestation, config_digest, model_digest
from fedsecure.worker.attest import wire as attest_wire
from fedsecure.worker.modules import build, describe, load_state, state_tensors
from fedsecure.worker.secure import SecAggIdentity, SecureSessions, update_vector

PeerSend = Callable[[str, bytes], bytes]
_PLAIN = frozenset({int, float, bool, str, type(None)})
# Allowed ops whose result shares memory with an input without being a view
# (views say so themselves: Tensor._is_view()). Ops returning an input itself
# (x.float() of a float tensor) are caught as in-place results.
_ALIASING = frozenset({"Tensor.detach", "torch.detach", "Tensor.data.__get__"})


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


# The model owner on whose behalf the current request runs; every object it creates is
# its own, and invisible to other model owners of the same worker.
_client: contextvars.ContextVar[str | None] = contextvars.ContextVar("fedsecure_client", default=None)


@dataclass(slots=True)
class Entry:
    obj: Any  # torch.Tensor | nn.Module | RemoteRecord
    owner: str | None = field(default_factory=_client.get, kw_only=True)  # None: the worker's own
    tags: frozenset[str] = frozenset()
    aggregate: bool = False  # the output of this worker's own aggregation function
    source: str | None = None  # the worker it was moved from
    version: int = -1  # the tensor's version when received (strict mode checks it is unmodified)
    samples: int = 0  # sample count its source reported
    share: int | None = None  # an additive share in Z_(2^64): its fixed point's fractional bits
    attestation: Attestation | None = None  # this worker's own Fit/Evaluate made it (or the source's did)
    attested_version: int = -1  # its version then: a later change voids the attestation
    digest: tuple[int, bytes] | None = None  # (version, model digest), cached by `WorkerCore._digest`
    nbytes: int = 0  # what it costs its owner's memory quota (set by the store)
    description: str = ""  # free text from whoever stored it; `Search` matches words of it


def _cost(obj: Any) -> int:
    """Bytes an object holds, for the memory quota: a tensor's storage (twice, when a gradient may
    join it); a module's tensors are entries of their own; an optimizer's state is charged when it
    is made (`WorkerCore._make_optimizer`)."""
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
                entry.nbytes = entry.nbytes or _cost(entry.obj)
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
            entry.nbytes = entry.nbytes or _cost(entry.obj)
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


_ids: Iterator[tuple[int, ...]] = iter(())


def new_id() -> int:
    """Object ids are 64 random bits: unguessable, so holding an id is the capability.

    Drawn from the OS's cryptographic source 512 at a time (one system call each
    time, not one per id).
    """
    global _ids
    try:
        return next(_ids)[0]
    except StopIteration:
        _ids = struct.iter_unpack(">Q", secrets.token_bytes(8 * 512))
        return next(_ids)[0]


def _meta(obj_id: int, t: torch.Tensor) -> dict[str, Any]:
    return {
        "id": obj_id,
        "shape": list(t.shape),
        "dtype": codec.dtype_name(t.dtype),
        "requires_grad": t.requires_grad,
        "owners": lb.owners(lb.labels_of(t)),
    }


def _count_scalars(value: Any) -> int:
    if isinstance(value, list | tuple):
        return sum(_count_scalars(v) for v in value)
    return 1


def _plain(value: Any) -> bool:
    if isinstance(value, bool | int | float):
        return True
    return isinstance(value, list | tuple) and all(_plain(v) for v in value)


_INPUT_CELLS = "fedsecure_inputs"


def _record_inputs(result: Any, tensors: list[torch.Tensor]) -> None:
    """Remember, on the autograd node that made ``result``, the label cells of its inputs.

    A backward pass recomputes with the tensors saved in the forward pass; if private
    data was written into one of them since (through ``.data``, which autograd does not
    see), the gradients depend on it. The cells are read again at backward time.
    """
    if isinstance(result, torch.Tensor):
        node = result.grad_fn
        if node is not None:
            node.metadata[_INPUT_CELLS] = lb.cells(tensors)  # type: ignore[index]
    elif isinstance(result, tuple | list):
        for r in result:
            _record_inputs(r, tensors)


def _graph(root: torch.Tensor) -> tuple[list[torch.Tensor], lb.Labels]:
    """The leaves whose ``.grad`` a backward pass from ``root`` writes, and the current
    labels of every tensor the pass reads."""
    fn = root.grad_fn
    if fn is None:
        return ([root] if root.requires_grad else []), lb.labels_of(root)
    leaves: list[torch.Tensor] = []
    labels = lb.labels_of(root)
    seen, stack = {fn}, [fn]
    while stack:
        node = stack.pop()
        variable = getattr(node, "variable", None)
        if variable is not None:
            leaves.append(variable)
            labels = labels | lb.labels_of(variable)
        recorded = node.metadata.get(_INPUT_CELLS)  # type: ignore[attr-defined]
        if recorded:
            labels = labels | lb.union_cells(recorded)
        for nxt, _ in node.next_functions:
            if nxt is not None and nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return leaves, labels


class WorkerCore:
    """One worker: its objects, its policy, and the executor of allowed operations."""

    def __init__(
        self,
        id: str,
        *,
        policy: lb.Policy | None = None,
        send_to_peer: PeerSend | None = None,
        secagg_identity: SecAggIdentity | None = None,
        memory_quota: int | None = None,
    ) -> None:
        """``memory_quota``: bytes of tensors each model owner may hold here (None: no limit); a
        request that would go over it is refused before anything is allocated.
        ``secagg_identity``: this worker's signing key and the federation's verification keys,
        from its operator (never from a model owner); with it the worker takes part only in secure
        aggregation with the consistency check (`fedsecure.worker.secure`)."""
        self.id = id
        self.policy = policy or lb.Policy()
        self.objects = Store()
        self.memory_quota = memory_quota
        self.samples = 0  # rows of private data, reported with moved updates
        self.max_reply: int | None = None  # the transport's limit: a Get that cannot leave stays
        self.framed = False  # the transport carries large tensors beside messages (codec.Framed)
        self._send_to_peer = send_to_peer
        self._secure = SecureSessions(secagg_identity)
        # DP-SGD steps run on this worker's data, per model owner (None: the worker's own client).
        self.dp_ledgers: dict[str | None, dp_sgd.Ledger] = {}
        self._dp_lock = threading.Lock()  # a budget check and its charge are one step
        self._handlers: dict[type[m.Request], Callable[[Any, Sender], Any]] = {
            m.Call: self._call,
            m.CallModule: self._call_module,
            m.Put: self._put,
            m.PutModule: self._put_module,
            m.PutRef: self._put_ref,
            m.Get: self._get,
            m.GetModule: self._get_module,
            m.Count: lambda msg, s: sum(1 for e in self.objects.values() if e.owner == _client.get()),
            m.Search: self._search,
            m.Owners: self._owners,
            m.MakeOptimizer: self._make_optimizer,
            m.OptimizerCall: self._optimizer_call,
            m.Move: self._move,
            m.MoveModule: self._move_module,
            m.CopyModule: self._copy_module,
            m.Aggregate: self._aggregate,
            m.AggregateModules: self._aggregate_modules,
            m.AggregateUpdates: self._aggregate_updates,
            m.Fit: self._fit,
            m.Evaluate: self._evaluate,
            m.SecAgg: self._secagg,
            m.Share: self._share,
            m.AggregateShares: self._aggregate_shares,
            m.DeliverShare: self._deliver_share,
            m.Deliver: self._deliver,
            m.DeliverModule: self._deliver_module,
        }

    # -- the data owner's own side (not reachable by messages) ---------------------------

    @property
    def own_label(self) -> lb.Label:
        return self.policy.label_for(self.id)

    def load(self, tensor: torch.Tensor, tags: tuple[str, ...] = ()) -> int:
        """Hold ``tensor`` as this owner's private data, findable by ``tags``."""
        t = tensor.detach().clone()
        lb.add_labels(t, frozenset({self.own_label}))
        obj_id = new_id()
        self.objects[obj_id] = Entry(t, tags=frozenset(_tag(x) for x in tags))
        if t.dim() > 0:
            self.samples = max(self.samples, t.shape[0])
        return obj_id

    # -- the protocol --------------------------------------------------------------------

    def handle(self, data: bytes, sender: Sender) -> bytes:
        """Answer one request. Never raises: every failure becomes an error reply."""
        try:
            msg = m.decode_request(data)
            handler = self._batch if isinstance(msg, m.Batch) else self._dispatch
            value = handler(msg, sender)  # type: ignore[arg-type]
            return m.encode_reply(m.Reply(value), framed=self.framed)
        except FedsecureError as exc:
            return m.encode_reply(m.error_reply(exc))
        except RecursionError:
            return m.encode_reply(m.error_reply(ProtocolError("the message is nested too deeply")))
        except Exception as exc:  # a bug here must not take the worker down
            return m.encode_reply(m.Reply(None, ("internal", f"{type(exc).__name__}: {exc}", self.id)))

    def _dispatch(self, msg: m.Request, sender: Sender) -> Any:
        if (sender.kind == "peer") != msg.PEER_ONLY:
            raise ProtocolError(
                f"{type(msg).__name__} is not accepted from a {sender.kind} ({sender.id!r})"
            )
        # A peer delivers on behalf of the model owner who ordered the move.
        client = getattr(msg, "owner", None) if sender.kind == "peer" else sender.id
        token = _client.set(client)
        try:
            self.objects.release(msg.release, client)
            return self._handlers[type(msg)](msg, sender)
        finally:
            _client.reset(token)

    def _batch(self, batch: m.Batch, sender: Sender) -> Any:
        if sender.kind != "client":
            raise ProtocolError(f"Batch is not accepted from a {sender.kind} ({sender.id!r})")
        self.objects.release(batch.release, sender.id)
        value = None
        last = len(batch.requests) - 1
        for i, data in enumerate(batch.requests):
            msg = m.decode_request(data)
            if isinstance(msg, m.Batch):
                raise ProtocolError("a batch cannot contain a batch")
            try:
                value = self._dispatch(msg, sender)
            except FedsecureError as exc:
                if i < last:  # the sender has moved on: say which earlier op failed
                    what = getattr(msg, "op", type(msg).__name__)
                    exc.args = (f"{what}, sent earlier without waiting for its reply, failed: {exc}",)
                raise
        return value

    def _entry(self, obj_id: int) -> Entry:
        entry = self.objects.get(obj_id)
        if entry is not None and entry.owner in (None, _client.get()):
            return entry
        # Another model owner's object does not exist for this one.
        raise ObjectNotFound(
            f"worker {self.id!r} holds no object {obj_id:#x} (it was freed, moved or "
            "fetched with get(), or never sent here)"
        )

    def _tensor(self, obj_id: int) -> torch.Tensor:
        obj = self._entry(obj_id).obj
        if not isinstance(obj, torch.Tensor):
            raise OperationNotAllowed(
                f"object {obj_id:#x} on {self.id!r} is a {type(obj).__name__}, not a tensor",
                op="resolve",
            )
        return obj

    def _resolve(self, value: Any, tensors: list[torch.Tensor], ids: dict[int, int]) -> Any:
        """Replace `Ref`s by stored tensors, collecting every tensor input."""
        kind = type(value)
        if kind in _PLAIN:
            return value
        if kind is Ref:
            t = self._tensor(value.id)
            tensors.append(t)
            ids[id(t)] = value.id
            return t
        if isinstance(value, torch.Tensor):
            tensors.append(value)
            return value
        if isinstance(value, list):
            return [self._resolve(v, tensors, ids) for v in value]
        if isinstance(value, tuple):
            return tuple(self._resolve(v, tensors, ids) for v in value)
        if isinstance(value, dict):
            return {k: self._resolve(v, tensors, ids) for k, v in value.items()}
        return value

    def _refuse_op(self, labels: lb.Labels, op: str) -> None:
        """Refuse a pointer op on labelled values where a rule forbids it: on a strict aggregator,
        and anywhere on data whose owner allows only training (the rule travels with the label)."""
        if not labels:
            return
        self._refuse_if_strict(labels, op)
        if self._training_only(labels):
            raise PermissionDenied(
                f"{op} on {self.id!r} refused: the values derive from private data of "
                f"{lb.owners(frozenset(x for x in labels if x.training_only))}, whose owners allow only training "
                "on it (Fit and Evaluate of a model, moves to trusted aggregators, secure aggregation), not "
                "pointer ops. A data owner who wants the full pointer API serves with --policy full",
                rule="training-only",
            )

    def _refuse_if_strict(self, labels: lb.Labels, op: str) -> None:
        if self.policy.strict and labels:
            raise PermissionDenied(
                f"{self.id!r} is a strict aggregator: it runs no {op} on values derived from "
                f"private data of {lb.owners(labels)}; it only aggregates them "
                f"({self.id}.aggregate([...]))",
                rule="strict-aggregator",
            )

    @staticmethod
    def _training_only(labels: lb.Labels) -> bool:
        return lb.training_only(labels)

    @property
    def memory_quota(self) -> int | None:
        return self._memory_quota

    @memory_quota.setter
    def memory_quota(self, quota: int | None) -> None:
        if quota is not None and quota < 0:
            raise ValueError("memory_quota must be a number of bytes >= 0 (None: no limit)")
        self._memory_quota = quota
        self.objects.accounting = quota is not None  # the store counts bytes only where they are limited

    def _call(self, msg: m.Call, sender: Sender) -> Any:
        fn = ALLOWED.get(msg.op)
        if fn is None:
            raise OperationNotAllowed(
                f"operation {msg.op!r} is not on {self.id!r}'s allow-list "
                "(see docs/allowlist.md)",
                op=msg.op,
            )
        if "out" in msg.kwargs:
            raise OperationNotAllowed(f"{msg.op}: the out= argument is not supported", op=msg.op)
        tensors: list[torch.Tensor] = []
        ids: dict[int, int] = {}
        args = self._resolve(msg.args, tensors, ids)
        kwargs = self._resolve(msg.kwargs, tensors, ids)
        if msg.op == "Tensor.backward":
            fn = _backward
        return self._execute(msg.op, fn, args, kwargs, tensors, ids, msg.result_id, msg.grad_enabled)

    def _execute(
        self,
        op: str,
        fn: Callable[..., Any],
        args: list[Any],
        kwargs: dict[str, Any],
        tensors: list[torch.Tensor],
        ids: dict[int, int],
        result_id: int,
        grad_enabled: bool,
        module: nn.Module | None = None,
    ) -> Any:
        """Run one op (or a module's forward) on the guarded path (`fedsecure.worker.execute`)."""
        labels = lb.union(tensors)
        if labels and (self.policy.strict or lb.training_only(labels)):
            self._refuse_op(labels, op)
        if labels and op in ex.VALUE_READS and tensors and tensors[0].numel() == 1:  # the release rules first
            lb.check_release(labels, tensors[0].numel(), scalar=tensors[0].dim() == 0, holder=self.id,
                             policy=self.policy, aggregate=False, what=f"the result of {op}")
        spec = None
        if (labels or self._memory_quota is not None) and op not in ex.UNPREDICTED:
            spec = ex.predict(op, fn, args, kwargs, tensors, grad_enabled, module)
            if spec is None and labels:
                ex.refuse_unpredictable(op, labels, self.id)
            if spec is not None and self._memory_quota is not None:
                self._admit(spec.nbytes, what=f"the result of {op}")
        versions = [t._version for t in tensors]
        modules = [module] if module is not None else []
        try:
            if grad_enabled == torch.is_grad_enabled():
                result = fn(*args, **kwargs)
            else:
                with torch.set_grad_enabled(grad_enabled):
                    result = fn(*args, **kwargs)
        except FedsecureError:
            ex.label_writes(tensors, labels, modules)
            raise
        except Exception as exc:
            if spec is not None and ex.hides_failures(labels):  # the exact call, floats and all
                spec = ex.predict(op, fn, args, kwargs, tensors, grad_enabled, module, cached=False)
            if spec is None or not ex.hides_failures(labels):
                ex.label_writes(tensors, labels, modules)  # the failure shows anyway: label all it touched
                detail = (
                    f"{type(exc).__name__}: {exc}"
                    if not labels  # not even the exception's type: it can differ with the values
                    else f"details withheld: the inputs derive from private data of {lb.owners(labels)}"
                )
                raise RemoteError(f"{op} failed on {self.id!r}: {detail}", op=op, worker=self.id) from None
            # The failure depends on private values that no owner lets out even as a metric: it must
            # not show. The call "succeeds" as predicted; what it wrote and returned is undefined. Only
            # what it may have written is labelled, as on success: labelling what it only read would
            # itself show the failure.
            written = ex.written(op, args, tensors, versions)
            ex.label_writes(written, labels)  # a module's buffers below, as on success
            result = ex.placeholder(spec, tensors)
            ex.mark_failed([*written, *_tensors_in(result)], op)
        except BaseException:
            ex.label_writes(tensors, labels, modules)
            raise
        # Whatever an op wrote to (in-place ops, out-of-place ops with side effects such as
        # batch_norm's running stats) now derives from all of its inputs.
        for t, v in zip(tensors, versions, strict=True):
            if t._version != v:
                lb.add_labels(t, labels)
        _record_inputs(result, tensors)
        if op == "F.batch_norm":  # writes running stats without bumping their versions
            ex.label_writes(tensors, labels)
        if module is not None and module.training:  # so does a module's forward, to its buffers
            ex.label_writes(list(module.buffers()), labels)
        if op == "Tensor.data.__set__":
            lb.merge(args[0], args[1])
        failure = ex.first_failure(tensors)
        if failure:
            ex.mark_failed(_tensors_in(result), failure)
        return self._outputs(result, op, tensors, ids, labels, result_id)

    def _outputs(
        self,
        result: Any,
        op: str,
        tensors: list[torch.Tensor],
        ids: dict[int, int],
        labels: lb.Labels,
        result_id: int | None,
    ) -> Any:
        if isinstance(result, torch.Tensor):
            if result.device.type not in ("cpu", "cuda") or result.layout != torch.strided:
                raise OperationNotAllowed(
                    f"{op} produced a {result.device.type} {result.layout} tensor; workers hold "
                    "dense tensors on their own devices",
                    op=op,
                )
            known = ids.get(id(result))
            if known is not None and any(result is t for t in tensors):
                return _meta(known, result)  # in place: the caller's pointer stays valid
            if result._is_view() or op in _ALIASING:  # shares an input's memory
                ptr = result.untyped_storage().data_ptr() if result.numel() else 0
                source = next(
                    (t for t in tensors if ptr and t.numel() and t.untyped_storage().data_ptr() == ptr),
                    None,
                )
                if source is not None:
                    lb.share_cell(result, source)
            lb.add_labels(result, labels)
            obj_id = result_id if result_id is not None else new_id()
            self.objects[obj_id] = Entry(result)
            return _meta(obj_id, result)
        if result is None:
            return None
        if _plain(result):
            lb.check_release(
                labels,
                _count_scalars(result),
                scalar=not isinstance(result, list | tuple),
                holder=self.id,
                policy=self.policy,
                aggregate=False,
                what=f"the result of {op}",
            )
            _refuse_undefined(ex.first_failure(tensors), f"the result of {op}", self.id)
            return result
        if isinstance(result, tuple | list):  # several tensors (split, max(dim), ...)
            return tuple(
                self._outputs(r, op, tensors, ids, labels, result_id if i == 0 else None)
                for i, r in enumerate(result)
            )
        raise OperationNotAllowed(
            f"{op} returned a {type(result).__name__}, which cannot leave a worker", op=op
        )

    def _module(self, obj_id: int) -> tuple[Entry, nn.Module]:
        entry = self._entry(obj_id)
        if not isinstance(entry.obj, nn.Module):
            raise OperationNotAllowed(f"object {obj_id:#x} on {self.id!r} is not a model", op="call")
        return entry, entry.obj

    def _call_module(self, msg: m.CallModule, sender: Sender) -> Any:
        _, module = self._module(msg.module_id)
        tensors: list[torch.Tensor] = []
        ids: dict[int, int] = {}
        args = self._resolve(msg.args, tensors, ids)
        kwargs = self._resolve(msg.kwargs, tensors, ids)
        tensors.extend(t for _, t in state_tensors(module))
        self._refuse_op(lb.union(tensors), "model.forward")  # before train() changes anything
        if module.training != msg.training:
            module.train(msg.training)
        return self._execute("model.forward", module, args, kwargs, tensors, ids, msg.result_id,
                             msg.grad_enabled, module)

    def _admit(self, nbytes: int, *, what: str, private: bool = False) -> None:
        """The checks every new object passes, however it is made (a tensor or a model sent, a result,
        a delivery from a peer, an optimizer's state): data labelled as this owner's own only where
        the policy accepts it, and the model owner's memory quota, before anything is allocated."""
        if private and not self.policy.private_sends:
            raise PermissionDenied(
                f"{self.id!r} does not accept data sent as its owner's own (private=True): "
                "only its owner loads its private data",
                rule="private-sends",
            )
        quota = self.memory_quota
        if quota is not None:
            used = self.objects.used.get(_client.get(), 0)
            if used + nbytes > quota:
                raise PermissionDenied(
                    f"{what} would take {nbytes} bytes on {self.id!r}, which holds {used} bytes for this model "
                    f"owner already: over its memory quota of {quota} bytes. Free objects you no longer need "
                    "(drop their pointers) or ask the worker's operator for a larger --memory-quota",
                    rule="memory-quota",
                )

    def _put(self, msg: m.Put, sender: Sender) -> Any:
        t = msg.value
        self._admit(_cost(t), what="the tensor sent", private=msg.private)
        if msg.requires_grad:
            if not (t.is_floating_point() or t.is_complex()):
                raise ProtocolError("only floating point tensors can require gradients")
            t.requires_grad_(True)
        if msg.private:
            lb.add_labels(t, frozenset({self.own_label}))
            if t.dim() > 0:
                self.samples = max(self.samples, t.shape[0])
        entry = Entry(t, tags=frozenset(_tag(x) for x in msg.tags), description=msg.description)
        self.objects[msg.object_id] = entry
        meta = _meta(msg.object_id, t)
        if entry.tags or entry.description:
            meta.update(tags=sorted(entry.tags), description=entry.description)
        return meta

    def _predicted_size(self, spec: Any) -> int:
        """Bytes a model of ``spec`` holds, from building it on the meta device (no memory), when a
        quota needs it."""
        if self.memory_quota is None:
            return 0
        with torch.device("meta"):
            module = build(spec)
        return sum(_cost(t) for _, t in state_tensors(module))

    def _install_module(
        self, module: nn.Module, module_id: int, ids: list[int], entry: Entry
    ) -> list[torch.Tensor]:
        own = [t for _, t in state_tensors(module)]
        if len(ids) != len(own):
            raise ProtocolError(f"the model has {len(own)} tensors, {len(ids)} ids were given")
        self.objects[module_id] = entry
        for obj_id, t in zip(ids, own, strict=True):
            self.objects[obj_id] = Entry(t, aggregate=entry.aggregate)
        return own

    def _put_module(self, msg: m.PutModule, sender: Sender) -> Any:
        self._admit(self._predicted_size(msg.spec), what="the model sent", private=msg.private)
        module = build(msg.spec)
        own = load_state(module, msg.tensors)
        if msg.private:
            for t in own:
                lb.add_labels(t, frozenset({self.own_label}))
        self._install_module(module, msg.module_id, msg.ids, Entry(module))
        return None

    def _put_ref(self, msg: m.PutRef, sender: Sender) -> Any:
        codec.parse_dtype(msg.dtype)
        self.objects[msg.object_id] = Entry(RemoteRecord(msg.location, msg.ref_id, msg.shape, msg.dtype))
        return None

    def _get(self, msg: m.Get, sender: Sender) -> Any:
        entry = self._entry(msg.object_id)
        obj = entry.obj
        if isinstance(obj, RemoteRecord):
            del self.objects[msg.object_id]
            return {"ref": [obj.location, obj.ref_id]}
        if not isinstance(obj, torch.Tensor):
            raise OperationNotAllowed("get() of a model: use model.get()", op="get")
        grad = obj.grad if obj.requires_grad and obj.is_leaf else None
        what = "the tensor" if grad is None else "the tensor and its gradient"
        lb.check_release(
            lb.labels_of(obj) | (lb.labels_of(grad) if grad is not None else frozenset()),
            obj.numel(),
            scalar=obj.dim() == 0,
            holder=self.id,
            policy=self.policy,
            aggregate=entry.aggregate,
            what=what,
        )
        _refuse_undefined(ex.failed(obj), "the tensor", self.id)
        value = codec.sendable(obj)  # checked first: a failure must lose nothing
        grad_value = None if grad is None else codec.sendable(grad)
        self._check_reply_size(value.nbytes + (0 if grad_value is None else grad_value.nbytes))
        del self.objects[msg.object_id]
        return {"tensor": value, "requires_grad": obj.requires_grad, "grad": grad_value}

    def _check_reply_size(self, size: int) -> None:
        if self.max_reply is not None and size > self.max_reply:
            raise ProtocolError(
                f"the value is {size} bytes, over this worker's maximum message of "
                f"{self.max_reply} bytes; it stays on {self.id!r} (raise --max-message)"
            )

    def _get_module(self, msg: m.GetModule, sender: Sender) -> Any:
        entry, module = self._module(msg.module_id)
        own = [t for _, t in state_tensors(module)]
        grads = [t.grad for t in own] if msg.grads else []
        present = [g for g in grads if g is not None]
        lb.check_release(
            lb.union(own + present),
            sum(t.numel() for t in own),
            scalar=False,
            holder=self.id,
            policy=self.policy,
            aggregate=entry.aggregate,
            what="the model and its gradients" if present else "the model",
        )
        values = [codec.sendable(t) for t in own]
        grad_values = [None if g is None else codec.sendable(g) for g in grads]
        self._check_reply_size(sum(v.nbytes for v in values) + sum(g.nbytes for g in grad_values if g is not None))
        del self.objects[msg.module_id]
        return {"values": values, "grads": grad_values} if msg.grads else values

    # -- optimizers next to their parameters -----------------------------------------

    def _hyperparameters(self, group: Any) -> dict[str, Any]:
        if not isinstance(group, dict):
            raise ProtocolError("a parameter group must be a map")
        settings = {}
        for key, value in group.items():
            if key == "params":
                continue
            if key not in OPTIMIZER_HYPERPARAMETERS:
                raise OperationNotAllowed(f"optimizer setting {key!r} is not allowed", op=str(key))
            ok = isinstance(value, bool | int | float) or (
                isinstance(value, tuple | list) and len(value) <= 4 and all(isinstance(v, float | int) for v in value)
            )
            if not ok:
                raise ProtocolError(f"optimizer setting {key!r} must be a number or a pair of numbers")
            settings[key] = tuple(value) if isinstance(value, list) else value
        return settings

    def _make_optimizer(self, msg: m.MakeOptimizer, sender: Sender) -> Any:
        cls = OPTIMIZERS.get(msg.kind)
        if cls is None:
            raise OperationNotAllowed(f"optimizer {msg.kind!r} is not on the allow-list", op=msg.kind)
        groups = []
        for group in msg.groups:
            settings = self._hyperparameters(group)
            ids = group.get("params")
            if not isinstance(ids, list) or not all(type(i) is int for i in ids):
                raise ProtocolError("a parameter group needs a list of object ids")
            groups.append({"params": [self._tensor(i) for i in ids], **settings})
        state = 2 * sum(p.numel() * p.element_size() for g in groups for p in g["params"])  # at most two moments
        self._admit(state, what=f"the state of {msg.kind}")
        try:
            optimizer = cls(groups)  # type: ignore[call-arg]  # every allowed class has defaults
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"cannot build {msg.kind}: {exc}") from exc
        self.objects[msg.optimizer_id] = Entry(optimizer, nbytes=state)
        return None

    def _optimizer_call(self, msg: m.OptimizerCall, sender: Sender) -> Any:
        optimizer = self._entry(msg.optimizer_id).obj
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise OperationNotAllowed(f"object {msg.optimizer_id:#x} is not an optimizer", op=msg.method)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if msg.method == "zero_grad":
            optimizer.zero_grad(set_to_none=True)
            return None
        if msg.method != "step":
            raise OperationNotAllowed(f"optimizer method {msg.method!r} is not allowed", op=msg.method)
        if len(msg.groups) != len(optimizer.param_groups):
            raise ProtocolError("one settings map per parameter group is required")
        for group, settings in zip(optimizer.param_groups, msg.groups, strict=True):
            group.update(self._hyperparameters(settings))  # schedulers change lr between steps
        grads = [p.grad for p in params if p.grad is not None]
        labels = lb.union(params) | lb.union(grads)
        self._refuse_op(labels, "optimizer step")
        try:
            optimizer.step()
        finally:  # the step wrote every parameter from its gradient and the optimizer's state
            ex.label_writes(params, labels)
        failure = ex.first_failure([*params, *grads])
        if failure:
            ex.mark_failed(params, failure)
        return None

    def _owners(self, msg: m.Owners, sender: Sender) -> Any:
        obj = self._entry(msg.object_id).obj
        if isinstance(obj, nn.Module):
            return lb.owners(lb.union(t for _, t in state_tensors(obj)))
        return lb.owners(lb.labels_of(obj))

    def _search(self, msg: m.Search, sender: Sender) -> Any:
        """Each tensor matching every item: an item matches a tag ("#x" and "x" alike) or occurs in
        the description, as PySyft 0.2.9's ``search`` matches. Each match gets a new id of the
        caller's (freeing it frees only that id), which carries no tags, so searches never find it."""
        items = [msg.tag, *msg.also]
        found = []
        caller = _client.get()
        for entry in list(self.objects.values()):
            if entry.owner not in (None, caller):  # another model owner's tags are its own
                continue
            if isinstance(entry.obj, torch.Tensor) and all(_matches(entry, item) for item in items):
                obj_id = new_id()
                self.objects[obj_id] = Entry(entry.obj)
                meta = _meta(obj_id, entry.obj)
                meta.update(tags=sorted(entry.tags), description=entry.description)
                found.append(meta)
        return found

    # -- a round's local work in one message (fedsecure.fl) ------------------------------

    def _tagged(self, tag: str) -> torch.Tensor:
        name, caller = _tag(tag), _client.get()
        for entry in self.objects.values():
            if entry.owner in (None, caller) and name in entry.tags and isinstance(entry.obj, torch.Tensor):
                return entry.obj
        raise ObjectNotFound(f"worker {self.id!r} holds no data tagged {tag!r}")

    def _fit(self, msg: m.Fit, sender: Sender) -> Any:
        settings = training.parse(msg.config)
        entry, module = self._module(msg.module_id)
        own = [t for _, t in state_tensors(module)]
        x, y = self._tagged(msg.x_tag), self._tagged(msg.y_tag)
        # Everything the module holds afterwards derives from the data and from its old state.
        labels = lb.labels_of(x) | lb.labels_of(y) | lb.union(own)
        self._refuse_if_strict(labels, "training")
        optimizer = training.check(module, x, y, settings)
        ex.step_on_meta(module, x, y, settings.batch_size, lambda out, t: training.loss_of(settings.loss, out, t))
        reference = model_digest(module)
        ledger = self._account_dp_sgd(settings, module, int(x.shape[0]))
        try:
            examples, loss, steps = training.fit(module, x, y, settings, msg.seed, optimizer)
        except Exception as exc:
            # The metadata fit (checked on meta tensors above): this failure comes from the values.
            self._failed_on_values("training", exc, labels, own)
            examples, loss, steps = int(x.shape[0]), float("nan"), training.planned_steps(int(x.shape[0]), settings)
        finally:
            for t in own:
                lb.add_labels(t, labels)
        entry.samples = examples
        # Training on data the model owner sent itself is no owner's contribution: it could compute it.
        own_data = self.own_label in lb.labels_of(x)
        entry.attestation = Attestation("fit", reference, config_digest(msg.config)) if own_data else None
        entry.attested_version = _version(module)
        # The mean training loss is a 0-dimensional metric: released unless an owner allows none.
        # Under DP-SGD it is withheld: it is computed without noise, so epsilon would not cover it.
        withhold = bool(labels) and min(label.max_metric_numel for label in labels) < 1
        reply = {"examples": examples, "loss": None if withhold or ledger is not None else loss, "steps": steps}
        if settings.dp_sgd is not None and ledger is not None:
            reply["epsilon"] = ledger.epsilon(settings.dp_sgd.delta)
        return reply

    def _account_dp_sgd(
        self, settings: training.Settings, module: nn.Module, examples: int
    ) -> dp_sgd.Ledger | None:
        """Charge this model owner's ledger for the DP-SGD steps about to run (before they run: a
        round that fails halfway is charged in full, which errs on the safe side). A policy's
        ``dp_sgd_budget`` refuses the round if the steps of all model owners would exceed it."""
        budget = self.policy.dp_sgd_budget
        if settings.dp_sgd is None:
            if budget is not None:
                raise PermissionDenied(
                    f"{self.id!r} trains only with DP-SGD (its owner set a privacy budget of epsilon "
                    f"{budget[0]:g} at delta {budget[1]:g}): set LocalTraining(dp_sgd=DPSGD(...))",
                    rule="dp-sgd-budget",
                )
            return None
        dp_sgd.check_module(module)  # refuse now, before anything is charged (and without Opacus)
        schedule = training.dp_plan(examples, settings)
        with self._dp_lock:
            return self._charge(settings.dp_sgd, schedule, budget)

    def _charge(
        self, dp: dp_sgd.DPSGDSettings, schedule: dp_sgd.Plan, budget: tuple[float, float] | None
    ) -> dp_sgd.Ledger:
        if budget is not None:
            after = dp_sgd.Ledger.combined(self.dp_ledgers.values())
            after.add(schedule.sampling_rate, dp.noise_multiplier, schedule.steps)
            spent = after.epsilon(budget[1])
            if spent > budget[0]:
                raise PermissionDenied(
                    f"{self.id!r} refuses to train: {schedule.steps} more DP-SGD steps would bring the epsilon "
                    f"spent on its data to {spent:.3g} at delta {budget[1]:g}, over its owner's budget of "
                    f"{budget[0]:g}",
                    rule="dp-sgd-budget",
                )
        ledger = self.dp_ledgers.setdefault(_client.get(), dp_sgd.Ledger())
        ledger.add(schedule.sampling_rate, dp.noise_multiplier, schedule.steps)
        return ledger

    def _evaluate(self, msg: m.Evaluate, sender: Sender) -> Any:
        _, module = self._module(msg.module_id)
        own = [t for _, t in state_tensors(module)]
        x, y = self._tagged(msg.x_tag), self._tagged(msg.y_tag)
        labels = lb.labels_of(x) | lb.labels_of(y) | lb.union(own)
        self._refuse_if_strict(labels, "evaluation")
        config = msg.config
        if not isinstance(config, dict) or set(config) != {"loss", "batch_size"}:
            raise ProtocolError("evaluation configuration must be {loss, batch_size}")
        training.check_evaluation(x, y, config["loss"], config["batch_size"])
        ex.step_on_meta(module, x, y, config["batch_size"], lambda out, t: training.loss_of(config["loss"], out, t))
        attestation = Attestation("evaluate", model_digest(module), config_digest(config))
        self._admit(3 * torch.float64.itemsize, what="the evaluation's sums")
        try:
            sums = training.evaluate(module, x, y, config["loss"], config["batch_size"])
        except Exception as exc:
            self._failed_on_values("evaluation", exc, labels, own)
            sums = torch.full((3,), float("nan"), dtype=torch.float64)
            ex.mark_failed([sums], "evaluation")
        lb.add_labels(sums, labels)
        self.objects[msg.result_id] = Entry(sums, samples=int(x.shape[0]), attestation=attestation,
                                            attested_version=sums._version)
        return _meta(msg.result_id, sums)

    def _failed_on_values(self, what: str, exc: Exception, labels: lb.Labels, written: list[torch.Tensor]) -> None:
        """A fixed function whose metadata checked out failed anyway: on the values. Reported (its text
        withheld) where the owners allow metrics, since a metric could tell as much; otherwise the work
        goes on as if it had succeeded, with what it wrote undefined (NaN), so the model owner's view
        does not depend on the values."""
        if not labels:
            if isinstance(exc, FedsecureError):
                raise exc
            raise RemoteError(f"{what} failed on {self.id!r}: {type(exc).__name__}: {exc}", op=what,
                              worker=self.id) from None
        if not ex.hides_failures(labels):
            raise RemoteError(f"{what} failed on {self.id!r} ({type(exc).__name__}; details withheld: the "
                              f"data derive from private data of {lb.owners(labels)})", op=what, worker=self.id) from None
        with torch.no_grad():
            for t in written:
                if t.is_floating_point():
                    t.fill_(float("nan"))
        ex.mark_failed(written, what)

    def _secagg(self, msg: m.SecAgg, sender: Sender) -> Any:
        def update() -> Any:
            entry, trained = self._module(msg.module_id)
            _, reference = self._module(msg.reference_id)
            if self.policy.strict:
                raise PermissionDenied(f"{self.id!r} is a strict aggregator, not a data owner", rule="strict-aggregator")
            return update_vector(trained, reference, self._samples_of(entry) if msg.weighted else None, msg.privacy)

        attestation, required = self._update_attestation(msg.module_id, msg.reference_id, msg.weighted, msg.privacy)
        return self._secure.step(_client.get(), msg.session, msg.phase, msg.client_id, msg.payload, update,
                                 attestation=None if attestation is None else attestation.digest(), required=required)

    @staticmethod
    def _valid_attestation(entry: Entry, obj: Any) -> Attestation | None:
        """The entry's attestation, if the object is unchanged since it was made."""
        if entry.attestation is None or _version(obj) != entry.attested_version:
            return None
        return entry.attestation

    def _check_cohort(self, entries: list[Entry], labels: lb.Labels, kind: str) -> None:
        """A training-only owner's contribution counts only as attested work of the cohort: every
        input must be a worker's own ``kind`` (Fit or Evaluate) of one and the same model under one
        and the same configuration. Otherwise the model owner could choose what all but one
        contributor submit, and subtract it."""
        if not self._training_only(labels):
            return
        found = [self._valid_attestation(e, e.obj) for e in entries]
        if any(a is None or a.kind != kind for a in found):
            raise _unattested(self.id, "aggregated")
        if len(set(found)) != 1:
            raise PermissionDenied(
                f"the contributions to this aggregate on {self.id!r} do not come from one common round: they "
                "were trained (or evaluated) from different models or under different configurations, so one "
                "could be chosen to cancel the others. Send every worker the same model and configuration",
                rule="cohort",
            )

    def _update_attestation(self, module_id: int, reference_id: int, weighted: bool, privacy: Any
                            ) -> tuple[Attestation | None, bool]:
        """The attestation of the update ``module_id`` - ``reference_id`` (None
        unless the module is this worker's own unmodified training of exactly that reference),
        and whether its labels require one (a training-only owner's data). The digest covers how the
        update is weighted, clipped and noised too: the model owner chooses those per worker, and a
        tiny clip norm for all but one owner would isolate that one."""
        entry, trained = self._module(module_id)
        required = self._training_only(lb.union(t for _, t in state_tensors(trained)))
        found = self._valid_attestation(entry, trained)
        if found is None or found.kind != "fit" or found.model != self._digest(reference_id):
            return None, required
        return _with_update_settings(found, weighted, privacy), required

    def _digest(self, module_id: int) -> bytes:
        """The model digest of a stored model, kept while it is unchanged (secure aggregation asks for
        the reference's in each of its phases)."""
        entry, module = self._module(module_id)
        version = _version(module)
        if entry.digest is None or entry.digest[0] != version:
            entry.digest = (version, model_digest(module))
        return entry.digest[1]

    def _share(self, msg: m.Share, sender: Sender) -> Any:
        """Split a value (a tensor, or a trained model's update) into additive shares, one per
        destination; only the shares leave, each on its own uniform and so meaningless."""
        destinations = msg.destinations
        if len(destinations) < 2 or len(set(destinations)) != len(destinations):
            raise ProtocolError(f"sharing needs two or more distinct share holders, got {destinations}")
        if len(msg.new_ids) != len(destinations):
            raise ProtocolError(f"one new id per share holder is needed: {len(destinations)} holders, "
                                f"{len(msg.new_ids)} ids")
        if type(msg.frac_bits) is not int or not 0 <= msg.frac_bits <= 52:
            raise ProtocolError(f"frac_bits must be an integer in [0, 52], got {msg.frac_bits!r}")
        entry = self._entry(msg.object_id)
        attestation: Attestation | None = None
        if msg.reference_id == 0:
            if msg.weighted or msg.privacy:
                raise ProtocolError("weighting, clipping and noise apply to a model's update, not to a tensor")
            t = self._tensor(msg.object_id)
            labels = lb.labels_of(t)
            if self._training_only(labels):
                raise PermissionDenied(
                    f"the tensor on {self.id!r} derives from private data of {lb.owners(labels)}, whose owners "
                    "allow only training on it: only a model's update after this worker's own training (Share "
                    "with a reference model) may be shared, never the data or values computed from it",
                    rule="cohort",
                )
            value = t.detach()
        else:
            attestation, required = self._update_attestation(msg.object_id, msg.reference_id, msg.weighted,
                                                             msg.privacy)
            if required and attestation is None:
                raise _unattested(self.id, "shared")
            _, trained = self._module(msg.object_id)
            _, reference = self._module(msg.reference_id)
            labels = lb.union(t for _, t in state_tensors(trained))
            value = torch.from_numpy(update_vector(trained, reference, self._samples_of(entry) if msg.weighted else None,
                                                   msg.privacy))
        if self.policy.strict and labels and not entry.aggregate:
            raise PermissionDenied(f"{self.id!r} is a strict aggregator, not a data owner: it shares no "
                                   "values derived from private data", rule="strict-aggregator")
        for destination in destinations:
            if destination != self.id:
                lb.check_destination(labels, destination, holder=self.id, what="a share of the value")
        try:
            shares = FixedPrecision.encode(value, frac_bits=msg.frac_bits).share(len(destinations)).to_tensors()
        except FixedPointOverflow as exc:
            if labels:  # the message would tell the size of a private value
                raise ProtocolError(f"a value derived from private data of {lb.owners(labels)} does not fit "
                                    f"{msg.frac_bits} fractional bits: use fewer") from None
            raise ProtocolError(str(exc)) from None
        samples, wire_labels = self._samples_of(entry), lb.labels_to_wire(labels)
        for destination, new, part in zip(destinations, msg.new_ids, shares, strict=True):
            if destination == self.id:
                self._fresh(new)
                lb.add_labels(part, labels)
                self._admit(_cost(part), what="this worker's own share")
                self.objects[new] = Entry(part, source=self.id, version=part._version, samples=samples,
                                          share=msg.frac_bits, attestation=attestation,
                                          attested_version=part._version)
            else:
                self._peer(destination, m.DeliverShare([], new, part, wire_labels, samples, msg.frac_bits,
                                                       _client.get() or "", attest_wire(attestation)))
        return {"shape": list(value.shape), "samples": samples}

    def _deliver_share(self, msg: m.DeliverShare, sender: Sender) -> Any:
        self._fresh(msg.object_id)
        labels = lb.labels_from_wire(msg.labels)
        self._receive_check(labels, sender)
        attestation = Attestation.from_wire(msg.attestation)
        t = msg.value
        if t.dtype != torch.int64 or not 0 <= msg.frac_bits <= 52:
            raise ProtocolError("a share is an int64 tensor with 0 to 52 fractional bits")
        self._admit(_cost(t), what="the share delivered here")
        lb.add_labels(t, labels)
        self.objects[msg.object_id] = Entry(t, source=sender.id, version=t._version, samples=msg.samples,
                                            share=msg.frac_bits, attestation=attestation,
                                            attested_version=t._version)
        return None

    # -- moves: straight from this worker to another ----------------------------------

    def _check_leaving(self, entry: Entry, labels: lb.Labels, destination: str, what: str) -> None:
        if destination == self.id:
            raise ProtocolError(f"{what} is already on {self.id!r}")
        if self.policy.strict and labels and not entry.aggregate:
            raise PermissionDenied(
                f"{self.id!r} is a strict aggregator: values derived from private data leave it "
                "only as results of its aggregation",
                rule="strict-aggregator",
            )
        lb.check_destination(labels, destination, holder=self.id, what=what)

    def _peer(self, destination: str, msg: m.Request) -> None:
        if self._send_to_peer is None:
            raise WorkerUnavailable(f"{self.id!r} has no link to other workers")
        data = m.encode_request(msg, framed=self.framed)
        m.reply_value(self._send_to_peer(destination, data), worker=destination)

    def _move(self, msg: m.Move, sender: Sender) -> Any:
        entry = self._entry(msg.object_id)
        t = self._tensor(msg.object_id)
        labels = lb.labels_of(t)
        self._check_leaving(entry, labels, msg.destination, "the tensor")
        self._peer(
            msg.destination,
            m.Deliver(
                [],
                msg.new_id,
                t.detach(),
                lb.labels_to_wire(labels),
                self._samples_of(entry),
                t.requires_grad,
                _client.get() or "",
                attest_wire(self._valid_attestation(entry, t)),
            ),
        )
        del self.objects[msg.object_id]
        return None

    def _samples_of(self, entry: Entry) -> int:
        return entry.samples if entry.source is not None or entry.samples else self.samples

    def _move_module(self, msg: m.MoveModule, sender: Sender) -> Any:
        entry, module = self._module(msg.module_id)
        own = [t for _, t in state_tensors(module)]
        labels = lb.union(own)
        self._check_leaving(entry, labels, msg.destination, "the model")
        spec = describe(module)
        assert spec is not None  # every module here was built from a description
        self._peer(
            msg.destination,
            m.DeliverModule(
                [],
                msg.new_module_id,
                spec,
                [t.detach() for t in own],
                msg.new_ids,
                [lb.labels_to_wire(lb.labels_of(t)) for t in own],
                self._samples_of(entry),
                _client.get() or "",
                attest_wire(self._valid_attestation(entry, module)),
            ),
        )
        del self.objects[msg.module_id]
        return None

    def _copy_module(self, msg: m.CopyModule, sender: Sender) -> Any:
        entry, module = self._module(msg.module_id)
        own = [t for _, t in state_tensors(module)]
        self._refuse_op(lb.union(own), "copy")
        spec = describe(module)
        assert spec is not None
        clone = build(spec)
        for mine, t in zip(load_state(clone, [t.detach() for t in own]), own, strict=True):
            lb.add_labels(mine, lb.labels_of(t))
        self._install_module(clone, msg.new_module_id, msg.new_ids, Entry(clone))
        return None

    def _receive_check(self, labels: lb.Labels, sender: Sender) -> None:
        # The receiver checks too: an owner's trust goes with its label, not with the sender.
        lb.check_destination(labels, self.id, holder=sender.id, what="a value sent here")

    def _fresh(self, *ids: int) -> None:
        if any(i in self.objects for i in ids):
            raise ProtocolError("a delivery must not replace an existing object")

    def _deliver(self, msg: m.Deliver, sender: Sender) -> Any:
        self._fresh(msg.object_id)
        labels = lb.labels_from_wire(msg.labels)
        self._receive_check(labels, sender)
        attestation = Attestation.from_wire(msg.attestation)
        t = msg.value
        if msg.requires_grad:
            if not (t.is_floating_point() or t.is_complex()):
                raise ProtocolError("only floating point tensors can require gradients")
            t.requires_grad_(True)
        self._admit(_cost(t), what="the value moved here")
        lb.add_labels(t, labels)
        self.objects[msg.object_id] = Entry(
            t, source=sender.id, version=t._version, samples=msg.samples, attestation=attestation,
            attested_version=t._version,
        )
        return None

    def _deliver_module(self, msg: m.DeliverModule, sender: Sender) -> Any:
        self._fresh(msg.module_id, *msg.ids)
        per_tensor = [lb.labels_from_wire(x) for x in msg.labels]
        self._receive_check(frozenset().union(*per_tensor), sender)
        attestation = Attestation.from_wire(msg.attestation)
        self._admit(self._predicted_size(msg.spec), what="the model moved here")
        module = build(msg.spec)
        own = load_state(module, msg.tensors)
        if len(per_tensor) != len(own):
            raise ProtocolError("one label list per tensor is required")
        for t, labels in zip(own, per_tensor, strict=True):
            lb.add_labels(t, labels)
        version = _version(module)
        entry = Entry(module, source=sender.id, version=version, samples=msg.samples, attestation=attestation,
                      attested_version=version)
        self._install_module(module, msg.module_id, msg.ids, entry)
        return None

    # -- the aggregator's fixed functions ----------------------------------------------

    def _weights(self, entries: list[Entry], labelled: bool, weighted: bool) -> list[float]:
        if self.policy.strict and labelled:
            sources = [e.source for e in entries]
            if None in sources:
                raise PermissionDenied(
                    "a strict aggregator aggregates only values moved to it by their owners",
                    rule="strict-aggregator",
                )
            if len(set(sources)) != len(sources):
                raise PermissionDenied(
                    f"a strict aggregator takes one value per owner, got sources {sources}",
                    rule="strict-aggregator",
                )
        if not weighted:
            return [1.0 / len(entries)] * len(entries)
        counts = [e.samples if e.source is not None else self.samples for e in entries]
        if any(c <= 0 for c in counts):
            raise ProtocolError(
                "a weighted mean needs every contributor's sample count; a worker reports the "
                "number of rows of its private data, and some inputs come from workers without any"
            )
        total = float(sum(counts))
        return [c / total for c in counts]

    def _check_contributors(self, labels: lb.Labels) -> None:
        if not labels:
            return
        need = max([self.policy.min_contributors, *(x.min_contributors for x in labels)])
        have = lb.owners(labels)
        if len(have) < need:
            raise PermissionDenied(
                f"an aggregate must combine at least {need} data owners, these inputs come from "
                f"{have}",
                rule="min-contributors",
            )

    def _aggregation_inputs(
        self, module_ids: list[int], spec: dict[str, Any] | None
    ) -> tuple[list[Entry], list[list[torch.Tensor]], lb.Labels]:
        """The models to aggregate, each of architecture ``spec``, unmodified since they arrived
        (strict mode), with their labels' union, checked for enough contributors."""
        pairs = [self._module(i) for i in module_ids]
        if spec is None or any(describe(mod) != spec for _, mod in pairs):
            raise ProtocolError("only models of the same architecture can be aggregated")
        entries = [e for e, _ in pairs]
        states = [[t for _, t in state_tensors(mod)] for _, mod in pairs]
        if self.policy.strict:
            for e, s in zip(entries, states, strict=True):
                if e.source is not None and sum(t._version for t in s) != e.version:
                    raise PermissionDenied("an input was modified after it arrived", rule="strict-aggregator")
        labels: lb.Labels = frozenset().union(*(lb.union(s) for s in states))
        self._check_contributors(labels)
        self._check_cohort(entries, labels, "fit")
        return entries, states, labels

    def _consume(self, ids: list[int], labels: lb.Labels) -> None:
        """A strict aggregator uses each owner's input in one aggregate only: otherwise the
        difference of two aggregates over subsets that differ by one owner is that owner's input."""
        if labels and (self.policy.strict or self._training_only(labels)):
            for i in ids:
                self.objects.pop(i, None)

    def _aggregate(self, msg: m.Aggregate, sender: Sender) -> Any:
        if len(msg.ids) < 1:
            raise ProtocolError("nothing to aggregate")
        entries = [self._entry(i) for i in msg.ids]
        tensors = [self._tensor(i) for i in msg.ids]
        if self.policy.strict:
            for e, t in zip(entries, tensors, strict=True):
                if e.source is not None and t._version != e.version:
                    raise PermissionDenied("an input was modified after it arrived", rule="strict-aggregator")
        labels = lb.union(tensors)
        self._check_contributors(labels)
        self._check_cohort(entries, labels, "evaluate")
        weights = self._weights(entries, bool(labels), msg.weighted)
        self._consume(msg.ids, labels)
        with torch.no_grad():
            out = torch.zeros_like(tensors[0], dtype=torch.float64 if tensors[0].dtype == torch.float64 else torch.float32)
            for w, t in zip(weights, tensors, strict=True):
                out.add_(t, alpha=w)
            out = out.to(tensors[0].dtype)
        lb.add_labels(out, labels)
        self.objects[msg.result_id] = Entry(out, aggregate=True)
        return _meta(msg.result_id, out)

    def _aggregate_modules(self, msg: m.AggregateModules, sender: Sender) -> Any:
        if len(msg.module_ids) < 1:
            raise ProtocolError("nothing to aggregate")
        spec = describe(self._module(msg.module_ids[0])[1])
        entries, states, labels = self._aggregation_inputs(msg.module_ids, spec)
        weights = self._weights(entries, bool(labels), msg.weighted)
        self._consume(msg.module_ids, labels)
        assert spec is not None
        clone = build(spec)
        own = [t for _, t in state_tensors(clone)]
        with torch.no_grad():
            for i, target in enumerate(own):
                if target.is_floating_point():
                    acc = torch.zeros_like(target, dtype=torch.float64)
                    for w, s in zip(weights, states, strict=True):
                        acc.add_(s[i], alpha=w)
                    target.copy_(acc)
                else:  # counters such as num_batches_tracked: take the largest
                    target.copy_(torch.stack([s[i] for s in states]).max(0).values)
                lb.add_labels(target, labels)
        self._install_module(clone, msg.new_module_id, msg.new_ids, Entry(clone, aggregate=True))
        return None

    def _aggregate_updates(self, msg: m.AggregateUpdates, sender: Sender) -> Any:
        if not msg.module_ids:
            raise ProtocolError("nothing to aggregate")
        _, reference = self._module(msg.reference_id)
        base = [t for _, t in state_tensors(reference)]
        spec = describe(reference)
        entries, states, labels = self._aggregation_inputs(msg.module_ids, spec)
        assert spec is not None
        if self._training_only(labels) and entries[0].attestation.model != self._digest(msg.reference_id):  # type: ignore[union-attr]
            raise PermissionDenied("the updates were not trained from the reference model given", rule="cohort")
        weights = self._weights(entries, bool(labels), bool(msg.rule.get("weighted", True)))
        floating = [i for i, t in enumerate(base) if t.is_floating_point()]
        with torch.no_grad():
            flat_base = torch.cat([base[i].reshape(-1).double() for i in floating])
            updates = [torch.cat([s[i].reshape(-1).double() for i in floating]) - flat_base for s in states]
            released = rules.release(msg.rule, updates, weights)
            self._consume(msg.module_ids, labels)
            combined = flat_base + released.aggregate
            clone = build(spec)
            own = [t for _, t in state_tensors(clone)]
            at = 0
            for i, target in enumerate(own):
                if i in floating:
                    size = target.numel()
                    target.copy_(combined[at : at + size].view(target.shape))
                    at += size
                else:  # counters such as num_batches_tracked: take the largest
                    target.copy_(torch.stack([s[i] for s in states]).max(0).values)
                lb.add_labels(target, labels)
        self._install_module(clone, msg.new_module_id, msg.new_ids, Entry(clone, aggregate=True))
        return released.metrics  # what the rule itself releases (a noisy count for adaptive clipping)


    def _aggregate_shares(self, msg: m.AggregateShares, sender: Sender) -> Any:
        if not msg.ids or len(set(msg.ids)) != len(msg.ids):
            raise ProtocolError("AggregateShares needs one or more distinct share ids")
        entries = [self._entry(i) for i in msg.ids]
        tensors = [self._tensor(i) for i in msg.ids]
        # Shares delivered by Share, or the caller's own int64 values (unlabelled: free to use anyway)
        if any(t.dtype != torch.int64 or (e.share is None and lb.labels_of(t)) for e, t in zip(entries, tensors, strict=True)):
            raise OperationNotAllowed("AggregateShares sums additive shares only: those delivered by Share, or "
                                      "int64 values of the caller's own", op="AggregateShares")
        frac_bits = {e.share for e in entries if e.share is not None}
        if len(frac_bits) > 1 or len({tuple(t.shape) for t in tensors}) != 1:
            raise ProtocolError("the shares to sum must have one shape and one number of fractional bits")
        if self.policy.strict:
            shared = [(e, t) for e, t in zip(entries, tensors, strict=True) if e.share is not None]
            sources = [e.source for e, _ in shared]
            if len(set(sources)) != len(sources):
                raise PermissionDenied(f"a strict aggregator sums one share per owner, got sources {sources}",
                                       rule="strict-aggregator")
            if any(t._version != e.version for e, t in shared):
                raise PermissionDenied("an input was modified after it arrived", rule="strict-aggregator")
        labels = lb.union(tensors)
        self._check_contributors(labels)
        self._check_cohort(entries, labels, "fit")
        total = tensors[0].detach().contiguous().clone()
        ring = total.numpy().view("uint64")  # addition in Z_(2^64): unsigned, wrapping by definition
        for t in tensors[1:]:
            ring += t.detach().contiguous().numpy().view("uint64")
        for i in msg.ids:  # each share joins one sum only: no differences of sums over other subsets
            del self.objects[i]
        lb.add_labels(total, labels)
        self.objects[msg.result_id] = Entry(total, aggregate=True, share=min(frac_bits, default=None),
                                            samples=sum(e.samples for e in entries))
        return _meta(msg.result_id, total)


def _backward(
    loss: torch.Tensor,
    gradient: torch.Tensor | None = None,
    retain_graph: bool | None = None,
    create_graph: bool = False,
    inputs: Any = None,
) -> None:
    """``loss.backward()``, then label every gradient it wrote with the labels of
    everything the backward pass read."""
    leaves, labels = _graph(loss)
    if gradient is not None:
        labels = labels | lb.labels_of(gradient)
    try:
        loss.backward(gradient, retain_graph, create_graph, inputs)
    finally:  # a pass that fails halfway has accumulated some gradients already
        if labels:
            for leaf in leaves:
                if leaf.grad is not None:
                    lb.add_labels(leaf.grad, labels)


def _with_update_settings(found: Attestation, weighted: bool, privacy: Any) -> Attestation:
    return Attestation(found.kind, found.model, config_digest([found.config.hex(), weighted, privacy]))


def _unattested(worker: str, verb: str) -> PermissionDenied:
    return PermissionDenied(
        f"a value derived from a training-only owner's data is {verb} on {worker!r} only as a worker's own "
        "unmodified work on it (the model trained by Fit from the round's common model, or the sums of "
        "Evaluate); this input is not, so it would not count as that owner's contribution",
        rule="cohort",
    )


def _version(obj: Any) -> int:
    """A tensor's version, or the sum of a module's tensors' versions: it changes with every write."""
    if isinstance(obj, nn.Module):
        return sum(t._version for _, t in state_tensors(obj))
    return int(obj._version) if isinstance(obj, torch.Tensor) else -1


def _tensors_in(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, tuple | list):
        return [t for v in value for t in _tensors_in(v)]
    return []


def _refuse_undefined(failure: str | None, what: str, worker: str) -> None:
    """A value left undefined by an op that failed on private data does not leave as if it meant
    something (the release rules were checked first: this says nothing they would not allow)."""
    if failure:
        raise RemoteError(
            f"{what} is undefined: {failure} failed earlier on values derived from private data "
            "(the failure was not reported then, since the data's owners allow no metrics)",
            op=failure,
            worker=worker,
        )


def _tag(tag: str) -> str:
    return tag[1:] if tag.startswith("#") else tag


def _matches(entry: Entry, item: str) -> bool:
    return _tag(item) in entry.tags or (bool(item) and item in entry.description)
