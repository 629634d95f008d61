"""The FedAvg engine through its public API, with real workers and a real aggregator."""

import copy

import pytest
import torch
from torch import nn

import fedsecure as sy
from fedsecure import fl
from fedsecure.data import federate, load_digits
from fedsecure.fl.engine import _seed
from fedsecure.wire import messages as m
from fedsecure.wire.ids import new_id
from fedsecure.worker import training
from fedsecure.worker.modules import describe


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def federation(digits, n=3, *, strict=True, extra=None):
    fed = sy.Federation()
    policy = sy.Policy(trusted_aggregators=frozenset({"agg"}), private_sends=False)
    parts = federate(digits, n, scheme="dirichlet", alpha=1.0, seed=0)
    workers = [
        sy.VirtualWorker(id=f"w{i}", data={"x": x, "y": y, "x_test": x[:20], "y_test": y[:20]},
                         policy=policy, federation=fed)
        for i, (x, y) in enumerate(parts)
    ]
    agg = sy.VirtualWorker(id="agg", policy=sy.Policy(strict=strict), federation=fed)
    return workers, agg, parts


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


TRAINING = fl.LocalTraining(epochs=2, batch_size=16, lr=0.05, optimizer_args={"momentum": 0.9})


def test_a_round_is_the_sample_weighted_mean_of_local_training(digits) -> None:
    workers, agg, parts = federation(digits)
    model = mlp()
    start = copy.deepcopy(model)
    fl.fit(model, workers, fl.FedAvg(training=TRAINING), rounds=1, aggregator=agg, seed=7)
    # the same by hand: train a copy on each share with the seed the engine gives it, then average
    settings = training.parse(TRAINING.to_wire())
    states, counts = [], []
    for w, (x, y) in zip(workers, parts, strict=True):
        local = copy.deepcopy(start)
        n, _, _ = training.fit(local, x, y, settings, _seed(7, 1, w.id))
        states.append(local.state_dict())
        counts.append(n)
    for name, value in model.state_dict().items():
        expected = sum(s[name].double() * c for s, c in zip(states, counts, strict=True)) / sum(counts)
        torch.testing.assert_close(value.double(), expected, atol=1e-6, rtol=1e-6)
    assert counts[0] != counts[1]  # so the weighting mattered


def test_the_model_owner_receives_only_aggregates(digits) -> None:
    workers, agg, _ = federation(digits)
    model = mlp()
    size = sum(t.numel() * 4 for t in model.state_dict().values())
    _, history = fl.fit(model, workers, fl.FedAvg(training=TRAINING), rounds=3, aggregator=agg)
    for w in workers:
        assert w.bytes_received < 2_000  # replies: sample counts and a loss, never weights
        assert w.object_count() == 0  # nothing of the model owner's is left on the workers
    assert size * 3 <= agg.bytes_received < size * 3 + 10_000  # one aggregate per round
    assert agg.object_count() == 0
    assert len(history) == 3 and history.last["workers"] == 3


def test_nothing_of_a_round_stays_on_its_workers_while_the_model_owner_evaluates(digits) -> None:
    """The mean is freed by the request that reads it, not by the aggregator's next one: the store
    itself, not what a flush would leave, is empty during the central evaluation."""
    workers, agg, _ = federation(digits)
    held: list[int] = []

    def central(parameters):
        held.append(sum(len(w.core.objects) for w in (agg, *workers)))
        return {}

    base = sum(len(w.core.objects) for w in workers)  # the owners' own data
    fl.fit(mlp(), workers, fl.FedAvg(training=TRAINING, evaluate_fn=central), rounds=2, aggregator=agg)
    assert held == [base, base]  # after each round


def test_a_trained_update_cannot_be_fetched_from_its_worker(digits) -> None:
    workers, _, _ = federation(digits)
    w = workers[0]
    model = mlp()
    module_id, ids = new_id(), [new_id() for _ in model.state_dict()]
    w.request(m.PutModule(module_id, describe(model), list(model.state_dict().values()), ids, False))
    w.request(m.Fit(module_id, "x", "y", TRAINING.to_wire(), 1))
    with pytest.raises(sy.PermissionDenied) as refused:
        w.request(m.GetModule(module_id))
    assert refused.value.rule == "private-data"
    with pytest.raises(sy.PermissionDenied):  # nor moved anywhere but to a trusted aggregator
        w.request(m.MoveModule(module_id, "w1", new_id(), [new_id() for _ in ids]))


