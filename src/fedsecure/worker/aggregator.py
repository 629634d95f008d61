"""The aggregator's fixed functions: the mean of tensors (`Aggregate`), of models
(`AggregateModules`, or folded as they arrive: `FoldModule` or `DeliverFold`, and `CloseSum`), a rule over models'
updates (`AggregateUpdates`, `fedsecure.aggregate.rules`) and the sum of additive shares
(`AggregateShares`).

Their results may leave where single inputs may not, so each checks its inputs first: enough
distinct data owners (`min_contributors`); on a strict aggregator, one unmodified input per owner,
each used in one aggregate only; for a training-only owner's data, one common round's attested
work (the cohort check), so the model owner cannot choose all inputs but one and subtract them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedsecure.aggregate import rules
from fedsecure.errors import OperationNotAllowed, PermissionDenied, ProtocolError
from fedsecure.wire import messages as m
from fedsecure.worker import labels as lb
from fedsecure.worker import moves
from fedsecure.worker.attest import Attestation
from fedsecure.worker.guards import unattested, valid_attestation
from fedsecure.worker.modules import describe, receive, state_tensors
from fedsecure.worker.store import Entry, Sender, WorkerState, meta, version


def aggregate(state: WorkerState, msg: m.Aggregate, sender: Sender) -> Any:
    if len(msg.ids) < 1:
        raise ProtocolError("nothing to aggregate")
    entries = [state.entry(i) for i in msg.ids]
    tensors = [state.tensor(i) for i in msg.ids]
    if state.policy.strict:
        _check_unmodified(e for e in entries if e.source is not None)
    labels = lb.union(tensors)
    _check_contributors(state, labels)
    _check_cohort(state, entries, labels, "evaluate")
    weights = _weights(state, entries, bool(labels), msg.weighted)
    _consume(state, msg.ids, labels)
    first = tensors[0]
    with torch.no_grad():
        accumulator = torch.float64 if first.dtype == torch.float64 else torch.float32
        out = rules.weighted_sum(tensors, weights, dtype=accumulator).to(first.dtype)
    lb.add_labels(out, labels)
    state.objects[msg.result_id] = Entry(out, aggregate=True)
    return meta(msg.result_id, out)


def aggregate_modules(state: WorkerState, msg: m.AggregateModules, sender: Sender) -> Any:
    if len(msg.module_ids) < 1:
        raise ProtocolError("nothing to aggregate")
    spec = describe(state.module(msg.module_ids[0])[1])
    entries, states, labels = _inputs(state, msg.module_ids, spec)
    weights = _weights(state, entries, bool(labels), msg.weighted)
    _consume(state, msg.module_ids, labels)
    assert spec is not None
    with torch.no_grad():
        _install(state, msg.new_module_id, msg.new_ids, spec, labels,
                 _combined(states, lambda i: rules.weighted_sum([s[i] for s in states], weights)))
    return None


def _combined(states: list[list[torch.Tensor]], floating: Callable[[int], torch.Tensor]) -> list[torch.Tensor]:
    """The aggregate model's tensors: its ``i``-th floating tensor ``floating(i)`` (in the inputs'
    dtype), each counter (num_batches_tracked) the largest of the inputs'."""
    return [floating(i).to(like.dtype, copy=True).reshape(like.shape) if like.is_floating_point()
            else torch.stack([s[i] for s in states]).max(0).values
            for i, like in enumerate(states[0])]


def _install(state: WorkerState, module_id: int, ids: list[int], spec: dict[str, Any], labels: frozenset[Any],
             values: list[torch.Tensor]) -> None:
    """Install the aggregate model, built around ``values``."""
    clone, own = receive(spec, values)
    for t in own:
        lb.add_labels(t, labels)
    state.install_module(clone, module_id, ids, Entry(clone, aggregate=True))


