"""Strategies: what the model owner asks of the workers each round, and what it does with the answer.

A strategy turns data into instructions and never does I/O (the engine, `fedsecure.fl.fit`, does).
Each phase of a round is one method: `configure_fit` picks the workers and their local training,
`aggregate_fit` turns the aggregate the aggregator released into the next global model;
`configure_evaluate` / `aggregate_evaluate` do the same for federated evaluation, and `evaluate`
is central evaluation on data the model owner holds.

The model owner never receives a single worker's update: `aggregate_fit` sees only what the
aggregator released (the weighted mean of the workers' models, or a robust rule's result), so every
server-side rule here is a function of that aggregate:

- `FedAvg`: McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
  Decentralized Data" (client fraction C, local epochs E, batch size B, sample-weighted mean).
- `FedProx`: Li et al. 2020, "Federated Optimization in Heterogeneous Networks" (a proximal term
  mu/2 * ||w - w_global||^2 in every worker's local loss).
- `FedAvgM`: Hsu et al. 2019, "Measuring the Effects of Non-Identical Data Distribution for
  Federated Visual Classification" (server momentum on the pseudo-gradient).
- `FedAdagrad`, `FedAdam`, `FedYogi`: Reddi et al. 2021, "Adaptive Federated Optimization"
  (Algorithm 2). beta_1 = 0.9 and beta_2 = 0.99 are the values the paper uses throughout; tau and
  the server learning rate were tuned per task over grids there, so our defaults (tau = 1e-3,
  eta = 10^-1.5) are points of those grids, not universal constants: tune them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from fedsecure.errors import FedsecureError
from fedsecure.worker.training import LOSSES

Parameters = dict[str, torch.Tensor]
"""A model's state: parameter and buffer names to tensors, in `state_dict` order."""

EVAL_BATCH = 256
"""Images per forward pass of an evaluation, central (the engine's, on the model owner's test set)
and federated (the workers'). McMahan et al.'s CNN on Fashion-MNIST's 10,000 test images (one-off:
one process, 2 threads, medians of 5, two runs each): 2.75-2.78 s and 47 MB above the process's
memory at 256 a pass, against 3.52-3.95 s and 245-259 MB at 1024 (each pass's activations outgrow
the CPU's caches), 3.00 s and 166 MB at 512, 2.85 s and 12 MB at 128; NIID-Bench's CNN
0.22-0.31 s at 256 against 0.29-0.34 s at 1024."""


