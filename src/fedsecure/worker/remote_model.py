"""`RemoteModel`: a model held by one worker, as the model owner drives it.

One handle for the whole life of a model on a worker (put, fit, evaluate, move, copy, aggregate,
get, release), used alike by the tutorial's verbs (``model.send``/``move``/``get`` in
`fedsecure.pointer.module`), by the engine's rounds and by secure aggregation. ``module_id`` names
the model there, ``ids`` its tensors (parameters, then buffers, as `state_tensors` lists them).
A model sent as weights only (its forward pass runs op by op on pointers) has no module on the
worker: ``module_id`` is None and only its pointers stand for it.

``owns_tensors``: whether this handle frees the tensors' ids (the engine's models), or pointers hold
them and free each their own (a tutorial model's parameters, which a user may keep).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fedsecure.wire import messages as m
from fedsecure.wire.ids import new_id
from fedsecure.worker.client import WorkerClient


class RemoteModel:
    __slots__ = ("worker", "module_id", "ids", "live", "owns_tensors", "__weakref__")

    def __init__(self, worker: WorkerClient, module_id: int | None, ids: Sequence[int] = (), *,
                 owns_tensors: bool = True) -> None:
        self.worker = worker
        self.module_id = module_id
        self.ids = list(ids)
        self.live = True
        self.owns_tensors = owns_tensors

    def _release_tensors(self, worker: WorkerClient) -> None:
        if self.owns_tensors:
            for i in self.ids:
                worker.release(i)

    def __repr__(self) -> str:
        where = "weights only" if self.module_id is None else f"{self.module_id:#018x}"
        return f"RemoteModel(@{self.worker.id}:{where}, {len(self.ids)} tensors{'' if self.live else ', gone'})"

    @classmethod
    def put(cls, worker: WorkerClient, spec: dict[str, Any], tensors: Sequence[torch.Tensor], *,
            private: bool = False, owns_tensors: bool = True) -> RemoteModel:
        """Build the model described by ``spec`` on ``worker``, holding ``tensors``."""
        module_id, ids = new_id(), [new_id() for _ in tensors]
        worker.request(m.PutModule(module_id, spec, [t.detach() for t in tensors], ids, private))
        return cls(worker, module_id, ids, owns_tensors=owns_tensors)

    def module(self) -> int:
        """The model's id on its worker (an error for a model sent as weights only)."""
        if self.module_id is None:
            raise ValueError(f"{self!r} has no model on its worker (it was sent as weights only)")
        return self.module_id

    # -- work done where the model is ---------------------------------------------------

    def fit(self, x_tag: str, y_tag: str, training: dict[str, Any], seed: int, *,
            deadline: float | None = None) -> dict[str, Any]:
        """A round's local training on the worker's data (tagged ``x_tag``, ``y_tag``); the reply (examples, loss, ...)."""
        worker = self.worker
        return worker.request(m.Fit(self.module(), x_tag, y_tag, training, seed),
                              deadline=deadline)  # type: ignore[no-any-return]

    def evaluate(self, x_tag: str, y_tag: str, settings: dict[str, Any], *,
                 deadline: float | None = None) -> int:
        """Evaluate on the worker's data; the id there of the sums (loss, correct, count)."""
        worker, result = self.worker, new_id()
        worker.request(m.Evaluate(self.module(), x_tag, y_tag, settings, result),
                       deadline=deadline)
        return result

    # -- where the model is -------------------------------------------------------------

    def move(self, destination: WorkerClient) -> RemoteModel:
        """Send the model straight to ``destination`` (the model owner sends only the order); this
        handle then stands for it there."""
        source, module_id = self.worker, new_id()
        ids = [new_id() for _ in self.ids]
        # The module's id goes with the move; its tensors' ids are freed by the same request (before
        # it runs: the module holds its tensors itself), so nothing of the model stays behind even
        # where the source is not asked again for a long time (one owner among thousands).
        self._release_tensors(source)
        source.request(m.MoveModule(self.module(), destination.id, module_id, ids))
        self.worker, self.module_id, self.ids = destination, module_id, ids
        return self

    def move_fold(self, destination: WorkerClient, sum_id: int, weighted: bool) -> None:
        """`move` to ``destination`` and `fold` there into the sum ``sum_id`` in one request (to this
        model's worker): the model is never stored at the destination, and this handle is spent."""
        source = self.worker
        self._release_tensors(source)  # freed by the same request, before it runs (as in `move`)
        source.request(m.MoveFold(self.module(), destination.id, sum_id, weighted))
        self.live = False

    def copy(self) -> RemoteModel:
        """A copy on the same worker."""
        worker, module_id = self.worker, new_id()
        ids = [new_id() for _ in self.ids]
        worker.request(m.CopyModule(self.module(), module_id, ids))
        return RemoteModel(worker, module_id, ids, owns_tensors=self.owns_tensors)

    @classmethod
    def aggregate(cls, worker: WorkerClient, models: Sequence[RemoteModel], weighted: bool) -> RemoteModel:
        """``worker``'s own aggregation function over models it holds: their (sample-weighted) mean."""
        module_id, ids = new_id(), [new_id() for _ in models[0].ids]
        worker.request(m.AggregateModules([r.module() for r in models], weighted, module_id, ids))
        return cls(worker, module_id, ids, owns_tensors=models[0].owns_tensors)

    def fold(self, sum_id: int, weighted: bool) -> None:
        """Add this model, on an aggregator, into the sum ``sum_id`` there (made by the first fold),
        which only `close_sum` reads; the model is consumed, and this handle spent."""
        worker = self.worker
        self._release_tensors(worker)  # freed by the same request, before it runs (as in `move`)
        worker.request(m.FoldModule(sum_id, self.module(), weighted))
        self.live = False

    @classmethod
    def close_sum(cls, worker: WorkerClient, sum_ids: Sequence[int], tensors: int) -> RemoteModel:
        """The mean of the models folded into the sums ``sum_ids`` on ``worker`` (added in that
        order), as a model of ``tensors`` tensors."""
        module_id, ids = new_id(), [new_id() for _ in range(tensors)]
        worker.request(m.CloseSum(list(sum_ids), module_id, ids))
        return cls(worker, module_id, ids)

    @classmethod
    def aggregate_updates(cls, worker: WorkerClient, models: Sequence[RemoteModel], reference: RemoteModel,
                          rule: dict[str, Any]) -> tuple[RemoteModel, dict[str, Any]]:
        """The aggregator's robust or clipped rule over the updates ``models`` minus ``reference``;
        the new model and what the rule itself releases."""
        module_id, ids = new_id(), [new_id() for _ in reference.ids]
        released = worker.request(m.AggregateUpdates([r.module() for r in models],
                                                     reference.module(), rule, module_id, ids))
        return cls(worker, module_id, ids), dict(released or {})

    # -- the end --------------------------------------------------------------------------

    def get(self, *, grads: bool = False) -> Any:
        """The model's tensors (with ``grads``: ``{"values": [...], "grads": [...]}``), if the worker's
        policy lets them leave; the worker deletes the model, and this handle is spent."""
        worker = self.worker
        # Its tensors' ids are freed by the same request, before it runs (as in `move`): the
        # model's memory goes back now, not with the worker's next request (an aggregator's mean
        # would otherwise stay there through the model owner's evaluation).
        self._release_tensors(worker)
        self.live = False
        return worker.request(m.GetModule(self.module(), grads))

    def release(self) -> None:
        """Forget the model on its worker (freed with the next request there)."""
        if self.live:
            self.live = False
            if self.module_id is not None:
                self.worker.release(self.module_id)
            self._release_tensors(self.worker)
