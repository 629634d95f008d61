"""The refusals that several kinds of work share: pointer ops on data whose owner allows only
training, anything but aggregation on a strict aggregator, values received from peers, values
left undefined by a failure, and work that is not a worker's own attested training."""

from __future__ import annotations

from typing import Any

from fedsecure.errors import PermissionDenied, RemoteError
from fedsecure.worker import labels as lb
from fedsecure.worker.attest import Attestation
from fedsecure.worker.store import Entry, Sender, WorkerState, version


def refuse_op(state: WorkerState, labels: lb.Labels, op: str) -> None:
    """Refuse a pointer op on labelled values where a rule forbids it: on a strict aggregator,
    and anywhere on data whose owner allows only training (the rule travels with the label)."""
    if not labels:
        return
    refuse_if_strict(state, labels, op)
    if lb.training_only(labels):
        raise PermissionDenied(
            f"{op} on {state.id!r} refused: the values derive from private data of "
            f"{lb.owners(frozenset(x for x in labels if x.training_only))}, whose owners allow only training "
            "on it (Fit and Evaluate of a model, moves to trusted aggregators, secure aggregation), not "
            "pointer ops. A data owner who wants the full pointer API serves with --policy full",
            rule="training-only",
        )


def refuse_if_strict(state: WorkerState, labels: lb.Labels, op: str) -> None:
    if state.policy.strict and labels:
        raise PermissionDenied(
            f"{state.id!r} is a strict aggregator: it runs no {op} on values derived from "
            f"private data of {lb.owners(labels)}; it only aggregates them "
            f"({state.id}.aggregate([...]))",
            rule="strict-aggregator",
        )


def check_received(state: WorkerState, labels: lb.Labels, sender: Sender) -> None:
    # The receiver checks too: an owner's trust goes with its label, not with the sender.
    lb.check_destination(labels, state.id, holder=sender.id, what="a value sent here")


def refuse_undefined(failure: str | None, what: str, worker: str) -> None:
    """A value left undefined by an op that failed on private data does not leave as if it meant
    something (the release rules were checked first: this says nothing they would not allow)."""
    if failure:
        raise RemoteError(
            f"{what} is undefined: {failure} failed earlier on values derived from private data "
            "(the failure was not reported then, since the data's owners allow no metrics)",
            op=failure,
            worker=worker,
        )


def valid_attestation(entry: Entry, obj: Any) -> Attestation | None:
    """The entry's attestation, if the object is unchanged since it was made."""
    if entry.attestation is None or version(obj) != entry.attested_version:
        return None
    return entry.attestation


def unattested(worker: str, verb: str) -> PermissionDenied:
    return PermissionDenied(
        f"a value derived from a training-only owner's data is {verb} on {worker!r} only as a worker's own "
        "unmodified work on it (the model trained by Fit from the round's common model, or the sums of "
        "Evaluate); this input is not, so it would not count as that owner's contribution",
        rule="cohort",
    )
