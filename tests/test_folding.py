"""The aggregator's mean folded as models arrive (`FoldModule`, `MoveFold`, `CloseSum`), tried as a
model owner would try to read more than the mean: the sum is sealed until it is closed, closes once,
under the checks of `AggregateModules`, and each model joins one sum only."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import fedsecure as sy
from fedsecure import fl
from fedsecure.fl.parties import sendable
from fedsecure.wire import codec
from fedsecure.wire import messages as m
from fedsecure.wire.codec import Ref
from fedsecure.wire.ids import new_id
from fedsecure.worker import aggregator
from fedsecure.worker.remote_model import RemoteModel

Make = Callable[..., sy.VirtualWorker]
TRAINING = fl.LocalTraining(epochs=1, batch_size=4, lr=0.1, optimizer_args={"momentum": 0.9}).to_wire()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


@pytest.fixture
def federation_of_three(make_worker: Make) -> tuple[list[sy.VirtualWorker], sy.VirtualWorker]:
    """Three owners that trust only ``agg``, a strict aggregator."""
    trust = sy.Policy(trusted_aggregators=frozenset({"agg"}), private_sends=False)
    torch.manual_seed(1)
    owners = [make_worker(name, policy=trust, data={"x": torch.randn(rows, 3), "y": torch.randint(0, 2, (rows,))})
              for name, rows in (("bob", 8), ("alice", 6), ("carol", 10))]
    return owners, make_worker("agg", policy=sy.Policy(strict=True))


def _trained(owner: sy.VirtualWorker, agg: sy.VirtualWorker, seed: int = 3) -> RemoteModel:
    """The common model, trained by ``owner`` (Fit: attested, labelled) and moved to ``agg``."""
    return _trained_there(owner, seed).move(agg)


def _trained_there(owner: sy.VirtualWorker, seed: int = 3, make: Callable[[], nn.Module] = _model) -> RemoteModel:
    """The common model (``make()``), trained by ``owner`` and still there."""
    model = make()
    remote = RemoteModel.put(owner, sendable(model), list(fl.parameters_of(model).values()))
    remote.fit("x", "y", TRAINING, seed)
    return remote


def _closed(agg: sy.VirtualWorker, *sum_ids: int) -> list[torch.Tensor]:
    return RemoteModel.close_sum(agg, sum_ids, len(fl.parameters_of(_model()))).get()  # type: ignore[no-any-return]


@pytest.mark.parametrize("weighted", [True, False])
def test_the_folded_mean_is_the_aggregated_one_in_any_order(federation_of_three, weighted: bool) -> None:  # type: ignore[no-untyped-def]
    owners, agg = federation_of_three
    inputs = [_trained(o, agg) for o in owners]
    aggregated = RemoteModel.aggregate(agg, inputs, weighted).get()
    for model in inputs:
        model.release()
    means = []
    for lanes in ([(0, 1, 2)], [(0, 1, 2)], [(0, 2), (1,)]):
        sums, models = [new_id() for _ in lanes], [_trained(o, agg) for o in owners]
        for sum_id, lane in zip(sums, lanes, strict=True):
            for i in lane:
                models[i].fold(sum_id, weighted)
        means.append(_closed(agg, *sums))
    for one, again, two_lanes, c in zip(*means, aggregated, strict=True):
        assert torch.equal(one, again)  # the same folds in the same order: the same mean
        assert torch.allclose(one, two_lanes, rtol=1e-6, atol=1e-7)  # sums of lanes closed together
        assert torch.allclose(one, c, rtol=1e-6, atol=1e-7)  # the aggregated mean, to rounding
    assert agg.object_count() == 0  # nothing of the models or the sums stays behind


def test_a_sum_cannot_be_read_or_used_before_it_is_closed(federation_of_three) -> None:  # type: ignore[no-untyped-def]
    owners, agg = federation_of_three
    sum_id = new_id()
    for o in owners:
        _trained(o, agg).fold(sum_id, True)
    for request, error in [
        (m.Get(sum_id), sy.OperationNotAllowed),
        (m.GetModule(sum_id, False), sy.OperationNotAllowed),
        (m.Move(sum_id, "bob", new_id()), sy.OperationNotAllowed),
        (m.Call("torch.add", [Ref(sum_id), Ref(sum_id)], {}, new_id(), False), sy.OperationNotAllowed),
        (m.AggregateModules([sum_id, sum_id], True, new_id(), [new_id()]), sy.FedsecureError),
    ]:
        with pytest.raises(error):
            agg.request(request)
    with pytest.raises(sy.ProtocolError, match="distinct"):  # one sum twice in one close
        _closed(agg, sum_id, sum_id)
    _closed(agg, sum_id)
    with pytest.raises(sy.ObjectNotFound):  # closed once
        _closed(agg, sum_id)


def test_a_sum_of_too_few_owners_is_refused_and_its_models_are_gone(make_worker: Make, federation_of_three) -> None:  # type: ignore[no-untyped-def]
    owners, agg = federation_of_three
    sum_id = new_id()
    folded = [_trained(o, agg) for o in owners[:1]]
    folded[0].fold(sum_id, True)
    with pytest.raises(sy.PermissionDenied) as info:
        _closed(agg, sum_id)
    assert info.value.rule == "min-contributors"
    with pytest.raises(sy.ObjectNotFound):  # the refused sum is not kept for another try
        _closed(agg, sum_id)
    with pytest.raises(sy.ObjectNotFound):  # nor is the model, which joined it
        folded[0].fold(new_id(), True)
    assert agg.object_count() == 0


def test_one_model_per_owner_unmodified_of_one_architecture(federation_of_three) -> None:  # type: ignore[no-untyped-def]
    owners, agg = federation_of_three
    bob, alice, _ = owners
    twice = new_id()
    _trained(bob, agg).fold(twice, True)
    _trained(bob, agg).fold(twice, True)
    _trained(alice, agg).fold(twice, True)
    with pytest.raises(sy.PermissionDenied, match="one value per owner"):
        _closed(agg, twice)
    changed = _trained(alice, agg)
    with pytest.raises(sy.PermissionDenied, match="strict aggregator"):  # a moved model is not changed here
        agg.request(m.Call("Tensor.mul_", [Ref(changed.ids[0]), 0.0], {}, new_id(), False))
    other = new_id()
    _trained(bob, agg).fold(other, True)
    with pytest.raises(sy.ProtocolError, match="weighted"):
        _trained(alice, agg).fold(other, False)
    small = nn.Linear(3, 2)
    lone = RemoteModel.put(alice, sendable(small), list(fl.parameters_of(small).values()))
    lone.fit("x", "y", TRAINING, 3)
    with pytest.raises(sy.ProtocolError, match="same architecture"):
        lone.move(agg).fold(other, True)


def test_for_training_only_owners_a_sum_closes_only_over_one_round(make_worker: Make) -> None:
    """A training-only owner's model counts only as attested work of the cohort: folded beside a
    model trained under another configuration, or an untrained copy, the sum does not close."""
    trust = sy.Policy(trusted_aggregators=frozenset({"agg"}), private_sends=False, training_only=True)
    torch.manual_seed(1)
    owners = [make_worker(name, policy=trust, data={"x": torch.randn(6, 3), "y": torch.randint(0, 2, (6,))})
              for name in ("bob", "alice", "carol")]
    agg = make_worker("agg", policy=sy.Policy(strict=True))
    one_round = new_id()
    for owner in owners:
        _trained(owner, agg).fold(one_round, True)
    assert len(_closed(agg, one_round)) == len(fl.parameters_of(_model()))
    other = fl.LocalTraining(epochs=1, batch_size=4, lr=1e-30).to_wire()  # changes nothing
    for odd in ("configuration", "untrained"):
        mixed = new_id()
        _trained(owners[0], agg).fold(mixed, True)
        _trained(owners[1], agg).fold(mixed, True)
        model = _model()
        remote = RemoteModel.put(owners[2], sendable(model), list(fl.parameters_of(model).values()))
        if odd == "configuration":
            remote.fit("x", "y", other, 3)
        remote.move(agg).fold(mixed, True)
        with pytest.raises(sy.PermissionDenied) as info:
            _closed(agg, mixed)
        assert info.value.rule == "cohort", odd


def test_a_sum_of_more_models_than_its_float32_part_holds_is_still_their_mean(make_worker: Make) -> None:
    """FLUSH_EVERY + 1 models: FLUSH_EVERY go through the float32 parts into the float64 sums, the
    last at the close."""
    trust = sy.Policy(trusted_aggregators=frozenset({"agg"}), private_sends=False)
    torch.manual_seed(2)
    owners = [make_worker(f"o{i}", policy=trust, data={"x": torch.randn(8 + 2 * i, 3), "y": torch.randint(0, 2, (8 + 2 * i,))})
              for i in range(aggregator.FLUSH_EVERY + 1)]
    agg = make_worker("agg", policy=sy.Policy(strict=True))
    inputs = [_trained(o, agg) for o in owners]
    aggregated = RemoteModel.aggregate(agg, inputs, True).get()
    for model in inputs:
        model.release()
    sum_id = new_id()
    for o in owners:
        _trained(o, agg).fold(sum_id, True)
    for folded, expected in zip(_closed(agg, sum_id), aggregated, strict=True):
        assert torch.allclose(folded, expected, rtol=1e-6, atol=1e-7)
    assert agg.object_count() == 0


def test_a_sum_that_would_pass_the_memory_quota_is_refused_and_the_model_stays(make_worker: Make) -> None:
    trust = sy.Policy(trusted_aggregators=frozenset({"agg"}), private_sends=False)
    bob = make_worker("bob", policy=trust, data={"x": torch.randn(8, 3), "y": torch.randint(0, 2, (8,))})
    model_bytes = sum(t.numel() * t.element_size() for t in _model().state_dict().values())
    agg = make_worker("agg", policy=sy.Policy(strict=True))
    agg.core.memory_quota = 2 * model_bytes
    moved = _trained(bob, agg)  # the model fits; its sum (float64 and float32 per weight) does not
    with pytest.raises(sy.PermissionDenied, match="the sum would take"):
        moved.fold(new_id(), True)
    assert agg.object_count() == 1  # the model was not consumed by the refused fold


def _moved_then_folded(owners: list[sy.VirtualWorker], agg: sy.VirtualWorker, weighted: bool) -> list[torch.Tensor]:
    """The mean of the owners' models, each moved to ``agg`` and folded there (two requests)."""
    sum_id = new_id()
    for o in owners:
        _trained(o, agg).fold(sum_id, weighted)
    return _closed(agg, sum_id)