class ConfigurationError(FedsecureError, ValueError):
    """A strategy or experiment setting is out of range."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigurationError(message)


@dataclass(frozen=True, slots=True)
class DPSGD:
    """Local DP-SGD on every worker (Abadi et al. 2016, "Deep Learning with Differential Privacy").

    Each step the worker draws a Poisson sample of its records, clips every record's gradient to L2
    norm ``max_grad_norm``, adds Gaussian noise of standard deviation ``noise_multiplier *
    max_grad_norm`` to their sum, and steps on the noisy mean. The worker accounts the steps it ran
    and reports its (epsilon, ``delta``) for this model owner, summed over all the rounds so far.
    ``noise_multiplier=0`` clips without noise: the worker then reports epsilon = inf.
    Workers need Opacus for it: ``pip install 'fedsecure[dp-sgd]'``.
    """

    noise_multiplier: float
    max_grad_norm: float
    delta: float = 1e-5

    def __post_init__(self) -> None:
        _check(
            _real(self.noise_multiplier) and self.noise_multiplier >= 0,
            f"DP-SGD noise_multiplier must be a finite number >= 0, got {self.noise_multiplier!r}",
        )
        _check(
            _real(self.max_grad_norm) and self.max_grad_norm > 0,
            f"DP-SGD max_grad_norm (the per-record clip bound) must be a finite number > 0, "
            f"got {self.max_grad_norm!r}",
        )
        _check(
            _real(self.delta) and 0 < self.delta < 1,
            f"DP-SGD delta must be in (0, 1), well below 1 / (records per worker), got {self.delta!r}",
        )

    def to_wire(self) -> dict[str, float]:
        return {
            "noise_multiplier": float(self.noise_multiplier),
            "max_grad_norm": float(self.max_grad_norm),
            "delta": float(self.delta),
        }


def _real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalTraining:
    """What each worker runs on its own data in one round: one command, not one message per op.

    ``optimizer`` is a name from the workers' optimizer allow-list (SGD, Adam, AdamW, Adagrad,
    RMSprop) and ``optimizer_args`` its hyperparameters besides ``lr`` (``momentum``,
    ``weight_decay``, ...). ``loss`` names a function of ``torch.nn.functional`` from `LOSSES`.
    ``proximal_mu`` > 0 adds FedProx's proximal term. ``max_steps`` caps the optimizer steps.
    ``dp_sgd``: run DP-SGD (`DPSGD`) instead of plain minibatch steps; each worker then protects
    every one of its records against everyone who sees its model, the aggregator included.
    """

    epochs: int = 1
    batch_size: int = 32
    optimizer: str = "SGD"
    lr: float = 0.01
    optimizer_args: Mapping[str, float | bool] = field(default_factory=dict)
    loss: str = "cross_entropy"
    proximal_mu: float = 0.0
    max_steps: int | None = None
    dp_sgd: DPSGD | None = None

    def __post_init__(self) -> None:
        _check(isinstance(self.epochs, int) and self.epochs >= 1, f"epochs must be >= 1, got {self.epochs!r}")
        _check(
            isinstance(self.batch_size, int) and self.batch_size >= 1,
            f"batch_size must be >= 1, got {self.batch_size!r}",
        )
        _check(self.lr > 0, f"the learning rate must be > 0, got {self.lr!r}")
        _check(self.loss in LOSSES, f"loss {self.loss!r} is not one of {', '.join(LOSSES)}")
        _check(self.proximal_mu >= 0, f"proximal_mu must be >= 0, got {self.proximal_mu!r}")
        _check(
            self.max_steps is None or (isinstance(self.max_steps, int) and self.max_steps >= 1),
            f"max_steps must be a positive integer or None, got {self.max_steps!r}",
        )
        _check(
            self.dp_sgd is None or isinstance(self.dp_sgd, DPSGD),
            f"dp_sgd must be a DPSGD(noise_multiplier=..., max_grad_norm=...) or None, got {self.dp_sgd!r}",
        )

    def to_wire(self) -> dict[str, Any]:
        return {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "optimizer": self.optimizer,
            "lr": float(self.lr),
            "optimizer_args": dict(self.optimizer_args),
            "loss": self.loss,
            "proximal_mu": float(self.proximal_mu),
            "max_steps": self.max_steps,
            "dp_sgd": None if self.dp_sgd is None else self.dp_sgd.to_wire(),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class AggregationRule:
    """The fixed function the aggregator applies to the workers' updates (deltas from the global
    model); its result is all the model owner receives.

    ``name``: "mean" (sample-weighted when ``weighted``), or a robust rule of
    `fedsecure.aggregate.rules`. ``clip_norm``: bound each update's L2 norm first (norm bounding,
    DP clipping). ``noise_multiplier``: add Gaussian noise of standard deviation
    ``noise_multiplier * clip_norm`` to the sum of the clipped updates (DP-FedAvg, McMahan et al.
    2018); needs ``clip_norm``. ``options``: the rule's own (``trim``, ``byzantine``, ``keep``).
    """

    name: str = "mean"
    weighted: bool = True
    clip_norm: float | None = None
    noise_multiplier: float = 0.0
    options: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(self.clip_norm is None or self.clip_norm > 0, f"clip_norm must be > 0, got {self.clip_norm!r}")
        _check(self.noise_multiplier >= 0, f"noise_multiplier must be >= 0, got {self.noise_multiplier!r}")
        _check(
            self.noise_multiplier == 0 or self.clip_norm is not None,
            "noise needs a clip_norm: the noise's scale is noise_multiplier * clip_norm",
        )
        _check(
            self.noise_multiplier == 0 or not self.weighted,
            "noise calibrated to clip_norm needs the unweighted mean (weighted=False): with sample "
            "weights one worker's influence is not bounded by clip_norm / n",
        )

    def to_wire(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "weighted": self.weighted,
            "clip_norm": None if self.clip_norm is None else float(self.clip_norm),
            "noise_multiplier": float(self.noise_multiplier),
            "options": {k: float(v) for k, v in self.options.items()},
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class FitPlan:
    """One round's training: who trains, how, and how the aggregator combines the results."""

    workers: tuple[str, ...]
    training: LocalTraining
    rule: AggregationRule = AggregationRule()


