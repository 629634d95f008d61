"""Additive secret sharing among workers: the pointer API and the engine's "shares" mode."""

import pytest
import torch
from torch import nn

import fedsecure as sy
from fedsecure import fl
from fedsecure.aggregate.shares import AdditiveShares
from fedsecure.data import federate, load_digits
from fedsecure.errors import SecAggInputError
from fedsecure.fl.secure import SecureSettings
from fedsecure.wire import messages as m
from fedsecure.wire.ids import new_id

TRAINING = fl.LocalTraining(epochs=1, batch_size=16, lr=0.05, optimizer_args={"momentum": 0.9})


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture
def hooked():
    hook = sy.TorchHook(torch)
    fed = sy.Federation()
    return hook, fed


def workers(fed, *names, **kw):
    return [sy.VirtualWorker(id=n, federation=fed, **kw) for n in names]


# -- the pointer API -----------------------------------------------------------------


def test_the_pysyft_spelling_adds_on_shares_and_decodes(hooked) -> None:
    _, fed = hooked
    bob, alice = workers(fed, "bob", "alice")
    x, y = torch.tensor([0.1, -0.2, 0.3]), torch.tensor([[1.5], [2.0], [-3.25]]).flatten()
    xs, ys = x.fix_precision().share(bob, alice), y.fix_precision().share(bob, alice)
    assert isinstance(xs, sy.SharedTensor) and [w.id for w in xs.holders] == ["bob", "alice"]
    z = (xs + ys).get().float_precision()  # float32 in, float32 out
    torch.testing.assert_close(z, x + y, atol=2**-16, rtol=0)
    torch.testing.assert_close((xs - ys).float_precision(), x - y, atol=2**-16, rtol=0)
    torch.testing.assert_close((3 * xs).float_precision(), 3 * x, atol=3 * 2**-16, rtol=0)
    torch.testing.assert_close((xs + 1.5).float_precision(), x + 1.5, atol=2**-16, rtol=0)
    torch.testing.assert_close((2 - xs).float_precision(), 2 - x, atol=2**-16, rtol=0)
    # without the hook: the same through fedsecure.fix_precision
    torch.testing.assert_close(sy.fix_precision(x).share(bob, alice).float_precision(), x, atol=2**-16, rtol=0)


def test_each_holder_sees_a_uniform_share_not_the_value(hooked) -> None:
    _, fed = hooked
    bob, alice = workers(fed, "bob", "alice")
    x = torch.zeros(20_000)
    xs = x.fix_precision().share(bob, alice)
    seen = fed.cores["bob"].objects[xs.shares[0].id_at_location].obj
    # a share of zeros looks like random 64-bit words: about half the bits are set
    bits = torch.from_numpy(seen.numpy().view("uint8")).unsqueeze(-1).bitwise_and(
        torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)).ne(0).float().mean()
    assert 0.49 < float(bits) < 0.51


def test_a_remote_value_is_shared_by_its_worker_and_never_leaves_whole(hooked) -> None:
    _, fed = hooked
    carol, bob, alice = workers(fed, "carol", "bob", "alice")
    value = torch.tensor([5.0, 6.0, -7.0])
    ptr = value.send(carol)
    before = dict(fed.link_bytes)
    shared = ptr.fix_precision().share(bob, alice).get()  # as in PySyft: a pointer, whose get() is the value
    assert set(fed.link_bytes) - set(before) == {("carol", "bob"), ("carol", "alice")}  # carol sent the shares
    torch.testing.assert_close(shared.float_precision(), value, atol=2**-16, rtol=0)


def test_shares_of_private_data_are_labelled_and_sum_only_across_owners(hooked) -> None:
    _, fed = hooked
    a_data, b_data = torch.tensor([1.0, 2.0]), torch.tensor([10.0, 20.0])
    a = sy.VirtualWorker(id="a", federation=fed, data={"v": a_data})
    b = sy.VirtualWorker(id="b", federation=fed, data={"v": b_data})
    h1, h2 = workers(fed, "h1", "h2", policy=sy.Policy(strict=True))
    (av,), (bv,) = a.search("v"), b.search("v")
    a_shared, b_shared = av.fix_precision().share(h1, h2).get(), bv.fix_precision().share(h1, h2).get()
    with pytest.raises(sy.PermissionDenied):  # one owner's share does not leave its holder
        a_shared.shares[0].get()
    with pytest.raises(sy.PermissionDenied):  # a strict holder runs no op on it either
        a_shared + b_shared
    with pytest.raises(sy.PermissionDenied, match="at least 2"):
        sy.SharedTensor.sum([a_shared])
    total = sy.SharedTensor.sum([a_shared, b_shared])
    torch.testing.assert_close(total.float_precision(), a_data + b_data, atol=2 * 2**-16, rtol=0)
    with pytest.raises(sy.ObjectNotFound):  # consumed: each share joins one sum only
        sy.SharedTensor.sum([a_shared, b_shared])


