"""Values that leave only hidden: additive secret sharing (`Share`, with `DeliverShare` to each
holder) and the data owner's side of secure aggregation (`SecAgg`, `fedsecure.worker.secure`).

An update leaves either way only as this worker's own training of the round's reference model
where its data's owner requires that: its attestation (`fedsecure.worker.attest`) also covers how
the update is weighted, clipped and noised, since the model owner chooses those per worker.
"""

from __future__ import annotations

from typing import Any

import torch

from fedsecure.aggregate.shares import FixedPrecision
from fedsecure.errors import FixedPointOverflow, PermissionDenied, ProtocolError
from fedsecure.wire import messages as m
from fedsecure.worker import labels as lb
from fedsecure.worker.attest import Attestation, config_digest
from fedsecure.worker.attest import wire as attest_wire
from fedsecure.worker.guards import check_received, unattested, valid_attestation
from fedsecure.worker.modules import state_tensors
from fedsecure.worker.secure import update_vector
from fedsecure.worker.store import CLIENT, Entry, Sender, WorkerState, cost


def share(state: WorkerState, msg: m.Share, sender: Sender) -> Any:
    """Split a value (a tensor, or a trained model's update) into additive shares, one per
    destination; only the shares leave, each on its own uniform and so meaningless."""
    _check_share(msg)
    entry = state.entry(msg.object_id)
    value, labels, attestation = _shared_value(state, msg, entry)
    if state.policy.strict and labels and not entry.aggregate:
        raise PermissionDenied(f"{state.id!r} is a strict aggregator, not a data owner: it shares no "
                               "values derived from private data", rule="strict-aggregator")
    for destination in msg.destinations:
        if destination != state.id:
            lb.check_destination(labels, destination, holder=state.id, what="a share of the value")
    try:
        shares = FixedPrecision.encode(value, frac_bits=msg.frac_bits).share(len(msg.destinations)).to_tensors()
    except FixedPointOverflow as exc:
        if labels:  # the message would tell the size of a private value
            raise ProtocolError(f"a value derived from private data of {lb.owners(labels)} does not fit "
                                f"{msg.frac_bits} fractional bits: use fewer") from None
        raise ProtocolError(str(exc)) from None
    samples, wire_labels = state.samples_of(entry), lb.labels_to_wire(labels)
    for destination, new, part in zip(msg.destinations, msg.new_ids, shares, strict=True):
        if destination == state.id:
            state.fresh(new)
            lb.add_labels(part, labels)
            state.admit(cost(part), what="this worker's own share")
            state.objects[new] = Entry(part, source=state.id, version=part._version, samples=samples,
                                       share=msg.frac_bits, attestation=attestation,
                                       attested_version=part._version)
        else:
            state.peer(destination, m.DeliverShare(new, part, wire_labels, samples, msg.frac_bits,
                                                   CLIENT.get() or "", attest_wire(attestation)))
    return {"shape": list(value.shape), "samples": samples}


def _check_share(msg: m.Share) -> None:
    destinations = msg.destinations
    if len(destinations) < 2 or len(set(destinations)) != len(destinations):
        raise ProtocolError(f"sharing needs two or more distinct share holders, got {destinations}")
    if len(msg.new_ids) != len(destinations):
        raise ProtocolError(f"one new id per share holder is needed: {len(destinations)} holders, "
                            f"{len(msg.new_ids)} ids")
    if type(msg.frac_bits) is not int or not 0 <= msg.frac_bits <= 52:
        raise ProtocolError(f"frac_bits must be an integer in [0, 52], got {msg.frac_bits!r}")


def _shared_value(
    state: WorkerState, msg: m.Share, entry: Entry
) -> tuple[torch.Tensor, lb.Labels, Attestation | None]:
    """What ``msg`` shares: a tensor as it is (never one derived from a training-only owner's data),
    or a model's update from the reference, attested where its labels require it; with its labels."""
    if msg.reference_id == 0:
        if msg.weighted or msg.privacy:
            raise ProtocolError("weighting, clipping and noise apply to a model's update, not to a tensor")
        t = state.tensor(msg.object_id)
        labels = lb.labels_of(t)
        if lb.training_only(labels):
            raise PermissionDenied(
                f"the tensor on {state.id!r} derives from private data of {lb.owners(labels)}, whose owners "
                "allow only training on it: only a model's update after this worker's own training (Share "
                "with a reference model) may be shared, never the data or values computed from it",
                rule="cohort",
            )
        return t.detach(), labels, None
    attestation, required = update_attestation(state, msg.object_id, msg.reference_id, msg.weighted, msg.privacy)
    if required and attestation is None:
        raise unattested(state.id, "shared")
    _, trained = state.module(msg.object_id)
    _, reference = state.module(msg.reference_id)
    labels = lb.union(t for _, t in state_tensors(trained))
    weight = state.samples_of(entry) if msg.weighted else None
    return torch.from_numpy(update_vector(trained, reference, weight, msg.privacy)), labels, attestation


def deliver_share(state: WorkerState, msg: m.DeliverShare, sender: Sender) -> Any:
    state.fresh(msg.object_id)
    labels = lb.labels_from_wire(msg.labels)
    check_received(state, labels, sender)
    attestation = Attestation.from_wire(msg.attestation)
    t = msg.value
    if t.dtype != torch.int64 or not 0 <= msg.frac_bits <= 52:
        raise ProtocolError("a share is an int64 tensor with 0 to 52 fractional bits")
    state.admit(cost(t), what="the share delivered here")
    lb.add_labels(t, labels)
    state.objects[msg.object_id] = Entry(t, source=sender.id, version=t._version, samples=msg.samples,
                                         share=msg.frac_bits, attestation=attestation,
                                         attested_version=t._version)
    return None


def secagg(state: WorkerState, msg: m.SecAgg, sender: Sender) -> Any:
    def update() -> Any:
        entry, trained = state.module(msg.module_id)
        _, reference = state.module(msg.reference_id)
        if state.policy.strict:
            raise PermissionDenied(f"{state.id!r} is a strict aggregator, not a data owner", rule="strict-aggregator")
        return update_vector(trained, reference, state.samples_of(entry) if msg.weighted else None, msg.privacy)

    attestation, required = update_attestation(state, msg.module_id, msg.reference_id, msg.weighted, msg.privacy)
    return state.secure.step(CLIENT.get(), msg.session, msg.phase, msg.client_id, msg.payload, update,
                             attestation=None if attestation is None else attestation.digest(), required=required)


def update_attestation(
    state: WorkerState, module_id: int, reference_id: int, weighted: bool, privacy: Any
) -> tuple[Attestation | None, bool]:
    """The attestation of the update ``module_id`` - ``reference_id`` (None
    unless the module is this worker's own unmodified training of exactly that reference),
    and whether its labels require one (a training-only owner's data). The digest covers how the
    update is weighted, clipped and noised too: the model owner chooses those per worker, and a
    tiny clip norm for all but one owner would isolate that one."""
    entry, trained = state.module(module_id)
    required = lb.training_only(lb.union(t for _, t in state_tensors(trained)))
    found = valid_attestation(entry, trained)
    if found is None or found.kind != "fit" or found.model != state.digest(reference_id):
        return None, required
    settings = config_digest([found.config.hex(), weighted, privacy])
    return Attestation(found.kind, found.model, settings), required
