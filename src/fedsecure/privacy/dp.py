"""DP-FedAvg: user-level differential privacy for any strategy, by wrapping it.

McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models": each round the
aggregator clips every worker's update to L2 norm S, sums, adds Gaussian noise of standard
deviation z * S and divides by the number of updates; the model owner then sees only that noisy
mean. One worker changes the sum by at most S, so each round is a sampled Gaussian mechanism with
noise multiplier z, over the k of n workers chosen (sampling rate q = k / n), and
`fedsecure.privacy.accounting` composes the rounds into (epsilon, delta).

`DPFedAvg` wraps a strategy (FedAvg, FedProx, FedAdam, ...) and changes only its aggregation rule:
the clip bound, the noise and the unweighted mean (with sample weights one worker's influence is
not bounded by S / k). Every other phase is the wrapped strategy's. The server optimizer of the
wrapped strategy runs on the noisy aggregate, which is post-processing and costs no privacy.

Adaptive clipping follows Andrew et al. 2021, "Differentially Private Learning with Adaptive
Clipping": the bound moves geometrically towards the ``target_quantile`` of the update norms,
S <- S * exp(-eta * (b - gamma)), where b is the noisy fraction of unclipped updates that the
aggregator releases (`fedsecure.aggregate.rules.release`, noise sigma_b on a count of sensitivity
1/2). The two Gaussian releases together cost what one of noise multiplier z costs when the
update's noise multiplier is z_update = (z^-2 - (2 sigma_b)^-2)^(-1/2) (the paper's Theorem 1), so
the accountant sees z and the aggregator adds noise at z_update.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from fedsecure.aggregate.rules import REPORT_UNCLIPPED, UNCLIPPED_FRACTION, UNCLIPPED_STDDEV
from fedsecure.errors import FedsecureError
from fedsecure.fl.strategy import (
    ConfigurationError,
    EvaluateAggregate,
    EvaluatePlan,
    Failure,
    FitAggregate,
    FitPlan,
    Parameters,
    Strategy,
)
from fedsecure.privacy.accounting import Accountant, Kind

_WRAPPED = "wrapped."
_OWN = "dp."


class PrivacyBudgetExhausted(FedsecureError, RuntimeError):
    """One more round would spend more than the privacy budget; `DPFedAvg.should_stop` said so first."""


def update_noise_multiplier(noise_multiplier: float, unclipped_stddev: float) -> float:
    """The update's noise multiplier that leaves the overall one at ``noise_multiplier`` once the
    unclipped count, noised with ``unclipped_stddev``, is released too (Andrew et al., Theorem 1)."""
    if unclipped_stddev <= noise_multiplier / 2:
        raise ConfigurationError(
            f"adaptive clipping with noise_multiplier={noise_multiplier} needs unclipped_stddev > "
            f"noise_multiplier / 2 = {noise_multiplier / 2}, got {unclipped_stddev}: raise unclipped_stddev "
            "(Andrew et al. suggest workers per round / 20) or sample more workers per round"
        )
    return float((noise_multiplier**-2 - (2 * unclipped_stddev) ** -2) ** -0.5)


class DPFedAvg(Strategy):
    """``strategy`` with every round's aggregate clipped, noised and accounted.

    ``noise_multiplier`` (z) and ``clip_norm`` (S, the first bound when adaptive) set the noise
    z * S on the sum of the updates. ``delta`` and ``accountant`` ("rdp" or "pld") set how epsilon
    is reported; with ``budget_epsilon`` no round starts that would spend more (see `should_stop`).
    ``adaptive_clipping`` moves S towards the ``target_quantile`` of the update norms with
    learning rate ``clip_learning_rate``, releasing the unclipped count with noise
    ``unclipped_stddev`` (default: workers per round / 20, as in Andrew et al.).
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        noise_multiplier: float,
        clip_norm: float,
        delta: float = 1e-5,
        accountant: Kind = "rdp",
        budget_epsilon: float | None = None,
        adaptive_clipping: bool = False,
        target_quantile: float = 0.5,
        clip_learning_rate: float = 0.2,
        unclipped_stddev: float | None = None,
    ) -> None:
        if not isinstance(strategy, Strategy):
            raise ConfigurationError(f"DPFedAvg wraps a Strategy, got {type(strategy).__name__}")
        if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
            raise ConfigurationError(f"noise_multiplier must be > 0, got {noise_multiplier!r}")
        if not (clip_norm > 0 and math.isfinite(clip_norm)):
            raise ConfigurationError(f"clip_norm must be > 0, got {clip_norm!r}")
        if budget_epsilon is not None and not budget_epsilon > 0:
            raise ConfigurationError(f"budget_epsilon must be > 0 or None, got {budget_epsilon!r}")
        if not 0 < target_quantile < 1:
            raise ConfigurationError(f"target_quantile must be in (0, 1), got {target_quantile!r}")
        if not clip_learning_rate > 0:
            raise ConfigurationError(f"clip_learning_rate must be > 0, got {clip_learning_rate!r}")
        if unclipped_stddev is not None:
            update_noise_multiplier(noise_multiplier, unclipped_stddev)  # refuse a bad value now
        self.strategy = strategy
        self.noise_multiplier = float(noise_multiplier)
        self.clip_norm = float(clip_norm)
        self.budget_epsilon = budget_epsilon
        self.adaptive_clipping = adaptive_clipping
        self.target_quantile = target_quantile
        self.clip_learning_rate = clip_learning_rate
        self.unclipped_stddev = unclipped_stddev
        self.accountant = Accountant(kind=accountant, noise_multiplier=noise_multiplier, delta=delta)
        self._metrics: dict[str, float] = {}

    def __repr__(self) -> str:
        return (
            f"DPFedAvg({self.strategy!r}, z={self.noise_multiplier}, S={self.clip_norm}, {self.accountant})"
        )

    # -- the phases that DP changes ---------------------------------------------------------------

    def configure_fit(
        self, server_round: int, parameters: Parameters, workers: Sequence[str], rng: random.Random
    ) -> FitPlan:
        plan = self.strategy.configure_fit(server_round, parameters, workers, rng)
        q = self._sampling_rate(plan, workers)
        spent = self.accountant.epsilon_after(1, sampling_rate=q)
        if self.budget_epsilon is not None and spent > self.budget_epsilon:
            raise PrivacyBudgetExhausted(
                f"round {server_round} would bring epsilon to {spent:.3f} > budget_epsilon={self.budget_epsilon} "
                f"(delta={self.accountant.delta}): stop training when should_stop() is True, or raise the "
                "budget, the noise multiplier or the number of workers"
            )
        options: dict[str, float] = {}
        z_update = self.noise_multiplier
        if self.adaptive_clipping:
            sigma_b = self.unclipped_stddev if self.unclipped_stddev is not None else len(plan.workers) / 20
            z_update = update_noise_multiplier(self.noise_multiplier, sigma_b)
            options = {REPORT_UNCLIPPED: 1.0, UNCLIPPED_STDDEV: sigma_b}
        rule = replace(
            plan.rule,
            weighted=False,
            clip_norm=self.clip_norm,
            noise_multiplier=z_update,
            options={**plan.rule.options, **options},
        )
        # Accounted once the plan is out: from then on the aggregator may release, whatever
        # happens to the round (a failed round is counted too, which errs on the safe side).
        self.accountant.step(sampling_rate=q)
        self._metrics = {
            "dp_epsilon": spent,
            "dp_delta": self.accountant.delta,
            "dp_sampling_rate": q,
            "dp_noise_multiplier": self.noise_multiplier,
            "dp_clip_norm": self.clip_norm,
        }
        return replace(plan, rule=rule)

    def _sampling_rate(self, plan: FitPlan, workers: Sequence[str]) -> float:
        if plan.rule.name != "mean":
            raise ConfigurationError(
                f"DP noise is calibrated to the mean, whose sensitivity to one worker is clip_norm / k; "
                f"the wrapped strategy's rule {plan.rule.name!r} has another sensitivity: use rule 'mean'"
            )
        chosen, available = list(plan.workers), set(workers)
        if not chosen or len(set(chosen)) != len(chosen) or not set(chosen) <= available or not available:
            raise ConfigurationError(
                f"the sampling rate k / n needs k distinct workers drawn from the n available ones; the "
                f"wrapped strategy chose {chosen} from {sorted(available)}"
            )
        return len(chosen) / len(available)

    def aggregate_fit(
        self, server_round: int, parameters: Parameters, aggregate: FitAggregate, failures: Sequence[Failure]
    ) -> Parameters:
        new = self.strategy.aggregate_fit(server_round, parameters, aggregate, failures)
        if self.adaptive_clipping:
            fraction = aggregate.metrics.get(UNCLIPPED_FRACTION)
            if fraction is None:
                raise ConfigurationError(
                    f"adaptive clipping needs the aggregator to release the noisy fraction of unclipped "
                    f"updates as FitAggregate.metrics[{UNCLIPPED_FRACTION!r}] "
                    "(fedsecure.aggregate.rules.release puts it in its metrics)"
                )
            self._metrics["dp_unclipped_fraction"] = float(fraction)
            self.clip_norm *= math.exp(-self.clip_learning_rate * (float(fraction) - self.target_quantile))
            self._metrics["dp_next_clip_norm"] = self.clip_norm
        return new

    @property
    def epsilon(self) -> float:
        """The epsilon spent so far, at the accountant's delta."""
        return self.accountant.epsilon()

    def round_metrics(self) -> dict[str, float]:
        return {**self.strategy.round_metrics(), **self._metrics}

    def should_stop(self) -> bool:
        """True when the wrapped strategy says so, or one more round at the last round's sampling
        rate would spend more than ``budget_epsilon``."""
        if self.strategy.should_stop():
            return True
        history = self.accountant.history
        if self.budget_epsilon is None or not history:
            return False
        return self.accountant.epsilon_after(1, sampling_rate=history[-1][0]) > self.budget_epsilon

    def state_dict(self) -> dict[str, Any]:
        own = {"accountant": self.accountant.state_dict(), "clip_norm": self.clip_norm}
        wrapped = {_WRAPPED + k: v for k, v in self.strategy.state_dict().items()}
        return {**wrapped, **{_OWN + k: v for k, v in own.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if _OWN + "accountant" not in state:
            raise ConfigurationError(
                "the checkpoint holds no privacy ledger (dp.accountant): it was not written by DPFedAvg, and "
                "resuming from it would forget the privacy already spent"
            )
        self.strategy.load_state_dict(
            {k[len(_WRAPPED) :]: v for k, v in state.items() if k.startswith(_WRAPPED)}
        )
        self.accountant.load_state_dict(state[_OWN + "accountant"])
        self.clip_norm = float(state[_OWN + "clip_norm"])
        self._metrics = {}

    # -- the phases that pass through -------------------------------------------------------------

    def initialize_parameters(self, parameters: Parameters) -> Parameters:
        return self.strategy.initialize_parameters(parameters)

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, workers: Sequence[str], rng: random.Random
    ) -> EvaluatePlan | None:
        return self.strategy.configure_evaluate(server_round, parameters, workers, rng)

    def aggregate_evaluate(
        self, server_round: int, aggregate: EvaluateAggregate, failures: Sequence[Failure]
    ) -> dict[str, float]:
        return self.strategy.aggregate_evaluate(server_round, aggregate, failures)

    def evaluate(self, server_round: int, parameters: Parameters) -> dict[str, float] | None:
        return self.strategy.evaluate(server_round, parameters)

    @property
    def min_fit_workers(self) -> int:
        return self.strategy.min_fit_workers
