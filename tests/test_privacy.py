"""The privacy promise, tried the way a curious model owner would try to break it.

Every rule of the release policy (fedsecure/worker/labels.py) has a test here.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn, optim

import fedsecure as sy

Make = Callable[..., sy.VirtualWorker]


@pytest.fixture
def owners(make_worker: Make) -> tuple[sy.VirtualWorker, sy.VirtualWorker, sy.VirtualWorker]:
    torch.manual_seed(0)
    bob = make_worker("bob", data={"x": torch.randn(8, 2), "y": torch.randn(8, 1)})
    alice = make_worker("alice", data={"x": torch.randn(6, 2), "y": torch.randn(6, 1)})
    return bob, alice, make_worker("secure_worker")


def _trained(worker: sy.VirtualWorker, model: nn.Module, steps: int = 2) -> nn.Module:
    (x,), (y,) = worker.search("#x"), worker.search("#y")
    remote = model.copy().send(worker)
    opt = optim.SGD(remote.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        loss = ((remote(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        loss.get()  # a scalar metric: released
    return remote


def test_private_data_cannot_be_fetched_and_stays_put(owners) -> None:  # type: ignore[no-untyped-def]
    bob, _, _ = owners
    (x,) = bob.search("x")
    assert x.owners == ["bob"]
    with pytest.raises(sy.PermissionDenied) as info:
        x.get()
    assert isinstance(info.value, PermissionError)
    assert info.value.rule == "private-data" and "private data of ['bob']" in str(info.value)
    assert x.shape == (8, 2)  # metadata is not private
    assert torch.isfinite(x.sum().get())  # a refusal loses nothing: the object is still there


def test_three_ways_to_make_data_private(make_worker: Make) -> None:
    via_data = make_worker("a", data=torch.ones(3))
    (p1,) = via_data.search("data")
    via_load = make_worker("b")
    via_load.load(torch.ones(3), tags=["#train"])
    (p2,) = via_load.search("#train")
    p3 = torch.ones(3).send(make_worker("c"), private=True)
    for ptr in (p1, p2, p3):
        with pytest.raises(sy.PermissionDenied):
            ptr.get()


@pytest.mark.parametrize(
    "derive",
    [
        lambda x: x * 1,
        lambda x: x + 0,
        lambda x: x.clone(),
        lambda x: x.detach(),
        lambda x: x.data,
        lambda x: x[0:2],
        lambda x: x.view(-1),
        lambda x: x.t().contiguous(),
        lambda x: torch.stack([x, x]),
        lambda x: x.float().double(),
        lambda x: torch.zeros_like(x) + x,
        lambda x: (x > 0).float(),
        lambda x: x.sort(dim=0)[0],
    ],
)
def test_everything_computed_from_private_data_is_private(owners, derive) -> None:  # type: ignore[no-untyped-def]
    bob, _, _ = owners
    (x,) = bob.search("x")
    derived = derive(x)
    with pytest.raises(sy.PermissionDenied):
        derived.get()


def test_writing_private_data_into_an_unlabelled_tensor_labels_it(owners) -> None:  # type: ignore[no-untyped-def]
    bob, _, _ = owners
    (x,) = bob.search("x")
    mine = torch.zeros(8, 2).send(bob)
    assert torch.equal(mine.copy().get(), torch.zeros(8, 2))  # mine, for now
    mine.add_(x)
    with pytest.raises(sy.PermissionDenied):
        mine.get()
    laundered = torch.zeros(8, 2).send(bob)
    laundered[:] = x
    with pytest.raises(sy.PermissionDenied):
        laundered.get()


def test_writing_through_a_view_labels_the_base_and_its_other_views(owners) -> None:  # type: ignore[no-untyped-def]
    bob, _, _ = owners
    (x,) = bob.search("x")
    base = torch.zeros(4, 2).send(bob)
    other_view = base[2:]
    view = base[:2]
    view.copy_(x[:2])
    for ptr in (base, other_view):
        with pytest.raises(sy.PermissionDenied):
            ptr.get()


def test_data_setter_labels_the_target(owners) -> None:  # type: ignore[no-untyped-def]
    bob, _, _ = owners
    (x,) = bob.search("x")
    holder = torch.zeros(8, 2).send(bob)
    holder.data = x
    with pytest.raises(sy.PermissionDenied):
        holder.get()


def test_models_gradients_and_optimizer_state_are_private(owners) -> None:  # type: ignore[no-untyped-def]
    bob, _, _ = owners
    remote = _trained(bob, nn.Linear(2, 1))
    with pytest.raises(sy.PermissionDenied):
        remote.get()
    with pytest.raises(sy.PermissionDenied):
        remote.weight.data.get()
    with pytest.raises(sy.PermissionDenied):
        remote.weight.grad.get()
    assert remote.weight.owners == ["bob"]


def test_gradients_of_unlabelled_weights_on_private_data_are_private(owners) -> None:  # type: ignore[no-untyped-def]
    bob, _, _ = owners
    (x,) = bob.search("x")
    w = torch.ones(2, requires_grad=True).send(bob)
    (x @ w).sum().backward()
    with pytest.raises(sy.PermissionDenied):
        w.grad.get()  # the gradient is the column sums of x


def test_buffers_updated_by_private_data_are_private(owners) -> None:  # type: ignore[no-untyped-def]
    bob, _, _ = owners
    (x,) = bob.search("x")
    remote = nn.BatchNorm1d(2).send(bob)
    remote(x)
    with pytest.raises(sy.PermissionDenied):
        remote.running_mean.get()


def test_scalar_metrics_may_leave_and_the_limit_is_configurable(make_worker: Make) -> None:
    default = make_worker("d", data=torch.arange(6.0))
    (x,) = default.search("data")
    assert x.mean().get().item() == pytest.approx(2.5)
    assert x.sum().item() == pytest.approx(15.0)
    with pytest.raises(sy.PermissionDenied):
        x[:2].sum(0, keepdim=True).repeat(2).get()

    off = make_worker("off", data=torch.arange(6.0), policy=sy.Policy(max_metric_numel=0))
    (y,) = off.search("data")
    with pytest.raises(sy.PermissionDenied):
        y.mean().get()
    with pytest.raises(sy.PermissionDenied):
        y.mean().item()
    with pytest.raises(sy.PermissionDenied):
        bool(y.mean() > 0)

    wide = make_worker("wide", data=torch.arange(6.0), policy=sy.Policy(max_metric_numel=3))
    (z,) = wide.search("data")
    assert z[:3].get().tolist() == [0.0, 1.0, 2.0]


def test_python_conversions_go_through_the_policy(owners) -> None:  # type: ignore[no-untyped-def]
    bob, _, _ = owners
    (x,) = bob.search("x")
    with pytest.raises(sy.PermissionDenied):
        x.tolist()
    assert isinstance(float(x[0, 0]), float)  # one number: a metric
    with pytest.raises(sy.PermissionDenied):
        x[0, 0:1].get()  # shape (1,): a tensor, not a metric


def test_errors_on_private_data_do_not_leak_values(owners) -> None:  # type: ignore[no-untyped-def]
    bob, _, _ = owners
    (y,) = bob.search("y")
    labels = (y * 100).long().flatten()
    logits = torch.zeros(8, 3).send(bob)
    with pytest.raises(sy.RemoteError) as info:
        torch.nn.functional.cross_entropy(logits, labels)
    assert "details withheld" in str(info.value)


def test_an_aggregate_of_two_owners_may_leave_the_aggregator(owners) -> None:  # type: ignore[no-untyped-def]
    bob, alice, secure_worker = owners
    model = nn.Linear(2, 1)
    bobs, alices = _trained(bob, model), _trained(alice, model)
    bobs.move(secure_worker)
    alices.move(secure_worker)
    assert bob.object_count() == 0  # nothing of the model owner's is left on bob
    average = ((bobs.weight.data + alices.weight.data) / 2).get()
    assert average.shape == (1, 2)
    for single in (bobs.weight.data, alices.bias):
        with pytest.raises(sy.PermissionDenied, match="private data of"):
            single.get()


def test_min_contributors_is_the_owners_choice(make_worker: Make) -> None:
    strict_owner = sy.Policy(min_contributors=3)
    bob = make_worker("bob", data=torch.ones(4), policy=strict_owner)
    alice = make_worker("alice", data=torch.ones(4))
    carol = make_worker("carol", data=torch.ones(4))
    agg = make_worker("agg")
    (b,), (a,), (c,) = bob.search("data"), alice.search("data"), carol.search("data")
    b2, a2, c2 = b.copy().move(agg), a.copy().move(agg), c.copy().move(agg)
    with pytest.raises(sy.PermissionDenied) as info:
        (b2 + a2).get()
    assert info.value.rule == "min-contributors"
    assert torch.equal((b2 + a2 + c2).get(), torch.full((4,), 3.0))
    with pytest.raises(ValueError, match="min_contributors"):
        sy.Policy(min_contributors=1)


def test_private_values_move_only_to_trusted_aggregators(make_worker: Make) -> None:
    policy = sy.Policy(trusted_aggregators={"secure_worker"})
    bob = make_worker("bob", data=torch.ones(3), policy=policy)
    alice = make_worker("alice")
    secure_worker = make_worker("secure_worker")
    (x,) = bob.search("data")
    with pytest.raises(sy.PermissionDenied) as info:
        x.copy().move(alice)
    assert info.value.rule == "untrusted-destination" and "'alice'" in str(info.value)
    assert x.location is bob and x.sum().item() == 3.0
    moved = x.copy().move(secure_worker)
    assert moved.location is secure_worker
    # Once there, it may not hop on to a worker bob does not trust either.
    with pytest.raises(sy.PermissionDenied):
        moved.move(alice)
    assert moved.location is secure_worker


def test_the_receiver_checks_the_owners_trust_too(make_worker: Make, federation: sy.Federation) -> None:
    """A dishonest worker forwarding bob's data to an untrusted peer is refused by the peer."""
    from fedsecure.wire import messages as m
    from fedsecure.worker.labels import labels_to_wire

    bob_label = sy.Policy(trusted_aggregators={"secure_worker"}).label_for("bob")
    alice = make_worker("alice")
    reply = m.decode_reply(
        federation.send(
            "mallory",
            "alice",
            m.encode_request(
                m.Deliver(1234, torch.ones(2), labels_to_wire(frozenset({bob_label})), 2, False, "")
            ),
        )
    )
    assert reply.error is not None and reply.error[0] == "permission"
    assert alice.object_count() == 0