@pytest.mark.parametrize(
    ("config", "error"),
    [
        ({**TRAINING.to_wire(), "optimizer": "LBFGS"}, sy.OperationNotAllowed),
        ({**TRAINING.to_wire(), "loss": "eval"}, sy.OperationNotAllowed),
        ({**TRAINING.to_wire(), "optimizer_args": {"foreach": True}}, sy.OperationNotAllowed),
        ({**TRAINING.to_wire(), "epochs": -1}, sy.ProtocolError),
        ({**TRAINING.to_wire(), "code": "import os"}, sy.ProtocolError),
    ],
)
def test_hostile_training_configurations_are_refused(digits, config, error) -> None:
    workers, _, _ = federation(digits)
    model = mlp()
    module_id, ids = new_id(), [new_id() for _ in model.state_dict()]
    w = workers[0]
    w.request(m.PutModule(module_id, describe(model), list(model.state_dict().values()), ids, False))
    with pytest.raises(error):
        w.request(m.Fit(module_id, "x", "y", config, 1))


def test_failed_workers_arrive_as_values(digits) -> None:
    workers, agg, _ = federation(digits, 4)
    broken = sy.VirtualWorker(id="broken", federation=workers[0].federation)  # holds no data
    model = mlp()
    _, history = fl.fit(model, [*workers, broken], fl.FedAvg(training=TRAINING), rounds=2, aggregator=agg)
    assert history.last["workers"] == 4
    assert any("broken" in f and "no data tagged" in f for f in history.last["failures"])
    with pytest.raises(fl.RoundFailed, match="too few of the 5 workers finished, 5 are needed.*broken"):
        fl.fit(mlp(), [*workers, broken], fl.FedAvg(training=TRAINING, min_fit_workers=5), rounds=1, aggregator=agg)


def test_federated_evaluation_releases_the_aggregate_only(digits) -> None:
    workers, agg, parts = federation(digits)
    model = mlp()
    strategy = fl.FedAvg(training=TRAINING, fraction_evaluate=1.0)
    _, history = fl.fit(model, workers, strategy, rounds=1, aggregator=agg)
    correct = count = 0
    for x, _y in parts:
        xt, yt = x[:20], _y[:20]
        correct += int((model(xt).argmax(1) == yt).sum())
        count += len(yt)
    assert history.last["federated_accuracy"] == pytest.approx(correct / count)


def test_clipping_at_the_aggregator_bounds_the_step(digits) -> None:
    workers, agg, _ = federation(digits)
    model = mlp()
    before = torch.cat([t.reshape(-1) for t in model.state_dict().values()]).clone()
    rule = fl.AggregationRule(clip_norm=0.01)
    fl.fit(model, workers, fl.FedAvg(training=TRAINING, rule=rule), rounds=1, aggregator=agg)
    after = torch.cat([t.reshape(-1) for t in model.state_dict().values()])
    assert 0 < float(torch.linalg.vector_norm(after - before)) <= 0.01 + 1e-6


@pytest.mark.parametrize("strategy", [fl.FedProx(proximal_mu=0.5, training=TRAINING), fl.FedAdam(training=TRAINING),
                                      fl.FedYogi(training=TRAINING), fl.FedAvgM(training=TRAINING)])
def test_every_strategy_learns_digits(digits, strategy) -> None:
    workers, agg, _ = federation(digits)
    _, history = fl.fit(mlp(), workers, strategy, rounds=5, aggregator=agg,
                        test_data=(digits.x_test, digits.y_test))
    assert history.last["central_accuracy"] > 0.6


def test_models_outside_the_allow_list_are_refused_with_a_hint(digits) -> None:
    workers, agg, _ = federation(digits)

    class Custom(nn.Module):
        def forward(self, x):  # data-dependent control flow: torch.fx cannot trace it
            return x if x.sum() > 0 else -x

    with pytest.raises(fl.ConfigurationError, match="allow-list"):
        fl.fit(Custom(), workers, fl.FedAvg(), rounds=1, aggregator=agg)