@dataclass(frozen=True, slots=True, kw_only=True)
class EvaluatePlan:
    workers: tuple[str, ...]
    batch_size: int = EVAL_BATCH
    loss: str = "cross_entropy"


@dataclass(frozen=True, slots=True, kw_only=True)
class Failure:
    """A worker that did not answer, as a value: ``phase`` is "fit" or "evaluate"."""

    worker: str
    phase: str
    error: str


@dataclass(frozen=True, slots=True, kw_only=True)
class FitAggregate:
    """What the aggregator released after a round of training."""

    parameters: Parameters
    num_examples: int
    workers: tuple[str, ...]
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class EvaluateAggregate:
    """Federated evaluation, summed over the workers by the aggregator."""

    loss: float
    accuracy: float | None
    num_examples: int
    workers: tuple[str, ...]


class Strategy:
    """The phases of a round. Subclass and override; wrap to compose (see `fedsecure.privacy`)."""

    def initialize_parameters(self, parameters: Parameters) -> Parameters:
        return parameters

    def configure_fit(
        self, server_round: int, parameters: Parameters, workers: Sequence[str], rng: random.Random
    ) -> FitPlan:
        raise NotImplementedError

    def aggregate_fit(
        self, server_round: int, parameters: Parameters, aggregate: FitAggregate, failures: Sequence[Failure]
    ) -> Parameters:
        raise NotImplementedError

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, workers: Sequence[str], rng: random.Random
    ) -> EvaluatePlan | None:
        return None

    def aggregate_evaluate(
        self, server_round: int, aggregate: EvaluateAggregate, failures: Sequence[Failure]
    ) -> dict[str, float]:
        out = {"federated_loss": aggregate.loss}
        if aggregate.accuracy is not None:
            out["federated_accuracy"] = aggregate.accuracy
        return out

    def evaluate(self, server_round: int, parameters: Parameters) -> dict[str, float] | None:
        return None

    @property
    def min_fit_workers(self) -> int:
        return 1

    def round_metrics(self) -> dict[str, float]:
        """Metrics the strategy itself computed in the last round (a DP wrapper's epsilon spent, its
        clip bound); the engine reads them after `aggregate_fit` and records them with the round."""
        return {}

    def should_stop(self) -> bool:
        """True when the strategy allows no further round (a privacy budget is spent); the engine
        asks before each round's `configure_fit` and ends training cleanly when it is True."""
        return False

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to resume this strategy (tensors and JSON values)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ConfigurationError(f"{type(self).__name__} keeps no state, the checkpoint has {sorted(state)}")


def sample_workers(
    workers: Sequence[str], fraction: float, minimum: int, rng: random.Random
) -> tuple[str, ...]:
    """``max(ceil(fraction * n), minimum)`` workers drawn without replacement, in a stable order."""
    n = len(workers)
    if n < minimum:
        raise ConfigurationError(
            f"{minimum} workers are needed per round and only {n} are available; lower "
            "min_fit_workers or add workers"
        )
    k = min(n, max(minimum, math.ceil(fraction * n)))
    return tuple(sorted(rng.sample(list(workers), k)))


