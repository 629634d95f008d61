"""PySyft 0.2's sandbox: a hook, six workers holding parts of small public data sets, and a grid.

``sy.create_sandbox(globals())`` sets up, in one call, what PySyft 0.2.9's "Part 5 - Welcome to the
Sandbox" works with: ``hook``, the workers ``bob, theo, jason, alice, andy, jon``, the list
``workers`` and ``grid``, a `PrivateGridNetwork` over them that searches every worker at once.

PySyft's sandbox served scikit-learn's Boston housing set, which scikit-learn removed in 1.2. This
one serves the sets that scikit-learn ships inside the package, so nothing is downloaded:
diabetes (the regression set that takes Boston's place), linnerud (regression with three
targets), and breast cancer, digits, iris and wine (classification).
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedsecure.errors import DatasetNotFound
from fedsecure.pointer.hook import TorchHook, describe, tag
from fedsecure.worker.client import WorkerClient
from fedsecure.worker.virtual import Federation, VirtualWorker

WORKER_IDS = ("bob", "theo", "jason", "alice", "andy", "jon")


@dataclass(frozen=True)
class SandboxDataset:
    """One data set served by the sandbox: scikit-learn's ``load_<name>``."""

    name: str
    title: str
    task: str  # "regression" or "classification": the target is float32 or int64
    about: str


DATASETS = (
    SandboxDataset("diabetes", "Diabetes", "regression",
                   "10 baseline measurements of 442 patients; target: disease progression a year later"),
    SandboxDataset("breast_cancer", "Breast cancer (Wisconsin, diagnostic)", "classification",
                   "30 features of cell nuclei in 569 images; target: 0 malignant, 1 benign"),
    SandboxDataset("digits", "Handwritten digits", "classification",
                   "1797 images of 8x8 pixels (values 0-16), flattened to 64 features; target: the digit"),
    SandboxDataset("iris", "Iris plants", "classification",
                   "4 measurements of 150 flowers; target: one of 3 species"),
    SandboxDataset("wine", "Wine recognition", "classification",
                   "13 chemical measurements of 178 wines; target: one of 3 cultivars"),
    SandboxDataset("linnerud", "Linnerud physical exercise", "regression",
                   "3 exercise counts of 20 men; targets: weight, waist and pulse"),
)


def _load(dataset: SandboxDataset) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole data set: data as float32, the target as float32 (regression) or int64."""
    try:
        from sklearn import datasets  # slow import: only when data is asked for
    except ImportError as error:
        raise DatasetNotFound(
            "the sandbox's data sets ship with scikit-learn, which is not installed: pip install "
            "'scikit-learn>=1.3', or call create_sandbox(globals(), download_data=False)"
        ) from error
    loader: Callable[[], Any] = getattr(datasets, f"load_{dataset.name}")
    bunch = loader()
    data = torch.from_numpy(np.asarray(bunch.data, dtype=np.float32))
    target_type = np.float32 if dataset.task == "regression" else np.int64
    return data, torch.from_numpy(np.asarray(bunch.target, dtype=target_type))


def _parts(dataset: SandboxDataset, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` consecutive parts of the data set, each tensor tagged and described."""
    data, target = _load(dataset)
    rows = data.shape[0]
    out = []
    start = 0
    for k, (x, y) in enumerate(zip(torch.tensor_split(data, count), torch.tensor_split(target, count), strict=True)):
        where = f"rows {start}-{start + x.shape[0] - 1} of {rows}, part {k + 1} of {count}"
        start += x.shape[0]
        text = f"{dataset.title} (scikit-learn's load_{dataset.name}): {dataset.about}. {where}."
        for t, role in ((x, "data"), (y, "target")):
            tag(t, f"#{dataset.name}", f"#{role}", f"#{dataset.task}")
            describe(t, f"The {role}. {text}")
        out.append((x, y))
    return out


