"""fedsecure.data: packaged data sets, the IDX reader, user files, partitioners and their summaries."""

from __future__ import annotations

import dataclasses
import gzip
import json
import pickle
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsecure.data import (
    FASHION_MNIST_DIR,
    Dataset,
    DatasetError,
    DatasetNotFound,
    PartitionError,
    dirichlet,
    federate,
    iid,
    label_skew,
    load_arrays,
    load_csv,
    load_digits,
    load_fashion_mnist,
    load_npz,
    partition,
    partition_counts,
    partition_csv,
    partition_records,
    partition_summary,
    quantity_skew,
    read_idx,
    shards,
    stratified_split,
    write_idx,
)
from fedsecure.data.idx import parse_idx
from fedsecure.data.packaged import FASHION_MNIST_FILES


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_digits()


# --- digits ------------------------------------------------------------------------------------


def test_digits_shapes_dtypes_and_range(digits: Dataset) -> None:
    assert digits.x_train.shape == (1438, 1, 8, 8) and digits.x_test.shape == (359, 1, 8, 8)
    assert digits.x_train.dtype == torch.float32 and digits.y_train.dtype == torch.int64
    assert digits.num_classes == 10 and digits.class_names == tuple("0123456789")
    both = torch.cat([digits.x_train, digits.x_test])
    assert both.min() == 0.0 and both.max() == 1.0
    assert "train=1438" in repr(digits) and "tensor" not in repr(digits)


def test_digits_split_is_stratified(digits: Dataset) -> None:
    train, test = digits.y_train.bincount(minlength=10), digits.y_test.bincount(minlength=10)
    total = (train + test).numpy()
    assert total.sum() == 1797 and total.tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    share = test.numpy()
    assert np.all(share >= np.floor(total * 0.2)) and np.all(share <= np.ceil(total * 0.2))


def test_digits_split_is_reproducible_and_seeded(digits: Dataset) -> None:
    again, other = load_digits(seed=0), load_digits(seed=1)
    assert torch.equal(again.x_train, digits.x_train) and torch.equal(again.y_test, digits.y_test)
    assert not torch.equal(other.y_train, digits.y_train)
    assert load_digits(test_fraction=0.5).x_test.shape[0] == 899  # 1797 / 2, rounded half up


