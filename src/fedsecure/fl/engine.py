"""The FedAvg engine: `fit` runs rounds of federated training on workers, virtual or remote.

Each round, for every worker the strategy picks: the global model goes to the worker, the worker
trains it on its own data in one message (`fedsecure.wire.messages.Fit`), and the trained model
moves from the worker straight to the aggregator. The aggregator applies its fixed rule and
releases only the aggregate, which is all the model owner receives; the strategy turns it into the
next global model. A worker that fails arrives as a `Failure` value; the round goes on when at
least ``strategy.min_fit_workers`` answered.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedsecure.errors import FedsecureError
from fedsecure.fl import checkpoint as ckpt
from fedsecure.fl.history import History
from fedsecure.fl.progress import Progress
from fedsecure.fl.strategy import (
    AggregationRule,
    ConfigurationError,
    EvaluateAggregate,
    EvaluatePlan,
    Failure,
    FitAggregate,
    FitPlan,
    Parameters,
    Strategy,
)
from fedsecure.wire import messages as m
from fedsecure.worker import training
from fedsecure.worker.client import WorkerClient
from fedsecure.worker.core import new_id
from fedsecure.worker.modules import describe, state_tensors


class RoundFailed(FedsecureError, RuntimeError):
    """Too few workers answered a round, even after retrying it."""


@dataclass(frozen=True, slots=True)
class _Trained:
    worker: str
    module_id: int  # on the aggregator
    ids: list[int]
    examples: int
    loss: float | None


def parameters_of(model: nn.Module) -> Parameters:
    return {name: t.detach().clone() for name, t in state_tensors(model)}


def load_parameters(model: nn.Module, parameters: Mapping[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, t in state_tensors(model):
            t.copy_(parameters[name])


def _seed(*parts: object) -> int:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class Engine:
    """One run of federated training. `fit` below is the one-call form."""

    def __init__(
        self,
        model: nn.Module,
        workers: Sequence[WorkerClient],
        strategy: Strategy,
        *,
        aggregator: WorkerClient,
        data: tuple[str, str] = ("x", "y"),
        eval_data: tuple[str, str] = ("x_test", "y_test"),
        test_data: tuple[torch.Tensor, torch.Tensor] | None = None,
        test_loss: str = "cross_entropy",
        seed: int = 0,
        parallelism: int | None = None,
        retries: int = 1,
        progress: bool | Progress = False,
        checkpoint: str | Path | None = None,
        settings: Mapping[str, Any] | None = None,
        on_round: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        spec = describe(model)
        if spec is None:
            raise ConfigurationError(
                f"{type(model).__name__} uses parts outside the workers' allow-list: the engine "
                "sends models as an architecture built from allow-listed layers, for example an "
                "nn.Sequential of Conv2d, ReLU, MaxPool2d, Flatten and Linear, or as a custom module "
                "whose forward torch.fx traces into allow-listed operations (see docs/models.md)"
            )
        ids = [w.id for w in workers]
        if len(set(ids)) != len(ids):
            raise ConfigurationError(f"worker ids must be distinct, got {ids}")
        if aggregator.id in ids:
            raise ConfigurationError(f"the aggregator {aggregator.id!r} cannot also be a training worker")
        if not workers:
            raise ConfigurationError("federated training needs at least one worker")
        self.model, self.spec = model, spec
        self.workers = {w.id: w for w in workers}
        self.strategy, self.aggregator = strategy, aggregator
        self.data, self.eval_data, self.test_data, self.test_loss = data, eval_data, test_data, test_loss
        self.seed, self.retries = seed, retries
        self.parallelism = parallelism or 1
        self.progress = progress if isinstance(progress, Progress) else Progress(enabled=progress)
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.settings = dict(settings or {})
        self.on_round = on_round
        self.history = History()
        self.parameters = strategy.initialize_parameters(parameters_of(model))
        self.round = 0

    # -- resume ----------------------------------------------------------------------

    def resume(self) -> bool:
        """Continue from the checkpoint directory's last complete round, if there is one."""
        if self.checkpoint is None:
            raise ConfigurationError("resuming needs a checkpoint directory (checkpoint=...)")
        saved = ckpt.load(self.checkpoint)
        if saved is None:
            return False
        if saved.settings != self.settings:
            changed = sorted(k for k in saved.settings.keys() | self.settings.keys()
                             if saved.settings.get(k) != self.settings.get(k))
            raise ckpt.CheckpointError(
                f"the checkpoint in {self.checkpoint} was written by a run with other settings "
                f"({', '.join(changed)}); resume with the same configuration or use a new output directory"
            )
        if set(saved.parameters) != set(self.parameters):
            raise ckpt.CheckpointError(f"the checkpoint in {self.checkpoint} holds another model's weights")
        self.parameters = {k: saved.parameters[k] for k in self.parameters}  # safetensors sorts names
        self.strategy.load_state_dict(saved.strategy_state)
        self.history = History(saved.history)
        self.round = saved.round
        return True

    # -- a round ---------------------------------------------------------------------

    def _put(self, worker: WorkerClient, parameters: Parameters) -> tuple[int, list[int]]:
        module_id, ids = new_id(), [new_id() for _ in parameters]
        tensors = list(parameters.values())
        worker.request(m.PutModule(worker.take_release(), module_id, self.spec, tensors, ids, False))
        return module_id, ids

    def _forget(self, worker: WorkerClient, module_id: int, ids: list[int]) -> None:
        worker.release(module_id)
        for i in ids:
            worker.release(i)

    def _train_one(self, worker: WorkerClient, plan: FitPlan, server_round: int) -> _Trained:
        module_id, ids = self._put(worker, self.parameters)
        try:
            reply = worker.request(
                m.Fit(worker.take_release(), module_id, self.data[0], self.data[1], plan.training.to_wire(),
                      _seed(self.seed, server_round, worker.id))
            )
            moved_id, moved_ids = new_id(), [new_id() for _ in ids]
            worker.request(m.MoveModule(worker.take_release(), module_id, self.aggregator.id, moved_id, moved_ids))
        except BaseException:
            self._forget(worker, module_id, ids)
            raise
        for i in ids:  # the module's id went with the move; its tensors' ids are freed here
            worker.release(i)
        return _Trained(worker.id, moved_id, moved_ids, int(reply["examples"]), reply.get("loss"))

    def _each(self, names: Sequence[str], task: Callable[[WorkerClient], Any], phase: str
              ) -> tuple[list[Any], list[Failure]]:
        done: list[Any] = []
        failures: list[Failure] = []

        def run(name: str) -> None:
            try:
                done.append(task(self.workers[name]))
            except FedsecureError as exc:
                failures.append(Failure(worker=name, phase=phase, error=f"{type(exc).__name__}: {exc}"))
            self.progress.worker_done()

        if self.parallelism <= 1:
            for name in names:
                run(name)
        else:
            with ThreadPoolExecutor(max_workers=min(self.parallelism, len(names))) as pool:
                list(pool.map(run, names))
        return done, failures

    def _aggregate(self, rule: AggregationRule, trained: list[_Trained]) -> Parameters:
        agg = self.aggregator
        new_module, new_ids = new_id(), [new_id() for _ in self.parameters]
        plain = rule.name == "mean" and rule.clip_norm is None and rule.noise_multiplier == 0
        reference: tuple[int, list[int]] | None = None
        try:
            if plain:
                agg.request(m.AggregateModules(agg.take_release(), [t.module_id for t in trained],
                                               rule.weighted, new_module, new_ids))
            else:
                reference = self._put(agg, self.parameters)
                agg.request(m.AggregateUpdates(agg.take_release(), [t.module_id for t in trained], reference[0],
                                               rule.to_wire(), new_module, new_ids))
        finally:
            for t in trained:
                self._forget(agg, t.module_id, t.ids)
            if reference is not None:
                self._forget(agg, *reference)
        values = agg.request(m.GetModule(agg.take_release(), new_module))
        for i in new_ids:
            agg.release(i)
        return dict(zip(self.parameters, values, strict=True))

    def _fit_round(self, server_round: int) -> tuple[FitPlan, FitAggregate, list[Failure]]:
        names = list(self.workers)
        for attempt in range(self.retries + 1):
            rng = random.Random(f"{self.seed}:{server_round}:{attempt}")
            plan = self.strategy.configure_fit(server_round, self.parameters, names, rng)
            unknown = [w for w in plan.workers if w not in self.workers]
            if unknown:
                raise ConfigurationError(f"the strategy chose unknown workers {unknown}")
            self.progress.start_phase(server_round, "fit", len(plan.workers))
            task: Callable[[WorkerClient], _Trained] = partial(self._train_one, plan=plan, server_round=server_round)
            trained, failures = self._each(plan.workers, task, "fit")
            if len(trained) >= self.strategy.min_fit_workers:
                trained.sort(key=lambda t: t.worker)
                parameters = self._aggregate(plan.rule, trained)
                examples = sum(t.examples for t in trained)
                losses = [(t.loss, t.examples) for t in trained if t.loss is not None]
                metrics = {"train_loss": sum(loss * n for loss, n in losses) / sum(n for _, n in losses)} if losses else {}
                aggregate = FitAggregate(parameters=parameters, num_examples=examples,
                                         workers=tuple(t.worker for t in trained), metrics=metrics)
                return plan, aggregate, failures
            for t in trained:
                self._forget(self.aggregator, t.module_id, t.ids)
        reasons = "; ".join(f"{f.worker}: {f.error}" for f in failures)
        raise RoundFailed(
            f"round {server_round}: only {len(trained)} of {len(plan.workers)} workers finished training, "
            f"{self.strategy.min_fit_workers} are needed (tried {self.retries + 1} times). Failures: {reasons}"
        )

    def _evaluate_one(self, worker: WorkerClient, plan: EvaluatePlan) -> tuple[str, int, list[int]]:
        module_id, ids = self._put(worker, self.parameters)
        result = new_id()
        try:
            worker.request(m.Evaluate(worker.take_release(), module_id, self.eval_data[0], self.eval_data[1],
                                      {"loss": plan.loss, "batch_size": plan.batch_size}, result))
            moved = new_id()
            worker.request(m.Move(worker.take_release(), result, self.aggregator.id, moved))
        finally:
            self._forget(worker, module_id, ids)
        return worker.id, moved, []

    def _federated_evaluate(self, server_round: int) -> dict[str, float]:
        plan = self.strategy.configure_evaluate(server_round, self.parameters, list(self.workers),
                                                random.Random(f"{self.seed}:{server_round}:evaluate"))
        if plan is None:
            return {}
        self.progress.start_phase(server_round, "evaluate", len(plan.workers))
        done, failures = self._each(plan.workers, lambda w: self._evaluate_one(w, plan), "evaluate")
        if not done:
            return {}
        agg, result = self.aggregator, new_id()
        try:
            agg.request(m.Aggregate(agg.take_release(), [d[1] for d in done], False, result))
        finally:
            for d in done:
                agg.release(d[1])
        mean = agg.request(m.Get(agg.take_release(), result))["tensor"]
        loss_sum, correct, count = (float(v) * len(done) for v in mean)  # the mean of sums, times n
        accuracy = correct / count if plan.loss in ("cross_entropy", "nll_loss") else None
        aggregate = EvaluateAggregate(loss=loss_sum / count, accuracy=accuracy, num_examples=round(count),
                                      workers=tuple(sorted(d[0] for d in done)))
        return self.strategy.aggregate_evaluate(server_round, aggregate, failures)

    def _central_evaluate(self, server_round: int) -> dict[str, float]:
        metrics = dict(self.strategy.evaluate(server_round, self.parameters) or {})
        if self.test_data is not None:
            load_parameters(self.model, self.parameters)
            x, y = self.test_data
            loss, correct, count = training.evaluate(self.model, x, y, self.test_loss, 1024).tolist()
            metrics["central_loss"] = loss / count
            if self.test_loss in ("cross_entropy", "nll_loss"):
                metrics["central_accuracy"] = correct / count
        return metrics

    def run_round(self) -> dict[str, Any]:
        server_round = self.round + 1
        started = time.perf_counter()
        plan, aggregate, failures = self._fit_round(server_round)
        fit_time = time.perf_counter() - started
        self.parameters = self.strategy.aggregate_fit(server_round, self.parameters, aggregate, failures)
        row: dict[str, Any] = {"round": server_round, "workers": len(aggregate.workers),
                               "examples": aggregate.num_examples, **aggregate.metrics}
        row.update(getattr(self.strategy, "round_metrics", dict)())
        evaluated = time.perf_counter()
        row.update(self._central_evaluate(server_round))
        row.update(self._federated_evaluate(server_round))
        row["fit_seconds"] = fit_time
        row["evaluate_seconds"] = time.perf_counter() - evaluated
        row["round_seconds"] = time.perf_counter() - started
        if failures:
            row["failures"] = [f"{f.worker} ({f.phase}): {f.error}" for f in failures]
        self.history.add(row)
        self.round = server_round
        if self.checkpoint is not None:
            ckpt.save(self.checkpoint, server_round=server_round, parameters=self.parameters,
                      strategy_state=self.strategy.state_dict(), history=self.history.rows, settings=self.settings)
        self.progress.end_round(row)
        if self.on_round is not None:
            self.on_round(row)
        return row

    def run(self, rounds: int) -> tuple[nn.Module, History]:
        if rounds < 1:
            raise ConfigurationError(f"rounds must be >= 1, got {rounds}")
        self.progress.start(rounds, self.round)
        try:
            while self.round < rounds:
                self.run_round()
                if getattr(self.strategy, "should_stop", lambda: False)():
                    self.progress.note("the strategy stopped training (its privacy budget is spent)")
                    break
        finally:
            self.progress.close()
        load_parameters(self.model, self.parameters)
        return self.model, self.history


def fit(
    model: nn.Module,
    workers: Sequence[WorkerClient],
    strategy: Strategy,
    *,
    rounds: int,
    aggregator: WorkerClient,
    test_data: tuple[torch.Tensor, torch.Tensor] | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    **options: Any,
) -> tuple[nn.Module, History]:
    """Train ``model`` for ``rounds`` rounds of ``strategy`` on ``workers``; return it and its `History`.

    Workers hold their training data under the tags ``data`` (default ``("x", "y")``) and,
    for federated evaluation, ``eval_data`` (``("x_test", "y_test")``). ``test_data`` is the model
    owner's own test set for central evaluation after every round. With ``checkpoint`` a
    directory, every round is saved there; ``resume=True`` continues from it. More options:
    `Engine`'s (``seed``, ``parallelism``, ``retries``, ``progress``, ``test_loss``, ``on_round``: called
    with each round's metrics).
    """
    engine = Engine(model, workers, strategy, aggregator=aggregator, test_data=test_data,
                    checkpoint=checkpoint, **options)
    if resume:
        engine.resume()
    return engine.run(rounds)
