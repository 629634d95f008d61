"""Strategies against results computed by hand."""

import math
import random

import pytest
import torch

from fedsecure import fl
from fedsecure.fl.strategy import sample_workers


def agg(value: float) -> fl.FitAggregate:
    return fl.FitAggregate(parameters={"w": torch.tensor([value]), "n": torch.tensor(3)}, num_examples=10,
                           workers=("a", "b"))


def step(strategy: fl.Strategy, x: float, mean: float) -> float:
    out = strategy.aggregate_fit(1, {"w": torch.tensor([x]), "n": torch.tensor(2)}, agg(mean), [])
    assert int(out["n"]) == 3  # integer buffers take the aggregate as it is
    return float(out["w"][0])


def test_fedavg_takes_the_aggregate() -> None:
    assert step(fl.FedAvg(), 1.0, 0.25) == 0.25


def test_fedavgm_momentum_by_hand() -> None:
    s = fl.FedAvgM(server_learning_rate=1.0, server_momentum=0.9)
    assert step(s, 1.0, 0.5) == pytest.approx(0.5)  # g = 0.5, v = 0.5
    assert step(s, 0.5, 0.5) == pytest.approx(0.05)  # g = 0, v = 0.45
    t = fl.FedAvgM(server_learning_rate=1.0, server_momentum=0.9)
    t.load_state_dict(s.state_dict())
    assert step(t, 0.05, 0.05) == pytest.approx(0.05 - 0.405)  # v = 0.405 carried over


@pytest.mark.parametrize(
    ("cls", "v1"),
    [
        (fl.FedAdam, 0.99 * 1e-6 + 0.01),  # b2 v0 + (1 - b2) d^2, v0 = tau^2
        (fl.FedYogi, 1e-6 + 0.01),  # v0 - (1 - b2) d^2 sign(v0 - d^2)
        (fl.FedAdagrad, 1e-6 + 1.0),  # v0 + d^2
    ],
)
def test_fedopt_first_step_by_hand(cls: type[fl.FedOpt], v1: float) -> None:
    s = cls(server_learning_rate=0.1, tau=1e-3)
    got = step(s, 0.0, 1.0)  # delta = 1, m = 0.1
    assert got == pytest.approx(0.1 * 0.1 / (math.sqrt(v1) + 1e-3), rel=1e-5)
    assert float(s.v["w"][0]) == pytest.approx(v1, rel=1e-5)


def test_fedopt_state_round_trip() -> None:
    a, b = fl.FedAdam(), fl.FedAdam()
    step(a, 0.0, 1.0)
    b.load_state_dict(a.state_dict())
    assert step(a, 0.3, 0.7) == step(b, 0.3, 0.7)


def test_fedprox_sets_the_proximal_term() -> None:
    s = fl.FedProx(proximal_mu=0.1, training=fl.LocalTraining(epochs=3))
    plan = s.configure_fit(1, {}, ["a", "b", "c"], random.Random(0))
    assert plan.training.proximal_mu == 0.1 and plan.training.epochs == 3
    with pytest.raises(fl.ConfigurationError, match="proximal_mu > 0"):
        fl.FedProx(proximal_mu=0)


def test_client_fraction_and_minimum() -> None:
    names = [f"w{i}" for i in range(10)]
    assert len(sample_workers(names, 0.3, 2, random.Random(1))) == 3
    assert len(sample_workers(names, 0.05, 2, random.Random(1))) == 2
    assert sample_workers(names, 0.3, 2, random.Random(5)) == sample_workers(names, 0.3, 2, random.Random(5))
    with pytest.raises(fl.ConfigurationError, match="only 1 are available"):
        sample_workers(["a"], 1.0, 2, random.Random(0))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: fl.LocalTraining(epochs=0), "epochs"),
        (lambda: fl.LocalTraining(loss="hinge"), "hinge"),
        (lambda: fl.LocalTraining(lr=-1), "learning rate"),
        (lambda: fl.FedAvg(fraction_fit=0), "fraction_fit"),
        (lambda: fl.AggregationRule(noise_multiplier=1.0), "clip_norm"),
        (lambda: fl.AggregationRule(noise_multiplier=1.0, clip_norm=1.0), "weighted=False"),
        (lambda: fl.FedAvgM(server_momentum=1.0), "server_momentum"),
    ],
)
def test_bad_settings_say_what_to_change(make, message: str) -> None:
    with pytest.raises(fl.ConfigurationError, match=message):
        make()