def test_digits_are_scikit_learns_read_without_importing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The file scikit-learn ships is read directly (its import takes most of a second); where it is
    not found, scikit-learn's own loader gives the same arrays; without scikit-learn, the error says
    what to install."""
    import importlib.util
    import subprocess
    import sys

    from sklearn.datasets import load_digits as sklearn_digits

    from fedsecure.data import packaged

    images, targets = packaged._sklearn_digits()
    bunch = sklearn_digits()
    assert np.array_equal(images, bunch.images) and np.array_equal(targets, bunch.target)
    code = "import sys; from fedsecure.data import load_digits; load_digits(); print('sklearn' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"

    elsewhere = importlib.util.spec_from_loader("sklearn", loader=None, is_package=True)
    assert elsewhere is not None and elsewhere.submodule_search_locations is not None
    elsewhere.submodule_search_locations.append("/nonexistent")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: elsewhere)
    images, targets = packaged._sklearn_digits()  # the fallback: scikit-learn's loader
    assert np.array_equal(images, bunch.images) and np.array_equal(targets, bunch.target)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DatasetNotFound, match=r"pip install 'scikit-learn"):
        load_digits()


def test_stratified_split_covers_every_index_once() -> None:
    labels = np.repeat(np.arange(3), [10, 7, 3])
    train, test = stratified_split(labels, test_fraction=0.3, seed=4)
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(20))
    assert len(test) == 6 and np.bincount(labels[test], minlength=3).tolist() == [3, 2, 1]
    none_held_out = stratified_split(labels, test_fraction=0.0)[1]
    assert len(none_held_out) == 0
    with pytest.raises(DatasetError, match="test_fraction"):
        stratified_split(labels, test_fraction=1.0)


# --- IDX ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("name", ["a-idx3-ubyte", "a-idx3-ubyte.gz"])
def test_idx_round_trip(tmp_path: Path, dtype: type[np.generic], name: str) -> None:
    values = np.random.default_rng(0).integers(0, 120, size=(5, 3, 4)) - (0 if dtype == np.uint8 else 60)
    array: np.ndarray = (values / 7 if np.issubdtype(dtype, np.floating) else values).astype(dtype)
    write_idx(tmp_path / name, array)
    back = read_idx(tmp_path / name)
    assert back.dtype == np.dtype(dtype) and back.dtype.isnative and back.flags.writeable
    assert np.array_equal(back, array)
    assert (tmp_path / name).read_bytes()[:2] == (b"\x1f\x8b" if name.endswith(".gz") else b"\x00\x00")


def test_idx_reads_big_endian_bytes_written_by_hand() -> None:
    data = bytes([0, 0, 0x0B, 2]) + struct.pack(">II", 2, 2) + bytes([1, 2, 0xFF, 0xFE, 0, 7, 0x80, 0])
    assert parse_idx(data).tolist() == [[258, -2], [7, -32768]]


def _header(code: int, *shape: int) -> bytes:
    return struct.pack(f">HBB{len(shape)}I", 0, code, len(shape), *shape)


GOOD = _header(0x08, 2, 3) + bytes(range(6))
CORRUPT: dict[str, tuple[bytes, str]] = {
    "empty": (b"", "truncated"),
    "half a header": (GOOD[:9], "truncated"),
    "truncated data": (GOOD[:-1], "truncated"),
    "trailing bytes": (GOOD + b"\x00", "bytes follow"),
    "bad magic": (b"\x01\x02" + GOOD[2:], "not an IDX file"),
    "unknown element type": (_header(0x0A, 6) + bytes(6), "unknown IDX element type"),
    "no dimensions": (_header(0x08), "0 dimensions"),
    "absurd size": (_header(0x0E, 2**32 - 1, 2**32 - 1), "max_bytes"),
}


@pytest.mark.parametrize("gzipped", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("case", list(CORRUPT))
def test_idx_corrupt_files_raise_dataset_error(tmp_path: Path, case: str, gzipped: bool) -> None:
    data, message = CORRUPT[case]
    path = tmp_path / ("f.gz" if gzipped else "f")
    path.write_bytes(gzip.compress(data) if gzipped else data)
    with pytest.raises(DatasetError, match=message):
        read_idx(path)


@pytest.mark.parametrize(
    "damage", [lambda z: z[: len(z) // 2], lambda z: z[:12] + b"\xff" * (len(z) - 12), lambda z: z + b"junk"]
)
def test_idx_damaged_gzip_raises_dataset_error(tmp_path: Path, damage: Callable[[bytes], bytes]) -> None:
    array = np.arange(4000, dtype=np.int32).reshape(40, 100)
    write_idx(tmp_path / "x.gz", array)
    (tmp_path / "x.gz").write_bytes(damage((tmp_path / "x.gz").read_bytes()))
    with pytest.raises(DatasetError):
        read_idx(tmp_path / "x.gz")


def test_idx_missing_file_and_unsupported_dtype(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFound, match="no such file"):
        read_idx(tmp_path / "nothing")
    with pytest.raises(DatasetError, match="cannot store dtype int64"):
        write_idx(tmp_path / "x", np.zeros(3, dtype=np.int64))


# --- Fashion-MNIST -----------------------------------------------------------------------------


def _fake_fashion(folder: Path, *, train: int = 12, test: int = 5, gz: bool = True) -> None:
    rng = np.random.default_rng(1)
    sizes = {"x_train": train, "y_train": train, "x_test": test, "y_test": test}
    for part, base in FASHION_MNIST_FILES.items():
        n = sizes[part]
        array = rng.integers(0, 256, size=(n, 28, 28)) if part[0] == "x" else np.arange(n) % 10
        array[:1] = 255 if part[0] == "x" else array[:1]
        write_idx(folder / (base + (".gz" if gz and part != "y_test" else "")), array.astype(np.uint8))


def test_fashion_mnist_reads_a_directory_of_idx_files(tmp_path: Path) -> None:
    _fake_fashion(tmp_path)  # three .gz files and one plain one
    data = load_fashion_mnist(tmp_path)
    assert data.x_train.shape == (12, 1, 28, 28) and data.x_test.shape == (5, 1, 28, 28)
    assert data.x_train.max() == 1.0 and data.x_train.min() >= 0.0 and data.x_train.dtype == torch.float32
    assert data.y_test.tolist() == [0, 1, 2, 3, 4] and data.class_names[0] == "T-shirt/top"
    raw = read_idx(tmp_path / "train-images-idx3-ubyte.gz")
    assert torch.equal(data.x_train[:, 0] * 255, torch.from_numpy(raw).float())


def test_fashion_mnist_missing_files_say_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFound, match="pass the directory") as error:
        load_fashion_mnist(tmp_path)
    assert "apt-get install dataset-fashion-mnist" in str(error.value)
    assert all(base in str(error.value) for base in FASHION_MNIST_FILES.values())


def test_fashion_mnist_mismatched_files(tmp_path: Path) -> None:
    _fake_fashion(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(4, dtype=np.uint8))
    with pytest.raises(DatasetError, match="5 test images but 4 labels"):
        load_fashion_mnist(tmp_path)


@pytest.mark.skipif(
    not FASHION_MNIST_DIR.is_dir(),
    reason="Debian's dataset-fashion-mnist is not installed (apt-get install it)",
)
def test_real_fashion_mnist() -> None:
    data = load_fashion_mnist()
    assert data.x_train.shape == (60000, 1, 28, 28) and data.x_test.shape == (10000, 1, 28, 28)
    assert data.y_train.bincount().tolist() == [6000] * 10 and data.y_test.bincount().tolist() == [1000] * 10
    assert data.x_train.min() == 0.0 and data.x_train.max() == 1.0
    assert data.y_train[:5].tolist() == [9, 0, 0, 3, 0]  # ankle boot, T-shirt, T-shirt, dress, T-shirt


# --- partitioners ------------------------------------------------------------------------------

SCHEMES: dict[str, dict[str, float]] = {
    "iid": {},
    "dirichlet": {"alpha": 0.3},
    "shards": {"classes_per_worker": 2},
    "quantity": {"alpha": 0.5},
}


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_partitions_cover_every_index_once_and_repeat(digits: Dataset, scheme: str) -> None:
    parts = partition(digits.y_train, 7, scheme=scheme, seed=3, **SCHEMES[scheme])  # type: ignore[arg-type]
    assert len(parts) == 7 and all(len(p) > 0 and p.dtype == np.int64 for p in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(digits.y_train)))
    again = partition(digits.y_train, 7, scheme=scheme, seed=3, **SCHEMES[scheme])  # type: ignore[arg-type]
    other = partition(digits.y_train, 7, scheme=scheme, seed=4, **SCHEMES[scheme])  # type: ignore[arg-type]
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_iid_sizes_and_mix(digits: Dataset) -> None:
    parts = iid(len(digits.y_train), 6, seed=0)
    assert {len(p) for p in parts} <= {239, 240}
    assert label_skew(digits.y_train, parts, 10) < 0.15


@pytest.mark.parametrize("workers, per_worker", [(10, 1), (10, 2), (4, 3), (3, 10), (20, 2)])
def test_shards_give_each_worker_exactly_c_classes(workers: int, per_worker: int) -> None:
    labels = np.random.default_rng(0).integers(0, 10, size=2000)
    parts = shards(labels, workers, classes_per_worker=per_worker, seed=1)
    counts = partition_counts(labels, parts, 10)
    assert ((counts > 0).sum(axis=1) == per_worker).all()
    assert counts.sum(axis=0).tolist() == np.bincount(labels, minlength=10).tolist()


def test_shards_argument_errors() -> None:
    labels = np.arange(100) % 10
    with pytest.raises(PartitionError, match="labels hold 10 classes"):
        shards(labels, 5, classes_per_worker=11)
    with pytest.raises(PartitionError, match="pick an integer"):
        shards(labels, 5, classes_per_worker=0)
    with pytest.raises(PartitionError, match="cannot hold all 10 classes"):
        shards(labels, 4, classes_per_worker=2)
    with pytest.raises(PartitionError, match="so some would get none"):
        shards(np.array([0] * 50 + [1]), 5, classes_per_worker=2)


def test_dirichlet_small_alpha_is_more_skewed(digits: Dataset) -> None:
    def skew(alpha: float) -> float:
        runs = [dirichlet(digits.y_train, 10, alpha=alpha, seed=s) for s in range(3)]
        return float(np.mean([label_skew(digits.y_train, parts, 10) for parts in runs]))

    strong, mild, weak = skew(0.05), skew(1.0), skew(100.0)
    assert strong > 0.6 and weak < 0.15 and strong > mild + 0.2 > weak + 0.2


def test_dirichlet_stops_feeding_workers_past_their_fair_share(digits: Dataset) -> None:
    # NIID-Bench's rule: a worker past N / num_workers gets no share of later classes, so it
    # overshoots by at most one class's samples.
    bound = len(digits.y_train) / 10 + int(digits.y_train.bincount().max())
    for seed in range(5):
        assert max(len(p) for p in dirichlet(digits.y_train, 10, alpha=0.05, seed=seed)) <= bound


def test_dirichlet_min_size_and_errors(digits: Dataset) -> None:
    parts = dirichlet(digits.y_train, 10, alpha=0.05, seed=0, min_size=30)
    assert min(len(p) for p in parts) >= 30
    with pytest.raises(PartitionError, match="at least 100 each"):
        dirichlet(digits.y_train, 20, alpha=1.0, min_size=100)
    with pytest.raises(PartitionError, match="in 5 draws"):
        dirichlet(np.arange(100) % 10, 10, alpha=0.01, min_size=10, max_tries=5)
    for alpha in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(PartitionError, match="alpha must be"):
            dirichlet(digits.y_train, 4, alpha=alpha)
    with pytest.raises(PartitionError, match="integer class indices"):
        dirichlet(np.ones((10, 2), dtype=np.int64), 2, alpha=1.0)


def test_quantity_skew_sizes_vary_with_alpha() -> None:
    def spread(alpha: float) -> float:
        sizes = [[len(p) for p in quantity_skew(5000, 10, alpha=alpha, seed=s)] for s in range(5)]
        return float(np.mean([np.std(s) / np.mean(s) for s in sizes]))

    assert spread(0.3) > 0.6 > 0.15 > spread(100.0)
    parts = quantity_skew(5000, 10, alpha=0.3, seed=0, min_size=50)
    assert min(len(p) for p in parts) >= 50 and sum(len(p) for p in parts) == 5000


def test_quantity_skew_with_a_floor_serves_ten_thousand_workers() -> None:
    """Cross-device: 10,000 workers of 60,000 samples. Redrawn Dirichlet splits leave about a
    fifth of them empty, so asking each for a sample fails; with a floor it is one draw."""
    with pytest.raises(PartitionError, match="floor=True"):
        quantity_skew(60_000, 10_000, alpha=0.5, min_size=1, max_tries=5)
    parts = partition(np.zeros(60_000, dtype=np.int64), 10_000, scheme="quantity", alpha=0.5, min_size=1, floor=True)
    sizes = np.array([len(p) for p in parts])
    assert len(parts) == 10_000 and sizes.min() >= 1 and sizes.sum() == 60_000
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(60_000))
    assert sizes.max() > 40 and np.median(sizes) < 5  # skewed: most hold a few samples, some many
    again = quantity_skew(60_000, 10_000, alpha=0.5, min_size=1, floor=True)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = quantity_skew(60_000, 10_000, alpha=0.5, min_size=1, floor=True, seed=1)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))
    three = quantity_skew(100, 10, alpha=0.5, min_size=3, floor=True)
    assert min(len(p) for p in three) >= 3 and sum(len(p) for p in three) == 100
    assert [len(p) for p in quantity_skew(30, 10, alpha=0.5, min_size=3, floor=True)] == [3] * 10
    with pytest.raises(PartitionError, match="takes alpha, floor, max_tries, min_size"):
        partition(np.zeros(20, dtype=np.int64), 2, scheme="quantity", alpha=1.0, flor=True)
    with pytest.raises(PartitionError, match="'dirichlet' takes alpha, max_tries, min_size, not floor"):
        partition(np.zeros(20, dtype=np.int64), 2, scheme="dirichlet", alpha=1.0, floor=True)


@pytest.mark.parametrize(
    "call",
    [
        lambda: iid(0, 2),
        lambda: iid(10, 0),
        lambda: iid(3, 4),
        lambda: iid(10, True),
        lambda: quantity_skew(50, 10, alpha=1.0),  # min_size 10 each needs 100 samples
        lambda: partition([0, 1.5], 2),
        lambda: partition([0, -1], 2),
    ],
)
def test_partitioner_argument_errors(call: Callable[[], object]) -> None:
    with pytest.raises(PartitionError):
        call()


# --- summaries and federate --------------------------------------------------------------------


def test_partition_summary_table_and_records() -> None:
    labels = np.array([0, 0, 1, 1, 2, 2, 2])
    parts = [np.array([0, 1, 2]), np.array([3, 4, 5, 6])]
    table = partition_summary(labels, parts, 3).splitlines()
    assert table[0].split() == ["worker", "samples", "classes", "|", "0", "1", "2"]
    assert table[2].split() == ["0", "3", "2", "|", "2", "1", "0"]
    assert table[3].split() == ["1", "4", "2", "|", "0", "1", "3"]
    assert table[5].split() == ["total", "7", "3", "|", "2", "2", "3"]
    assert "exactly one worker" in table[6]
    assert table[7] == "samples per worker: min 3, median 3.5, mean 3.5, max 4"
    assert table[8].endswith("0.375")  # (3/7 + 9/28) / 2
    records = partition_records(labels, parts, 3)
    assert json.loads(json.dumps(records)) == records
    assert records[1] == {"worker": 1, "samples": 4, "classes": 2, "counts": [0, 1, 3]}


def test_summary_shows_the_first_rows_and_the_csv_has_them_all() -> None:
    labels = np.arange(12) % 3
    parts = [np.array([i, i + 6]) for i in range(6)]
    table = partition_summary(labels, parts, 3, rows=2).splitlines()
    assert [row.split()[0] for row in table[2:5]] == ["0", "1", "..."]
    assert table[4] == "... 4 more workers"
    assert table[6].split()[:3] == ["total", "12", "3"]  # the totals are of every worker, shown or not
    assert partition_summary(labels, parts, 3, rows=6) == partition_summary(labels, parts, 3)
    rows = partition_csv(labels, parts, 3).splitlines()
    assert rows[0] == "worker,samples,classes,class_0,class_1,class_2"
    assert rows[1:] == [f"{i},2,1,{','.join('2' if c == i % 3 else '0' for c in range(3))}" for i in range(6)]


def test_summary_reports_overlap_and_gaps() -> None:
    labels = np.arange(6) % 2
    text = partition_summary(labels, [np.array([0, 1, 2]), np.array([2, 3])], 2)
    assert "2 of 6 samples held by no worker, 1 by more than one" in text
    with pytest.raises(PartitionError, match="outside"):
        partition_counts(labels, [np.array([6])], 2)


def test_label_skew_extremes() -> None:
    labels = np.array([0, 1, 0, 1])
    assert label_skew(labels, [np.array([0, 1]), np.array([2, 3])], 2) == 0.0
    assert label_skew(labels, [np.array([0, 2]), np.array([1, 3])], 2) == 0.5


def test_federate_gives_each_worker_its_samples(digits: Dataset) -> None:
    shares = federate(digits, 5, scheme="shards", classes_per_worker=2, seed=2)
    assert len(shares) == 5 and sum(len(y) for _, y in shares) == len(digits.y_train)
    parts = shards(digits.y_train, 5, classes_per_worker=2, seed=2)
    for (x, y), part in zip(shares, parts, strict=True):
        assert torch.equal(x, digits.x_train[part]) and torch.equal(y, digits.y_train[part])
        assert len(y.unique()) == 2 and x.shape[1:] == (1, 8, 8)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"scheme": "random"}, "unknown scheme"),
        ({"scheme": "dirichlet"}, "needs alpha="),
        ({"scheme": "shards"}, "needs classes_per_worker="),
        ({"scheme": "iid", "alpha": 1.0}, "takes no options"),
        ({"scheme": "shards", "classes_per_worker": 2, "alpha": 1.0}, "not alpha"),
    ],
)
def test_federate_option_errors(digits: Dataset, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(PartitionError, match=message):
        federate(digits, 3, **kwargs)  # type: ignore[arg-type]


# --- your own data: arrays, npz, csv -----------------------------------------------------------


def test_load_arrays_converts_and_checks() -> None:
    x, y = torch.arange(40.0, dtype=torch.float64).reshape(20, 2), np.arange(20) % 4
    data = load_arrays(x, y.astype(np.float32), test_fraction=0.25, name="mine")
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64 and data.num_classes == 4
    assert len(data.y_test) == 5 and data.y_test.bincount(minlength=4).tolist() in (
        [1, 1, 1, 2],
        [2, 1, 1, 1],
    )
    rows = {tuple(r) for r in torch.cat([data.x_train, data.x_test]).tolist()}
    assert rows == {tuple(r) for r in x.float().tolist()}
    kept = load_arrays(x, y, x_test=x[:3], y_test=y[:3])
    assert torch.equal(kept.x_train, x.float()) and kept.y_test.tolist() == [0, 1, 2]
    with pytest.raises(dataclasses.FrozenInstanceError):
        data.num_classes = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        ((np.zeros((5, 2)), np.zeros(4)), {}, "5 input rows but 4 labels"),
        ((np.zeros(5), np.zeros(5)), {}, r"reshape\(-1, 1\)"),
        ((np.zeros((5, 2)), np.zeros((5, 1))), {}, "labels need shape"),
        ((np.zeros((5, 2)), np.array([0, 1, 2, 3, 0.5])), {}, "non-integer"),
        ((np.zeros((5, 2)), np.array([0, 1, 2, 3, -1])), {}, "negative"),
        ((np.zeros((5, 2)), np.arange(5)), {"num_classes": 3}, "num_classes is 3"),
        ((np.zeros((5, 2)), np.arange(5)), {"x_test": np.zeros((2, 2))}, "both x_test and y_test"),
        (
            (np.zeros((5, 2)), np.arange(5)),
            {"x_test": np.zeros((2, 3)), "y_test": [0, 1]},
            "same sample shape",
        ),
        ((np.array([[object()]] * 5), np.arange(5)), {}, "dtype object"),
        ((np.zeros((0, 2)), np.zeros(0)), {}, "no samples"),
    ],
)
def test_load_arrays_errors(args: tuple[object, ...], kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        load_arrays(*args, **kwargs)  # type: ignore[arg-type]


def test_load_npz_layouts(tmp_path: Path) -> None:
    x, y = np.random.default_rng(0).random((30, 3)), np.arange(30) % 3
    np.savez(tmp_path / "single.npz", x=x, y=y)
    single = load_npz(tmp_path / "single.npz", test_fraction=0.2)
    assert len(single.y_train) == 24 and single.name == "single.npz" and single.num_classes == 3
    np.savez_compressed(tmp_path / "split.npz", x_train=x[:20], y_train=y[:20], x_test=x[20:], y_test=y[20:])
    split = load_npz(tmp_path / "split.npz")
    assert (
        torch.equal(split.x_test, torch.from_numpy(x[20:]).float())
        and split.y_train.tolist() == y[:20].tolist()
    )
    np.savez(tmp_path / "keys.npz", inputs=x, labels=y)
    with pytest.raises(DatasetError, match=r"holds arrays \['inputs', 'labels'\]"):
        load_npz(tmp_path / "keys.npz")
    np.save(tmp_path / "one.npy", x)
    with pytest.raises(DatasetError, match=".npy file"):
        load_npz(tmp_path / "one.npy")
    with pytest.raises(DatasetNotFound):
        load_npz(tmp_path / "absent.npz")


class _Planted:
    """Unpickling this touches a file: proof that a loader ran pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return (Path.touch, (self.marker,))


