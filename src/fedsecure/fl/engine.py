"""The FedAvg engine: `fit` runs rounds of federated training on workers, virtual or remote.

Each round, for every worker the strategy picks: the global model goes to the worker, the worker
trains it on its own data in one message (`fedsecure.wire.messages.Fit`), and the trained model
moves from the worker straight to the aggregator, which folds it into the round's sealed sum
there and then (a plain mean; `MoveFold`), or keeps it for its robust or clipped rule. The
aggregator releases only the aggregate, which is all the model owner receives; the strategy turns it into the
next global model. A worker that fails arrives as a `Failure` value; the round goes on when at
least ``strategy.min_fit_workers`` answered. With ``secure_aggregation="pairwise"`` or ``"shares"``
no party sees a trained model: the workers mask it, or split it among share holders, and the model
owner learns only the sum (`fedsecure.fl.secure`).
"""

from __future__ import annotations

import hashlib
import math
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

from fedsecure.errors import FedsecureError, SecureAggregationError
from fedsecure.fl import checkpoint as ckpt
from fedsecure.fl.history import History
from fedsecure.fl.parties import check_parties, sendable
from fedsecure.fl.progress import Progress
from fedsecure.fl.report import RoundClock, epsilon_of, local_epsilon, who
from fedsecure.fl.secure import SecureSettings, Trained, secure_mean, shared_mean
from fedsecure.fl.strategy import (
    EVAL_BATCH,
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
from fedsecure.wire.ids import new_id
from fedsecure.worker import heap, training
from fedsecure.worker.client import WorkerClient
from fedsecure.worker.modules import state_tensors
from fedsecure.worker.remote_model import RemoteModel


class RoundFailed(FedsecureError, RuntimeError):
    """Too few workers answered a round, even after retrying it."""


@dataclass(frozen=True, slots=True)
class _Trained:
    worker: str
    model: RemoteModel  # on the aggregator
    examples: int
    loss: float | None
    epsilon: float | None = None  # the worker's local DP-SGD epsilon for this model owner, so far


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
    """One run of federated training. `fit` below is the one-call form.

    ``evaluate_every``: the model is evaluated (centrally on ``test_data`` and by the strategy's
    ``evaluate_fn``, and federated where the strategy asks for it) every that many rounds, and
    always after the last round of `run` or one after which the strategy stops training; with
    thousands of owners and few sampled per round, evaluation can take longer than training."""

    def __init__(
        self,
        model: nn.Module,
        workers: Sequence[WorkerClient],
        strategy: Strategy,
        *,
        aggregator: WorkerClient | None,
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
        groups: Mapping[str, int] | None = None,
        secure_aggregation: str = "trusted",
        secure: SecureSettings | None = None,
        work_deadline: float = 3600.0,
        share_holders: Sequence[WorkerClient] = (),
        evaluate_every: int = 1,
    ) -> None:
        if isinstance(evaluate_every, bool) or not isinstance(evaluate_every, int) or evaluate_every < 1:
            raise ConfigurationError(f"evaluate_every is a number of rounds >= 1, got {evaluate_every!r}")
        spec = sendable(model)
        aggregator = check_parties(workers, aggregator, secure_aggregation, share_holders)
        self.model, self.spec = model, spec
        self.workers = {w.id: w for w in workers}
        self.strategy = strategy
        self._aggregator = aggregator
        self.share_holders = list(share_holders)
        self.data, self.eval_data, self.test_data, self.test_loss = data, eval_data, test_data, test_loss
        self.seed, self.retries = seed, retries
        self.parallelism = parallelism or 1
        self.progress = progress if isinstance(progress, Progress) else Progress(enabled=progress)
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.settings = dict(settings or {})
        self.on_round = on_round
        self.groups = dict(groups or {})
        self.secure_aggregation = secure_aggregation
        self._kept: dict[str, list[RemoteModel]] = {}
        self._sums: dict[int, int] = {}  # lane -> the aggregator's sum its models fold into (a plain mean)
        self._last_failures: list[Failure] = []
        self.secure = secure or SecureSettings()
        self.work_deadline = work_deadline  # seconds a worker may take for a round's training
        self.history = History()
        self.clock = RoundClock()
        self.parameters = strategy.initialize_parameters(parameters_of(model))
        self.round = 0
        self.evaluate_every = evaluate_every
        self._last_round: int | None = None  # the last round of `run`, which is always evaluated

    @property
    def aggregator(self) -> WorkerClient:
        if self._aggregator is None:
            raise ConfigurationError(
                "this run has no aggregator (pairwise secure aggregation): federated evaluation needs one"
            )
        return self._aggregator

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

    def _put(self, worker: WorkerClient, parameters: Parameters) -> RemoteModel:
        return RemoteModel.put(worker, self.spec, list(parameters.values()))

    def _fit_on(self, worker: WorkerClient, plan: FitPlan, server_round: int) -> tuple[RemoteModel, dict[str, Any]]:
        """Send the global model to ``worker`` and train it there; (the model there, the reply)."""
        with self.clock.timed("transfer"):
            model = self._put(worker, self.parameters)
        try:
            with self.clock.timed("train"):
                reply = model.fit(self.data[0], self.data[1], plan.training.to_wire(),
                                  _seed(self.seed, server_round, worker.id), deadline=self.work_deadline)
        except BaseException:
            model.release()
            raise
        return model, reply

    def _train_one(self, worker: WorkerClient, plan: FitPlan, server_round: int) -> _Trained:
        """Train, then move the trained model to the aggregator; for a plain mean, the aggregator
        folds it into the round's sum as it arrives (`MoveFold`), and holds one sum, not every model."""
        model, reply = self._fit_on(worker, plan, server_round)
        try:
            with self.clock.timed("transfer"):
                if self._sums:
                    model.move_fold(self.aggregator, self._sums[self.groups.get(worker.id, -1)], plan.rule.weighted)
                else:
                    model.move(self.aggregator)
        except BaseException:
            model.release()
            raise
        return _Trained(worker.id, model, int(reply["examples"]), reply.get("loss"), epsilon_of(reply))

    def _train_kept(self, worker: WorkerClient, plan: FitPlan, server_round: int) -> Trained:
        """Train, and keep the trained model and the global one on the worker (secure aggregation)."""
        with self.clock.timed("transfer"):
            reference = self._put(worker, self.parameters)
        try:
            model, reply = self._fit_on(worker, plan, server_round)
        except BaseException:
            reference.release()
            raise
        self._kept[worker.id] = [model, reference]
        return Trained(worker.id, model.module(), reference.module(), int(reply["examples"]), epsilon_of(reply))

    def _secure_round(self, plan: FitPlan, server_round: int) -> tuple[FitAggregate, list[Failure]] | None:
        rule = plan.rule
        if rule.name != "mean" or rule.options:
            raise ConfigurationError(
                f"secure aggregation ({self.secure_aggregation}) computes the (weighted) mean only: the aggregation "
                f"rule must be 'mean' (robust rules need an aggregator that sees the updates), got {rule}"
            )
        privacy: dict[str, Any] = {}
        if rule.clip_norm is not None:  # DP-FedAvg with the noise split among the workers
            privacy["clip_norm"] = rule.clip_norm
            if rule.noise_multiplier:
                privacy["noise_std"] = rule.noise_multiplier * rule.clip_norm / math.sqrt(len(plan.workers))
        task: Callable[[WorkerClient], Trained] = partial(self._train_kept, plan=plan, server_round=server_round)
        self._kept = {}
        try:
            trained, failures = self._each(plan.workers, task, "fit")
            self._last_failures = failures
            if len(trained) < self.strategy.min_fit_workers:
                return None
            trained.sort(key=lambda t: t.worker)
            try:
                with self.clock.timed("aggregate"):
                    parameters, survivors, lost = self._secure_sum(trained, rule.weighted, privacy)
            except SecureAggregationError as exc:  # too few survivors, a holder lost: nothing was revealed
                lost = [f for f in exc.failures if isinstance(f, Failure)]
                self._last_failures = [*failures, *lost,
                                       Failure(worker="(round)", phase="secure aggregation", error=str(exc))]
                return None
        finally:
            for kept in self._kept.values():
                for model in kept:
                    model.release()
        failures += lost
        self._last_failures = failures
        if len(survivors) < self.strategy.min_fit_workers:
            return None
        examples = sum(t.examples for t in trained if t.worker in survivors)
        return FitAggregate(parameters=parameters, num_examples=examples, workers=tuple(survivors),
                            metrics=local_epsilon(trained)), failures

    def _secure_sum(self, trained: list[Trained], weighted: bool, privacy: dict[str, Any]
                    ) -> tuple[Parameters, list[str], list[Failure]]:
        if self.secure_aggregation == "shares":
            return shared_mean(trained, self.workers, self.share_holders, self.parameters, self.secure, self._each,
                               weighted=weighted, privacy=privacy)
        return secure_mean(trained, self.workers, self.parameters, self.secure, self._each,
                           weighted=weighted, privacy=privacy)

    def _each(self, names: Sequence[str], task: Callable[[WorkerClient], Any], phase: str
              ) -> tuple[list[Any], list[Failure]]:
        done: list[Any] = []
        failures: list[Failure] = []

        def run(name: str) -> None:
            try:
                done.append(task(self.workers[name]))
            except FedsecureError as exc:
                failures.append(Failure(worker=name, phase=phase, error=f"{type(exc).__name__}: {exc}"))
                self.progress.worker_failed(name, phase, failures[-1].error)
            self.progress.worker_done()

        if self.groups:  # one thread per group (a host, or one of its lanes), its workers one after the other
            buckets: dict[int, list[str]] = {}
            for name in names:
                buckets.setdefault(self.groups.get(name, -1), []).append(name)
            def run_all(bucket: list[str]) -> None:
                for name in bucket:
                    run(name)

            with ThreadPoolExecutor(max_workers=len(buckets)) as pool:
                list(pool.map(run_all, buckets.values()))
        elif self.parallelism <= 1:
            for name in names:
                run(name)
        else:
            with ThreadPoolExecutor(max_workers=min(self.parallelism, len(names))) as pool:
                list(pool.map(run, names))
        return done, failures

    def _lane_sums(self, plan: FitPlan) -> dict[int, int]:
        """For a plain mean, a sum on the aggregator for each lane (a group of workers that train
        one after the other): the models of a lane arrive in its order, so each sum, and the mean
        of the sums added in lane order, is the same in every run. Workers that train in a pool of
        threads (``parallelism``) arrive in any order: their models are kept and averaged at the end."""
        rule = plan.rule
        if rule.name != "mean" or rule.clip_norm is not None or rule.noise_multiplier or (
                self.parallelism > 1 and not self.groups):
            return {}
        return {lane: new_id() for lane in sorted({self.groups.get(w, -1) for w in plan.workers})}

    def _aggregate(self, rule: AggregationRule, trained: list[_Trained]) -> tuple[Parameters, dict[str, float]]:
        agg = self.aggregator
        reference: RemoteModel | None = None
        released: dict[str, Any] = {}
        models = [t.model for t in trained]
        try:
            if self._sums:  # the models were folded in as they came, into their lane's sum
                lanes = sorted({self.groups.get(t.worker, -1) for t in trained})
                combined = RemoteModel.close_sum(agg, [self._sums[g] for g in lanes], len(self.parameters))
            elif rule.name == "mean" and rule.clip_norm is None and rule.noise_multiplier == 0:
                combined = RemoteModel.aggregate(agg, models, rule.weighted)
            else:
                reference = self._put(agg, self.parameters)
                combined, released = RemoteModel.aggregate_updates(agg, models, reference, rule.to_wire())
        finally:
            for model in models:
                model.release()
            if reference is not None:
                reference.release()
        values = combined.get()
        return dict(zip(self.parameters, values, strict=True)), {k: float(v) for k, v in released.items()}

    def _fit_round(self, server_round: int) -> tuple[FitPlan, FitAggregate, list[Failure]]:
        names = list(self.workers)
        for attempt in range(self.retries + 1):
            rng = random.Random(f"{self.seed}:{server_round}:{attempt}")
            plan = self.strategy.configure_fit(server_round, self.parameters, names, rng)
            unknown = [w for w in plan.workers if w not in self.workers]
            if unknown:
                raise ConfigurationError(f"the strategy chose unknown workers {unknown}")
            self.progress.start_phase(server_round, "fit", len(plan.workers))
            if self.secure_aggregation != "trusted":
                secured = self._secure_round(plan, server_round)
                if secured is not None:
                    return plan, *secured
                continue
            task: Callable[[WorkerClient], _Trained] = partial(self._train_one, plan=plan, server_round=server_round)
            self._sums = self._lane_sums(plan)
            trained, failures = self._each(plan.workers, task, "fit")
            self._last_failures = failures
            if len(trained) >= self.strategy.min_fit_workers:
                trained.sort(key=lambda t: t.worker)
                with self.clock.timed("aggregate"):
                    parameters, released = self._aggregate(plan.rule, trained)
                examples = sum(t.examples for t in trained)
                losses = [(t.loss, t.examples) for t in trained if t.loss is not None]
                metrics = {"train_loss": sum(loss * n for loss, n in losses) / sum(n for _, n in losses)} if losses else {}
                metrics.update(released)
                metrics.update(local_epsilon(trained))
                aggregate = FitAggregate(parameters=parameters, num_examples=examples,
                                         workers=tuple(t.worker for t in trained), metrics=metrics)
                return plan, aggregate, failures
            for t in trained:
                t.model.release()
            for sum_id in self._sums.values():  # sums too small to close go unread
                self.aggregator.release(sum_id)
        raise RoundFailed(
            f"round {server_round}: too few of the {len(plan.workers)} workers finished, "
            f"{self.strategy.min_fit_workers} are needed (tried {self.retries + 1} times)"
            + ("; the last try's failures: " + "; ".join(f"{f.worker}: {f.error}" for f in self._last_failures)
               if self._last_failures else "")
        )

    def _evaluate_one(self, worker: WorkerClient, plan: EvaluatePlan) -> tuple[str, int]:
        """Evaluate on ``worker``'s held-out data; the sums move to the aggregator: (worker, their id there)."""
        model = self._put(worker, self.parameters)
        try:
            result = model.evaluate(self.eval_data[0], self.eval_data[1],
                                    {"loss": plan.loss, "batch_size": plan.batch_size}, deadline=self.work_deadline)
            moved = new_id()
            model.release()  # freed by the Move's request: the worker may not be asked again for rounds
            worker.request(m.Move(result, self.aggregator.id, moved))
        finally:
            model.release()
        return worker.id, moved

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
            agg.request(m.Aggregate([d[1] for d in done], False, result))
        finally:
            for d in done:
                agg.release(d[1])
        mean = agg.request(m.Get(result))["tensor"]
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
            loss, correct, count = training.evaluate(self.model, x, y, self.test_loss, EVAL_BATCH).tolist()
            metrics["central_loss"] = loss / count
            if self.test_loss in ("cross_entropy", "nll_loss"):
                metrics["central_accuracy"] = correct / count
        return metrics

    def run_round(self) -> dict[str, Any]:
        server_round = self.round + 1
        started = time.perf_counter()
        self.clock.reset()
        plan, aggregate, failures = self._fit_round(server_round)
        fit_time = time.perf_counter() - started
        heap.trim()  # the round's models are released: their memory goes back before the evaluation's
        self.parameters = self._finite(server_round, self.strategy.aggregate_fit(server_round, self.parameters,
                                                                                 aggregate, failures))
        row: dict[str, Any] = {"round": server_round, "workers": len(aggregate.workers),
                               "examples": aggregate.num_examples, **aggregate.metrics}
        row.update(self.strategy.round_metrics())
        self.progress.start_phase(server_round, "evaluate", 0)
        evaluated = time.perf_counter()
        if (server_round % self.evaluate_every == 0 or server_round == self._last_round
                or self.strategy.should_stop()):
            row.update(self._central_evaluate(server_round))
            row.update(self._federated_evaluate(server_round))
            heap.trim()  # and the evaluation's, before the next round's models arrive
        row["fit_seconds"] = fit_time
        row.update(self.clock.split(fit_time))
        row["evaluate_seconds"] = time.perf_counter() - evaluated
        row["round_seconds"] = time.perf_counter() - started
        row.update(who(plan.workers, aggregate.workers, self.secure_aggregation != "trusted"))
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

    def _finite(self, server_round: int, parameters: Parameters) -> Parameters:
        """``parameters``, unless training diverged: then the run stops, keeping the last good model."""
        bad = [k for k, t in parameters.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            kept = f"; round {self.round}'s checkpoint in {self.checkpoint} is kept" if self.checkpoint and self.round else ""
            raise RoundFailed(
                f"round {server_round}: the aggregated model is not finite (NaN or Inf in {', '.join(bad[:3])}"
                f"{', ...' if len(bad) > 3 else ''}): training diverged, so the run stops{kept}. Lower the "
                "learning rate ([training] lr), clip the updates ([aggregation] clip_norm), or check the data"
            )
        return parameters

    def run(self, rounds: int) -> tuple[nn.Module, History]:
        if rounds < 1:
            raise ConfigurationError(f"rounds must be >= 1, got {rounds}")
        self.progress.start(rounds, self.round)
        self._last_round = rounds
        try:
            while self.round < rounds:
                if self.strategy.should_stop():
                    why = f"the strategy ended training after round {self.round} (its privacy budget allows no further round)"
                    self.progress.note(why)
                    self.progress.finish("stopped", why)
                    break
                self.run_round()
            else:
                self.progress.finish("finished")
        except KeyboardInterrupt:
            self.progress.finish("interrupted", f"interrupted in round {self.round + 1}")
            raise
        except BaseException as exc:
            self.progress.finish("failed", str(exc))
            raise
        load_parameters(self.model, self.parameters)
        return self.model, self.history