def test_unlabelled_values_behave_as_in_pysyft(bob: sy.VirtualWorker, secure_worker: sy.VirtualWorker) -> None:
    x = torch.tensor([1.0, 2.0]).send(bob)
    y = (x * 3).move(secure_worker)
    assert torch.equal(y.get(), torch.tensor([3.0, 6.0]))
    model = nn.Linear(2, 1)
    remote = model.copy().send(bob)
    assert torch.equal(remote.get().weight, model.weight)


def test_the_label_counting_limit_is_real_without_strict_mode(owners) -> None:  # type: ignore[no-untyped-def]
    """Documented limit: on a non-strict aggregator, a + 0 * b passes label counting."""
    bob, alice, secure_worker = owners
    (bx,), (ax,) = bob.search("x"), alice.search("x")
    b, a = bx[:2].move(secure_worker), ax[:2].move(secure_worker)
    leaked = (a + 0 * b).get()
    assert leaked.shape == (2, 2)  # alice's rows: why strict mode exists


def test_strict_aggregator_releases_only_its_own_mean(make_worker: Make) -> None:
    bob = make_worker("bob", data={"x": torch.randn(8, 2), "y": torch.randn(8, 1)})
    alice = make_worker("alice", data={"x": torch.randn(4, 2), "y": torch.randn(4, 1)})
    agg = make_worker("agg", policy=sy.Policy(strict=True))
    model = nn.Linear(2, 1)
    bobs, alices = _trained(bob, model).move(agg), _trained(alice, model).move(agg)
    with pytest.raises(sy.PermissionDenied) as info:
        alices.weight.data + 0 * bobs.weight.data
    assert info.value.rule == "strict-aggregator"
    with pytest.raises(sy.PermissionDenied):
        alices.get()
    with pytest.raises(sy.PermissionDenied):
        alices.move(bob)
    with pytest.raises(sy.PermissionDenied, match="one value per owner"):
        agg.aggregate([alices, alices, bobs])
    with pytest.raises(sy.PermissionDenied, match="at least 2"):
        agg.aggregate([alices])
    mean = agg.aggregate([alices, bobs]).get()
    with pytest.raises(sy.ObjectNotFound):  # each input joins one aggregate only
        agg.aggregate([alices, bobs], weighted=True)
    bobs, alices = _trained(bob, model).move(agg), _trained(alice, model).move(agg)
    weighted = agg.aggregate([alices, bobs], weighted=True).get()
    assert isinstance(mean, nn.Linear) and isinstance(weighted, nn.Linear)
    assert not torch.equal(weighted.weight, mean.weight)  # 8 rows against 4


