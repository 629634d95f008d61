"""`Dataset`: a train/test split of one data set as torch tensors, and `load_arrays` for your own.

Every loader of this package returns a `Dataset`: inputs are float32 with one row per sample,
labels are int64 class indices in ``[0, num_classes)``. When a loader is given a single set of
samples it splits off a test set with `stratified_split`: every class keeps its share in both
halves (the same idea as scikit-learn's ``train_test_split(..., stratify=y)``, written here in
numpy so that a seed gives the same split whatever scikit-learn version is installed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedsecure.errors import DatasetError


@dataclass(frozen=True, slots=True)
class Dataset:
    """One data set, split into train and test; checked on construction."""

    name: str
    x_train: torch.Tensor  # float32, (N, ...)
    y_train: torch.Tensor  # int64, (N,)
    x_test: torch.Tensor  # float32, (M, ...), same sample shape as x_train
    y_test: torch.Tensor  # int64, (M,)
    num_classes: int
    class_names: tuple[str, ...] = ()  # empty, or one name per class

    def __post_init__(self) -> None:
        for part, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if x.dtype != torch.float32 or y.dtype != torch.int64:
                raise DatasetError(
                    f"{self.name}: {part} inputs must be float32 and labels int64, not {x.dtype} and "
                    f"{y.dtype}; use load_arrays(), which converts them"
                )
            if x.ndim < 2 or y.ndim != 1 or len(x) != len(y):
                raise DatasetError(
                    f"{self.name}: {part} inputs {tuple(x.shape)} and labels {tuple(y.shape)} do not match: "
                    "inputs need shape (N, ...) and labels shape (N,)"
                )
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise DatasetError(
                    f"{self.name}: {part} labels span [{int(y.min())}, {int(y.max())}] but num_classes is "
                    f"{self.num_classes}; labels must be class indices in [0, num_classes)"
                )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DatasetError(
                f"{self.name}: train samples have shape {tuple(self.x_train.shape[1:])} but test samples "
                f"{tuple(self.x_test.shape[1:])}; both halves need the same sample shape"
            )
        if self.class_names and len(self.class_names) != self.num_classes:
            raise DatasetError(
                f"{self.name}: {len(self.class_names)} class names for {self.num_classes} classes; "
                "give one name per class or none"
            )

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def __repr__(self) -> str:  # the default would print every tensor
        return (
            f"Dataset(name={self.name!r}, train={len(self.y_train)}, test={len(self.y_test)}, "
            f"sample_shape={self.sample_shape}, num_classes={self.num_classes})"
        )


def stratified_split(
    labels: np.ndarray, *, test_fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, test)`` with ``round(N * test_fraction)`` test samples, spread over the classes.

    Each class gives ``floor(n_c * test_fraction)`` samples to the test set, and the classes with the
    largest remainders one more each, until the total is right (largest-remainder rounding).
    """
    if not 0.0 <= test_fraction < 1.0:
        raise DatasetError(f"test_fraction must be in [0, 1), not {test_fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    if len(labels) == 0:
        return np.arange(0), np.arange(0)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    exact = counts * test_fraction
    n_test = np.floor(exact).astype(np.int64)
    missing = int(np.floor(len(labels) * test_fraction + 0.5)) - int(n_test.sum())
    n_test[np.argsort(n_test - exact, kind="stable")[:missing]] += 1
    by_class = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])
    train, test = [], []
    for members, k in zip(by_class, n_test, strict=True):
        members = rng.permutation(members)
        test.append(members[:k])
        train.append(members[k:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def load_arrays(
    x: Any,
    y: Any,
    *,
    x_test: Any = None,
    y_test: Any = None,
    num_classes: int | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    name: str = "arrays",
    class_names: Sequence[str] = (),
) -> Dataset:
    """A `Dataset` from numpy arrays or tensors: ``x`` (N, ...) numeric, ``y`` (N,) class indices.

    Without ``x_test``/``y_test``, a stratified ``test_fraction`` of the samples becomes the test set
    (``seed`` picks which). Inputs are cast to float32 as they are (no scaling); ``num_classes``
    defaults to the largest label plus one.
    """
    x_all = _inputs(x, what="x", name=name)
    if len(x_all) == 0:
        raise DatasetError(f"{name}: x holds no samples; a data set needs at least one")
    y_all = _labels(y, what="y", name=name, rows=len(x_all))
    if (x_test is None) != (y_test is None):
        raise DatasetError(f"{name}: pass both x_test and y_test, or neither to split a test set off x and y")
    if x_test is None:
        train, test = stratified_split(y_all, test_fraction=test_fraction, seed=seed)
        x_tr, y_tr, x_te, y_te = x_all[train], y_all[train], x_all[test], y_all[test]
    else:
        x_te = _inputs(x_test, what="x_test", name=name).copy()
        y_te = _labels(y_test, what="y_test", name=name, rows=len(x_te)).copy()
        x_tr, y_tr = x_all.copy(), y_all.copy()
    if num_classes is None:
        num_classes = int(max(y_tr.max(initial=-1), y_te.max(initial=-1))) + 1
    return Dataset(
        name=name,
        x_train=torch.from_numpy(x_tr),
        y_train=torch.from_numpy(y_tr),
        x_test=torch.from_numpy(x_te),
        y_test=torch.from_numpy(y_te),
        num_classes=num_classes,
        class_names=tuple(class_names),
    )


def as_numpy(value: Any, *, what: str, name: str) -> np.ndarray:
    """A numpy view of a tensor, array or nested sequence; object arrays are refused."""
    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if array.dtype.kind not in "biuf":
        raise DatasetError(
            f"{name}: {what} has dtype {array.dtype}; only numbers are accepted (object arrays would need "
            "pickle, which fedsecure never uses): convert it with np.asarray(..., dtype=np.float32)"
        )
    return array


def _inputs(value: Any, *, what: str, name: str) -> np.ndarray:
    array = as_numpy(value, what=what, name=name)
    if array.ndim < 2:
        raise DatasetError(
            f"{name}: {what} has shape {array.shape}; inputs need one row per sample, shape (N, ...) "
            "(for one feature per sample, pass x.reshape(-1, 1))"
        )
    return array.astype(np.float32, copy=False)


def _labels(value: Any, *, what: str, name: str, rows: int) -> np.ndarray:
    array = as_numpy(value, what=what, name=name)
    if array.ndim != 1:
        raise DatasetError(
            f"{name}: {what} has shape {array.shape}; labels need shape (N,), one class per sample"
        )
    if len(array) != rows:
        raise DatasetError(
            f"{name}: {rows} input rows but {len(array)} labels in {what}; they must match one to one"
        )
    if array.dtype.kind == "f" and not np.array_equal(array, np.round(array)):
        raise DatasetError(
            f"{name}: {what} holds non-integer labels; labels must be class indices 0, 1, 2, ..."
        )
    if len(array) and array.min() < 0:
        raise DatasetError(f"{name}: {what} holds negative labels; labels must be class indices 0, 1, 2, ...")
    return array.astype(np.int64, copy=False)