def test_npz_never_unpickles(tmp_path: Path) -> None:
    marker = tmp_path / "pickle-ran"
    np.savez(tmp_path / "objects.npz", x=np.array([_Planted(marker)] * 4, dtype=object), y=np.arange(4))
    with pytest.raises(DatasetError, match="without pickle"):
        load_npz(tmp_path / "objects.npz")
    (tmp_path / "plain.pickle").write_bytes(pickle.dumps({"x": _Planted(marker)}))
    with pytest.raises(DatasetError, match="without pickle"):
        load_npz(tmp_path / "plain.pickle")
    assert not marker.exists()


def test_load_csv_numeric_and_named_labels(tmp_path: Path) -> None:
    rows = [f"{i},{i % 3},{i * 0.5}" for i in range(30)]
    (tmp_path / "n.csv").write_text("a,label,b\n" + "\n".join(rows) + "\n")
    numeric = load_csv(tmp_path / "n.csv", test_fraction=0.2)
    assert numeric.x_train.shape == (24, 2) and numeric.num_classes == 3 and numeric.class_names == ()
    assert {tuple(r) for r in torch.cat([numeric.x_train, numeric.x_test]).tolist()} == {
        (float(i), i * 0.5) for i in range(30)
    }
    named = "\n".join(f"{i}; {i * 2}; {['cat', 'dog'][i % 2]}" for i in range(10))
    with gzip.open(tmp_path / "named.csv.gz", "wt") as stream:
        stream.write(named + "\n")
    data = load_csv(
        tmp_path / "named.csv.gz", label_column=-1, header=False, delimiter=";", test_fraction=0.0
    )
    assert data.class_names == ("cat", "dog") and data.y_train.bincount().tolist() == [5, 5]
    assert data.x_train.shape == (10, 2) and len(data.y_test) == 0


