"""Models on workers: ``send``, ``get``, ``move`` and ``copy`` for `torch.nn.Module`.

A sent model keeps its Python object: its parameters and buffers become
pointers, so ``model.parameters()``, ``model.weight.data`` and ``torch.optim``
work on it unchanged. If the worker can build the model itself (layers from its
layer allow-list, or a custom module that torch.fx traces into allow-listed
operations: see docs/models.md), ``model(x)`` is one message (the whole forward
pass runs there); otherwise the forward pass runs op by op on pointers.
"""

from __future__ import annotations

import copy
import weakref
from typing import Any

import torch
from torch import nn

from fedsecure.errors import OperationNotAllowed, PermissionDenied, WorkerMismatch
from fedsecure.pointer.inplace import become_local, become_pointer, convertible, in_place
from fedsecure.pointer.tensor import PointerTensor, call, send_tensor
from fedsecure.wire import messages as m
from fedsecure.wire.ids import new_id
from fedsecure.worker.client import WorkerClient
from fedsecure.worker.modules import describe
from fedsecure.worker.remote_model import RemoteModel

_ATTR = "_fedsecure_remote"


class _RemoteForward:
    """Installed as the sent model's ``forward``: one message runs the whole pass."""

    def __init__(self, module: nn.Module, remote: RemoteModel) -> None:
        self.module = weakref.ref(module)
        self.remote = remote

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self.module()
        assert module is not None
        return call(
            "model.forward",
            args,
            kwargs,
            module_id=self.remote.module_id,
            training=module.training,
            worker=self.remote.worker,
        )


def remote_of(module: nn.Module) -> RemoteModel | None:
    return module.__dict__.get(_ATTR)


def _slots(module: nn.Module) -> list[tuple[dict[str, Any], str]]:
    """Every parameter and buffer slot, in the order `state_tensors` lists them."""
    params = [
        (sub._parameters, name)
        for _, sub in module.named_modules(remove_duplicate=False)
        for name, p in sub._parameters.items()
        if p is not None
    ]
    buffers = [
        (sub._buffers, name)
        for _, sub in module.named_modules(remove_duplicate=False)
        for name, b in sub._buffers.items()
        if b is not None
    ]
    return params + buffers


def _install(module: nn.Module, remote: RemoteModel, pointers: list[PointerTensor]) -> None:
    for (slot, name), ptr in zip(_slots(module), pointers, strict=True):
        if slot[name] is not ptr:
            slot[name] = ptr
    module.__dict__[_ATTR] = remote
    if remote.module_id is not None:
        module.__dict__["forward"] = _RemoteForward(module, remote)
        weakref.finalize(module, remote.release)


def send_module(module: nn.Module, worker: WorkerClient, *, private: bool = False) -> nn.Module:
    """Send ``module``'s weights (and, if describable, its architecture) to ``worker``.

    The module object itself is returned, now pointing to the worker.
    """
    remote = remote_of(module)
    if remote is not None:
        raise OperationNotAllowed(
            f"this model is already on {remote.worker.id!r}; use model.move(worker)", op="send"
        )
    if not isinstance(worker, WorkerClient):
        raise TypeError(f"send() needs a worker, got {type(worker).__name__}")
    slots = _slots(module)
    tensors = [slot[name] for slot, name in slots]
    spec = describe(module)
    if spec is None:  # weights only: the forward pass runs op by op
        sent = [send_tensor(t, worker, private=private) for t in tensors]
        pointers = [_in_place(t, p._fs.worker, p.id_at_location, p._fs_owners, p) for t, p in zip(tensors, sent, strict=True)]
        _install(module, RemoteModel(worker, None), pointers)
        return module
    remote = RemoteModel.put(worker, spec, tensors, private=private, owns_tensors=False)  # pointers hold the ids
    owners = [worker.id] if private else []
    pointers = [_in_place(t, worker, i, owners) for t, i in zip(tensors, remote.ids, strict=True)]
    _install(module, remote, pointers)
    return module


def _in_place(
    t: torch.Tensor, worker: WorkerClient, obj_id: int, owners: list[str], sent: PointerTensor | None = None
) -> PointerTensor:
    """The model's own tensor object, now pointing to ``obj_id`` (as PySyft moves parameters in
    place, so that optimizers built before the send step the remote weights); a new pointer for a
    tensor of another subclass, which cannot convert."""
    if isinstance(t, PointerTensor):  # a tensor the model holds twice: converted at its first slot
        if sent is not None:
            sent._fs.live = False
        if t.id_at_location != obj_id:
            worker.release(obj_id)
        return t
    if not convertible(t):
        return sent if sent is not None else PointerTensor(worker, obj_id, t.shape, t.dtype, t.requires_grad, owners)
    if sent is not None:
        sent._fs.live = False  # the id now belongs to t
    return become_pointer(t, worker, obj_id, owners)


def _pointers(module: nn.Module) -> list[PointerTensor]:
    out = []
    for slot, name in _slots(module):
        ptr = slot[name]
        if not isinstance(ptr, PointerTensor):
            raise WorkerMismatch(f"parameter {name!r} of this model is local, not on a worker")
        out.append(ptr)
    return out


def _require_remote(module: nn.Module, verb: str) -> RemoteModel:
    remote = remote_of(module)
    if remote is None:
        raise OperationNotAllowed(f"{verb}() of a local model: send it to a worker first", op=verb)
    return remote


