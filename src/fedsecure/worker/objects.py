"""Objects in and out: tensors and models sent (`Put`, `PutModule`), pointers to other workers'
objects (`PutRef`), values fetched (`Get`, `GetModule`: checked by the release rules, and by the
transport's message size, before anything leaves), and the inspection verbs (`Count`, `Search`,
`Owners`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedsecure.errors import OperationNotAllowed, ProtocolError
from fedsecure.wire import codec
from fedsecure.wire import messages as m
from fedsecure.wire.ids import new_id
from fedsecure.worker import execute as ex
from fedsecure.worker import labels as lb
from fedsecure.worker.guards import refuse_undefined
from fedsecure.worker.modules import receive, state_tensors
from fedsecure.worker.store import CLIENT, Entry, RemoteRecord, Sender, WorkerState, cost, meta, tag


def put(state: WorkerState, msg: m.Put, sender: Sender) -> Any:
    t = msg.value
    state.admit(cost(t), what="the tensor sent", private=msg.private)
    if msg.requires_grad:
        if not (t.is_floating_point() or t.is_complex()):
            raise ProtocolError("only floating point tensors can require gradients")
        t.requires_grad_(True)
    if msg.private:
        lb.add_labels(t, frozenset({state.own_label}))
        if t.dim() > 0:
            state.samples = max(state.samples, t.shape[0])
    entry = Entry(t, tags=frozenset(tag(x) for x in msg.tags), description=msg.description)
    state.objects[msg.object_id] = entry
    described = meta(msg.object_id, t)
    if entry.tags or entry.description:
        described.update(tags=sorted(entry.tags), description=entry.description)
    return described


def put_module(state: WorkerState, msg: m.PutModule, sender: Sender) -> Any:
    state.admit(state.predicted_size(msg.spec), what="the model sent", private=msg.private)
    module, own = receive(msg.spec, msg.tensors)  # decoded here: this worker's own
    if msg.private:
        for t in own:
            lb.add_labels(t, frozenset({state.own_label}))
    state.install_module(module, msg.module_id, msg.ids, Entry(module))
    return None


def put_ref(state: WorkerState, msg: m.PutRef, sender: Sender) -> Any:
    codec.parse_dtype(msg.dtype)
    state.objects[msg.object_id] = Entry(RemoteRecord(msg.location, msg.ref_id, msg.shape, msg.dtype))
    return None


def get(state: WorkerState, msg: m.Get, sender: Sender) -> Any:
    entry = state.entry(msg.object_id)
    obj = entry.obj
    if isinstance(obj, RemoteRecord):
        del state.objects[msg.object_id]
        return {"ref": [obj.location, obj.ref_id]}
    if not isinstance(obj, torch.Tensor):
        raise OperationNotAllowed("get() of a model: use model.get()", op="get")
    grad = obj.grad if obj.requires_grad and obj.is_leaf else None
    what = "the tensor" if grad is None else "the tensor and its gradient"
    lb.check_release(
        lb.labels_of(obj) | (lb.labels_of(grad) if grad is not None else frozenset()),
        obj.numel(),
        scalar=obj.dim() == 0,
        holder=state.id,
        policy=state.policy,
        aggregate=entry.aggregate,
        what=what,
    )
    refuse_undefined(ex.failed(obj), "the tensor", state.id)
    value = codec.sendable(obj)  # checked first: a failure must lose nothing
    grad_value = None if grad is None else codec.sendable(grad)
    state.check_reply_size(value.nbytes + (0 if grad_value is None else grad_value.nbytes))
    del state.objects[msg.object_id]
    return {"tensor": value, "requires_grad": obj.requires_grad, "grad": grad_value}


def get_module(state: WorkerState, msg: m.GetModule, sender: Sender) -> Any:
    entry, module = state.module(msg.module_id)
    own = [t for _, t in state_tensors(module)]
    grads = [t.grad for t in own] if msg.grads else []
    present = [g for g in grads if g is not None]
    lb.check_release(
        lb.union(own + present),
        sum(t.numel() for t in own),
        scalar=False,
        holder=state.id,
        policy=state.policy,
        aggregate=entry.aggregate,
        what="the model and its gradients" if present else "the model",
    )
    values = [codec.sendable(t) for t in own]
    grad_values = [None if g is None else codec.sendable(g) for g in grads]
    state.check_reply_size(sum(v.nbytes for v in values) + sum(g.nbytes for g in grad_values if g is not None))
    del state.objects[msg.module_id]
    return {"values": values, "grads": grad_values} if msg.grads else values


def count(state: WorkerState, msg: m.Count, sender: Sender) -> Any:
    caller = CLIENT.get()
    return sum(1 for e in state.objects.values() if e.owner == caller)


def owners(state: WorkerState, msg: m.Owners, sender: Sender) -> Any:
    obj = state.entry(msg.object_id).obj
    if isinstance(obj, nn.Module):
        return lb.owners(lb.union(t for _, t in state_tensors(obj)))
    return lb.owners(lb.labels_of(obj))


def search(state: WorkerState, msg: m.Search, sender: Sender) -> Any:
    """Each tensor matching every item: an item matches a tag ("#x" and "x" alike) or occurs in
    the description, as PySyft 0.2.9's ``search`` matches. Each match gets a new id of the
    caller's (freeing it frees only that id), which carries no tags, so searches never find it."""
    items = [msg.tag, *msg.also]
    found = []
    caller = CLIENT.get()
    for entry in list(state.objects.values()):
        if entry.owner not in (None, caller):  # another model owner's tags are its own
            continue
        if isinstance(entry.obj, torch.Tensor) and all(_matches(entry, item) for item in items):
            obj_id = new_id()
            state.objects[obj_id] = Entry(entry.obj)
            described = meta(obj_id, entry.obj)
            described.update(tags=sorted(entry.tags), description=entry.description)
            found.append(described)
    return found


def _matches(entry: Entry, item: str) -> bool:
    return tag(item) in entry.tags or (bool(item) and item in entry.description)