def test_an_owner_shares_only_with_holders_it_trusts(hooked) -> None:
    _, fed = hooked
    owner = sy.VirtualWorker(id="o", federation=fed, data={"v": torch.ones(3)},
                             policy=sy.Policy(trusted_aggregators=frozenset({"h1", "h2"})))
    h1, h2, h3 = workers(fed, "h1", "h2", "h3")
    (v,) = owner.search("v")
    with pytest.raises(sy.PermissionDenied, match="do not trust 'h3'"):
        v.fix_precision().share(h1, h3)
    assert fed.cores["h1"].objects == {}  # refused before any share left
    v.fix_precision().share(h1, h2)


@pytest.mark.parametrize("bad", [
    {"destinations": ["h1"]}, {"destinations": ["h1", "h1"]}, {"new_ids": [1]}, {"frac_bits": 60},
    {"frac_bits": -1}, {"weighted": True}, {"privacy": {"clip_norm": 1.0}},
])
def test_malformed_share_requests_are_refused(hooked, bad) -> None:
    _, fed = hooked
    src, h1, h2 = workers(fed, "src", "h1", "h2")
    ptr = torch.ones(3).send(src)
    fields = {"object_id": ptr.id_at_location, "reference_id": 0, "weighted": False, "privacy": {},
              "destinations": ["h1", "h2"], "new_ids": [new_id(), new_id()], "frac_bits": 16} | bad
    with pytest.raises(sy.ProtocolError):
        src.request(m.Share(**fields))
    assert fed.cores["h1"].objects == {} and fed.cores["h2"].objects == {}


def test_shares_cannot_be_delivered_by_a_client_or_summed_when_they_are_not_shares(hooked) -> None:
    _, fed = hooked
    (h,) = workers(fed, "h")
    with pytest.raises(sy.ProtocolError, match="not accepted from a client"):
        h.request(m.DeliverShare(new_id(), torch.zeros(2, dtype=torch.int64), [], 0, 16, ""))
    owner = sy.VirtualWorker(id="o", federation=fed, data={"v": torch.ones(2, dtype=torch.int64)})
    (v,) = owner.search("v")
    v = v.move(h)
    with pytest.raises(sy.OperationNotAllowed, match="additive shares only"):
        h.request(m.AggregateShares([v.id_at_location], new_id()))


def test_a_value_too_large_for_the_fixed_point_is_refused_without_its_size() -> None:
    fed = sy.Federation()
    owner = sy.VirtualWorker(id="o", federation=fed, data={"v": torch.tensor([1e30])})
    h1, h2 = workers(fed, "h1", "h2")
    (v,) = owner.search("v")
    with pytest.raises(sy.ProtocolError) as info:
        v.fix_precision().share(h1, h2)
    assert "1e+30" not in str(info.value) and "fewer" in str(info.value)
    with pytest.raises(SecAggInputError, match="two or more workers"):
        torch.ones(2).fix_precision().share(h1)


# -- the engine ----------------------------------------------------------------------


def owners(digits, n=4, trust=("h1", "h2")):
    fed = sy.Federation()
    policy = sy.Policy(trusted_aggregators=frozenset(trust), private_sends=False)
    owners_ = [sy.VirtualWorker(id=f"w{i}", data={"x": x, "y": y}, policy=policy, federation=fed)
               for i, (x, y) in enumerate(federate(digits, n, scheme="dirichlet", alpha=1.0, seed=0))]
    holders = [sy.VirtualWorker(id=h, policy=sy.Policy(strict=True), federation=fed) for h in ("h1", "h2")]
    return owners_, holders


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def test_shares_rounds_match_the_trusted_aggregator(digits) -> None:
    workers_, holders = owners(digits)
    shared, history = fl.fit(mlp(), workers_, fl.FedAvg(training=TRAINING), rounds=2, aggregator=None,
                             secure_aggregation="shares", share_holders=holders,
                             test_data=(digits.x_test, digits.y_test))
    trusted_workers, _ = owners(digits, trust=("agg",))
    agg = sy.VirtualWorker(id="agg", federation=trusted_workers[0].federation, policy=sy.Policy(strict=True))
    trusted, _ = fl.fit(mlp(), trusted_workers, fl.FedAvg(training=TRAINING), rounds=2, aggregator=agg)
    for name, value in trusted.state_dict().items():
        torch.testing.assert_close(shared.state_dict()[name], value, atol=1e-5, rtol=1e-5)
    assert history.last["workers"] == 4 and history.last["central_accuracy"] > 0.5


def test_the_holders_see_only_shares_and_the_model_owner_only_the_sum(digits) -> None:
    workers_, holders = owners(digits, 3)
    fed = workers_[0].federation
    seen: list[tuple[str, object]] = []
    for h in holders:
        core, handle = fed.cores[h.id], fed.cores[h.id].handle

        def spy(data, sender, handle=handle, name=h.id, **options):
            seen.append((name, m.decode_request(data)))
            return handle(data, sender, **options)

        core.handle = spy  # type: ignore[method-assign]
    received_before = sum(w.bytes_received for w in workers_)
    fl.fit(mlp(), workers_, fl.FedAvg(training=TRAINING), rounds=1, aggregator=None, secure_aggregation="shares",
           share_holders=holders)
    shares = [msg for _, msg in seen if isinstance(msg, m.DeliverShare)]
    assert len(shares) == 6 and all(s.value.dtype == torch.int64 for s in shares)
    assert not any(isinstance(msg, m.DeliverModule | m.DeliverFold | m.Deliver) for _, msg in seen)  # no model reached a holder
    # the model owner's replies from the data owners are small: no update came back to it
    assert sum(w.bytes_received for w in workers_) - received_before < 3 * 2000
    for h in holders:
        assert fed.cores[h.id].objects == {}  # the holders keep nothing after the round


