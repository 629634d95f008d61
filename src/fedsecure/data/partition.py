"""Partitioners: which training samples each worker holds, IID or skewed.

Each returns one sorted int64 index array per worker; together they hold every index ``0..N-1``
exactly once, and every worker holds at least one sample. The same arguments and ``seed`` give the
same partition (numpy's ``default_rng``). The skewed schemes follow NIID-Bench (Li, Diao, Chen and
He, 2022, "Federated Learning on Non-IID Data Silos: An Experimental Study", ICDE; their
``partition_data``):

- `dirichlet` (label skew, "p_k ~ Dir(beta)"): each class is spread over the workers in
  proportions drawn from a symmetric Dirichlet(alpha); small alpha gives each worker few classes,
  large alpha approaches IID. Redrawn until every worker holds ``min_size`` samples.
- `shards` (label skew, "#C=k"): every worker holds exactly ``classes_per_worker`` classes, and the
  samples of a class are split evenly among the workers that hold it. The pathological non-IID
  setting of McMahan et al., 2017, "Communication-Efficient Learning of Deep Networks from
  Decentralized Data" (AISTATS), gives each client two shards of label-sorted data, i.e. at most
  two classes; #C=2 makes that exactly two.
- `quantity_skew` ("q ~ Dir(beta)"): IID labels, but worker sizes drawn from Dirichlet(alpha).
  With ``floor=True`` every worker first gets ``min_size`` samples and only the rest is split in
  Dirichlet proportions, in one draw: the form for thousands of workers (cross-device), where a
  redraw would practically never leave every worker ``min_size`` samples.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from fedsecure.errors import PartitionError

MAX_TRIES = 1000


def iid(n: int, num_workers: int, *, seed: int = 0) -> list[np.ndarray]:
    """A random split of ``range(n)`` into ``num_workers`` parts whose sizes differ by at most one."""
    _check_workers(_check_count(n), num_workers)
    rng = np.random.default_rng(seed)
    return [np.sort(part) for part in np.array_split(rng.permutation(n), num_workers)]


def dirichlet(
    labels: Any,
    num_workers: int,
    *,
    alpha: float,
    seed: int = 0,
    min_size: int = 10,
    max_tries: int = MAX_TRIES,
) -> list[np.ndarray]:
    """Label skew: each class spread over the workers by Dirichlet(alpha) proportions (NIID-Bench).

    As in NIID-Bench, a worker that already holds ``N / num_workers`` samples receives no share of
    the classes drawn after that, which keeps the sizes from running away, and the whole draw is
    repeated until every worker holds at least ``min_size`` samples (at most ``max_tries`` times).
    """
    y = as_labels(labels)
    _check_workers(len(y), num_workers, min_size=min_size)
    _check_alpha(alpha)
    rng = np.random.default_rng(seed)
    fair_share = len(y) / num_workers
    by_class = [np.flatnonzero(y == k) for k in np.unique(y)]
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_workers)]
        sizes = np.zeros(num_workers, dtype=np.int64)
        for members in by_class:
            open_ = sizes < fair_share  # never all False: the sizes sum to less than N here
            weights = rng.dirichlet(np.full(num_workers, float(alpha))) * open_
            # A tiny alpha can underflow every open worker's weight to 0: then share equally among them.
            weights = weights / weights.sum() if weights.sum() > 0 else open_ / open_.sum()
            cuts = (np.cumsum(weights) * len(members)).astype(np.int64)[:-1]
            for part, chunk in zip(parts, np.split(rng.permutation(members), cuts), strict=True):
                part.append(chunk)
            sizes += np.diff(cuts, prepend=0, append=len(members))
        if sizes.min() >= min_size:
            return [np.sort(np.concatenate(part)) for part in parts]
    raise PartitionError(
        f"dirichlet(alpha={alpha}) left some of {num_workers} workers with fewer than min_size={min_size} "
        f"samples in {max_tries} draws; raise alpha, lower min_size or num_workers, or raise max_tries"
    )


def shards(labels: Any, num_workers: int, *, classes_per_worker: int, seed: int = 0) -> list[np.ndarray]:
    """Pathological label skew: every worker holds exactly ``classes_per_worker`` classes (NIID-Bench #C=k).

    Every class goes to at least one worker (so no sample is dropped, unlike NIID-Bench's own code,
    which can leave a class to nobody); the remaining picks are random. A class's samples are split
    evenly among the workers that hold it.
    """
    y = as_labels(labels)
    _check_workers(len(y), num_workers)
    classes, counts = np.unique(y, return_counts=True)
    k = len(classes)
    if not isinstance(classes_per_worker, int | np.integer) or not 1 <= classes_per_worker <= k:
        raise PartitionError(
            f"classes_per_worker={classes_per_worker!r}, but the labels hold {k} classes; "
            f"pick an integer from 1 to {k}"
        )
    if num_workers * classes_per_worker < k:
        raise PartitionError(
            f"{num_workers} workers with {classes_per_worker} classes each cannot hold all {k} classes; "
            f"use at least {math.ceil(k / classes_per_worker)} workers or classes_per_worker="
            f"{math.ceil(k / num_workers)}"
        )
    rng = np.random.default_rng(seed)
    held = np.zeros((num_workers, k), dtype=bool)
    # Deal the classes round-robin in a random order first, so every class has a holder; worker w
    # gets at most ceil(k / num_workers) <= classes_per_worker of them, all distinct.
    held[np.arange(k) % num_workers, rng.permutation(k)] = True
    for worker in range(num_workers):
        need = classes_per_worker - int(held[worker].sum())
        held[worker, rng.choice(np.flatnonzero(~held[worker]), size=need, replace=False)] = True
    holders = held.sum(axis=0)
    short = np.flatnonzero(counts < holders)
    if len(short):
        first = short[0]
        raise PartitionError(
            f"class {classes[first]} has {counts[first]} samples but {holders[first]} workers hold it, "
            "so some would get none; lower num_workers or classes_per_worker, or try another seed"
        )
    parts: list[list[np.ndarray]] = [[] for _ in range(num_workers)]
    for c, label in enumerate(classes):
        members = rng.permutation(np.flatnonzero(y == label))
        shares = np.array_split(members, holders[c])
        for holder, chunk in zip(np.flatnonzero(held[:, c]), shares, strict=True):
            parts[holder].append(chunk)
    return [np.sort(np.concatenate(part)) for part in parts]


def quantity_skew(
    n: int, num_workers: int, *, alpha: float, seed: int = 0, min_size: int = 10, max_tries: int = MAX_TRIES,
    floor: bool = False,
) -> list[np.ndarray]:
    """Quantity skew: a random split of ``range(n)`` with worker sizes in Dirichlet(alpha) proportions.

    Redrawn until every worker holds at least ``min_size`` samples (at most ``max_tries`` times),
    as NIID-Bench does. With ``floor``, worker ``i`` holds samples ``i * min_size`` to
    ``(i + 1) * min_size - 1`` of one random order, and the remaining ``n - num_workers * min_size``
    are split in Dirichlet(alpha) proportions: one draw, whatever the number of workers. (With
    10,000 workers, alpha 0.5 and 60,000 samples, a Dirichlet split leaves about a fifth of the
    workers without a single sample, so redrawing for ``min_size=1`` does not end.)
    """
    _check_workers(_check_count(n), num_workers, min_size=min_size)
    _check_alpha(alpha)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    if floor:
        rest = n - num_workers * min_size
        cuts = (np.cumsum(rng.dirichlet(np.full(num_workers, float(alpha)))) * rest).astype(np.int64)[:-1]
        firsts = order[: num_workers * min_size].reshape(num_workers, min_size)
        return [np.sort(np.concatenate([first, part]))
                for first, part in zip(firsts, np.split(order[num_workers * min_size:], cuts), strict=True)]
    for _ in range(max_tries):
        cuts = (np.cumsum(rng.dirichlet(np.full(num_workers, float(alpha)))) * n).astype(np.int64)[:-1]
        if np.diff(cuts, prepend=0, append=n).min() >= min_size:
            return [np.sort(part) for part in np.split(order, cuts)]
    raise PartitionError(
        f"quantity_skew(alpha={alpha}) left some of {num_workers} workers with fewer than "
        f"min_size={min_size} samples in {max_tries} draws; raise alpha, lower min_size or num_workers, or give "
        "every worker min_size samples first (floor=True)"
    )


def as_labels(labels: Any) -> np.ndarray:
    """Labels as a 1-D int64 numpy array of class indices (from a tensor, array or sequence)."""
    array = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise PartitionError(
            f"labels must be a 1-D array of integer class indices, not {array.dtype} of shape {array.shape}; "
            "pass dataset.y_train"
        )
    if len(array) and array.min() < 0:
        raise PartitionError("labels must be class indices 0, 1, 2, ..., but some are negative")
    return array.astype(np.int64, copy=False)


def _check_count(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise PartitionError(f"n must be a positive number of samples, not {n!r}; pass len(dataset.y_train)")
    return int(n)


def _check_workers(n: int, num_workers: int, *, min_size: int = 1) -> None:
    if isinstance(num_workers, bool) or not isinstance(num_workers, int | np.integer) or num_workers < 1:
        raise PartitionError(f"num_workers must be a positive integer, not {num_workers!r}")
    if isinstance(min_size, bool) or not isinstance(min_size, int | np.integer) or min_size < 1:
        raise PartitionError(f"min_size must be a positive integer, not {min_size!r}")
    if num_workers * min_size > n:
        raise PartitionError(
            f"{n} samples cannot give {num_workers} workers at least {min_size} each; "
            "lower num_workers (or min_size), or use more data"
        )


def _check_alpha(alpha: float) -> None:
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, int | float | np.floating)
        or not 0 < alpha < math.inf
    ):
        raise PartitionError(
            f"alpha must be a positive finite number, not {alpha!r}; "
            "small (0.1) gives strong skew, large (100) nearly IID"
        )