class FedAvg(Strategy):
    """Federated averaging: the sample-weighted mean of the workers' models is the next global model.

    ``fraction_fit`` is McMahan et al.'s C (at least ``min_fit_workers`` per round);
    ``training`` holds E (epochs), B (batch_size) and the local optimizer.
    ``evaluate_fn(parameters) -> metrics`` evaluates centrally on the model owner's test set.
    ``fraction_evaluate`` > 0 also evaluates on the workers' held-out data (aggregated metrics only).
    """

    def __init__(
        self,
        *,
        training: LocalTraining | None = None,
        fraction_fit: float = 1.0,
        min_fit_workers: int = 2,
        fraction_evaluate: float = 0.0,
        min_evaluate_workers: int = 2,
        evaluate_fn: Callable[[Parameters], Mapping[str, float]] | None = None,
        rule: AggregationRule | None = None,
    ) -> None:
        _check(0 < fraction_fit <= 1, f"fraction_fit must be in (0, 1], got {fraction_fit!r}")
        _check(0 <= fraction_evaluate <= 1, f"fraction_evaluate must be in [0, 1], got {fraction_evaluate!r}")
        _check(min_fit_workers >= 1, f"min_fit_workers must be >= 1, got {min_fit_workers!r}")
        self.training = training or LocalTraining()
        self.fraction_fit = fraction_fit
        self._min_fit_workers = min_fit_workers
        self.fraction_evaluate = fraction_evaluate
        self.min_evaluate_workers = min_evaluate_workers
        self.evaluate_fn = evaluate_fn
        self.rule = rule or AggregationRule()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(C={self.fraction_fit}, {self.training})"

    @property
    def min_fit_workers(self) -> int:
        return self._min_fit_workers

    def configure_fit(
        self, server_round: int, parameters: Parameters, workers: Sequence[str], rng: random.Random
    ) -> FitPlan:
        chosen = sample_workers(workers, self.fraction_fit, self.min_fit_workers, rng)
        return FitPlan(workers=chosen, training=self.training, rule=self.rule)

    def aggregate_fit(
        self, server_round: int, parameters: Parameters, aggregate: FitAggregate, failures: Sequence[Failure]
    ) -> Parameters:
        return dict(aggregate.parameters)

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, workers: Sequence[str], rng: random.Random
    ) -> EvaluatePlan | None:
        if self.fraction_evaluate == 0:
            return None
        chosen = sample_workers(workers, self.fraction_evaluate, min(self.min_evaluate_workers, len(workers)), rng)
        return EvaluatePlan(workers=chosen, batch_size=EVAL_BATCH, loss=self.training.loss)

    def evaluate(self, server_round: int, parameters: Parameters) -> dict[str, float] | None:
        if self.evaluate_fn is None:
            return None
        return {k: float(v) for k, v in self.evaluate_fn(parameters).items()}


class FedProx(FedAvg):
    """FedAvg whose workers add ``proximal_mu``/2 * ||w - w_global||^2 to their local loss."""

    def __init__(self, *, proximal_mu: float, training: LocalTraining | None = None, **kwargs: Any) -> None:
        _check(proximal_mu > 0, f"FedProx needs proximal_mu > 0 (0 is FedAvg), got {proximal_mu!r}")
        super().__init__(training=replace(training or LocalTraining(), proximal_mu=proximal_mu), **kwargs)
        self.proximal_mu = proximal_mu


def _floating(parameters: Parameters) -> list[str]:
    return [k for k, t in parameters.items() if t.is_floating_point()]


