"""DP-FedAvg as a strategy wrapper: pass-through, calibration of the noise, clipping, budget, resume,
adaptive clipping; with the real aggregation rules (`rules.release`) standing in for the aggregator."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import torch

from fedsecure.aggregate import rules
from fedsecure.fl import (
    STRATEGIES,
    AggregationRule,
    ConfigurationError,
    EvaluateAggregate,
    FedAdam,
    FedAvg,
    FitAggregate,
    FitPlan,
    Parameters,
    Strategy,
)
from fedsecure.privacy import Accountant, DPFedAvg, PrivacyBudgetExhausted, update_noise_multiplier

WORKERS = [f"w{i}" for i in range(20)]


def make(name: str, **kwargs: Any) -> Strategy:
    extra = {"proximal_mu": 0.1} if name == "fedprox" else {}
    return STRATEGIES[name](fraction_fit=0.25, **extra, **kwargs)


def params(*values: float) -> Parameters:
    return {"w": torch.tensor(values, dtype=torch.float32), "steps": torch.tensor(3)}


def fit_round(
    strategy: Strategy,
    server_round: int,
    current: Parameters,
    released: Parameters,
    metrics: Mapping[str, float] | None = None,
) -> tuple[FitPlan, Parameters]:
    plan = strategy.configure_fit(server_round, current, WORKERS, random.Random(server_round))
    aggregate = FitAggregate(
        parameters=released, num_examples=100, workers=plan.workers, metrics=metrics or {}
    )
    return plan, strategy.aggregate_fit(server_round, current, aggregate, [])


def test_strategy_hooks_default_to_nothing() -> None:
    assert FedAvg().round_metrics() == {}
    assert FedAvg().should_stop() is False


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_the_wrapper_changes_only_the_rule(name: str) -> None:
    plain, wrapped = make(name), DPFedAvg(make(name), noise_multiplier=1.0, clip_norm=0.5)
    current = params(1.0, 2.0)
    for server_round, released in enumerate([params(1.5, 1.0), params(2.0, 0.5)], start=1):
        plain_plan, plain_next = fit_round(plain, server_round, current, released)
        dp_plan, dp_next = fit_round(wrapped, server_round, current, released)
        assert dp_plan.workers == plain_plan.workers and dp_plan.training == plain_plan.training
        assert dp_plan.rule == AggregationRule(
            name="mean", weighted=False, clip_norm=0.5, noise_multiplier=1.0
        )
        assert dp_next.keys() == plain_next.keys()
        assert all(torch.equal(dp_next[k], plain_next[k]) for k in plain_next)
        current = plain_next
    assert wrapped.state_dict().keys() == {
        *(f"wrapped.{k}" for k in plain.state_dict()),
        "dp.accountant",
        "dp.clip_norm",
    }
    assert wrapped.min_fit_workers == plain.min_fit_workers


def test_evaluation_passes_through() -> None:
    seen: list[Parameters] = []

    def central(p: Parameters) -> dict[str, float]:
        seen.append(p)
        return {"accuracy": 0.5}

    inner = FedAvg(fraction_evaluate=0.5, evaluate_fn=central)
    wrapped = DPFedAvg(inner, noise_multiplier=1.0, clip_norm=1.0)
    plan = wrapped.configure_evaluate(1, params(0.0), WORKERS, random.Random(0))
    assert plan == inner.configure_evaluate(1, params(0.0), WORKERS, random.Random(0))
    assert wrapped.evaluate(1, params(0.0)) == {"accuracy": 0.5} and len(seen) == 1
    federated = EvaluateAggregate(loss=0.3, accuracy=0.9, num_examples=10, workers=("w1",))
    assert wrapped.aggregate_evaluate(1, federated, []) == {"federated_loss": 0.3, "federated_accuracy": 0.9}
    assert wrapped.initialize_parameters(params(4.0))["w"].tolist() == [4.0]


class FixedPlan(FedAvg):
    """A strategy whose plan names the given workers, whatever is available."""

    def __init__(self, workers: Sequence[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fixed = tuple(workers)

    def configure_fit(
        self, server_round: int, parameters: Parameters, workers: Sequence[str], rng: random.Random
    ) -> FitPlan:
        return FitPlan(workers=self.fixed, training=self.training, rule=self.rule)


@pytest.mark.parametrize(
    ("inner", "message"),
    [
        (FedAvg(rule=AggregationRule(name="median")), "rule 'median' has another sensitivity"),
        (FixedPlan(["w1", "w1"]), "k distinct workers drawn from the n available"),
        (FixedPlan(["w1", "stranger"]), "k distinct workers drawn from the n available"),
        (FixedPlan([]), "k distinct workers"),
    ],
)
def test_plans_that_cannot_be_accounted_are_refused(inner: Strategy, message: str) -> None:
    wrapped = DPFedAvg(inner, noise_multiplier=1.0, clip_norm=1.0)
    with pytest.raises(ConfigurationError, match=message):
        wrapped.configure_fit(1, params(0.0), WORKERS, random.Random(0))
    assert wrapped.accountant.rounds == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"noise_multiplier": 0.0}, "noise_multiplier must be > 0"),
        ({"clip_norm": -1.0}, "clip_norm must be > 0"),
        ({"budget_epsilon": 0.0}, "budget_epsilon must be > 0"),
        ({"target_quantile": 1.0}, "target_quantile must be in"),
        ({"unclipped_stddev": 0.4}, r"needs unclipped_stddev > noise_multiplier / 2 = 0.5"),
    ],
)
def test_bad_settings_say_what_is_wrong(kwargs: dict[str, float], message: str) -> None:
    settings: dict[str, Any] = {"noise_multiplier": 1.0, "clip_norm": 1.0, **kwargs}
    with pytest.raises(ConfigurationError, match=message):
        DPFedAvg(FedAvg(), **settings)


def test_the_sampling_rate_is_k_over_n_and_accounted_each_round() -> None:
    wrapped = DPFedAvg(FedAvg(fraction_fit=0.25), noise_multiplier=1.0, clip_norm=1.0)
    for server_round in range(1, 4):
        fit_round(wrapped, server_round, params(0.0), params(0.0))
    assert wrapped.accountant.history == [(5 / 20, 1.0, 3)]
    direct = Accountant(noise_multiplier=1.0, sampling_rate=0.25)
    direct.step(rounds=3)
    metrics = wrapped.round_metrics()
    assert metrics["dp_epsilon"] == pytest.approx(direct.epsilon()) == pytest.approx(wrapped.epsilon)
    assert (
        metrics["dp_sampling_rate"] == 0.25 and metrics["dp_delta"] == 1e-5 and metrics["dp_clip_norm"] == 1.0
    )


def dp_rule(n: int, *, z: float, clip: float, **kwargs: Any) -> dict[str, Any]:
    """The rule a DPFedAvg plan sends to the aggregator for n workers, as it travels."""
    wrapped = DPFedAvg(FedAvg(fraction_fit=1.0), noise_multiplier=z, clip_norm=clip, **kwargs)
    return wrapped.configure_fit(1, params(0.0), WORKERS[:n], random.Random(0)).rule.to_wire()


@pytest.mark.parametrize(("n", "z", "clip"), [(5, 1.0, 1.0), (10, 0.7, 2.5), (20, 2.0, 0.1)])
def test_noise_std_is_z_times_clip_over_n(n: int, z: float, clip: float) -> None:
    rule = dp_rule(n, z=z, clip=clip)
    gen = torch.Generator().manual_seed(n)
    updates = [torch.full((500,), float(i)) for i in range(n)]  # norms far above clip: all clipped
    clipped_mean = sum(rules.clip_by_norm(u, clip) for u in updates) / n
    draws = torch.stack(
        [rules.apply(rule, updates, [1.0] * n, generator=gen) - clipped_mean for _ in range(200)]
    )
    # 100_000 normal draws: the sample std is within 1% of the truth with overwhelming probability
    assert float(draws.std()) == pytest.approx(z * clip / n, rel=0.01)
    assert abs(float(draws.mean())) < 4 * z * clip / n / math.sqrt(draws.numel())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_contribution_is_bounded_by_the_clip_norm(seed: int) -> None:
    n, clip = 8, 0.5
    rule = dp_rule(n, z=1.0, clip=clip)
    gen = torch.Generator().manual_seed(seed)
    others = [torch.randn(100, generator=gen) * 0.1 for _ in range(n - 1)]
    attacker = torch.randn(100, generator=gen) * 10 ** (seed + 2)
    # Same noise draw with and without the attacker: n * mean - (n - 1) * mean is the attacker's
    # share of the noisy sum, whatever its update.
    with_attacker = rules.apply(
        rule, [*others, attacker], [1.0] * n, generator=torch.Generator().manual_seed(9)
    )
    without = rules.apply(rule, others, [1.0] * (n - 1), generator=torch.Generator().manual_seed(9))
    share = n * with_attacker - (n - 1) * without
    assert float(torch.linalg.vector_norm(share)) == pytest.approx(clip, rel=1e-6)


def test_sample_weights_no_longer_count() -> None:
    rule = dp_rule(3, z=1e-9, clip=100.0)
    out = rules.apply(rule, [torch.zeros(2), torch.ones(2), torch.full((2,), 2.0)], [1, 1, 1000])
    assert out.tolist() == pytest.approx([1.0, 1.0])


def run_until_stopped(wrapped: DPFedAvg) -> int:
    rounds = 0
    while not wrapped.should_stop():
        rounds += 1
        fit_round(wrapped, rounds, params(0.0), params(0.0))
    return rounds


def test_the_budget_stops_training_before_it_is_overspent() -> None:
    wrapped = DPFedAvg(FedAvg(fraction_fit=0.25), noise_multiplier=1.0, clip_norm=1.0, budget_epsilon=6.0)
    rounds = run_until_stopped(wrapped)
    direct = Accountant(noise_multiplier=1.0, sampling_rate=0.25)
    direct.step(rounds=rounds)
    assert rounds > 1 and wrapped.epsilon == direct.epsilon() <= 6.0 < direct.epsilon_after(1)
    with pytest.raises(PrivacyBudgetExhausted, match="would bring epsilon to .* > budget_epsilon=6.0"):
        wrapped.configure_fit(rounds + 1, params(0.0), WORKERS, random.Random(0))
    assert wrapped.accountant.rounds == rounds


def test_a_budget_smaller_than_one_round_refuses_the_first() -> None:
    wrapped = DPFedAvg(FedAvg(fraction_fit=1.0), noise_multiplier=0.5, clip_norm=1.0, budget_epsilon=0.1)
    assert not wrapped.should_stop()  # the rate is known only once a plan exists
    with pytest.raises(PrivacyBudgetExhausted):
        wrapped.configure_fit(1, params(0.0), WORKERS, random.Random(0))


def test_the_wrapped_strategy_can_stop_training_too() -> None:
    class Stop(FedAvg):
        def should_stop(self) -> bool:
            return True

    assert DPFedAvg(Stop(), noise_multiplier=1.0, clip_norm=1.0).should_stop()


def adaptive(**kwargs: Any) -> DPFedAvg:
    settings: dict[str, Any] = {
        "noise_multiplier": 0.5,
        "clip_norm": 0.1,
        "adaptive_clipping": True,
        **kwargs,
    }
    return DPFedAvg(FedAdam(fraction_fit=1.0, server_learning_rate=0.1), **settings)


def adaptive_round(
    wrapped: DPFedAvg, server_round: int, norms: Sequence[float], current: Parameters
) -> Parameters:
    """One round with the real aggregation rule; worker i sends an update of norm norms[i]."""
    workers = [f"w{i}" for i in range(len(norms))]
    plan = wrapped.configure_fit(server_round, current, workers, random.Random(server_round))
    updates = [torch.tensor([norm, 0.0]) for norm in norms]
    released = rules.release(plan.rule.to_wire(), updates, [1.0] * len(updates), generator=GEN)
    model = {"w": current["w"] + released.aggregate.float(), "steps": current["steps"]}
    aggregate = FitAggregate(parameters=model, num_examples=1, workers=plan.workers, metrics=released.metrics)
    return wrapped.aggregate_fit(server_round, current, aggregate, [])


GEN = torch.Generator().manual_seed(0)


@pytest.mark.parametrize(("quantile", "expected"), [(0.5, 5.0), (0.9, 9.0)])
def test_adaptive_clipping_follows_the_target_quantile(quantile: float, expected: float) -> None:
    wrapped = adaptive(target_quantile=quantile)
    norms = [1 + 9 * i / 99 for i in range(100)]  # 1 to 10, evenly: quantile q at 1 + 9q
    current = params(0.0, 0.0)
    for server_round in range(1, 81):
        current = adaptive_round(wrapped, server_round, norms, current)
    assert wrapped.clip_norm == pytest.approx(1 + 9 * quantile, rel=0.15)
    assert wrapped.round_metrics()["dp_next_clip_norm"] == wrapped.clip_norm
    assert abs(wrapped.round_metrics()["dp_unclipped_fraction"] - quantile) < 0.1


def test_adaptive_clipping_releases_a_noisy_centred_count() -> None:
    rule = dp_rule(20, z=0.5, clip=2.0, adaptive_clipping=True, unclipped_stddev=1.0)
    assert rule["options"] == {"report_unclipped": 1.0, "unclipped_stddev": 1.0}
    assert rule["noise_multiplier"] == pytest.approx(update_noise_multiplier(0.5, 1.0))
    assert update_noise_multiplier(1.0, 1.0) == pytest.approx(1 / math.sqrt(0.75))
    updates = [torch.tensor([float(i)]) for i in range(20)]  # norms 0..19: 3 of them (0, 1, 2) unclipped
    exact = rules.release({**rule, "options": {"report_unclipped": 1.0}}, updates, [1.0] * 20)
    assert exact.metrics == {rules.UNCLIPPED_FRACTION: pytest.approx(3 / 20)}
    gen = torch.Generator().manual_seed(3)
    noisy = torch.tensor(
        [
            rules.release(rule, updates, [1.0] * 20, generator=gen).metrics["unclipped_fraction"]
            for _ in range(2000)
        ]
    )
    assert float(noisy.std()) == pytest.approx(1.0 / 20, rel=0.05)
    assert abs(float(noisy.mean()) - 3 / 20) < 4 * (1.0 / 20) / math.sqrt(2000)


def test_adaptive_clipping_needs_the_released_fraction() -> None:
    wrapped = adaptive()
    with pytest.raises(ConfigurationError, match="release the noisy fraction of unclipped updates"):
        fit_round(wrapped, 1, params(0.0, 0.0), params(0.0, 0.0))
    with pytest.raises(ConfigurationError, match="needs unclipped_stddev > noise_multiplier / 2"):
        adaptive(noise_multiplier=2.0).configure_fit(1, params(0.0), WORKERS, random.Random(0))  # 20 / 20 = 1


def test_a_resumed_run_accounts_and_clips_as_an_unbroken_one() -> None:
    norms = [0.5 + i / 10 for i in range(20)]
    unbroken, first = adaptive(), adaptive()
    GEN.manual_seed(5)
    current_a = params(0.0, 0.0)
    for server_round in range(1, 4):
        current_a = adaptive_round(unbroken, server_round, norms, current_a)
    GEN.manual_seed(5)
    current_b = params(0.0, 0.0)
    for server_round in range(1, 4):
        current_b = adaptive_round(first, server_round, norms, current_b)
    state = first.state_dict()
    assert set(state) == {"wrapped.m.w", "wrapped.v.w", "dp.accountant", "dp.clip_norm"}
    json.dumps({k: v for k, v in state.items() if not isinstance(v, torch.Tensor)})
    resumed = adaptive()
    resumed.load_state_dict(state)
    assert resumed.clip_norm == unbroken.clip_norm != 0.1  # it moved, and the checkpoint kept where to
    for wrapped, current in ((unbroken, current_a), (resumed, current_b)):
        GEN.manual_seed(7)  # the same noise for both runs from here on
        current = adaptive_round(wrapped, 4, norms, current)
        wrapped.final = current  # type: ignore[attr-defined]
    assert torch.equal(resumed.final["w"], unbroken.final["w"])  # type: ignore[attr-defined]
    assert resumed.accountant.history == unbroken.accountant.history == [(1.0, 0.5, 4)]
    assert resumed.epsilon == unbroken.epsilon
    assert resumed.clip_norm == unbroken.clip_norm


def test_a_checkpoint_without_the_ledger_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="would forget the privacy already spent"):
        adaptive().load_state_dict(FedAdam().state_dict())