# Where PySyft's tutorials get() a model trained on a worker's private data, fedsecure refuses.
_TRAINED_ON_PRIVATE_DATA = (
    "A model trained on a data owner's private data comes back only as an aggregate: move each "
    "owner's model to an aggregator (model.move(secure_worker)) and average there "
    "(secure_worker.aggregate([...]).get()), or let fedsecure.fl.fit run the rounds; see "
    "docs/tutorial.md and docs/pysyft.md."
)


def get_module(module: nn.Module) -> nn.Module:
    """Fetch the weights back (if the worker's policy allows); the model becomes local."""
    remote = _require_remote(module, "get")
    pointers = _pointers(module)
    grads: list[torch.Tensor | None]
    if remote.module_id is None:
        unique = {id(p): p for p in pointers}
        fetched = {key: PointerTensor.get(p) for key, p in unique.items()}
        values = [fetched[id(p)].detach() for p in pointers]
        grads = [fetched[id(p)].grad for p in pointers]
    else:
        try:
            reply = remote.get(grads=True)
        except PermissionDenied as err:
            raise PermissionDenied(f"{err} {_TRAINED_ON_PRIVATE_DATA}", rule=err.rule) from err
        values, grads = reply["values"], reply["grads"]
    param_slots = {id(sub._parameters) for sub in module.modules()}
    restored: dict[int, torch.Tensor] = {}
    for (slot, name), ptr, value, grad in zip(_slots(module), pointers, values, grads, strict=True):
        if id(ptr) in restored:  # held twice: restored at its first slot
            slot[name] = restored[id(ptr)]
        elif in_place(ptr):
            restored[id(ptr)] = become_local(ptr, value, grad)
        else:
            ptr._fs.live = False
            local = nn.Parameter(value, requires_grad=ptr.requires_grad) if id(slot) in param_slots else value
            if grad is not None and local.requires_grad:
                local.grad = grad
            slot[name] = restored[id(ptr)] = local
    del module.__dict__[_ATTR]
    module.__dict__.pop("forward", None)
    return module


def move_module(module: nn.Module, worker: WorkerClient) -> nn.Module:
    """Send the model straight from its worker to ``worker``; the caller sends only the order."""
    remote = _require_remote(module, "move")
    if worker is remote.worker:
        return module
    pointers = _pointers(module)
    if remote.module_id is None:
        for p in pointers:
            p.move(worker)
        remote.worker = worker
        return module
    source = remote.worker
    remote.move(worker)
    for p, i in zip(pointers, remote.ids, strict=True):
        if p._fs.live:  # the source's entry for the old id goes with the next request
            source.release(p._fs.id)
        p._fs.worker, p._fs.id, p._fs.live = worker, i, True
        p._fs_grad = None
    return module


def _proxy_copy(module: nn.Module, remote: RemoteModel) -> nn.Module:
    """A new local proxy of ``module``'s structure for the remote model ``remote``."""
    pointers = _pointers(module)
    remote.owns_tensors = False  # the new pointers hold their ids
    fresh = [
        PointerTensor(remote.worker, i, p.shape, p.dtype, p.requires_grad, p.owners)
        for p, i in zip(pointers, remote.ids, strict=True)
    ]
    memo: dict[int, Any] = {id(p): f for p, f in zip(pointers, fresh, strict=True)}
    old_remote = remote_of(module)
    memo[id(old_remote)] = None
    memo[id(module.__dict__.get("forward"))] = None
    clone = copy.deepcopy(module, memo)
    clone.__dict__.pop("forward", None)
    _install(clone, remote, fresh)
    return clone


def copy_module(module: nn.Module) -> nn.Module:
    """A copy of the model: local models are deep-copied, remote ones copied on their worker."""
    remote = remote_of(module)
    if remote is None:
        return copy.deepcopy(module)
    if remote.module_id is None:  # each pointer copies itself on its worker
        return copy.deepcopy(module, {id(remote): RemoteModel(remote.worker, None)})
    return _proxy_copy(module, remote.copy())


def aggregate(worker: WorkerClient, values: list[Any], weighted: bool) -> Any:
    """``worker.aggregate(values)``: see `WorkerClient.aggregate`."""
    if not values:
        raise ValueError("aggregate() needs at least one value")
    if all(isinstance(v, PointerTensor) for v in values):
        for v in values:
            if v.location is not worker:
                raise WorkerMismatch(f"a value lives on {v.location.id!r}; move it to {worker.id!r} first")
        result_id = new_id()
        meta = worker.request(
            m.Aggregate([v.id_at_location for v in values], weighted, result_id)
        )
        return PointerTensor._from_meta(worker, meta)
    if all(isinstance(v, nn.Module) for v in values):
        models: list[RemoteModel] = []
        for v in values:
            r = remote_of(v)
            if r is None or r.module_id is None or r.worker is not worker:
                raise WorkerMismatch(
                    f"aggregate() takes models sent to {worker.id!r} that workers build themselves "
                    "(allow-listed layers, or graphs of allow-listed operations: see docs/models.md); "
                    "move them there first"
                )
            models.append(r)
        return _proxy_copy(values[0], RemoteModel.aggregate(worker, models, weighted))
    raise TypeError("aggregate() takes a list of pointers or a list of sent models")

