"""Provenance labels and the release policy: what may leave a worker, and where to.

Every tensor a worker holds may carry a *cell*: the set of labels of the data
owners whose private data it derives from. A label is a sticky policy: it names
the owner and carries that owner's own rules (which aggregators it trusts, how
large a metric may leave, how many owners an aggregate must combine), so the
rules travel with the data to whichever worker holds it.

Cells form a union-find forest: tensors that share storage (views, ``.data``,
``detach``) share one cell, so writing private data through one alias labels
every alias. Labels only ever grow.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from fedsecure.errors import PermissionDenied, ProtocolError

_CELL = "_fedsecure_cell"


@dataclass(frozen=True, slots=True)
class Label:
    """One data owner's sticky policy, attached to everything derived from its data."""

    owner: str
    trusted: frozenset[str] | None  # aggregators the owner trusts; None: any worker
    max_metric_numel: int  # largest value that may leave as a metric; 0: none
    min_contributors: int  # distinct owners an aggregate must combine to leave
    # Only attested training may touch the data: no pointer ops on it anywhere, and a contribution
    # counts toward an aggregate only as a `Fit` (or `Evaluate`) of the cohort's common model.
    training_only: bool = False

    def to_wire(self) -> list[Any]:
        trusted = None if self.trusted is None else sorted(self.trusted)
        return [self.owner, trusted, self.max_metric_numel, self.min_contributors, self.training_only]

    @classmethod
    def from_wire(cls, raw: Any) -> Label:
        if (
            not isinstance(raw, list)
            or len(raw) != 5
            or not isinstance(raw[0], str)
            or not (raw[1] is None or (isinstance(raw[1], list) and all(isinstance(x, str) for x in raw[1])))
            or type(raw[2]) is not int
            or type(raw[3]) is not int
            or type(raw[4]) is not bool
        ):
            raise ProtocolError(f"malformed label {raw!r}")
        trusted = None if raw[1] is None else frozenset(raw[1])
        return cls(raw[0], trusted, raw[2], raw[3], raw[4])


Labels = frozenset[Label]
NO_LABELS: Labels = frozenset()


def labels_to_wire(labels: Labels) -> list[Any]:
    return [label.to_wire() for label in sorted(labels, key=lambda x: x.owner)]


def labels_from_wire(raw: Any) -> Labels:
    if not isinstance(raw, list):
        raise ProtocolError("labels must be a list")
    return frozenset(Label.from_wire(x) for x in raw)


def owners(labels: Labels) -> list[str]:
    return sorted({label.owner for label in labels})


class Cell:
    """A union-find node; the root holds the labels of every tensor in its set."""

    __slots__ = ("parent", "labels")

    def __init__(self, labels: Labels = NO_LABELS) -> None:
        self.parent: Cell | None = None
        self.labels = labels

    def root(self) -> Cell:
        cell = self
        while cell.parent is not None:
            cell = cell.parent
        if cell is not self:  # path compression keeps later lookups O(1)
            node = self
            while node.parent is not None and node.parent is not cell:
                node.parent, node = cell, node.parent
        return cell


def labels_of(obj: Any) -> Labels:
    cell = getattr(obj, _CELL, None)
    return NO_LABELS if cell is None else cell.root().labels


def _cell(t: torch.Tensor) -> Cell:
    cell = getattr(t, _CELL, None)
    if cell is None:
        cell = Cell()
        setattr(t, _CELL, cell)
    return cell.root()


def add_labels(t: torch.Tensor, labels: Labels) -> None:
    """Label ``t`` (and every alias sharing its cell) with ``labels`` as well."""
    if labels:
        root = _cell(t)
        if not labels <= root.labels:
            root.labels = root.labels | labels


def share_cell(alias: torch.Tensor, source: torch.Tensor) -> None:
    """``alias`` shares storage with ``source``: from now on they share labels."""
    src = _cell(source)
    existing = getattr(alias, _CELL, None)
    if existing is None:
        setattr(alias, _CELL, src)
    else:
        merge(alias, source)


def merge(a: torch.Tensor, b: torch.Tensor) -> None:
    ra, rb = _cell(a), _cell(b)
    if ra is not rb:
        rb.parent = ra
        ra.labels = ra.labels | rb.labels


def cells(tensors: Iterable[torch.Tensor]) -> list[Cell]:
    """The cells of ``tensors`` (created if missing), to read their labels later."""
    out = []
    for t in tensors:
        cell = getattr(t, _CELL, None)
        if cell is None:
            cell = Cell()
            setattr(t, _CELL, cell)
        out.append(cell)
    return out


def union_cells(items: Iterable[Cell]) -> Labels:
    out: Labels = NO_LABELS
    for cell in items:
        labels = cell.root().labels
        if labels:
            out = out | labels
    return out


@functools.lru_cache(maxsize=1024)
def training_only(labels: Labels) -> bool:
    """Whether an owner of ``labels`` allows only training on its data (cached: runs on every op)."""
    return any(label.training_only for label in labels)


def union(items: Iterable[Any]) -> Labels:
    out: Labels = NO_LABELS
    for item in items:
        cell = getattr(item, _CELL, None)
        if cell is not None:
            labels = cell.root().labels
            if labels:
                out = out | labels
    return out


