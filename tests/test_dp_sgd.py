"""Local DP-SGD on the workers: through `fedsecure.fl.fit`, the worker's checks, its ledger and budget."""

from __future__ import annotations

import copy
import importlib.util
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fedsecure as sy
from fedsecure import fl
from fedsecure.data import federate, load_digits
from fedsecure.experiment.config import parse as Experiment
from fedsecure.wire import messages as m
from fedsecure.wire.ids import new_id
from fedsecure.worker import training
from fedsecure.worker.client import WorkerClient
from fedsecure.worker.modules import build, describe, load_state, state_tensors
from fedsecure.worker.store import Sender

DP = fl.DPSGD(noise_multiplier=0.7, max_grad_norm=1.0)
opacus = pytest.mark.skipif(importlib.util.find_spec("opacus") is None,
                            reason="DP-SGD needs Opacus: pip install 'fedsecure[dp-sgd]'")


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def federation(digits, n=4, *, policy=None):
    fed = sy.Federation()
    policy = policy or sy.Policy(trusted_aggregators=frozenset({"agg"}), private_sends=False)
    parts = federate(digits, n, scheme="iid", seed=0)
    workers = [sy.VirtualWorker(id=f"w{i}", data={"x": x, "y": y}, policy=policy, federation=fed)
               for i, (x, y) in enumerate(parts)]
    agg = sy.VirtualWorker(id="agg", policy=sy.Policy(strict=True), federation=fed)
    return workers, agg, parts


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def put(worker, model):
    tensors = [t for _, t in state_tensors(model)]
    module_id, ids = new_id(), [new_id() for _ in tensors]
    worker.request(m.PutModule(module_id, describe(model), tensors, ids, False))
    return module_id


def rdp_epsilon(runs, delta):
    """The RDP accountant of Google's dp-accounting library, called directly."""
    import dp_accounting as dpa

    accountant = dpa.rdp.RdpAccountant()
    for q, z, steps in runs:
        accountant.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), steps)
    return accountant.get_epsilon(delta)


@opacus
def test_dp_sgd_learns_digits_and_each_worker_reports_its_growing_epsilon(digits) -> None:
    workers, agg, parts = federation(digits)
    local = fl.LocalTraining(epochs=1, batch_size=32, lr=0.3, optimizer_args={"momentum": 0.9}, dp_sgd=DP)
    rounds = 3
    _, history = fl.fit(mlp(), workers, fl.FedAvg(training=local), rounds=rounds, aggregator=agg,
                        test_data=(digits.x_test, digits.y_test))
    epsilons = [row["local_epsilon"] for row in history]
    assert all(math.isfinite(e) and e > 0 for e in epsilons)
    assert epsilons == sorted(epsilons) and epsilons[0] < epsilons[-1]
    # the worker's own ledger: ceil(n / B) Poisson steps a round at q = 1 / ceil(n / B)
    expected = max(
        rdp_epsilon([(1 / math.ceil(len(y) / 32), 0.7, math.ceil(len(y) / 32) * rounds)], 1e-5) for _, y in parts
    )
    assert epsilons[-1] == pytest.approx(expected, rel=1e-9)
    assert "train_loss" not in history.last  # computed without noise: not released under DP-SGD
    assert history.last["central_accuracy"] > 0.6  # chance is 0.1


@opacus
def test_a_worker_keeps_one_ledger_per_model_owner(digits) -> None:
    workers, _, _ = federation(digits, 2)
    w = workers[0]
    other = WorkerClient(w.id, lambda data: w.federation.call(w.id, data, Sender("client", "another-owner")))
    config = fl.LocalTraining(batch_size=32, max_steps=3, dp_sgd=DP).to_wire()
    first = [w.request(m.Fit(put(w, mlp()), "x", "y", config, 1))["epsilon"] for _ in range(2)]
    second = other.request(m.Fit(put(other, mlp()), "x", "y", config, 1))["epsilon"]
    assert first[0] < first[1] and second == pytest.approx(first[0])
    assert set(w.core.dp_ledgers) == {"model-owner", "another-owner"}
    assert w.core.dp_ledgers["model-owner"].steps == 6


@opacus
def test_per_record_clipping_bounds_the_update(digits) -> None:
    # no noise, a tiny clip bound, one Poisson sample of every record per step (batch >= records):
    # each step moves the weights by at most lr * max_grad_norm, and the mean of two workers too
    workers, agg, _ = federation(digits, 2)
    model = mlp()
    start = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    local = fl.LocalTraining(epochs=3, batch_size=10_000, lr=1.0,
                             dp_sgd=fl.DPSGD(noise_multiplier=0.0, max_grad_norm=1e-3))
    _, history = fl.fit(model, workers, fl.FedAvg(training=local), rounds=1, aggregator=agg)
    moved = float((torch.cat([p.detach().flatten() for p in model.parameters()]) - start).norm())
    assert 0 < moved <= 3 * 1.0 * 1e-3 * (1 + 1e-4)
    assert history.last["local_epsilon"] == math.inf  # clipping without noise protects nothing


