"""Pairwise secure aggregation through the engine: the model owner learns the sum and nothing else."""

import copy

import pytest
import torch
from torch import nn

import fedsecure as sy
from fedsecure import fl
from fedsecure.aggregate import SecAggServer, decode_message
from fedsecure.data import federate, load_digits
from fedsecure.fl.secure import SecureSettings
from fedsecure.wire import messages as m
from fedsecure.wire.ids import new_id
from fedsecure.worker.modules import describe

TRAINING = fl.LocalTraining(epochs=1, batch_size=16, lr=0.05, optimizer_args={"momentum": 0.9})


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def owners(digits, n=4, trust=()):
    fed = sy.Federation()
    # by default the owners trust no aggregator at all: their models can leave only masked
    policy = sy.Policy(trusted_aggregators=frozenset(trust), private_sends=False)
    return [sy.VirtualWorker(id=f"w{i}", data={"x": x, "y": y}, policy=policy, federation=fed)
            for i, (x, y) in enumerate(federate(digits, n, scheme="dirichlet", alpha=1.0, seed=0))]


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def test_secure_rounds_match_the_trusted_aggregator(digits) -> None:
    secure, _ = fl.fit(mlp(), owners(digits), fl.FedAvg(training=TRAINING), rounds=2, aggregator=None,
                       secure_aggregation="pairwise", secure=SecureSettings(bound=2.0, bits=64))
    fed_workers = owners(digits, trust={"agg"})
    trusted_agg = sy.VirtualWorker(id="agg", federation=fed_workers[0].federation)
    trusted, _ = fl.fit(mlp(), fed_workers, fl.FedAvg(training=TRAINING), rounds=2, aggregator=trusted_agg)
    for name, value in trusted.state_dict().items():
        torch.testing.assert_close(secure.state_dict()[name], value, atol=1e-5, rtol=1e-5)


def test_a_worker_that_drops_out_is_recovered(digits) -> None:
    workers = owners(digits, 5)
    dead = workers[2]
    calls = {"n": 0}
    inner = dead._transport

    def drops_after_sharing(data: bytes) -> bytes:
        msg = m.decode_request(data)
        if isinstance(msg, m.SecAgg) and msg.phase == "mask":
            raise sy.WorkerUnavailable("w2 went away")
        calls["n"] += 1
        return inner(data)

    dead._transport = drops_after_sharing
    _, history = fl.fit(mlp(), workers, fl.FedAvg(training=TRAINING), rounds=1, aggregator=None,
                        secure_aggregation="pairwise", test_data=(digits.x_test, digits.y_test))
    assert history.last["workers"] == 4
    assert any("w2" in f and "mask" in f for f in history.last["failures"])


def test_too_few_survivors_fail_the_round_and_reveal_nothing(digits) -> None:
    workers = owners(digits, 3)
    for w in workers[1:]:
        inner = w._transport

        def gone(data: bytes, inner=inner) -> bytes:
            if isinstance(m.decode_request(data), m.SecAgg):
                raise sy.WorkerUnavailable("gone")
            return inner(data)

        w._transport = gone
    with pytest.raises(fl.RoundFailed):
        fl.fit(mlp(), workers, fl.FedAvg(training=TRAINING, min_fit_workers=1), rounds=1, aggregator=None,
               secure_aggregation="pairwise", retries=0)


def test_a_masked_update_reveals_nothing_and_the_model_stays_private(digits) -> None:
    """Drive one worker by hand as a curious model owner: what comes back is masked."""
    w = owners(digits, 2)[0]
    model = mlp()
    spec, tensors = describe(model), list(model.state_dict().values())
    ids = {}
    for name in ("ref", "model"):
        ids[name] = new_id()
        w.request(m.PutModule(ids[name], spec, tensors, [new_id() for _ in tensors], False))
    w.request(m.Fit(ids["model"], "x", "y", TRAINING.to_wire(), 1))
    with pytest.raises(sy.PermissionDenied):
        w.request(m.GetModule(ids["model"]))
    size = sum(t.numel() for t in tensors) + 1
    server = SecAggServer(clients=[1, 2], threshold=2, vector_size=size, bound=1000.0)
    reply = w.request(m.SecAgg("s", "advertise", 1, server.setup.encode(), ids["model"], ids["ref"], True, {}))
    assert decode_message(reply).sender == 1
    with pytest.raises(sy.ProtocolError, match="exists already"):
        w.request(m.SecAgg("s", "advertise", 1, server.setup.encode(), ids["model"], ids["ref"], True, {}))
    with pytest.raises(sy.ProtocolError, match="phases are"):
        w.request(m.SecAgg("s2", "reveal", 1, b"", ids["model"], ids["ref"], True, {}))
    with pytest.raises(sy.ProtocolError, match="no secure aggregation session"):
        w.request(m.SecAgg("nope", "mask", 1, b"", ids["model"], ids["ref"], True, {}))


def test_pairwise_mode_refuses_rules_it_cannot_compute(digits) -> None:
    strategy = fl.FedAvg(training=TRAINING, rule=fl.AggregationRule(name="median"))
    with pytest.raises(fl.ConfigurationError, match="mean only"):
        fl.fit(mlp(), owners(digits), strategy, rounds=1, aggregator=None, secure_aggregation="pairwise")


def test_an_unknown_mode_is_refused(digits) -> None:
    with pytest.raises(fl.ConfigurationError, match="'trusted'.*'pairwise'"):
        fl.fit(copy.deepcopy(mlp()), owners(digits), fl.FedAvg(), rounds=1, aggregator=None,
               secure_aggregation="homomorphic")


def test_dp_composes_with_secure_aggregation(digits) -> None:
    from fedsecure.privacy import DPFedAvg

    strategy = DPFedAvg(fl.FedAvg(training=TRAINING, min_fit_workers=4), noise_multiplier=0.5, clip_norm=1.0)
    model = mlp()
    before = torch.cat([t.reshape(-1) for t in model.state_dict().values()]).clone()
    _, history = fl.fit(model, owners(digits), strategy, rounds=1, aggregator=None, secure_aggregation="pairwise",
                        secure=SecureSettings(bound=2.0, bits=64))
    after = torch.cat([t.reshape(-1) for t in model.state_dict().values()])
    assert history.last["dp_epsilon"] > 0
    # a mean of 4 clipped updates plus noise of std z*S/4 per coordinate: about 0.125 * sqrt(d)
    step = float(torch.linalg.vector_norm(after - before))
    expected = 0.5 * 1.0 / 4 * before.numel() ** 0.5
    assert 0.5 * expected < step < 1.0 + 1.5 * expected


def test_workers_clip_and_noise_their_own_update() -> None:
    from fedsecure.worker.secure import update_vector

    reference = nn.Linear(100, 100)
    trained = copy.deepcopy(reference)
    with torch.no_grad():
        trained.weight.add_(1.0)  # an update of norm 100
    clipped = update_vector(trained, reference, None, {"clip_norm": 2.0})
    assert abs(float((clipped**2).sum() ** 0.5) - 2.0) < 1e-9
    noisy = update_vector(trained, reference, None, {"clip_norm": 2.0, "noise_std": 0.1})
    assert abs(float((noisy - clipped).std()) - 0.1) < 0.01
    with pytest.raises(sy.ProtocolError, match="unweighted"):
        update_vector(trained, reference, 10, {"clip_norm": 2.0, "noise_std": 0.1})
    with pytest.raises(sy.ProtocolError, match="clip_norm and noise_std"):
        update_vector(trained, reference, None, {"exec": "x"})