class PrivateGridNetwork:
    """Workers searched as one: ``grid.search("#diabetes", "#data")``.

    ``search(*query)`` asks every worker for the objects that match every item of ``query`` (as
    `WorkerClient.search`: an item matches a tag or occurs in a description) and returns
    ``{worker id: [pointers]}`` for the workers with matches.
    """

    def __init__(self, *workers: WorkerClient) -> None:
        for w in workers:
            if not isinstance(w, WorkerClient):
                raise TypeError(f"PrivateGridNetwork(*workers) takes workers, got {type(w).__name__}")
        ids = [w.id for w in workers]
        if len(set(ids)) != len(ids):
            raise ValueError(f"PrivateGridNetwork: each worker once, got the ids {ids}")
        self.workers: list[WorkerClient] = list(workers)

    def search(self, *query: str) -> dict[str, list[Any]]:
        if not query:
            raise TypeError("search() needs at least one tag or word, such as grid.search('#diabetes')")
        found = {w.id: w.search(list(query)) for w in self.workers}
        return {worker_id: pointers for worker_id, pointers in found.items() if pointers}

    def __repr__(self) -> str:
        return f"<PrivateGridNetwork of {len(self.workers)} workers: {', '.join(w.id for w in self.workers)}>"


def create_sandbox(
    gbs: MutableMapping[str, Any], verbose: bool = True, download_data: bool = True
) -> None:
    """Put a ready federation into ``gbs`` (pass ``globals()``), as PySyft 0.2's sandbox does.

    ``gbs`` gets ``hook``, the workers ``bob, theo, jason, alice, andy, jon``, ``workers`` (their
    list) and ``grid`` (a `PrivateGridNetwork` of them). With ``download_data`` each data set
    of `DATASETS` is cut into consecutive parts, one per worker: its data (float32) tagged
    ``#<name>``, ``#data`` and ``#regression`` or ``#classification``; its target (float32 for
    regression, int64 for classification) tagged ``#<name>``, ``#target`` and the task; each
    described in words. Nothing is downloaded: the sets ship with scikit-learn (Boston housing,
    which PySyft's sandbox served, left scikit-learn in 1.2; diabetes is the regression set here).

    As in PySyft's sandbox the data is handed over by this process: it is the model owner's
    own, so ``get()`` reads it back. For data the workers keep private, give each worker its
    own with ``VirtualWorker(hook, id, data={tag: tensor})``.

    Each call makes a fresh hook, federation and workers: calling it again starts over.
    """
    if not isinstance(gbs, MutableMapping):
        raise TypeError(f"create_sandbox() fills a namespace: pass globals(), got {type(gbs).__name__}")
    say = print if verbose else (lambda *_: None)
    say("Setting up a sandbox:")
    say("  - hooking torch (a federation of its own)")
    hook = TorchHook(torch, federation=Federation())
    say(f"  - creating the workers {', '.join(WORKER_IDS)}")
    shares: list[list[torch.Tensor]] = [[] for _ in WORKER_IDS]
    if download_data:
        say("  - loading the data sets that ship with scikit-learn (nothing to download):")
        for dataset in DATASETS:
            say(f"      {dataset.title} (#{dataset.name}, {dataset.task})")
            for share, (x, y) in zip(shares, _parts(dataset, len(WORKER_IDS)), strict=True):
                share += [x, y]
        say("    (PySyft's sandbox served Boston housing, which scikit-learn removed in 1.2; the "
            "regression set here is #diabetes)")
        say("  - handing each worker consecutive parts (the model owner's own data: get() reads it back)")
    workers = [
        VirtualWorker(hook, id=worker_id, data=tuple(share) if share else None)
        for worker_id, share in zip(WORKER_IDS, shares, strict=True)
    ]
    gbs["hook"] = hook
    gbs.update(zip(WORKER_IDS, workers, strict=True))
    gbs["workers"] = workers
    gbs["grid"] = PrivateGridNetwork(*workers)
    say("  - stored hook, " + ", ".join(WORKER_IDS) + ", workers and grid in the namespace given")
    say("Done.")


__all__ = ["DATASETS", "PrivateGridNetwork", "SandboxDataset", "create_sandbox"]