@pytest.mark.parametrize(
    "text, kwargs, message",
    [
        ("a,b\n1,2\n", {"label_column": "label"}, "no column named 'label'"),
        ("a,label\n1,2\nx,3\n", {}, "must be numeric"),
        ("a,b,label\n1,2,0\n1,2\n", {}, "columns"),
        ("a,label\n", {}, "no data rows"),
        ("", {}, "empty"),
        ("1,2\n", {"header": False, "label_column": "b"}, "header=False"),
        ("1,2\n", {"header": False, "label_column": 5}, "rows have 2 columns"),
        ("label\n1\n", {}, "at least one feature column"),
    ],
)
def test_load_csv_errors(tmp_path: Path, text: str, kwargs: dict[str, object], message: str) -> None:
    (tmp_path / "bad.csv").write_text(text)
    with pytest.raises(DatasetError, match=message):
        load_csv(tmp_path / "bad.csv", **kwargs)  # type: ignore[arg-type]


def test_an_owners_held_out_part_leaves_it_a_row_to_train_on() -> None:
    from fedsecure.experiment.owners import _split

    x, y = torch.arange(8.0).reshape(4, 2), torch.arange(4)
    for rows, fraction, held in [(2, 0.9, 1), (2, 0.2, 1), (4, 0.5, 2), (4, 0.99, 3)]:
        part = _split(x[:rows], y[:rows], fraction, seed=0)
        assert (len(part["y_test"]), len(part["y"])) == (held, rows - held)
        assert sorted(part["y_test"].tolist() + part["y"].tolist()) == list(range(rows))