@opacus
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_clipping_and_averaging_match_opacus_called_directly(digits) -> None:
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    x, y = digits.x_train[:64], digits.y_train[:64]
    model = mlp()
    ours, reference, plain = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    local = fl.LocalTraining(epochs=3, batch_size=1_000, lr=0.5, dp_sgd=fl.DPSGD(noise_multiplier=0.0, max_grad_norm=0.1))
    training.fit(ours, x, y, training.parse(local.to_wire()), seed=0)
    # Opacus' own per-sample gradients (its hooks) and DPOptimizer, on the full batch, without noise
    gsm = GradSampleModule(reference)
    optimizer = DPOptimizer(torch.optim.SGD(reference.parameters(), lr=0.5), noise_multiplier=0.0,
                            max_grad_norm=0.1, expected_batch_size=64)
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(gsm(x), y).backward()
        optimizer.step()
    for a, b in zip(ours.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    training.fit(plain, x, y, training.parse(fl.LocalTraining(epochs=3, batch_size=1_000, lr=0.5).to_wire()), 0)
    assert not torch.allclose(plain[1].weight, ours[1].weight, atol=1e-3)  # so the clipping mattered


class Mixing(nn.Module):
    """Adds the batch's mean to every record: one record then reaches into every row's activations."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.fc(x + x.mean(0))


@opacus
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_one_record_moves_a_graph_model_by_at_most_its_clipped_share(digits) -> None:
    # A traced graph (GraphModel) that mixes the rows of a batch. Per-layer hooks would take every
    # row's "per-sample" gradient from activations that depend on all the records; the worker takes
    # each record's gradient with the model applied to that record alone.
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    x, y = digits.x_train[:50], digits.y_train[:50]
    neighbour = x.clone()
    neighbour[0] = 50.0
    clip, n = 0.01, len(y)
    settings = training.parse(fl.LocalTraining(batch_size=1_000, lr=1.0, max_steps=1,
                                               dp_sgd=fl.DPSGD(noise_multiplier=0.0, max_grad_norm=clip)).to_wire())
    mixing = Mixing()
    built = build(describe(mixing))
    load_state(built, [t.detach().clone() for _, t in state_tensors(mixing)])
    assert type(built).__name__ == "GraphModel"
    trained = []
    for data in (x, neighbour):
        module = copy.deepcopy(built)
        training.fit(module, data, y, settings, seed=0)
        trained.append(torch.cat([p.detach().flatten() for p in module.parameters()]))
    assert float((trained[0] - trained[1]).norm()) <= 2 * clip / n * (1 + 1e-4)
    hooked = []
    for data in (x, neighbour):
        module = copy.deepcopy(built)
        optimizer = DPOptimizer(torch.optim.SGD(module.parameters(), lr=1.0), noise_multiplier=0.0,
                                max_grad_norm=clip, expected_batch_size=n)
        F.cross_entropy(GradSampleModule(module)(data), y).backward()
        optimizer.step()
        hooked.append(torch.cat([p.detach().flatten() for p in module.parameters()]))
    assert float((hooked[0] - hooked[1]).norm()) > 2 * (2 * clip / n)  # with hooks the bound fails


@opacus
def test_fedprox_and_a_groupnorm_cnn_train_with_dp_sgd(digits) -> None:
    workers, agg, _ = federation(digits, 2)
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 8 * 8, 10))
    local = fl.LocalTraining(batch_size=32, lr=0.1, max_steps=5, dp_sgd=DP)
    _, history = fl.fit(cnn, workers, fl.FedProx(proximal_mu=0.1, training=local), rounds=1, aggregator=agg)
    assert history.last["local_epsilon"] > 0 and "failures" not in history.last


@opacus
def test_batchnorm_is_refused_with_what_to_use_instead(digits) -> None:
    workers, _, _ = federation(digits, 2)
    w = workers[0]
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))
    config = fl.LocalTraining(dp_sgd=DP).to_wire()
    with pytest.raises(sy.OperationNotAllowed, match="GroupNorm or LayerNorm"):
        w.request(m.Fit(put(w, model), "x", "y", config, 1))
    assert not w.core.dp_ledgers  # nothing ran, nothing is charged


@pytest.mark.parametrize(
    "dp_sgd",
    [
        {"noise_multiplier": -1.0, "max_grad_norm": 1.0, "delta": 1e-5},
        {"noise_multiplier": float("nan"), "max_grad_norm": 1.0, "delta": 1e-5},
        {"noise_multiplier": 1.0, "max_grad_norm": float("inf"), "delta": 1e-5},
        {"noise_multiplier": "1.0", "max_grad_norm": 1.0, "delta": 1e-5},
        {"noise_multiplier": True, "max_grad_norm": 1.0, "delta": 1e-5},
        {"noise_multiplier": 1.0, "max_grad_norm": 0.0, "delta": 1e-5},
        {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1.0},
        {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": [1e-5]},
        {"noise_multiplier": 1.0, "max_grad_norm": 1.0},
        {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5, "secure_mode": False},
        [1.0, 1.0, 1e-5],
        "on",
    ],
)
def test_hostile_dp_sgd_settings_are_refused(digits, dp_sgd) -> None:
    workers, _, _ = federation(digits, 2)
    w = workers[0]
    config = {**fl.LocalTraining().to_wire(), "dp_sgd": dp_sgd}
    with pytest.raises(sy.ProtocolError, match="dp_sgd|DP-SGD"):
        w.request(m.Fit(put(w, mlp()), "x", "y", config, 1))
    assert not w.core.dp_ledgers


def test_a_configuration_without_the_dp_sgd_key_is_refused() -> None:
    config = fl.LocalTraining().to_wire()
    del config["dp_sgd"]
    with pytest.raises(sy.ProtocolError, match=r"missing \['dp_sgd'\]"):
        training.parse(config)


@pytest.mark.parametrize(
    "kwargs",
    [{"noise_multiplier": -0.1, "max_grad_norm": 1.0}, {"noise_multiplier": math.nan, "max_grad_norm": 1.0},
     {"noise_multiplier": 1.0, "max_grad_norm": "1"}, {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 2.0}],
)
def test_the_model_owner_side_checks_its_settings(kwargs) -> None:
    with pytest.raises(fl.ConfigurationError, match="DP-SGD"):
        fl.DPSGD(**kwargs)


def test_without_opacus_the_worker_says_what_to_install(digits, monkeypatch) -> None:
    workers, _, _ = federation(digits, 2)
    w = workers[0]
    monkeypatch.setitem(sys.modules, "opacus", None)  # `import opacus` now fails
    with pytest.raises(sy.OperationNotAllowed, match=r"pip install 'fedsecure\[dp-sgd\]'"):
        w.request(m.Fit(put(w, mlp()), "x", "y", fl.LocalTraining(dp_sgd=DP).to_wire(), 1))
    assert not w.core.dp_ledgers
    reply = w.request(m.Fit(put(w, mlp()), "x", "y", fl.LocalTraining(max_steps=2).to_wire(), 1))
    assert reply["steps"] == 2 and "epsilon" not in reply  # plain training needs no Opacus


@opacus
def test_a_data_owner_budget_ends_its_dp_sgd_and_refuses_plain_training(digits) -> None:
    budget = sy.Policy(private_sends=False, dp_sgd_budget=(2.5, 1e-5))
    workers, _, _ = federation(digits, 2, policy=budget)
    w = workers[0]
    with pytest.raises(sy.PermissionDenied, match="trains only with DP-SGD"):
        w.request(m.Fit(put(w, mlp()), "x", "y", fl.LocalTraining(max_steps=2).to_wire(), 1))
    dp = fl.DPSGD(noise_multiplier=1.0, max_grad_norm=1.0)
    config = fl.LocalTraining(batch_size=32, max_steps=10, dp_sgd=dp).to_wire()
    spent = []
    with pytest.raises(sy.PermissionDenied, match="over its owner's budget"):
        for _ in range(10):
            spent.append(w.request(m.Fit(put(w, mlp()), "x", "y", config, 1))["epsilon"])
    assert len(spent) == 3 and spent == sorted(spent) and spent[-1] <= 2.5  # about 1.98, 2.25, 2.47
    assert w.core.dp_ledgers["model-owner"].steps == 30  # the refused round charged nothing
    with pytest.raises(ValueError, match="dp_sgd_budget"):
        sy.Policy(dp_sgd_budget=(math.inf, 1e-5))


def test_the_training_section_of_an_experiment_turns_dp_sgd_on() -> None:
    on = Experiment({"training": {"lr": 0.1, "dp_sgd_noise_multiplier": 1.1, "dp_sgd_max_grad_norm": 0.5}})
    assert on.training().dp_sgd == fl.DPSGD(noise_multiplier=1.1, max_grad_norm=0.5, delta=1e-5)
    assert Experiment({"training": {"lr": 0.1}}).training().dp_sgd is None
    with pytest.raises(fl.ConfigurationError, match="dp_sgd_max_grad_norm"):
        Experiment({"training": {"dp_sgd_noise_multiplier": 1.1}}).training()