def test_a_strict_aggregator_defeats_differences_of_overlapping_aggregates(make_worker: Make) -> None:
    """(a + b) - (b + c) + (a + c) = 2a: a strict aggregator lets each input join one aggregate."""
    workers = [make_worker(n, data={"x": torch.randn(4, 2), "y": torch.randn(4, 1)}) for n in ("a", "b", "c")]
    agg = make_worker("agg", policy=sy.Policy(strict=True))
    model = nn.Linear(2, 1)
    a, b, c = (_trained(w, model).move(agg) for w in workers)
    agg.aggregate([a, b]).get()
    for pair in ([a, c], [b, c]):
        with pytest.raises(sy.ObjectNotFound):
            agg.aggregate(pair)


def test_strict_aggregation_of_tensors(make_worker: Make) -> None:
    bob = make_worker("bob", data=torch.full((3,), 2.0))
    # alice reports 9 samples (the rows of her largest data set), bob 3
    alice = make_worker("alice", data={"data": torch.ones(3), "rows": torch.zeros(9, 1)})
    agg = make_worker("agg", policy=sy.Policy(strict=True))
    (b,), (a,) = bob.search("data"), alice.search("data")
    bm, am = b.copy().move(agg), a.copy().move(agg)
    assert torch.allclose(agg.aggregate([bm, am]).get(), torch.full((3,), 1.5))
    bm, am = b.copy().move(agg), a.copy().move(agg)
    with pytest.raises(sy.PermissionDenied):
        (bm + am).get()
    weighted = agg.aggregate([bm, am], weighted=True).get()
    assert torch.allclose(weighted, torch.full((3,), (3 * 2.0 + 9 * 1.0) / 12))


