"""Your own data from files: numpy ``.npz`` archives and CSV tables. Never pickle.

``np.load`` always runs with ``allow_pickle=False``: an archive member that is an object array
(which only pickle can restore, and restoring it can run arbitrary code) is refused with a
`DatasetError`, as is a pickle file passed in place of an archive.
"""

from __future__ import annotations

import csv
import gzip
import os
import warnings
import zipfile
from collections.abc import Callable
from typing import IO, Any

import numpy as np

from fedsecure.data.datasets import Dataset, load_arrays
from fedsecure.data.idx import PathLike
from fedsecure.errors import DatasetError, DatasetNotFound

_NPZ_LAYOUTS = "x_train, y_train (and optionally x_test, y_test), or x, y"
_SAVEZ = (
    "np.savez(path, x=inputs, y=labels) or np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)"
)


def load_npz(
    path: PathLike,
    *,
    num_classes: int | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    name: str | None = None,
) -> Dataset:
    """A `Dataset` from an archive written by ``np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)``.

    Without ``x_test``/``y_test`` (or with just ``x`` and ``y``), a stratified ``test_fraction``
    becomes the test set, as in `load_arrays`.
    """
    source = os.fspath(path)
    name = name or os.path.basename(source)
    try:
        loaded = np.load(source, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DatasetError(f"{source}: a .npy file holding one array; save x and y with {_SAVEZ}")
        with loaded as archive:
            keys = set(archive.files)
            if {"x_train", "y_train"} <= keys:
                wanted = ["x_train", "y_train"] + (
                    ["x_test", "y_test"] if {"x_test", "y_test"} <= keys else []
                )
            elif {"x", "y"} <= keys:
                wanted = ["x", "y"]
            else:
                raise DatasetError(
                    f"{source}: holds arrays {sorted(keys)}, but needs {_NPZ_LAYOUTS}; save them with {_SAVEZ}"
                )
            arrays = {key: archive[key] for key in wanted}
    except FileNotFoundError as error:
        raise DatasetNotFound(f"{source}: no such file; check the path") from error
    except DatasetError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        # np.load raises ValueError for pickled data and object arrays, OSError/BadZipFile for the rest.
        raise DatasetError(
            f"{source}: cannot be read without pickle or is not a numpy archive ({error}); "
            f"store only numeric arrays, with {_SAVEZ}"
        ) from error
    for key, values in arrays.items():
        _refuse_non_finite(f"{source}: array {key!r}", values, lambda index: f"at index {index}")
    x, y = arrays.get("x_train", arrays.get("x")), arrays.get("y_train", arrays.get("y"))
    return load_arrays(
        x,
        y,
        x_test=arrays.get("x_test"),
        y_test=arrays.get("y_test"),
        num_classes=num_classes,
        test_fraction=test_fraction,
        seed=seed,
        name=name,
    )


def load_csv(
    path: PathLike,
    *,
    label_column: str | int = "label",
    delimiter: str = ",",
    header: bool = True,
    num_classes: int | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    name: str | None = None,
) -> Dataset:
    """A `Dataset` from a CSV table (plain or ``.gz``): one row per sample, numeric feature columns.

    ``label_column`` names the label column (by header name, or by position: ``-1`` is the last).
    Labels are class indices (0, 1, 2, ...) or names; names become indices in sorted order and
    their names become ``class_names``. A stratified ``test_fraction`` becomes the test set.
    """
    source = os.fspath(path)
    name = name or os.path.basename(source)
    columns = _first_row(source, delimiter=delimiter)
    label = _label_index(columns, label_column, header=header, source=source)
    features = [i for i in range(len(columns)) if i != label]
    if not features:
        raise DatasetError(
            f"{source}: only the label column; a CSV data set needs at least one feature column"
        )
    skip = 1 if header else 0
    try:
        with warnings.catch_warnings():  # no rows: our own error below says so
            warnings.filterwarnings("ignore", message="loadtxt: input contained no data")
            x = np.loadtxt(
                source, delimiter=delimiter, skiprows=skip, usecols=features, dtype=np.float32, ndmin=2
            )
            raw_labels = np.loadtxt(
                source, delimiter=delimiter, skiprows=skip, usecols=[label], dtype=str, ndmin=1
            )
    except ValueError as error:
        raise DatasetError(
            f"{source}: {error}; every row needs {len(columns)} columns, and every column but the label "
            "column must be numeric"
        ) from error
    if len(x) == 0:
        raise DatasetError(f"{source}: no data rows; a data set needs at least one sample")
    _refuse_non_finite(source, x, lambda index: f"in row {index[0] + skip + 1}, column {features[index[1]] + 1}")
    y, class_names = _encode_labels(raw_labels)
    if class_names and num_classes is None:
        num_classes = len(class_names)
    return load_arrays(
        x,
        y,
        num_classes=num_classes,
        test_fraction=test_fraction,
        seed=seed,
        name=name,
        class_names=class_names,
    )


def _refuse_non_finite(what: str, values: np.ndarray, where: Callable[[tuple[int, ...]], str]) -> None:
    """NaN or Inf in a data set trains to NaN: refused at load, naming the first bad entry."""
    if values.dtype.kind not in "fc":
        return
    bad = ~np.isfinite(values)
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise DatasetError(
            f"{what} holds {int(bad.sum())} value(s) that are NaN or infinite, the first ({values[index]}) "
            f"{where(index)}; training on them gives NaN: fix or drop those samples"
        )


def _open_text(source: str) -> IO[str]:
    return gzip.open(source, "rt", newline="") if source.endswith(".gz") else open(source, newline="")


def _first_row(source: str, *, delimiter: str) -> list[str]:
    try:
        with _open_text(source) as stream:
            row = next(csv.reader(stream, delimiter=delimiter), None)
    except FileNotFoundError as error:
        raise DatasetNotFound(f"{source}: no such file; check the path") from error
    if not row:
        raise DatasetError(f"{source}: empty; a CSV data set needs a header row and one row per sample")
    return [cell.strip() for cell in row]


def _label_index(columns: list[str], label_column: str | int, *, header: bool, source: str) -> int:
    if isinstance(label_column, str):
        if not header:
            raise DatasetError(
                f"{source}: label_column={label_column!r} names a column, but header=False; "
                "pass the column's position instead (label_column=-1 for the last)"
            )
        if label_column not in columns:
            raise DatasetError(
                f"{source}: no column named {label_column!r} (the header has {columns}); "
                "pass label_column=NAME or label_column=POSITION"
            )
        return columns.index(label_column)
    if not -len(columns) <= label_column < len(columns):
        raise DatasetError(f"{source}: label_column={label_column}, but rows have {len(columns)} columns")
    return label_column % len(columns)


def _encode_labels(raw: np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
    """Numeric labels as they are; names as indices into their sorted set (which becomes the class names)."""
    try:
        numeric: Any = raw.astype(np.float64)
    except ValueError:
        names, indices = np.unique(np.char.strip(raw), return_inverse=True)
        return indices.astype(np.int64), tuple(str(name) for name in names)
    return numeric, ()