def test_a_worker_that_fails_while_sharing_is_left_out(digits) -> None:
    workers_, holders = owners(digits, 4)
    dead = workers_[1]
    inner = dead._transport

    def fails(data: bytes) -> bytes:
        if isinstance(m.decode_request(data), m.Share):
            raise sy.WorkerUnavailable("w1 went away")
        return inner(data)

    dead._transport = fails
    _, history = fl.fit(mlp(), workers_, fl.FedAvg(training=TRAINING, min_fit_workers=2), rounds=1,
                        aggregator=None, secure_aggregation="shares", share_holders=holders)
    assert history.last["workers"] == 3
    assert any("w1" in f and "secret sharing" in f for f in history.last["failures"])


def test_a_lost_holder_fails_the_round(digits) -> None:
    workers_, holders = owners(digits, 3)
    inner = holders[1]._transport

    def gone(data: bytes) -> bytes:
        if isinstance(m.decode_request(data), m.AggregateShares):
            raise sy.WorkerUnavailable("h2 went away")
        return inner(data)

    holders[1]._transport = gone
    with pytest.raises(fl.RoundFailed, match="h2"):
        fl.fit(mlp(), workers_, fl.FedAvg(training=TRAINING), rounds=1, aggregator=None,
               secure_aggregation="shares", share_holders=holders, retries=0)


def test_dp_composes_with_shares(digits) -> None:
    from fedsecure.privacy import DPFedAvg

    workers_, holders = owners(digits, 4)
    strategy = DPFedAvg(fl.FedAvg(training=TRAINING, min_fit_workers=4), noise_multiplier=0.5, clip_norm=1.0)
    model = mlp()
    before = torch.cat([t.reshape(-1) for t in model.state_dict().values()]).clone()
    _, history = fl.fit(model, workers_, strategy, rounds=1, aggregator=None, secure_aggregation="shares",
                        share_holders=holders)
    after = torch.cat([t.reshape(-1) for t in model.state_dict().values()])
    assert history.last["dp_epsilon"] > 0
    # each owner clipped its update to norm 1 and added noise of std z*S/sqrt(4): the mean moves by
    # at most 1 plus noise of std z*S/4 per coordinate, about 0.125 * sqrt(d) in norm
    step = float(torch.linalg.vector_norm(after - before))
    expected = 0.5 * 1.0 / 4 * before.numel() ** 0.5
    assert 0.5 * expected < step < 1.0 + 1.5 * expected


@pytest.mark.parametrize("holders, match", [((), "two or more"), (("h1",), "two or more"), (("h1", "h1"), "distinct"),
                                            (("w0", "h1"), "training workers")])
def test_shares_mode_needs_two_distinct_holders(digits, holders, match) -> None:
    workers_, real = owners(digits, 2)
    by_id = {w.id: w for w in [*workers_, *real]}
    with pytest.raises(fl.ConfigurationError, match=match):
        fl.Engine(mlp(), workers_, fl.FedAvg(training=TRAINING), aggregator=None, secure_aggregation="shares",
                  share_holders=[by_id[h] for h in holders])


def test_the_fixed_point_bound_is_checked() -> None:
    with pytest.raises(fl.ConfigurationError, match="frac_bits"):
        SecureSettings(frac_bits=60)
    total = AdditiveShares.from_tensors([torch.tensor([2**40], dtype=torch.int64),
                                         torch.tensor([-(2**40) + 2**24], dtype=torch.int64)], frac_bits=24)
    assert float(total.float_precision()) == 1.0


def test_a_refused_sum_of_shares_loses_nothing(hooked) -> None:
    _, fed = hooked
    owners_ = [sy.VirtualWorker(id=n, federation=fed, data={"v": torch.ones(k)}) for n, k in (("a", 2), ("b", 3))]
    h1, h2 = workers(fed, "h1", "h2", policy=sy.Policy(strict=True))
    a, b = (o.search("v")[0].fix_precision().share(h1, h2).get() for o in owners_)
    with pytest.raises(SecAggInputError, match="shapes"):
        sy.SharedTensor.sum([a, b])
    with pytest.raises(sy.ProtocolError, match="one shape"):  # the holder checks too
        h1.request(m.AggregateShares([a.shares[0].id_at_location, b.shares[0].id_at_location],
                                     new_id()))
    assert len(fed.cores["h1"].objects) == 2 and len(fed.cores["h2"].objects) == 2  # both shares still there
