"""`fit`, the one-call form of the engine: on workers the caller holds, or on a backend that hosts
them (a simulation on Ray or in processes, `fedsecure.experiment`), started and stopped around the run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from fedsecure.fl.engine import Engine
from fedsecure.fl.history import History
from fedsecure.fl.strategy import ConfigurationError, Strategy
from fedsecure.worker.client import WorkerClient


class Backend(Protocol):
    """What hosts the owners for a run: entered before the first round, left after the last."""

    def __enter__(self) -> Hosted: ...

    def __exit__(self, *exc: object) -> Any: ...


class Hosted(Protocol):
    workers: list[WorkerClient]
    aggregator: WorkerClient | None
    groups: dict[str, int]
    share_holders: list[WorkerClient]


_NOT_GIVEN: Any = object()


def fit(
    model: nn.Module,
    workers: Sequence[WorkerClient] | None,
    strategy: Strategy,
    *,
    rounds: int,
    aggregator: WorkerClient | None = _NOT_GIVEN,
    backend: Backend | None = None,
    test_data: tuple[torch.Tensor, torch.Tensor] | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    **options: Any,
) -> tuple[nn.Module, History]:
    """Train ``model`` for ``rounds`` rounds of ``strategy`` on ``workers``; return it and its `History`.

    Either ``workers`` and ``aggregator`` (None for pairwise secure aggregation), or ``workers=None``
    and ``backend``: an object that hosts them while the run goes, such as
    ``fedsecure.experiment.RaySimulation(exp)`` or ``Simulation(exp)``, which `fit` enters and leaves.
    Workers hold their training data under the tags ``data`` (default ``("x", "y")``) and,
    for federated evaluation, ``eval_data`` (``("x_test", "y_test")``). ``test_data`` is the model
    owner's own test set for central evaluation after every round. With ``checkpoint`` a
    directory, every round is saved there; ``resume=True`` continues from it. More options:
    ``secure_aggregation="pairwise"``: no party sees an update, the model owner learns only their
    sum (`fedsecure.fl.secure`; ``secure=SecureSettings(...)``; ``aggregator`` may then be None).
    ``secure_aggregation="shares"`` with ``share_holders=[w1, w2, ...]``: each update is split into
    additive shares among holders that must not all collude; the model owner learns only the sum.
    `Engine`'s (``work_deadline``: seconds a worker may take to train, default an hour; ``seed``,
    ``parallelism``, ``retries``, ``progress``, ``test_loss``, ``on_round``: called with each
    round's metrics).
    """
    if backend is not None:
        if workers is not None or aggregator is not _NOT_GIVEN:
            raise ConfigurationError("fit takes workers and an aggregator, or a backend that hosts them "
                                     "(workers=None), not both")
        with backend as hosted:
            hosting: dict[str, Any] = {"groups": hosted.groups}  # owners of one lane of a host train in turn
            if hosted.share_holders:
                hosting["share_holders"] = hosted.share_holders
            return fit(model, hosted.workers, strategy, rounds=rounds, aggregator=hosted.aggregator,
                       test_data=test_data, checkpoint=checkpoint, resume=resume, **hosting, **options)
    if workers is None or aggregator is _NOT_GIVEN:
        raise ConfigurationError("fit needs workers and aggregator= (None for pairwise secure aggregation), "
                                 "or workers=None and backend= (a simulation that hosts them)")
    engine = Engine(model, workers, strategy, aggregator=aggregator, test_data=test_data,
                    checkpoint=checkpoint, **options)
    if resume:
        engine.resume()
    return engine.run(rounds)
