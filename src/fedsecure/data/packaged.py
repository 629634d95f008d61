"""Data sets that ship with packages, so that examples and tests need no download.

- Digits: the UCI optical recognition of handwritten digits test set (Alpaydin and Kaynak, 1998),
  1797 images of 8x8 pixels with values 0-16, shipped inside scikit-learn (the file that
  ``sklearn.datasets.load_digits`` reads). The embedded default: always there.
- Fashion-MNIST: Xiao, Rasul and Vollgraf, 2017, "Fashion-MNIST: a Novel Image Dataset for
  Benchmarking Machine Learning Algorithms" (arXiv:1708.07747): 60000 + 10000 grey images of
  28x28 pixels in the IDX format of MNIST, shipped by Debian's ``dataset-fashion-mnist`` package
  as gzip-compressed files in ``/usr/share/datasets/fashion-mnist/``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import torch

from fedsecure.data.datasets import Dataset, stratified_split
from fedsecure.data.idx import PathLike, read_idx
from fedsecure.errors import DatasetError, DatasetNotFound

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


def load_digits(*, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 digits as images ``(N, 1, 8, 8)`` scaled to [0, 1], split stratified by class.

    ``seed`` picks the split; the same seed always gives the same split.
    """
    pixels, digits = _sklearn_digits()
    images = (np.asarray(pixels, dtype=np.float32) / np.float32(16.0))[:, None]
    labels = np.asarray(digits, dtype=np.int64)
    train, test = stratified_split(labels, test_fraction=test_fraction, seed=seed)
    return Dataset(
        name="digits",
        x_train=torch.from_numpy(images[train]),
        y_train=torch.from_numpy(labels[train]),
        x_test=torch.from_numpy(images[test]),
        y_test=torch.from_numpy(labels[test]),
        num_classes=10,
        class_names=tuple(str(digit) for digit in range(10)),
    )


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """The digits' images ``(1797, 8, 8)`` and classes as scikit-learn ships them: read from its file
    ``sklearn/datasets/data/digits.csv.gz`` (a row of 64 pixels, then the digit), found without
    importing scikit-learn, whose import takes most of a second;
    through ``sklearn.datasets.load_digits`` where that file is not (another layout)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise DatasetNotFound(
            "the digits data set ships with scikit-learn, which is not installed: pip install 'scikit-learn>=1.3'"
        )
    for root in spec.submodule_search_locations or ():
        shipped = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if shipped.is_file():
            table = np.loadtxt(shipped, delimiter=",")
            return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits as sklearn_digits  # noqa: PLC0415 - the slow way, as a fallback

    bunch = sklearn_digits()
    return bunch.images, bunch.target


def load_fashion_mnist(path: PathLike | None = None) -> Dataset:
    """Fashion-MNIST's own train and test sets as images ``(N, 1, 28, 28)`` scaled to [0, 1].

    ``path`` is a directory holding the four IDX files, each plain or ``.gz``; by default, where
    Debian's ``dataset-fashion-mnist`` package puts them.
    """
    folder = FASHION_MNIST_DIR if path is None else Path(os.fspath(path))
    files = {part: _find(folder, base) for part, base in FASHION_MNIST_FILES.items()}
    missing = [FASHION_MNIST_FILES[part] for part, found in files.items() if found is None]
    if missing:
        raise DatasetNotFound(_not_found_message(folder, missing, default=path is None))
    arrays = {part: read_idx(found) for part, found in files.items() if found is not None}
    x_train, y_train = _images(arrays, "train", folder), _labels(arrays, "train", folder)
    x_test, y_test = _images(arrays, "test", folder), _labels(arrays, "test", folder)
    if x_train.shape[2:] != x_test.shape[2:]:
        raise DatasetError(
            f"{folder}: train images are {tuple(x_train.shape[2:])} but test images {tuple(x_test.shape[2:])}; "
            "the four files come from different data sets"
        )
    return Dataset(
        name="fashion-mnist",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=10,
        class_names=FASHION_MNIST_CLASSES,
    )


def _find(folder: Path, base: str) -> Path | None:
    for candidate in (folder / base, folder / f"{base}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _not_found_message(folder: Path, missing: list[str], *, default: bool) -> str:
    where = f"Fashion-MNIST is not installed: {folder} lacks" if default else f"{folder} lacks"
    how = (
        "install Debian's package (apt-get install dataset-fashion-mnist, as root) or "
        "download the four files from https://github.com/zalandoresearch/fashion-mnist and pass "
        "load_fashion_mnist(path=THAT_DIRECTORY)"
    )
    if not default:
        how = f"pass the directory that holds all four files (plain or .gz), or {how}"
    return f"{where} {', '.join(name + '[.gz]' for name in missing)}; {how}"


def _images(arrays: dict[str, np.ndarray], part: str, folder: Path) -> torch.Tensor:
    images = arrays[f"x_{part}"]
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DatasetError(
            f"{folder}: {FASHION_MNIST_FILES[f'x_{part}']} holds {images.dtype} of shape {images.shape}, "
            "not uint8 images (N, height, width); the file is not an image file of Fashion-MNIST"
        )
    if len(images) != len(arrays[f"y_{part}"]):
        raise DatasetError(
            f"{folder}: {len(images)} {part} images but {len(arrays[f'y_{part}'])} labels; "
            "the image and label files do not belong together: reinstall them"
        )
    return torch.from_numpy(images).unsqueeze(1).to(torch.float32).div_(255.0)


def _labels(arrays: dict[str, np.ndarray], part: str, folder: Path) -> torch.Tensor:
    labels = arrays[f"y_{part}"]
    if labels.dtype != np.uint8 or labels.ndim != 1 or (len(labels) and labels.max() > 9):
        raise DatasetError(
            f"{folder}: {FASHION_MNIST_FILES[f'y_{part}']} holds {labels.dtype} of shape {labels.shape}"
            f"{f' up to {labels.max()}' if labels.size else ''}, not uint8 class indices 0-9; "
            "the file is not a label file of Fashion-MNIST"
        )
    return torch.from_numpy(labels.astype(np.int64))