def aggregate_updates(state: WorkerState, msg: m.AggregateUpdates, sender: Sender) -> Any:
    if not msg.module_ids:
        raise ProtocolError("nothing to aggregate")
    _, reference = state.module(msg.reference_id)
    base = [t for _, t in state_tensors(reference)]
    spec = describe(reference)
    entries, states, labels = _inputs(state, msg.module_ids, spec)
    assert spec is not None
    if lb.training_only(labels) and entries[0].attestation.model != state.digest(msg.reference_id):  # type: ignore[union-attr]
        raise PermissionDenied("the updates were not trained from the reference model given", rule="cohort")
    weights = _weights(state, entries, bool(labels), bool(msg.rule.get("weighted", True)))
    floating = [i for i, t in enumerate(base) if t.is_floating_point()]
    with torch.no_grad():
        flat_base = torch.cat([base[i].reshape(-1).double() for i in floating])
        updates = [torch.cat([s[i].reshape(-1).double() for i in floating]) - flat_base for s in states]
        released = rules.release(msg.rule, updates, weights)
        _consume(state, msg.module_ids, labels)
        combined = flat_base + released.aggregate
        pieces = dict(zip(floating, torch.split(combined, [base[i].numel() for i in floating]), strict=True))
        _install(state, msg.new_module_id, msg.new_ids, spec, labels, _combined(states, pieces.__getitem__))
    return released.metrics  # what the rule itself releases (a noisy count for adaptive clipping)


FLUSH_EVERY = 32
"""Models added into a sum's float32 part before it goes into the float64 sum (`SealedSum`)."""

SUM_CHUNK = 1 << 18
"""Values of a tensor that a sum adds in float64 at a time (`SealedSum`): 2 MB of float64."""


def _pieces(n: int) -> Iterable[slice]:
    return (slice(start, start + SUM_CHUNK) for start in range(0, n, SUM_CHUNK))


def _add_into(acc: torch.Tensor, other: torch.Tensor) -> None:
    """``acc += other``, `SUM_CHUNK` values at a time: torch makes a float64 copy of a float32
    operand on the CPU, here of one chunk instead of the whole tensor (the same numbers)."""
    flat, more = acc.view(-1), other.reshape(-1)
    for piece in _pieces(flat.numel()):
        flat[piece].add_(more[piece])


