"""`Optims`: one optimizer per worker over the same parameters (PySyft's ``floptimizer.Optims``).

A model that visits several workers in turn (``model.send(data.location)``) keeps its parameters,
but an optimizer's state (momentum, Adam's moments) lives on the worker where it was made: it
cannot follow the model. `Optims` keeps one optimizer per worker, each of the given optimizer's
class and settings over the same parameters, so each worker's state stays where it belongs.
Importable as PySyft spells it: ``from fedsecure.federated.floptimizer import Optims``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def _worker_id(worker: Any) -> str:
    wid = worker if isinstance(worker, str) else getattr(worker, "id", None)
    if not isinstance(wid, str):
        raise TypeError(f"Optims takes workers or worker ids, got {type(worker).__name__}")
    return wid


class Optims:
    """``Optims(workers, optim=torch.optim.Adam(model.parameters(), lr=0.1))``; then
    ``optims.get_optim(worker_id)`` gives that worker's optimizer.

    ``optim`` is a template: each worker gets a fresh optimizer of its class with its parameter
    groups and settings (the template itself is not stepped).
    """

    def __init__(self, workers: Iterable[Any], optim: torch.optim.Optimizer) -> None:
        if not isinstance(optim, torch.optim.Optimizer):
            raise TypeError(f"optim must be a torch.optim.Optimizer, got {type(optim).__name__}")
        self.workers = [_worker_id(w) for w in workers]
        if not self.workers:
            raise ValueError("Optims needs at least one worker")
        self.optim = optim
        self.optimizers: dict[str, torch.optim.Optimizer] = {w: self._fresh() for w in self.workers}

    def _fresh(self) -> torch.optim.Optimizer:
        groups = [dict(group, params=list(group["params"])) for group in self.optim.param_groups]
        return type(self.optim)(groups, **self.optim.defaults)

    def get_optim(self, worker: Any) -> torch.optim.Optimizer:
        """The optimizer for ``worker`` (a worker or its id)."""
        wid = _worker_id(worker)
        if wid not in self.optimizers:
            raise KeyError(f"no optimizer for worker {wid!r}; Optims was made for {self.workers}")
        return self.optimizers[wid]

    def count_vals(self) -> int:
        """How many state entries the optimizers hold, all workers together."""
        return sum(len(o.state) for o in self.optimizers.values())

    def __repr__(self) -> str:
        return f"Optims({type(self.optim).__name__} for {self.workers})"
