"""One call from a `Dataset` to each worker's training data: `partition` by scheme name, then `federate`.

The test set stays whole: it is the model owner's, for evaluating the global model.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch

from fedsecure.data.datasets import Dataset
from fedsecure.data.partition import as_labels, dirichlet, iid, quantity_skew, shards
from fedsecure.errors import PartitionError

Scheme = Literal["iid", "dirichlet", "shards", "quantity"]
# Per scheme: the options it requires, and those it accepts besides.
_OPTIONS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "iid": (frozenset(), frozenset()),
    "dirichlet": (frozenset({"alpha"}), frozenset({"min_size", "max_tries"})),
    "shards": (frozenset({"classes_per_worker"}), frozenset()),
    "quantity": (frozenset({"alpha"}), frozenset({"min_size", "max_tries", "floor"})),
}
_EXAMPLES = {"alpha": "alpha=0.5", "classes_per_worker": "classes_per_worker=2"}


def partition(
    labels: Any, num_workers: int, *, scheme: Scheme = "iid", seed: int = 0, **options: Any
) -> list[np.ndarray]:
    """The index arrays of `iid`, `dirichlet`, `shards` or `quantity_skew`, chosen by ``scheme``.

    ``options`` are the chosen partitioner's own: ``alpha`` (and ``min_size``, ``max_tries``) for
    "dirichlet" and "quantity", ``floor`` for "quantity", ``classes_per_worker`` for "shards".
    """
    if scheme not in _OPTIONS:
        raise PartitionError(f"unknown scheme {scheme!r}; choose one of {', '.join(map(repr, _OPTIONS))}")
    required, optional = _OPTIONS[scheme]
    unknown = set(options) - required - optional
    if unknown:
        accepted = ", ".join(sorted(required | optional)) or "no options"
        raise PartitionError(f"scheme {scheme!r} takes {accepted}, not {', '.join(sorted(unknown))}")
    absent = sorted(required - set(options))
    if absent:
        raise PartitionError(
            f"scheme {scheme!r} needs {', '.join(_EXAMPLES[o] for o in absent)} (for example)"
        )
    y = as_labels(labels)
    if scheme == "iid":
        return iid(len(y), num_workers, seed=seed)
    if scheme == "dirichlet":
        return dirichlet(y, num_workers, seed=seed, **options)
    if scheme == "shards":
        return shards(y, num_workers, seed=seed, **options)
    return quantity_skew(len(y), num_workers, seed=seed, **options)


def federate(
    dataset: Dataset, num_workers: int, *, scheme: Scheme = "iid", seed: int = 0, **options: Any
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each worker's ``(x, y)`` share of ``dataset``'s training set, partitioned by ``scheme``.

    ``federate(load_digits(), 4, scheme="dirichlet", alpha=0.3)``; see `partition` for the options.
    The tensors are copies, one pair per worker, in worker order.
    """
    parts = partition(dataset.y_train, num_workers, scheme=scheme, seed=seed, **options)
    shares = []
    for part in parts:
        index = torch.from_numpy(part)
        shares.append((dataset.x_train[index], dataset.y_train[index]))
    return shares