@dataclass(slots=True)
class SealedSum:
    """A mean of models folded in as they arrive (`FoldModule`): no request reads it; `CloseSum`
    checks what went in, as `AggregateModules` checks its inputs, and only then makes the mean.
    Each model times its weight is added into a float32 part (float64 for float64 weights), which
    goes into a float64 sum every `FLUSH_EVERY` models and at the close: the rounding of at most
    32 float32 additions per value, where adding each model into the float64 sum directly took
    2.2x the time (`benchmarks/model_transfer.py`: McMahan's CNN, 1.84 ms a fold against 0.85 ms,
    64 fresh models, the flushes included; the means differ by 2.7e-7 of the largest weight).
    With a flush every 8 models a fold took 1.06 ms, and the means differed by 8.4e-8 (one-off
    of 64 models with random weights, 8, 16, 32 and 64 models a flush: 1.06, 0.92, 0.85 and 0.80 ms).
    Models folded into one sum in the same order give the same sum, so the engine keeps one sum
    per lane, whose owners train one after the other. A float64 sum is made by its first flush: a
    lane of at most `FLUSH_EVERY` models in a round holds only its part until the close, which adds
    the part into the mean's float64 sum as a flush would have (the same numbers, one float64 copy
    of the model less per lane while the round trains: 16 lanes of 5 of McMahan's CNNs took 101 MB
    instead of 304 MB before the close, one-off). The close makes the mean `SUM_CHUNK` values at a
    time from every lane merged in (`merge`), and a flush adds its part the same way: besides the
    mean they hold at most 2 `SUM_CHUNK` float64 values, whatever the model's size, where whole
    tensors took 2P for a model of P values (the float64 sum, and the float64 copy torch makes on
    the CPU of a float32 part added to it). One-off, McMahan's CNN in 2 lanes of 5 models: the
    close took at most 10 MB besides the lanes' parts (6.3 MB of it the mean) against 25 MB, and a
    later flush 2.8-3.3 ms against 6.4-6.9 ms; `benchmarks/model_transfer.py` times the close."""

    spec: dict[str, Any]
    weighted: bool
    sums: list[torch.Tensor | None]  # per tensor: the float64 sum (None before the first flush), or for a counter (num_batches_tracked) the largest
    parts: list[torch.Tensor | None]  # per floating tensor: the models added since the last flush
    likes: list[tuple[torch.dtype, torch.Size]]  # the first model's tensors' dtypes and shapes
    total: int = 0  # the summed weights
    pending: int = 0  # models in the parts
    sources: list[str | None] = field(default_factory=list)
    labels: lb.Labels = frozenset()
    attestations: list[Attestation | None] = field(default_factory=list)
    merged: list[SealedSum] = field(default_factory=list)  # lanes whose models the mean also takes

    @classmethod
    def start(cls, spec: dict[str, Any], weighted: bool, tensors: Sequence[torch.Tensor]) -> SealedSum:
        floating = [t.is_floating_point() for t in tensors]
        return cls(spec, weighted,
                   [None if f else t.detach().clone() for t, f in zip(tensors, floating, strict=True)],
                   [torch.zeros(t.shape, dtype=torch.promote_types(t.dtype, torch.float32)) if f else None
                    for t, f in zip(tensors, floating, strict=True)],
                   [(t.dtype, t.shape) for t in tensors])

    def add(self, tensors: Sequence[torch.Tensor], weight: int) -> None:
        for acc, part, t in zip(self.sums, self.parts, tensors, strict=True):
            if part is not None:
                part.add_(t.detach(), alpha=weight)
            else:
                assert acc is not None  # a counter's largest, from the start
                torch.maximum(acc, t, out=acc)
        self.total += weight
        self.pending += 1
        if self.pending == FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        """The float32 parts into the float64 sums (the first flush makes them)."""
        if self.pending:
            for i, part in enumerate(self.parts):
                if part is not None:
                    acc = self.sums[i]
                    if acc is None:
                        self.sums[i] = part.to(torch.float64)  # exactly 0 + part in float64
                    else:
                        _add_into(acc, part)
                    part.zero_()
            self.pending = 0

    def merge(self, other: SealedSum) -> None:
        """Take ``other``'s models into this sum's mean (its numbers are read by `mean`)."""
        if other.spec != self.spec or other.weighted != self.weighted:
            raise ProtocolError("sums closed together must be of one architecture, all weighted or all unweighted")
        self.merged.append(other)
        self.total += other.total
        self.sources += other.sources
        self.labels = self.labels | other.labels
        self.attestations += other.attestations

    def mean(self) -> list[torch.Tensor]:
        """The mean of this sum's models and of every merged sum's, a chunk of each tensor at a time.
        Each value is added in the order a whole-tensor close adds it: this lane's float64 sum and
        part, then each merged lane's, then divided by the total weight."""
        lanes = [self, *self.merged]
        means = []
        for i, (dtype, shape) in enumerate(self.likes):
            if self.parts[i] is None:  # a counter: the largest
                largest = self.sums[i]
                assert largest is not None
                for lane in self.merged:
                    torch.maximum(largest, lane.sums[i], out=largest)  # type: ignore[arg-type]
                means.append(largest)
                continue
            mean = torch.empty(shape, dtype=dtype)
            flat = mean.view(-1)
            for piece in _pieces(flat.numel()):
                acc = lanes[0]._lane_sum(i, piece)
                for lane in lanes[1:]:
                    acc.add_(lane._lane_sum(i, piece))
                flat[piece].copy_(acc.div_(self.total))
            means.append(mean)
        return means

    def _lane_sum(self, i: int, piece: slice) -> torch.Tensor:
        """This lane's float64 sum of tensor ``i`` over ``piece``: its float64 sum plus its part
        (in place: the close uses a sum once), or its part where it never flushed."""
        acc, part = self.sums[i], self.parts[i]
        assert part is not None
        if acc is None:
            return part.view(-1)[piece].to(torch.float64)  # exactly 0 + part in float64
        chunk = acc.view(-1)[piece]
        return chunk.add_(part.view(-1)[piece]) if self.pending else chunk


def fold_module(state: WorkerState, msg: m.FoldModule, sender: Sender) -> Any:
    with state.sums_lock:
        entry, module = state.module(msg.module_id)
        _fold(state, msg.sum_id, msg.weighted, entry, module, "FoldModule")
        del state.objects[msg.module_id]  # each model joins one sum only
    return None


def deliver_fold(state: WorkerState, msg: m.DeliverFold, sender: Sender) -> Any:
    """A model moved here by its worker (`MoveFold`), checked as any delivery and folded at once:
    never stored, so nothing else can use it."""
    module, entry = moves.arrived(state, msg, sender)
    with state.sums_lock:
        _fold(state, msg.sum_id, msg.weighted, entry, module, "DeliverFold")
    return None