@dataclass(frozen=True, slots=True)
class Policy:
    """A worker's rules, as its data owner sets them.

    ``trusted_aggregators``: workers that may receive values derived from this
    worker's private data (None: every worker, the in-process default).
    ``max_metric_numel``: a labelled value with at most this many elements may
    leave as a metric (1, the default, admits 0-dimensional scalars such as a loss;
    0 switches metrics off). Each metric reveals one number about the data: see
    docs/privacy.md for what that allows.
    ``min_contributors``: an aggregate leaves only if it combines the private data
    of at least this many distinct owners.
    ``strict``: as an aggregator, run no op on labelled values and release only
    the result of the fixed aggregation functions (`Aggregate`).
    ``private_sends``: accept data that a client sends as this owner's own
    (``send(w, private=True)``), a way to simulate data owners in one process. A
    worker in its own process refuses it: only its owner loads its private data.
    ``dp_sgd_budget``: ``(epsilon, delta)``; the worker then trains only with local DP-SGD, and
    refuses a round whose steps would bring the epsilon spent on its data, composed over every
    model owner it trained for, above ``epsilon`` at ``delta`` (see docs/privacy_dp_robust.md).
    ``training_only``: the deployment policy of a served worker with private data (the default of
    ``fedsecure worker serve``). The model owner may put models, train them with `Fit`, evaluate
    them with `Evaluate`, move the results to trusted aggregators and take part in secure
    aggregation, but runs no pointer op on anything derived from the data, here or on any other
    worker (the rule travels with the label); and the owner's contribution counts toward an
    aggregate only as attested training of the cohort's common model under its common
    configuration (see docs/privacy.md).
    """

    trusted_aggregators: frozenset[str] | None = None
    max_metric_numel: int = 1
    min_contributors: int = 2
    strict: bool = False
    private_sends: bool = True
    dp_sgd_budget: tuple[float, float] | None = None
    training_only: bool = False

    def __post_init__(self) -> None:
        if self.trusted_aggregators is not None and not isinstance(self.trusted_aggregators, frozenset):
            object.__setattr__(self, "trusted_aggregators", frozenset(self.trusted_aggregators))
        if self.max_metric_numel < 0:
            raise ValueError("max_metric_numel must be >= 0 (0 switches metric release off)")
        if self.min_contributors < 2:
            raise ValueError(
                "min_contributors must be >= 2: an 'aggregate' of one owner is that owner's data"
            )
        if self.dp_sgd_budget is not None:
            budget = self.dp_sgd_budget
            if not (
                isinstance(budget, tuple | list) and len(budget) == 2
                and all(isinstance(v, int | float) and not isinstance(v, bool) for v in budget)
                and 0 < budget[0] < math.inf and 0 < budget[1] < 1
            ):
                raise ValueError(f"dp_sgd_budget must be (epsilon > 0, delta in (0, 1)), got {budget!r}")
            object.__setattr__(self, "dp_sgd_budget", (float(budget[0]), float(budget[1])))

    def label_for(self, owner: str) -> Label:
        return Label(owner, self.trusted_aggregators, self.max_metric_numel, self.min_contributors,
                     self.training_only)


def is_metric(numel: int, scalar: bool, limit: int) -> bool:
    """A metric is a scalar (a loss, an accuracy) or, if the owner allows, a small tensor.

    With the default limit of 1 only 0-dimensional values count: a model's bias of
    shape (1,) is a weight, not a metric.
    """
    return numel <= limit and (scalar or limit > 1)


def check_release(
    labels: Labels,
    numel: int,
    *,
    scalar: bool,
    holder: str,
    policy: Policy,
    aggregate: bool,
    what: str,
) -> None:
    """Raise `PermissionDenied` unless a value with ``labels`` may leave ``holder``.

    ``scalar``: the value is 0-dimensional (a Python number or a 0-dim tensor).
    """
    if not labels:
        return
    names = owners(labels)
    limit = min(label.max_metric_numel for label in labels)
    if is_metric(numel, scalar, limit):
        return
    if policy.strict:
        if aggregate:
            return
        raise PermissionDenied(
            f"{what} on {holder!r} derives from private data of {names}; {holder!r} is a strict "
            "aggregator and releases only the results of its own aggregation "
            f"({holder}.aggregate([...]))",
            rule="strict-aggregator",
        )
    need = max(label.min_contributors for label in labels)
    if len(names) >= need:
        return
    rule = "private-data" if len(names) == 1 else "min-contributors"
    raise PermissionDenied(
        f"{what} on {holder!r} ({numel} elements) derives from private data of {names} and may "
        f"not leave: only aggregates combining at least {need} data owners, or metrics of at most "
        f"{limit} element(s) (0-dimensional if 1), are released. Move it to an aggregator the owner trusts and "
        "combine it with other owners' values there.",
        rule=rule,
    )


def check_destination(labels: Labels, destination: str, *, holder: str, what: str) -> None:
    """Raise `PermissionDenied` unless every owner in ``labels`` trusts ``destination``."""
    refusing = sorted(
        label.owner
        for label in labels
        if label.trusted is not None
        and destination not in label.trusted
        and destination != label.owner
    )
    if refusing:
        raise PermissionDenied(
            f"{what} on {holder!r} derives from private data of {refusing}, who do not trust "
            f"{destination!r} as an aggregator; it may move only to workers they trust "
            "(Policy.trusted_aggregators)",
            rule="untrusted-destination",
        )
