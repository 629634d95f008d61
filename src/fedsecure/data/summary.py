"""What a partition gave each worker: per-class counts as a table, as JSON-ready records, and one skew number.

The skew number is the mean, over workers, of the total variation distance between the worker's
label distribution and that of all the samples the workers hold together: 0 when every worker has
the global mix, approaching 1 when each holds classes that are rare overall.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fedsecure.data.partition import as_labels
from fedsecure.errors import PartitionError


def partition_counts(labels: Any, parts: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """An int64 array ``(num_workers, num_classes)``: how many samples of each class each worker holds."""
    y = as_labels(labels)
    if len(y) and int(y.max()) >= num_classes:
        raise PartitionError(
            f"labels go up to {int(y.max())} but num_classes is {num_classes}; pass num_classes"
        )
    counts = np.zeros((len(parts), num_classes), dtype=np.int64)
    for worker, part in enumerate(parts):
        index = np.asarray(part)
        if index.ndim != 1 or (index.size and index.dtype.kind not in "iu"):
            raise PartitionError(f"part {worker} is not a 1-D array of sample indices")
        if index.size and (index.min() < 0 or index.max() >= len(y)):
            raise PartitionError(
                f"part {worker} holds indices outside 0..{len(y) - 1}; pass the labels it indexes"
            )
        counts[worker] = np.bincount(y[index], minlength=num_classes)
    return counts


def partition_records(labels: Any, parts: Sequence[np.ndarray], num_classes: int) -> list[dict[str, Any]]:
    """One plain dict per worker (``worker``, ``samples``, ``classes`` held, per-class ``counts``), for JSON."""
    counts = partition_counts(labels, parts, num_classes)
    return [
        {
            "worker": worker,
            "samples": int(row.sum()),
            "classes": int(np.count_nonzero(row)),
            "counts": [int(c) for c in row],
        }
        for worker, row in enumerate(counts)
    ]


def label_skew(labels: Any, parts: Sequence[np.ndarray], num_classes: int) -> float:
    """Mean total variation distance between each worker's label distribution and the overall one."""
    return _skew(partition_counts(labels, parts, num_classes))


def _skew(counts: np.ndarray) -> float:
    counts = counts.astype(np.float64)
    sizes = counts.sum(axis=1, keepdims=True)
    if not len(counts) or not sizes.all():
        raise PartitionError("label skew needs at least one worker, each with at least one sample")
    overall = counts.sum(axis=0) / counts.sum()
    return float((0.5 * np.abs(counts / sizes - overall).sum(axis=1)).mean())


def partition_summary(labels: Any, parts: Sequence[np.ndarray], num_classes: int, *, rows: int | None = None) -> str:
    """A readable table: one row per worker with its sample count and per-class counts, then totals,
    the workers' sizes and the label skew. ``rows``: show at most that many workers (the first
    ones) and say how many are not shown; `partition_csv` has every row."""
    counts = partition_counts(labels, parts, num_classes)
    total = counts.sum(axis=0)
    shown = counts if rows is None else counts[:max(rows, 0)]
    lines = [_cells(str(worker), row) for worker, row in enumerate(shown)] + [_cells("total", total)]
    header = ["worker", "samples", "classes"] + [str(c) for c in range(num_classes)]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        left = "  ".join(cell.rjust(width) for cell, width in zip(cells[:3], widths[:3], strict=True))
        right = " ".join(cell.rjust(width) for cell, width in zip(cells[3:], widths[3:], strict=True))
        return f"{left} | {right}"

    text = [line(header), "-" * len(line(header)), *(line(row) for row in lines[:-1])]
    if len(shown) < len(counts):
        text.append(f"... {len(counts) - len(shown)} more workers")
    text += ["-" * len(line(header)), line(lines[-1]), _coverage(len(as_labels(labels)), parts)]
    if len(counts):
        sizes = counts.sum(axis=1)
        text.append(f"samples per worker: min {int(sizes.min())}, median {float(np.median(sizes)):g}, "
                    f"mean {float(sizes.mean()):.1f}, max {int(sizes.max())}")
        if sizes.all():
            text.append(f"label skew (mean total variation to the overall mix): {_skew(counts):.3f}")
    return "\n".join(text)


def partition_csv(labels: Any, parts: Sequence[np.ndarray], num_classes: int) -> str:
    """Every worker's row of `partition_summary` as CSV: worker, samples, classes, then one count per class."""
    counts = partition_counts(labels, parts, num_classes)
    header = ",".join(["worker", "samples", "classes", *(f"class_{c}" for c in range(num_classes))])
    return "\n".join([header, *(",".join(_cells(str(worker), row)) for worker, row in enumerate(counts))]) + "\n"


def _cells(first: str, row: np.ndarray) -> list[str]:
    return [first, str(int(row.sum())), str(int(np.count_nonzero(row)))] + [str(int(c)) for c in row]


def _coverage(n: int, parts: Sequence[np.ndarray]) -> str:
    everything = np.concatenate([np.asarray(part, dtype=np.int64) for part in parts] or [np.arange(0)])
    held = np.bincount(everything, minlength=n)
    missing, repeated = int(np.count_nonzero(held == 0)), int(np.count_nonzero(held > 1))
    if not missing and not repeated:
        return f"every one of the {n} samples is held by exactly one worker"
    return f"{missing} of {n} samples held by no worker, {repeated} by more than one"