def _fold(state: WorkerState, sum_id: int, weighted: bool, entry: Entry, module: torch.nn.Module, op: str) -> None:
    spec = describe(module)
    own = [t for _, t in state_tensors(module)]
    if state.policy.strict:
        _check_unmodified([entry] if entry.source is not None else [])
    weight = (entry.samples if entry.source is not None else state.samples) if weighted else 1  # as `_weights`
    if weight <= 0:
        raise ProtocolError("a weighted mean needs every contributor's sample count; this model's worker reported none")
    sealed = _sum(state, sum_id, weighted, spec, own, op)
    if sealed.spec != spec:
        raise ProtocolError("only models of the same architecture can be aggregated")
    if sealed.weighted != weighted:
        raise ProtocolError("every model of a sum is folded weighted, or every one unweighted")
    attestation = valid_attestation(entry, module)
    with torch.no_grad():
        sealed.add(own, weight)
    sealed.sources.append(entry.source)
    sealed.labels = sealed.labels | lb.union(own)
    sealed.attestations.append(attestation)


def _sum(state: WorkerState, sum_id: int, weighted: bool, spec: Any, own: list[torch.Tensor], op: str) -> SealedSum:
    """The sum ``sum_id``: made by the first fold (and charged to the model owner's quota)."""
    if sum_id not in state.objects:
        state.admit(sum(t.numel() * (8 + torch.promote_types(t.dtype, torch.float32).itemsize)  # sum and part
                        if t.is_floating_point() else t.numel() * t.element_size() for t in own), what="the sum")
        sealed = SealedSum.start(spec, weighted, own)
        state.objects[sum_id] = Entry(sealed)
        return sealed
    return _sealed(state, sum_id, op)


def _sealed(state: WorkerState, sum_id: int, op: str) -> SealedSum:
    found = state.entry(sum_id).obj
    if not isinstance(found, SealedSum):
        raise OperationNotAllowed(f"object {sum_id:#x} on {state.id!r} is not a sum of models", op=op)
    return found


def close_sum(state: WorkerState, msg: m.CloseSum, sender: Sender) -> Any:
    with state.sums_lock:
        return _close(state, msg)


def _close(state: WorkerState, msg: m.CloseSum) -> None:
    if not msg.sum_ids or len(set(msg.sum_ids)) != len(msg.sum_ids):
        raise ProtocolError("CloseSum needs one or more distinct sums")
    sums = [_sealed(state, i, "CloseSum") for i in msg.sum_ids]
    for i in msg.sum_ids:
        del state.objects[i]  # one use, whatever the checks say
    sealed = sums[0]
    with torch.no_grad():
        for more in sums[1:]:
            sealed.merge(more)
    _check_sources(state, sealed.sources, bool(sealed.labels))
    _check_contributors(state, sealed.labels)
    _check_attested(state, sealed.attestations, sealed.labels, "fit")
    with torch.no_grad():
        _install(state, msg.new_module_id, msg.new_ids, sealed.spec, sealed.labels, sealed.mean())
    return None


def aggregate_shares(state: WorkerState, msg: m.AggregateShares, sender: Sender) -> Any:
    if not msg.ids or len(set(msg.ids)) != len(msg.ids):
        raise ProtocolError("AggregateShares needs one or more distinct share ids")
    entries = [state.entry(i) for i in msg.ids]
    tensors = [state.tensor(i) for i in msg.ids]
    # Shares delivered by Share, or the caller's own int64 values (unlabelled: free to use anyway)
    if any(t.dtype != torch.int64 or (e.share is None and lb.labels_of(t)) for e, t in zip(entries, tensors, strict=True)):
        raise OperationNotAllowed("AggregateShares sums additive shares only: those delivered by Share, or "
                                  "int64 values of the caller's own", op="AggregateShares")
    frac_bits = {e.share for e in entries if e.share is not None}
    if len(frac_bits) > 1 or len({tuple(t.shape) for t in tensors}) != 1:
        raise ProtocolError("the shares to sum must have one shape and one number of fractional bits")
    if state.policy.strict:
        shared = [e for e in entries if e.share is not None]
        sources = [e.source for e in shared]
        if len(set(sources)) != len(sources):
            raise PermissionDenied(f"a strict aggregator sums one share per owner, got sources {sources}",
                                   rule="strict-aggregator")
        _check_unmodified(shared)
    labels = lb.union(tensors)
    _check_contributors(state, labels)
    _check_cohort(state, entries, labels, "fit")
    total = tensors[0].detach().contiguous().clone()
    ring = total.numpy().view("uint64")  # addition in Z_(2^64): unsigned, wrapping by definition
    for t in tensors[1:]:
        ring += t.detach().contiguous().numpy().view("uint64")
    for i in msg.ids:  # each share joins one sum only: no differences of sums over other subsets
        del state.objects[i]
    lb.add_labels(total, labels)
    state.objects[msg.result_id] = Entry(total, aggregate=True, share=min(frac_bits, default=None),
                                         samples=sum(e.samples for e in entries))
    return meta(msg.result_id, total)