class FedAvgM(FedAvg):
    """FedAvg with server momentum: v = beta * v + (x - mean); x = x - server_lr * v."""

    def __init__(self, *, server_learning_rate: float = 1.0, server_momentum: float = 0.9, **kwargs: Any) -> None:
        _check(server_learning_rate > 0, f"server_learning_rate must be > 0, got {server_learning_rate!r}")
        _check(0 <= server_momentum < 1, f"server_momentum must be in [0, 1), got {server_momentum!r}")
        super().__init__(**kwargs)
        self.server_learning_rate = server_learning_rate
        self.server_momentum = server_momentum
        self.velocity: Parameters = {}

    def aggregate_fit(
        self, server_round: int, parameters: Parameters, aggregate: FitAggregate, failures: Sequence[Failure]
    ) -> Parameters:
        new = dict(aggregate.parameters)
        for k in _floating(parameters):
            g = parameters[k] - aggregate.parameters[k]  # the pseudo-gradient
            v = self.velocity.get(k)
            v = g.clone() if v is None else v.mul_(self.server_momentum).add_(g)
            self.velocity[k] = v
            new[k] = parameters[k] - self.server_learning_rate * v
        return new

    def state_dict(self) -> dict[str, Any]:
        return {f"velocity.{k}": v for k, v in self.velocity.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.velocity = {k.removeprefix("velocity."): v.clone() for k, v in state.items()}


class FedOpt(FedAvg):
    """Adaptive server optimizers of Reddi et al. 2021, Algorithm 2, on Delta = mean - x:
    m = b1 m + (1 - b1) Delta; v by the subclass' rule; x = x + eta * m / (sqrt(v) + tau).
    v starts at tau^2 (the paper's v_{-1} >= tau^2), m at 0."""

    def __init__(
        self,
        *,
        server_learning_rate: float = 10**-1.5,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 1e-3,
        **kwargs: Any,
    ) -> None:
        _check(server_learning_rate > 0, f"server_learning_rate must be > 0, got {server_learning_rate!r}")
        _check(0 <= beta_1 < 1 and 0 <= beta_2 < 1, f"beta_1 and beta_2 must be in [0, 1), got {beta_1}, {beta_2}")
        _check(tau > 0, f"tau must be > 0, got {tau!r}")
        super().__init__(**kwargs)
        self.server_learning_rate = server_learning_rate
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.tau = tau
        self.m: Parameters = {}
        self.v: Parameters = {}

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def aggregate_fit(
        self, server_round: int, parameters: Parameters, aggregate: FitAggregate, failures: Sequence[Failure]
    ) -> Parameters:
        new = dict(aggregate.parameters)
        for k in _floating(parameters):
            x = parameters[k]
            delta = aggregate.parameters[k] - x
            m = self.m.get(k, torch.zeros_like(x))
            m = self.beta_1 * m + (1 - self.beta_1) * delta
            v = self.second_moment(self.v.get(k, torch.full_like(x, self.tau**2)), delta * delta)
            self.m[k], self.v[k] = m, v
            new[k] = x + self.server_learning_rate * m / (v.sqrt() + self.tau)
        return new

    def state_dict(self) -> dict[str, Any]:
        return {**{f"m.{k}": t for k, t in self.m.items()}, **{f"v.{k}": t for k, t in self.v.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.m = {k[2:]: t.clone() for k, t in state.items() if k.startswith("m.")}
        self.v = {k[2:]: t.clone() for k, t in state.items() if k.startswith("v.")}


class FedAdagrad(FedOpt):
    """v = v + Delta^2."""

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        return v + delta_sq


class FedAdam(FedOpt):
    """v = b2 v + (1 - b2) Delta^2."""

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        return self.beta_2 * v + (1 - self.beta_2) * delta_sq


class FedYogi(FedOpt):
    """v = v - (1 - b2) Delta^2 sign(v - Delta^2)."""

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        return v - (1 - self.beta_2) * delta_sq * torch.sign(v - delta_sq)


STRATEGIES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedavgm": FedAvgM,
    "fedadagrad": FedAdagrad,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
}
