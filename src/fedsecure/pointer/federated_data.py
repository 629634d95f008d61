"""PySyft 0.2's federated data sets: `BaseDataset`, `FederatedDataset`, `federate`, `FederatedDataLoader`.

A `BaseDataset` pairs inputs with targets, either here or on one worker. `federate` cuts a torch
data set into consecutive parts and sends one part to each worker (the parts are then the model
owner's own data, as after any ``t.send``). A `FederatedDataset` gathers one `BaseDataset` per
worker, whether the model owner sent it or the worker holds it as its own private data (found with
``worker.search``). A `FederatedDataLoader` walks over it in batches: for each batch it sends the
worker an index tensor (which samples, in which order: public, drawn here) and the worker selects
those samples itself with allowed ops, so the data never passes through this process, and batches
of private data are private too.

The names, arguments and default order follow PySyft 0.2.9 (``syft/frameworks/torch/fl/``); where
behaviour differs on purpose, the docstring says so.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, cast

import torch
from torch.utils.data import Dataset, IterableDataset, TensorDataset, default_collate

from fedsecure.errors import DatasetError, ObjectNotFound, OperationNotAllowed, PartitionError, WorkerMismatch
from fedsecure.pointer.tensor import PointerTensor, send_tensor
from fedsecure.worker.client import WorkerClient


def _where(t: torch.Tensor) -> str:
    return f"on {t.location.id!r}" if isinstance(t, PointerTensor) else "here"


def _check_pair(data: Any, targets: Any, transform: Any) -> None:
    for name, value in (("data", data), ("targets", targets)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"BaseDataset {name} must be a tensor or a pointer to one, got {type(value).__name__}; "
                "convert it with torch.as_tensor(...)"
            )
        if value.dim() == 0:
            raise DatasetError(f"BaseDataset {name} is a scalar; it needs one row per sample, shape (N, ...)")
    if isinstance(data, PointerTensor) != isinstance(targets, PointerTensor) or (
        isinstance(data, PointerTensor) and data.location is not targets.location
    ):
        raise WorkerMismatch(
            f"BaseDataset: data is {_where(data)} but targets are {_where(targets)}; both must be local, "
            "or both on the same worker (send or move them together)"
        )
    if data.shape[0] != targets.shape[0]:
        raise DatasetError(
            f"BaseDataset: {data.shape[0]} data rows but {targets.shape[0]} targets; give one target per sample"
        )
    if transform is not None and not callable(transform):
        raise TypeError(f"BaseDataset transform must be callable, got {type(transform).__name__}")
    if transform is not None and isinstance(data, PointerTensor):
        raise OperationNotAllowed(
            f"BaseDataset: a transform is Python code and runs only on local data, but the data is "
            f"{_where(data)}; apply it before sending (BaseDataset(x, y, transform=f).send(worker) "
            "sends the transformed samples)",
            op="BaseDataset.transform",
        )


class BaseDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Inputs ``data`` and ``targets`` (one row per sample): both local, or both pointers on one worker.

    ``transform`` (local data only) is applied to each input as ``__getitem__`` returns it, and to
    every input that `send` or `federate` sends. ``len``, ``location`` (the worker, or None when
    local), ``send(worker)``, ``get()`` and ``federate(workers)`` work as in PySyft; indexing a
    remote data set is refused: a `FederatedDataLoader` builds its batches on the worker.
    """

    def __init__(
        self, data: torch.Tensor, targets: torch.Tensor, transform: Callable[[Any], Any] | None = None
    ) -> None:
        _check_pair(data, targets, transform)
        self.data = data
        self.targets = targets
        self.transform_ = transform

    @property
    def location(self) -> WorkerClient | None:
        """The worker holding the data, or None when it is here."""
        return self.data.location if isinstance(self.data, PointerTensor) else None

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def __getitem__(self, index: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self.location is not None:
            raise OperationNotAllowed(
                f"BaseDataset[{index!r}]: the data is on {self.location.id!r}; iterate over it with "
                "sy.FederatedDataLoader(sy.FederatedDataset([dataset])), which builds batches there, "
                "or get() it first where its owner allows",
                op="BaseDataset.__getitem__",
            )
        x = self.data[index]
        if self.transform_ is not None:
            x = self.transform_(x)
        return x, self.targets[index]

    def transform(self, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace the (local) inputs by ``transform(data)``, applied to all of them at once."""
        _check_pair(self.data, self.targets, transform)
        data = transform(self.data)
        _check_pair(data, self.targets, None)
        self.data = data

    def send(self, worker: WorkerClient, *, private: bool = False) -> BaseDataset:
        """A `BaseDataset` of pointers to a copy of this one on ``worker`` (the transform applied).

        ``private=True`` makes it the worker's own private data, as if it had loaded it itself.
        """
        if self.location is not None:
            raise OperationNotAllowed(
                f"send(): this data set is already on {self.location.id!r}; get() it first to send it elsewhere",
                op="BaseDataset.send",
            )
        data, targets = _rows(self, 0, len(self))
        return BaseDataset(
            send_tensor(data, worker, private=private), send_tensor(targets, worker, private=private)
        )

    def get(self) -> BaseDataset:
        """Fetch data and targets here (the worker's policy permitting); returns this data set."""
        location = self.location
        if location is None:
            raise OperationNotAllowed("get(): this data set is already here", op="BaseDataset.get")
        data = cast(PointerTensor, self.data).get()  # a refusal raises here and changes nothing
        try:
            targets = cast(PointerTensor, self.targets).get()
        except Exception:
            self.data = send_tensor(data, location)  # put back what came: the data set stays whole
            raise
        self.data, self.targets = data, targets
        return self

    def federate(self, *workers: Any, private: bool = False) -> FederatedDataset:
        """Split into consecutive parts, one per worker, and send them: see `federate`."""
        return federate(self, *workers, private=private)

    def __repr__(self) -> str:
        def spec(t: torch.Tensor) -> str:
            return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"

        where = "here" if self.location is None else f"on {self.location.id!r}"
        return (
            f"BaseDataset({len(self)} samples {where}: data {spec(self.data)}, targets {spec(self.targets)})"
        )


def _concatenate(worker_id: str, parts: list[BaseDataset]) -> BaseDataset:
    for name in ("data", "targets"):
        specs = {(tuple(getattr(p, name).shape[1:]), getattr(p, name).dtype) for p in parts}
        if len(specs) > 1:
            raise DatasetError(
                f"FederatedDataset: {len(parts)} data sets on {worker_id!r} are joined into one, but their "
                f"{name} differ in sample shape or dtype ({sorted(map(str, specs))}); make them agree, or "
                "give one data set per worker"
            )
    return BaseDataset(torch.cat([p.data for p in parts]), torch.cat([p.targets for p in parts]))


class FederatedDataset:
    """Remote `BaseDataset` s, at most one per worker, looked up by worker id.

    Several data sets on one worker are joined into one (concatenated on that worker, in the order
    given; PySyft kept only the last). ``workers`` lists the worker ids, ``fd["bob"]`` is bob's
    data set, ``len(fd)`` counts every sample, ``datasets`` maps worker ids to data sets.
    """

    def __init__(self, datasets: Iterable[BaseDataset]) -> None:
        groups: dict[str, list[BaseDataset]] = {}
        for i, dataset in enumerate(datasets):
            if not isinstance(dataset, BaseDataset):
                raise TypeError(
                    f"FederatedDataset takes BaseDatasets; item {i} is a {type(dataset).__name__} "
                    "(wrap pointers as sy.BaseDataset(data_ptr, target_ptr))"
                )
            if dataset.location is None:
                raise DatasetError(
                    f"FederatedDataset: data set {i} is local; send it first (dataset.send(worker)), "
                    "or split it over workers with dataset.federate(workers)"
                )
            groups.setdefault(dataset.location.id, []).append(dataset)
        if not groups:
            raise DatasetError("FederatedDataset needs at least one data set on a worker")
        self.datasets: dict[str, BaseDataset] = {
            wid: parts[0] if len(parts) == 1 else _concatenate(wid, parts) for wid, parts in groups.items()
        }

    @property
    def workers(self) -> list[str]:
        """The ids of the workers holding the data, in the order the data sets were given."""
        return list(self.datasets)

    locations = workers

    def _key(self, worker: str | WorkerClient) -> str:
        key = worker.id if isinstance(worker, WorkerClient) else worker
        if key not in self.datasets:
            raise ObjectNotFound(
                f"no data set on worker {key!r} here; this federated data set spans {self.workers}"
            )
        return key

    def __getitem__(self, worker: str | WorkerClient) -> BaseDataset:
        return self.datasets[self._key(worker)]

    def __contains__(self, worker: object) -> bool:
        key = worker.id if isinstance(worker, WorkerClient) else worker
        return key in self.datasets

    def get_dataset(self, worker: str | WorkerClient) -> BaseDataset:
        """Fetch one worker's data set here (its policy permitting) and drop it from this one."""
        key = self._key(worker)
        dataset = self.datasets[key]
        if dataset.location is not None:  # (fetched already by dataset.get(): only taken out)
            dataset.get()
        del self.datasets[key]
        return dataset

    def __len__(self) -> int:
        return sum(len(dataset) for dataset in self.datasets.values())

    def __repr__(self) -> str:
        sizes = ", ".join(f"{wid}: {len(ds)}" for wid, ds in self.datasets.items())
        return f"FederatedDataset({len(self)} samples on {len(self.datasets)} workers: {sizes})"


# -- federate -------------------------------------------------------------------------------------


def _worker_list(workers: tuple[Any, ...]) -> list[WorkerClient]:
    if len(workers) == 1 and isinstance(workers[0], list | tuple):  # federate((bob, alice)), as PySyft
        workers = tuple(workers[0])
    if not workers:
        raise PartitionError("federate() needs at least one worker: dataset.federate((bob, alice))")
    for w in workers:
        if not isinstance(w, WorkerClient):
            raise TypeError(f"federate() takes workers (e.g. sy.VirtualWorker), got {type(w).__name__} {w!r}")
    ids = [w.id for w in workers]
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        raise PartitionError(f"federate(): worker(s) {twice} appear more than once; name each worker once")
    return list(workers)


def _rows(dataset: Any, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples ``start:stop`` of a map-style data set as two stacked tensors (inputs, targets)."""
    if isinstance(dataset, BaseDataset) and dataset.transform_ is None:
        return dataset.data[start:stop], dataset.targets[start:stop]
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        return dataset.tensors[0][start:stop], dataset.tensors[1][start:stop]
    samples = []
    for i in range(start, stop):
        sample = dataset[i]
        if not isinstance(sample, Sequence) or len(sample) != 2:
            raise DatasetError(
                f"sample {i} of the {type(dataset).__name__} is a {type(sample).__name__}, not a pair "
                "(input, target); federate() needs __getitem__ to return (x, y)"
            )
        samples.append(tuple(sample))
    try:
        data, targets = default_collate(samples)
    except (TypeError, RuntimeError) as error:
        raise DatasetError(
            f"samples {start}..{stop - 1} of the {type(dataset).__name__} do not stack into tensors ({error}); "
            "make __getitem__ return tensors or numbers of one shape (e.g. with transforms.ToTensor())"
        ) from error
    return torch.as_tensor(data), torch.as_tensor(targets)


def federate(dataset: Any, *workers: Any, private: bool = False) -> FederatedDataset:
    """Split a map-style data set into ``len(workers)`` consecutive parts and send one to each worker.

    ``dataset`` is any torch ``Dataset`` whose ``__getitem__`` returns ``(input, target)``, or a local
    `BaseDataset`. Parts hold ``ceil(N / len(workers))`` samples each (the last one the rest), as in
    PySyft; each part's inputs and targets are stacked and sent, so they are the model owner's own
    data (``private=True``: the workers' private data). A split that would leave a worker without
    samples is refused (PySyft left such workers out). After ``sy.TorchHook(torch)`` this is also
    ``dataset.federate((bob, alice))`` on every torch ``Dataset``.
    """
    targets = _worker_list(workers)
    if isinstance(dataset, BaseDataset) and dataset.location is not None:
        raise OperationNotAllowed(
            f"federate(): this data set is already on {dataset.location.id!r}; "
            "sy.FederatedDataset([dataset]) makes it a federated data set as it is",
            op="federate",
        )
    if (
        isinstance(dataset, IterableDataset)
        or not hasattr(dataset, "__getitem__")
        or not hasattr(dataset, "__len__")
    ):
        raise DatasetError(
            f"federate() needs a map-style data set (__len__ and __getitem__), got {type(dataset).__name__}; "
            "an iterable data set cannot be split into parts: collect it into a TensorDataset first"
        )
    n = len(dataset)
    size = math.ceil(n / len(targets))
    if n == 0 or math.ceil(n / size) < len(targets):
        usable = 0 if n == 0 else math.ceil(n / size)
        raise PartitionError(
            f"federate(): {n} samples in parts of ceil({n}/{len(targets)}) = {size} fill only {usable} of "
            f"{len(targets)} workers; use fewer workers or more samples"
        )
    parts = []
    for k, worker in enumerate(targets):
        data, labels = _rows(dataset, k * size, min(n, (k + 1) * size))
        parts.append(
            BaseDataset(
                send_tensor(data, worker, private=private), send_tensor(labels, worker, private=private)
            )
        )
    return FederatedDataset(parts)


# -- the loader -----------------------------------------------------------------------------------

# torch DataLoader settings (often spread in from a ``kwargs`` dict) that only concern how a local
# process loads its data: batches are built on the workers here, so they change nothing.
_HARMLESS = frozenset(
    {
        "num_workers",
        "pin_memory",
        "pin_memory_device",
        "timeout",
        "prefetch_factor",
        "persistent_workers",
        "multiprocessing_context",
    }
)
# Settings that would change which samples a batch holds, or call code the loader cannot run.
_REFUSED = {
    "sampler": "the order is shuffle=True/False (and seed= or generator=)",
    "batch_sampler": "batches are batch_size consecutive samples of each worker's order",
    "worker_init_fn": "no local loader processes are started, so it would never be called",
    "collate_fn": "a batch is built on its worker by indexing; stack samples before federating",
}
_END = object()


def _schedule(batches: Mapping[str, Sequence[Any]], lanes: int) -> Iterator[list[tuple[str, Any]]]:
    """Steps of (worker id, batch): ``lanes`` workers are read side by side, one batch each per
    step; a lane whose worker has no batches left takes the next worker not yet read."""
    waiting = deque((wid, iter(items)) for wid, items in batches.items())
    current = [waiting.popleft() for _ in range(min(lanes, len(waiting)))]
    while current:
        step, still = [], []
        for lane in current:
            while True:
                item = next(lane[1], _END)
                if item is not _END:
                    step.append((lane[0], item))
                    still.append(lane)
                    break
                if not waiting:
                    break
                lane = waiting.popleft()
        current = still
        if step:
            yield step


def _fetch(dataset: BaseDataset, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch, selected on the data's worker by the index sent to it."""
    position = send_tensor(index, cast(PointerTensor, dataset.data).location)
    return dataset.data[position], dataset.targets[position]


class FederatedDataLoader:
    """Batches of a `FederatedDataset`, each a pair of pointers ``(data, target)`` on one worker.

    By default every batch of the first worker comes first, then every batch of the next (PySyft's
    order with one iterator). ``shuffle=True`` draws a new order of each worker's samples in every
    epoch (here, from ``generator``, ``seed``, or torch's global generator: the order is public;
    the samples stay where they are). ``drop_last`` drops each worker's last short batch.
    ``iter_per_worker=True``: each step is a dict ``{worker id: (data, target)}`` holding one batch
    of every worker that has batches left. ``num_iterators=k`` (capped at the number of workers
    less one, as in PySyft): each step is a dict of batches from ``k`` workers read side by side,
    and a worker whose batches run out hands its place to the next; unlike PySyft, an epoch ends
    only when every batch was given, so each sample comes once per epoch. ``len(loader)`` is the
    number of steps.

    Of torch ``DataLoader``'s other settings, ``num_workers``, ``pin_memory``, ``pin_memory_device``,
    ``timeout``, ``prefetch_factor``, ``persistent_workers`` and ``multiprocessing_context`` are
    accepted and change nothing (they concern local loader processes, and no data is loaded here);
    ``sampler``, ``batch_sampler``, ``worker_init_fn`` and a ``collate_fn`` are refused, as they
    would change the batches or never be called. Anything else is a TypeError.
    """

    def __init__(
        self,
        federated_dataset: FederatedDataset,
        batch_size: int = 8,
        shuffle: bool = False,
        num_iterators: int = 1,
        drop_last: bool = False,
        collate_fn: Callable[..., Any] | None = None,
        iter_per_worker: bool = False,
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(federated_dataset, FederatedDataset):
            raise TypeError(
                f"FederatedDataLoader takes a FederatedDataset, got {type(federated_dataset).__name__}; make "
                "one with dataset.federate((bob, alice)) or sy.FederatedDataset([...]), or use "
                "torch.utils.data.DataLoader for local data"
            )
        for name, value in (("batch_size", batch_size), ("num_iterators", num_iterators)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FederatedDataLoader: {name} must be a positive integer, got {value!r}")
        if collate_fn is not None:
            kwargs["collate_fn"] = collate_fn
        refused = sorted(set(kwargs) & set(_REFUSED))
        if refused:
            raise OperationNotAllowed(
                f"FederatedDataLoader does not take {refused}: {'; '.join(_REFUSED[k] for k in refused)}",
                op="FederatedDataLoader",
            )
        unknown = sorted(set(kwargs) - _HARMLESS)
        if unknown:
            raise TypeError(f"FederatedDataLoader got unexpected keyword argument(s) {unknown}")
        if seed is not None and generator is not None:
            raise ValueError("FederatedDataLoader: give seed= or generator=, not both")
        if seed is not None:
            generator = torch.Generator().manual_seed(seed)
        self.federated_dataset = federated_dataset
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.iter_per_worker = bool(iter_per_worker)
        self.num_iterators = num_iterators
        self.generator = generator

    @property
    def workers(self) -> list[str]:
        return self.federated_dataset.workers

    def _lanes(self) -> int:
        n = len(self.federated_dataset.workers)
        return n if self.iter_per_worker else max(1, min(self.num_iterators, n - 1))

    def _count(self, n: int) -> int:
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _epoch(self) -> dict[str, list[torch.Tensor]]:
        """Each worker's batches of sample indices for one epoch."""
        plans = {}
        for wid, dataset in self.federated_dataset.datasets.items():
            if dataset.location is None:
                raise DatasetError(
                    f"FederatedDataLoader: {wid!r}'s data set was fetched here with get(); take it "
                    f"out of the federated data set with get_dataset({wid!r}), or send it back"
                )
            n = len(dataset)
            order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
            plans[wid] = list(order.split(self.batch_size))[: self._count(n)]
        return plans

    def __iter__(self) -> Iterator[Any]:
        datasets = dict(self.federated_dataset.datasets)
        per_step = self.iter_per_worker or self._lanes() > 1
        for step in _schedule(self._epoch(), self._lanes()):
            # Built as yielded and not kept here: a batch's objects go when the caller drops it.
            if per_step:
                yield {wid: _fetch(datasets[wid], index) for wid, index in step}
            else:
                yield _fetch(datasets[step[0][0]], step[0][1])

    def __len__(self) -> int:
        counts: dict[str, Sequence[int]] = {
            wid: range(self._count(len(ds))) for wid, ds in self.federated_dataset.datasets.items()
        }
        return sum(1 for _ in _schedule(counts, self._lanes()))

    def __repr__(self) -> str:
        return (
            f"FederatedDataLoader({self.federated_dataset!r}, batch_size={self.batch_size}, "
            f"shuffle={self.shuffle}, drop_last={self.drop_last}, iter_per_worker={self.iter_per_worker})"
        )


__all__ = ["BaseDataset", "FederatedDataLoader", "FederatedDataset", "federate"]