# -- what every aggregate checks ------------------------------------------------------------


def _inputs(
    state: WorkerState, module_ids: list[int], spec: dict[str, Any] | None
) -> tuple[list[Entry], list[list[torch.Tensor]], lb.Labels]:
    """The models to aggregate, each of architecture ``spec``, unmodified since they arrived
    (strict mode), with their labels' union, checked for enough contributors."""
    pairs = [state.module(i) for i in module_ids]
    if spec is None or any(describe(mod) != spec for _, mod in pairs):
        raise ProtocolError("only models of the same architecture can be aggregated")
    entries = [e for e, _ in pairs]
    states = [[t for _, t in state_tensors(mod)] for _, mod in pairs]
    if state.policy.strict:
        _check_unmodified(e for e in entries if e.source is not None)
    labels: lb.Labels = frozenset().union(*(lb.union(s) for s in states))
    _check_contributors(state, labels)
    _check_cohort(state, entries, labels, "fit")
    return entries, states, labels


def _check_unmodified(entries: Iterable[Entry]) -> None:
    """A strict aggregator aggregates values as they arrived: a change since (by a pointer op of
    the model owner's) would make the aggregate the model owner's choice."""
    if any(version(e.obj) != e.version for e in entries):
        raise PermissionDenied("an input was modified after it arrived", rule="strict-aggregator")


def _check_sources(state: WorkerState, sources: list[str | None], labelled: bool) -> None:
    """A strict aggregator combines private values only as their owners moved them here, one each."""
    if state.policy.strict and labelled:
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


def _weights(state: WorkerState, entries: list[Entry], labelled: bool, weighted: bool) -> list[float]:
    _check_sources(state, [e.source for e in entries], labelled)
    if not weighted:
        return [1.0 / len(entries)] * len(entries)
    counts = [e.samples if e.source is not None else state.samples for e in entries]
    if any(c <= 0 for c in counts):
        raise ProtocolError(
            "a weighted mean needs every contributor's sample count; a worker reports the "
            "number of rows of its private data, and some inputs come from workers without any"
        )
    return rules.normalized(counts)


def _check_contributors(state: WorkerState, labels: lb.Labels) -> None:
    if not labels:
        return
    need = max([state.policy.min_contributors, *(x.min_contributors for x in labels)])
    have = lb.owners(labels)
    if len(have) < need:
        raise PermissionDenied(
            f"an aggregate must combine at least {need} data owners, these inputs come from "
            f"{have}",
            rule="min-contributors",
        )


def _check_cohort(state: WorkerState, entries: list[Entry], labels: lb.Labels, kind: str) -> None:
    """A training-only owner's contribution counts only as attested work of the cohort: every
    input must be a worker's own ``kind`` (Fit or Evaluate) of one and the same model under one
    and the same configuration. Otherwise the model owner could choose what all but one
    contributor submit, and subtract it."""
    if lb.training_only(labels):
        _check_attested(state, [valid_attestation(e, e.obj) for e in entries], labels, kind)


def _check_attested(state: WorkerState, found: list[Attestation | None], labels: lb.Labels, kind: str) -> None:
    """`_check_cohort` on the inputs' attestations, as they were when the inputs came in."""
    if not lb.training_only(labels):
        return
    if any(a is None or a.kind != kind for a in found):
        raise unattested(state.id, "aggregated")
    if len(set(found)) != 1:
        raise PermissionDenied(
            f"the contributions to this aggregate on {state.id!r} do not come from one common round: they "
            "were trained (or evaluated) from different models or under different configurations, so one "
            "could be chosen to cancel the others. Send every worker the same model and configuration",
            rule="cohort",
        )


def _consume(state: WorkerState, ids: list[int], labels: lb.Labels) -> None:
    """A strict aggregator uses each owner's input in one aggregate only: otherwise the
    difference of two aggregates over subsets that differ by one owner is that owner's input."""
    if labels and (state.policy.strict or lb.training_only(labels)):
        for i in ids:
            state.objects.pop(i, None)