def test_functional_batch_norm_labels_the_running_stats_it_writes(owners) -> None:  # type: ignore[no-untyped-def]
    bob, _, _ = owners
    (x,) = bob.search("x")
    running_mean, running_var = torch.zeros(2).send(bob), torch.ones(2).send(bob)
    torch.nn.functional.batch_norm(x, running_mean, running_var, training=True)
    for stat in (running_mean, running_var):
        with pytest.raises(sy.PermissionDenied):
            stat.get()


def test_a_refused_model_move_loses_nothing(make_worker: Make) -> None:
    bob = make_worker("bob", data={"x": torch.randn(4, 2), "y": torch.randn(4, 1)}, policy=sy.Policy(trusted_aggregators={"agg"}))
    alice = make_worker("alice")
    remote = _trained(bob, nn.Linear(2, 1))
    with pytest.raises(sy.PermissionDenied):
        remote.move(alice)
    assert remote.weight.location is bob
    (x,) = bob.search("x")
    assert remote(x).shape == (4, 1)  # still there, still usable
    assert remote.weight.owners == ["bob"]


def test_a_worker_side_optimizer_labels_what_it_updates(owners) -> None:  # type: ignore[no-untyped-def]
    bob, _, _ = owners
    (x,), (y,) = bob.search("x"), bob.search("y")
    remote = nn.Linear(2, 1).send(bob)
    opt = sy.optim.Adam(remote.parameters(), lr=0.1)
    opt.zero_grad()
    ((remote(x) - y) ** 2).mean().backward()
    opt.step()
    with pytest.raises(sy.PermissionDenied):
        remote.get()
    with pytest.raises(sy.PermissionDenied):
        remote.bias.copy().get()
