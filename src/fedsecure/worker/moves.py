"""Moves: a value goes straight from this worker to another (`Move`, `MoveModule`, `MoveFold`), never
through the model owner, and only where its labels' owners trust the destination; the destination
checks that again when the value arrives (`Deliver`, `DeliverModule`, `DeliverFold`, sent by the
peer). `CopyModule` copies a model within the worker.

A moved value keeps its labels, its sample count and this worker's attestation that it is its own
unmodified work, so the aggregator receiving it can tell a contribution from anything else.
"""

from __future__ import annotations

from typing import Any

import torch

from fedsecure.errors import PermissionDenied, ProtocolError
from fedsecure.wire import messages as m
from fedsecure.worker import labels as lb
from fedsecure.worker.attest import Attestation
from fedsecure.worker.attest import wire as attest_wire
from fedsecure.worker.guards import check_received, refuse_op, valid_attestation
from fedsecure.worker.modules import describe, receive, state_tensors
from fedsecure.worker.store import CLIENT, Entry, Sender, WorkerState, cost, version


def move(state: WorkerState, msg: m.Move, sender: Sender) -> Any:
    entry = state.entry(msg.object_id)
    t = state.tensor(msg.object_id)
    labels = lb.labels_of(t)
    _check_leaving(state, entry, labels, msg.destination, "the tensor")
    state.peer(
        msg.destination,
        m.Deliver(
            msg.new_id,
            t.detach(),
            lb.labels_to_wire(labels),
            state.samples_of(entry),
            t.requires_grad,
            CLIENT.get() or "",
            attest_wire(valid_attestation(entry, t)),
        ),
    )
    del state.objects[msg.object_id]
    return None


def move_module(state: WorkerState, msg: m.MoveModule, sender: Sender) -> Any:
    spec, own, labels, samples, owner, attestation = _leaving(state, msg.module_id, msg.destination)
    state.peer(msg.destination, m.DeliverModule(msg.new_module_id, spec, own, msg.new_ids, labels, samples, owner,
                                                attestation))
    del state.objects[msg.module_id]
    return None


def move_fold(state: WorkerState, msg: m.MoveFold, sender: Sender) -> Any:
    """A move whose destination folds the model into a sum as it arrives (`aggregator.deliver_fold`)."""
    spec, own, labels, samples, owner, attestation = _leaving(state, msg.module_id, msg.destination)
    state.peer(msg.destination, m.DeliverFold(msg.sum_id, msg.weighted, spec, own, labels, samples, owner,
                                              attestation))
    del state.objects[msg.module_id]
    return None


def _leaving(state: WorkerState, module_id: int, destination: str) -> tuple[Any, list[torch.Tensor], list[Any], int,
                                                                          str, list[Any]]:
    """What a moved model's delivery carries, once the model may leave for ``destination``: its
    description, tensors, each tensor's labels, sample count, model owner and attestation."""
    entry, module = state.module(module_id)
    own = [t for _, t in state_tensors(module)]
    _check_leaving(state, entry, lb.union(own), destination, "the model")
    spec = describe(module)
    assert spec is not None  # every module here was built from a description
    return (spec, [t.detach() for t in own], [lb.labels_to_wire(lb.labels_of(t)) for t in own],
            state.samples_of(entry), CLIENT.get() or "", attest_wire(valid_attestation(entry, module)))


def copy_module(state: WorkerState, msg: m.CopyModule, sender: Sender) -> Any:
    _, module = state.module(msg.module_id)
    own = [t for _, t in state_tensors(module)]
    refuse_op(state, lb.union(own), "copy")
    spec = describe(module)
    assert spec is not None
    clone, copies = receive(spec, [t.detach().clone(memory_format=torch.contiguous_format) for t in own])
    for mine, t in zip(copies, own, strict=True):
        lb.add_labels(mine, lb.labels_of(t))
    state.install_module(clone, msg.new_module_id, msg.new_ids, Entry(clone))
    return None


def deliver(state: WorkerState, msg: m.Deliver, sender: Sender) -> Any:
    state.fresh(msg.object_id)
    labels = lb.labels_from_wire(msg.labels)
    check_received(state, labels, sender)
    attestation = Attestation.from_wire(msg.attestation)
    t = msg.value
    if msg.requires_grad:
        if not (t.is_floating_point() or t.is_complex()):
            raise ProtocolError("only floating point tensors can require gradients")
        t.requires_grad_(True)
    state.admit(cost(t), what="the value moved here")
    lb.add_labels(t, labels)
    state.objects[msg.object_id] = Entry(
        t, source=sender.id, version=t._version, samples=msg.samples, attestation=attestation,
        attested_version=t._version,
    )
    return None


def deliver_module(state: WorkerState, msg: m.DeliverModule, sender: Sender) -> Any:
    state.fresh(msg.module_id, *msg.ids)
    module, entry = arrived(state, msg, sender)
    state.install_module(module, msg.module_id, msg.ids, entry)
    return None


def arrived(state: WorkerState, msg: m.DeliverModule | m.DeliverFold, sender: Sender) -> tuple[Any, Entry]:
    """A delivered model, checked (its labels' owners trust this worker, its description and tensors
    match, the model owner's quota) and labelled, around the delivered tensors; and its entry."""
    per_tensor = [lb.labels_from_wire(x) for x in msg.labels]
    check_received(state, frozenset().union(*per_tensor), sender)
    attestation = Attestation.from_wire(msg.attestation)
    state.admit(state.predicted_size(msg.spec), what="the model moved here")
    module, own = receive(msg.spec, msg.tensors)  # decoded here: this worker's own
    if len(per_tensor) != len(own):
        raise ProtocolError("one label list per tensor is required")
    for t, labels in zip(own, per_tensor, strict=True):
        lb.add_labels(t, labels)
    now = version(module)
    return module, Entry(module, source=sender.id, version=now, samples=msg.samples, attestation=attestation,
                         attested_version=now)


def _check_leaving(state: WorkerState, entry: Entry, labels: lb.Labels, destination: str, what: str) -> None:
    if destination == state.id:
        raise ProtocolError(f"{what} is already on {state.id!r}")
    if state.policy.strict and labels and not entry.aggregate:
        raise PermissionDenied(
            f"{state.id!r} is a strict aggregator: values derived from private data leave it "
            "only as results of its aggregation",
            rule="strict-aggregator",
        )
    lb.check_destination(labels, destination, holder=state.id, what=what)