def test_dp_fedavg_trains_and_accounts_every_round(digits) -> None:
    from fedsecure.privacy import DPFedAvg

    workers, agg, _ = federation(digits, 6)
    strategy = DPFedAvg(fl.FedAvg(training=TRAINING, fraction_fit=0.5, min_fit_workers=3), noise_multiplier=0.3,
                        clip_norm=1.0, budget_epsilon=40.0)
    _, history = fl.fit(mlp(), workers, strategy, rounds=60, aggregator=agg, test_data=(digits.x_test, digits.y_test))
    epsilons = [r["dp_epsilon"] for r in history]
    assert epsilons == sorted(epsilons) and epsilons[-1] <= 40.0
    assert len(history) < 60  # the budget ended training early, cleanly
    # 3 workers per round drown in noise of this scale; the point is that it still learns
    assert history.last["central_accuracy"] > 0.25  # chance is 0.1


@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "multi_krum"])
def test_robust_rules_run_at_the_aggregator(digits, rule) -> None:
    workers, agg, _ = federation(digits, 6)
    options = {"trim": 0.2} if rule == "trimmed_mean" else {"byzantine": 1} if rule == "multi_krum" else {}
    strategy = fl.FedAvg(training=TRAINING, rule=fl.AggregationRule(name=rule, options=options))
    _, history = fl.fit(mlp(), workers, strategy, rounds=4, aggregator=agg, test_data=(digits.x_test, digits.y_test))
    assert history.last["central_accuracy"] > 0.6


def test_training_workers_in_threads_gives_the_serial_result(digits) -> None:
    results = []
    for parallelism in (1, 3):
        workers, agg, _ = federation(digits, 5)
        model, _ = fl.fit(mlp(), workers, fl.FedAvg(training=TRAINING), rounds=2, aggregator=agg,
                          parallelism=parallelism)
        results.append(model.state_dict())
    for name, value in results[0].items():
        torch.testing.assert_close(results[1][name], value, atol=1e-6, rtol=1e-6)


def dropout_mlp(seed=0, p=0.5):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(p), nn.Linear(32, 10))


def test_dropout_masks_come_from_the_training_seed_not_from_torchs_global_generator(digits) -> None:
    x, y = digits.x_train[:200], digits.y_train[:200]
    settings = training.parse(TRAINING.to_wire())

    def trained(seed, p=0.5, global_seed=0):
        model = dropout_mlp(p=p)
        torch.manual_seed(global_seed)
        training.fit(model, x, y, settings, seed)
        assert "forward" not in model[3].__dict__  # the layer is torch's own again after the fit
        return torch.cat([t.flatten() for t in model.state_dict().values()])

    first = trained(5, global_seed=1)
    assert torch.equal(first, trained(5, global_seed=2))
    assert not torch.equal(first, trained(6))
    assert not torch.equal(first, trained(5, p=0.0))  # the layer drops units


def test_owners_training_in_threads_draw_the_dropout_masks_of_the_serial_run(digits) -> None:
    results = []
    for parallelism, global_seed in ((1, 1), (3, 2)):
        workers, agg, _ = federation(digits, 5)
        torch.manual_seed(global_seed)
        model, _ = fl.fit(dropout_mlp(), workers, fl.FedAvg(training=TRAINING), rounds=2, aggregator=agg,
                          parallelism=parallelism, seed=3)
        results.append(model.state_dict())
    for name, value in results[0].items():
        torch.testing.assert_close(results[1][name], value, atol=1e-6, rtol=1e-6)


def test_evaluate_every_skips_rounds_but_never_the_last_and_a_bad_value_is_refused(digits) -> None:
    workers, agg, _ = federation(digits, 3)
    strategy = fl.FedAvg(training=TRAINING, fraction_evaluate=1.0)
    _, history = fl.fit(mlp(), workers, strategy, rounds=4, aggregator=agg, evaluate_every=3,
                        test_data=(digits.x_test, digits.y_test))
    assert [r["round"] for r in history.rows if "central_accuracy" in r] == [3, 4]
    assert [r["round"] for r in history.rows if "federated_accuracy" in r] == [3, 4]
    for bad in (0, 1.5, True):
        with pytest.raises(fl.ConfigurationError, match="evaluate_every is a number of rounds"):
            fl.Engine(mlp(), workers, strategy, aggregator=agg, evaluate_every=bad)