@pytest.mark.parametrize("weighted", [True, False])
def test_a_model_moved_into_a_sum_is_folded_as_it_arrives_and_never_stored(federation_of_three, weighted: bool) -> None:  # type: ignore[no-untyped-def]
    """`MoveFold` (the engine's plain mean): the same sum as a move and a fold, bit for bit, with
    the model gone from its owner and never an object on the aggregator."""
    owners, agg = federation_of_three
    expected = _moved_then_folded(owners, agg, weighted)
    one_request = new_id()
    for o in owners:
        remote = _trained_there(o)
        before = o.object_count()
        remote.move_fold(agg, one_request, weighted)
        assert o.object_count() == before - 1 - len(remote.ids)  # the module and its tensors' ids
        assert agg.object_count() == 1  # the sum, made by the first delivery
        with pytest.raises(sy.ObjectNotFound):  # the handle is spent: the model is nowhere now
            agg.request(m.FoldModule(new_id(), remote.module(), weighted))
    for got, want in zip(_closed(agg, one_request), expected, strict=True):
        assert torch.equal(got, want)
    assert agg.object_count() == 0


def _wide() -> nn.Module:
    """A model whose large weights travel beside the messages (`codec.FRAME_MIN`)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 256))


def test_a_delivery_folded_as_it_arrives_keeps_nothing_of_the_senders_tensors(federation_of_three) -> None:  # type: ignore[no-untyped-def]
    """Within one process the delivery reads the sender's large tensors themselves, not copies:
    changed after the request, they change nothing in the sum."""
    owners, agg = federation_of_three
    assert max(t.nbytes for t in _wide().state_dict().values()) >= codec.FRAME_MIN
    reference = new_id()
    for o in owners:
        _trained_there(o, make=_wide).move(agg).fold(reference, True)
    expected = RemoteModel.close_sum(agg, [reference], len(_wide().state_dict())).get()
    sum_id, senders = new_id(), []
    for o in owners:
        remote = _trained_there(o, make=_wide)
        senders += list(o.core.objects[remote.module()].obj.state_dict(keep_vars=True).values())
        remote.move_fold(agg, sum_id, True)
    with torch.no_grad():
        for t in senders:
            t.fill_(7)
    for got, want in zip(RemoteModel.close_sum(agg, [sum_id], len(expected)).get(), expected, strict=True):
        assert torch.equal(got, want)


def test_a_refused_fold_on_delivery_leaves_the_model_with_its_owner_and_the_sum_as_it_was(federation_of_three, make_worker: Make) -> None:  # type: ignore[no-untyped-def]
    owners, agg = federation_of_three
    bob, alice, _ = owners
    expected = _moved_then_folded(owners, agg, True)
    sum_id = new_id()
    for o in owners:
        _trained_there(o).move_fold(agg, sum_id, True)
    small = nn.Linear(3, 2)
    lone = RemoteModel.put(alice, sendable(small), list(fl.parameters_of(small).values()))
    lone.fit("x", "y", TRAINING, 3)
    before = alice.object_count()
    with pytest.raises(sy.ProtocolError, match="same architecture"):
        lone.move_fold(agg, sum_id, True)
    assert alice.object_count() == before - len(lone.ids)  # the module stays (its tensors' ids went with the request)
    lone.release()
    assert alice.object_count() == before - len(lone.ids) - 1
    elsewhere = make_worker("elsewhere", policy=sy.Policy(strict=True))
    with pytest.raises(sy.PermissionDenied):  # bob's data trusts only agg
        _trained_there(bob).move_fold(elsewhere, new_id(), True)
    assert elsewhere.object_count() == 0
    model = _model()
    with pytest.raises(sy.ProtocolError, match="not accepted from a client"):  # only a peer delivers
        agg.request(m.DeliverFold(sum_id, True, sendable(model), list(fl.parameters_of(model).values()),
                                  [[] for _ in fl.parameters_of(model)], 5, "", []))
    for got, want in zip(_closed(agg, sum_id), expected, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("chunk", [aggregator.SUM_CHUNK, 5])
@pytest.mark.parametrize("sizes", [(3, 5), (33, 2), (40, 70, 1)])
def test_a_sum_makes_its_float64_sum_at_its_first_flush_with_the_same_numbers(
    sizes: tuple[int, ...], chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lanes of at most FLUSH_EVERY models hold no float64 sum before the close, and lanes closed
    together give, bit for bit, the mean of float64 sums made at the start (as sums did before),
    also where flushes and the close add a few values at a time (chunks of 5 of a 4x3 weight)."""
    monkeypatch.setattr(aggregator, "SUM_CHUNK", chunk)
    flush_every = aggregator.FLUSH_EVERY
    gen = torch.Generator().manual_seed(chunk)  # not the values of a mean just freed
    like = [torch.zeros(4, 3), torch.zeros(3), torch.tensor(0)]  # a weight, a bias, a counter
    lanes = [[([torch.randn(4, 3, generator=gen), torch.randn(3, generator=gen), torch.tensor(k)],
               int(torch.randint(1, 50, (), generator=gen))) for k in range(n)] for n in sizes]
    sums = []
    for lane in lanes:
        sealed = aggregator.SealedSum.start({}, True, like)
        for tensors, weight in lane:
            sealed.add(tensors, weight)
        assert (sealed.sums[0] is None) == (len(lane) < flush_every)  # no float64 copy until a flush
        sums.append(sealed)
    for more in sums[1:]:
        sums[0].merge(more)
    got = sums[0].mean()
    merged: list[torch.Tensor] = [torch.zeros(t.shape, dtype=torch.float64) for t in like[:2]]
    total = 0
    for lane in lanes:  # sums made at the start, flushed every FLUSH_EVERY models and at the close
        lane_sums = [torch.zeros(t.shape, dtype=torch.float64) for t in like[:2]]
        parts = [torch.zeros_like(t) for t in like[:2]]
        for i, (tensors, weight) in enumerate(lane, start=1):
            for part, t in zip(parts, tensors, strict=False):
                part.add_(t, alpha=weight)
            total += weight
            if i % flush_every == 0 or i == len(lane):
                for acc, part in zip(lane_sums, parts, strict=True):
                    acc.add_(part)
                    part.zero_()
        for acc, lane_sum in zip(merged, lane_sums, strict=True):
            acc.add_(lane_sum)
    for mean, acc in zip(got[:2], merged, strict=True):
        assert torch.equal(mean, (acc / total).to(torch.float32))
    assert int(got[2]) == max(sizes) - 1  # the counter: the largest


def test_a_fold_into_what_is_not_a_sum_is_refused_under_the_name_of_its_request(federation_of_three) -> None:  # type: ignore[no-untyped-def]
    (bob, alice, _), agg = federation_of_three
    held = torch.zeros(2).send(agg)  # a tensor, held there while the folds try it
    not_a_sum = held.id_at_location
    with pytest.raises(sy.OperationNotAllowed, match="is not a sum of models") as folded:
        _trained(bob, agg).fold(not_a_sum, True)
    assert folded.value.op == "FoldModule"
    with pytest.raises(sy.FedsecureError, match="is not a sum of models") as delivered:
        _trained_there(alice).move_fold(agg, not_a_sum, True)
    assert "DeliverFold" in repr(delivered.value) + str(getattr(delivered.value, "op", ""))
