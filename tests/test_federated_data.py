"""PySyft 0.2's federated data sets: BaseDataset, FederatedDataset, federate, FederatedDataLoader."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn, optim
from torch.utils.data import Dataset, TensorDataset

import fedsecure as sy
from fedsecure.data import load_digits

Make = Callable[..., sy.VirtualWorker]


def _numbered(n: int, features: int = 3) -> TensorDataset:
    """Sample i has inputs all equal to i and target i: a batch tells which samples it holds."""
    ids = torch.arange(n)
    return TensorDataset(ids.float().unsqueeze(1).repeat(1, features), ids)


def _epoch(loader: sy.FederatedDataLoader) -> list[tuple[str, list[int]]]:
    """(worker id, the targets of the batch) for every batch of one epoch, in order."""
    out = []
    for data, target in loader:
        assert isinstance(data, sy.PointerTensor) and isinstance(target, sy.PointerTensor)
        assert data.location is target.location
        ids = target.get().tolist()
        assert data.get()[:, 0].tolist() == [float(i) for i in ids]  # inputs and targets stay paired
        out.append((data.location.id, ids))
    return out


class Squares(Dataset):  # type: ignore[type-arg]
    """A map-style data set that is no TensorDataset: (x, x**2) with a Python int target."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.tensor([float(i), float(i) ** 2]), i


# -- the loader ------------------------------------------------------------------------------------


def test_batches_are_pointers_on_their_worker_worker_by_worker(bob, alice) -> None:
    fd = _numbered(10).federate((bob, alice))
    loader = sy.FederatedDataLoader(fd, batch_size=2)
    shapes = []
    for data, target in loader:
        shapes.append((data.location.id, tuple(data.shape), tuple(target.shape), target.dtype))
    assert shapes == [("bob", (2, 3), (2,), torch.int64)] * 2 + [("bob", (1, 3), (1,), torch.int64)] + [
        ("alice", (2, 3), (2,), torch.int64)
    ] * 2 + [("alice", (1, 3), (1,), torch.int64)]
    assert _epoch(loader) == [
        ("bob", [0, 1]),
        ("bob", [2, 3]),
        ("bob", [4]),
        ("alice", [5, 6]),
        ("alice", [7, 8]),
        ("alice", [9]),
    ]
    assert len(loader) == 6 and loader.workers == ["bob", "alice"]


def test_shuffle_draws_a_new_order_each_epoch_over_the_same_samples(bob, alice) -> None:
    fd = _numbered(40).federate((bob, alice))
    loader = sy.FederatedDataLoader(fd, batch_size=6, shuffle=True, seed=3)
    first, second = _epoch(loader), _epoch(loader)
    for epoch in (first, second):  # every sample exactly once, on the worker that holds it
        assert sorted(i for _, ids in epoch for i in ids) == list(range(40))
        assert all((wid == "bob") == (max(ids) < 20) for wid, ids in epoch)
        assert [wid for wid, _ in epoch] == ["bob"] * 4 + ["alice"] * 4
    assert first != second
    assert first != _epoch(sy.FederatedDataLoader(fd, batch_size=6))
    assert _epoch(sy.FederatedDataLoader(fd, batch_size=6, shuffle=True, seed=3)) == first


def test_drop_last_drops_each_workers_short_batch(bob, alice) -> None:
    fd = _numbered(10).federate((bob, alice))
    kept = sy.FederatedDataLoader(fd, batch_size=2, drop_last=True)
    assert len(kept) == 4
    assert _epoch(kept) == [("bob", [0, 1]), ("bob", [2, 3]), ("alice", [5, 6]), ("alice", [7, 8])]
    assert len(sy.FederatedDataLoader(fd, batch_size=8, drop_last=True)) == 0
    assert list(sy.FederatedDataLoader(fd, batch_size=8, drop_last=True)) == []


def test_iter_per_worker_gives_one_batch_of_every_worker_per_step(bob, alice) -> None:
    x, y = _numbered(8).tensors
    fd = sy.FederatedDataset(
        [sy.BaseDataset(x[:5], y[:5]).send(bob), sy.BaseDataset(x[5:], y[5:]).send(alice)]
    )
    loader = sy.FederatedDataLoader(fd, batch_size=2, iter_per_worker=True)
    steps = [{wid: (d.location.id, t.get().tolist()) for wid, (d, t) in step.items()} for step in loader]
    assert steps == [
        {"bob": ("bob", [0, 1]), "alice": ("alice", [5, 6])},
        {"bob": ("bob", [2, 3]), "alice": ("alice", [7])},
        {"bob": ("bob", [4])},
    ]
    assert len(loader) == 3


def test_num_iterators_reads_workers_side_by_side_and_gives_every_batch(make_worker: Make) -> None:
    workers = [make_worker(w) for w in ("a", "b", "c")]
    fd = _numbered(12).federate(workers)
    loader = sy.FederatedDataLoader(fd, batch_size=2, num_iterators=2)
    steps = [{wid: t.get().tolist() for wid, (_, t) in step.items()} for step in loader]
    assert steps == [{"a": [0, 1], "b": [4, 5]}, {"a": [2, 3], "b": [6, 7]}, {"c": [8, 9]}, {"c": [10, 11]}]
    assert len(loader) == 4
    # as in PySyft, at most one iterator fewer than workers: with two workers, plain pairs
    two = sy.FederatedDataLoader(_numbered(4).federate(workers[:2]), batch_size=2, num_iterators=5)
    assert len(two) == 2 and all(isinstance(batch, tuple) for batch in two)


def test_the_data_never_passes_through_the_model_owner(bob, alice) -> None:
    fd = TensorDataset(torch.randn(64, 2000), torch.arange(64)).federate((bob, alice))
    before = sum(w.bytes_sent + w.bytes_received for w in (bob, alice))
    loader = sy.FederatedDataLoader(fd, batch_size=4, shuffle=True)
    for data, _ in loader:
        assert data.shape[1] == 2000
    traffic = sum(w.bytes_sent + w.bytes_received for w in (bob, alice)) - before
    assert traffic < 1000 * len(loader), f"{traffic} bytes for {len(loader)} batches of 32 kB each"


def test_batches_are_freed_when_dropped(bob, alice) -> None:
    fd = _numbered(64).federate((bob, alice))
    loader = sy.FederatedDataLoader(fd, batch_size=4, shuffle=True)
    before = (bob.object_count(), alice.object_count())
    assert before == (2, 2)
    for epoch in range(2):
        for data, target in loader:
            (data * 2 + target.unsqueeze(1)).sum()
        for step in sy.FederatedDataLoader(fd, batch_size=4, iter_per_worker=True):
            assert len(step) == 2
        del data, target, step
        assert (bob.object_count(), alice.object_count()) == before, f"epoch {epoch}"


# -- federate and the data sets --------------------------------------------------------------------


def test_federate_a_custom_dataset_in_consecutive_parts(make_worker: Make) -> None:
    a, b, c = make_worker("a"), make_worker("b"), make_worker("c")
    fd = Squares(7).federate(a, b, c)  # PySyft's other spelling: workers as arguments
    assert fd.workers == ["a", "b", "c"] and len(fd) == 7
    assert [len(fd[w]) for w in fd.workers] == [3, 3, 1]
    part = fd["b"]
    assert part.location is b and part.targets.dtype == torch.int64
    assert torch.equal(part.data.get(), torch.tensor([[3.0, 9.0], [4.0, 16.0], [5.0, 25.0]]))
    assert "a: 3" in repr(fd) and "c: 1" in repr(fd) and "7 samples" in repr(fd)


def test_federate_a_base_dataset_applies_its_transform(bob, alice) -> None:
    x, y = _numbered(4).tensors
    local = sy.BaseDataset(x, y, transform=lambda t: t * 10)
    assert torch.equal(local[1][0], torch.full((3,), 10.0)) and local[1][1] == 1
    fd = local.federate((bob, alice))
    assert torch.equal(fd[alice].data.get(), x[2:] * 10)  # a worker object works as the key too
    assert torch.equal(fd["bob"].targets.get(), y[:2])


def test_base_dataset_send_get_and_repr(bob) -> None:
    x, y = torch.randn(5, 2), torch.arange(5)
    local = sy.BaseDataset(x, y)
    assert local.location is None and len(local) == 5 and "here" in repr(local)
    remote = local.send(bob)
    assert isinstance(remote.data, sy.PointerTensor) and remote.location is bob
    assert repr(remote) == "BaseDataset(5 samples on 'bob': data (5, 2) float32, targets (5,) int64)"
    assert remote.get() is remote and remote.location is None
    assert torch.equal(remote.data, x) and torch.equal(remote.targets, y)
    assert bob.object_count() == 0


def test_several_data_sets_on_one_worker_are_joined(bob, alice) -> None:
    x, y = _numbered(6).tensors
    parts = [
        sy.BaseDataset(x[:2], y[:2]).send(bob),
        sy.BaseDataset(x[2:3], y[2:3]).send(alice),
        sy.BaseDataset(x[3:], y[3:]).send(bob),
    ]
    fd = sy.FederatedDataset(parts)
    assert fd.workers == ["bob", "alice"] and len(fd["bob"]) == 5 and len(fd) == 6
    assert fd["bob"].targets.get().tolist() == [0, 1, 3, 4, 5]
    mixed = [sy.BaseDataset(x[:2], y[:2]).send(bob), sy.BaseDataset(x[:2, :2], y[:2]).send(bob)]
    with pytest.raises(sy.FedsecureError, match="differ in sample shape"):
        sy.FederatedDataset(mixed)


def test_get_dataset_takes_one_worker_out(bob, alice) -> None:
    fd = _numbered(4).federate((bob, alice))
    back = fd.get_dataset("alice")
    assert back.location is None and back.targets.tolist() == [2, 3]
    assert fd.workers == ["bob"] and "alice" not in fd and "bob" in fd
    with pytest.raises(KeyError, match="spans \\['bob'\\]"):
        fd["alice"]
    fd["bob"].get()  # fetched in place: the loader says how to go on
    with pytest.raises(ValueError, match="get_dataset\\('bob'\\)"):
        list(sy.FederatedDataLoader(fd))
    assert fd.get_dataset("bob").targets.tolist() == [0, 1] and len(fd) == 0


def test_bad_data_sets_are_refused_with_the_fix(bob, alice) -> None:
    x, y = torch.zeros(4, 2), torch.zeros(4)
    with pytest.raises(ValueError, match="one target per sample"):
        sy.BaseDataset(x, y[:3])
    with pytest.raises(sy.WorkerMismatch, match="same worker"):
        sy.BaseDataset(x.send(bob), y.send(alice))
    with pytest.raises(sy.WorkerMismatch, match="both must be local"):
        sy.BaseDataset(x.send(bob), y)
    with pytest.raises(TypeError, match="torch.as_tensor"):
        sy.BaseDataset([[0.0]], y)
    with pytest.raises(sy.OperationNotAllowed, match="apply it before sending"):
        sy.BaseDataset(x.send(bob), y.send(bob), transform=lambda t: t)
    remote = sy.BaseDataset(x, y).send(bob)
    with pytest.raises(sy.OperationNotAllowed, match="FederatedDataLoader"):
        remote[0]
    with pytest.raises(sy.OperationNotAllowed, match="already on 'bob'"):
        remote.send(alice)
    with pytest.raises(sy.OperationNotAllowed, match="already here"):
        sy.BaseDataset(x, y).get()
    with pytest.raises(ValueError, match="send it first"):
        sy.FederatedDataset([sy.BaseDataset(x, y)])
    with pytest.raises(TypeError, match="BaseDatasets"):
        sy.FederatedDataset([(x, y)])
    with pytest.raises(ValueError, match="at least one"):
        sy.FederatedDataset([])


def test_bad_federate_calls_are_refused_with_the_fix(bob, alice, make_worker: Make) -> None:
    with pytest.raises(ValueError, match="fill only 2 of 3 workers; use fewer workers"):
        _numbered(4).federate((bob, alice, make_worker("carol")))
    with pytest.raises(ValueError, match="more than once"):
        _numbered(4).federate((bob, bob))
    with pytest.raises(TypeError, match="takes workers"):
        _numbered(4).federate(("bob", "alice"))
    with pytest.raises(ValueError, match="at least one worker"):
        _numbered(4).federate(())

    class Singles(Squares):
        def __getitem__(self, i: int) -> Any:
            return torch.tensor([float(i)])

    with pytest.raises(ValueError, match="not a pair"):
        Singles(4).federate((bob, alice))
    with pytest.raises(sy.OperationNotAllowed, match="already on 'bob'"):
        sy.BaseDataset(torch.zeros(2, 1), torch.zeros(2)).send(bob).federate((bob, alice))


def test_loader_settings_are_checked(bob, alice) -> None:
    fd = _numbered(8).federate((bob, alice))
    with pytest.raises(TypeError, match="takes a FederatedDataset"):
        sy.FederatedDataLoader(_numbered(8), batch_size=2)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        sy.FederatedDataLoader(fd, batch_size=0)
    with pytest.raises(sy.OperationNotAllowed, match="sampler"):
        sy.FederatedDataLoader(fd, sampler=range(8))
    with pytest.raises(sy.OperationNotAllowed, match="collate_fn"):
        sy.FederatedDataLoader(fd, 2, False, 1, False, lambda batch: batch)
    with pytest.raises(TypeError, match="unexpected keyword argument\\(s\\) \\['batchsize'\\]"):
        sy.FederatedDataLoader(fd, batchsize=2)
    with pytest.raises(ValueError, match="not both"):
        sy.FederatedDataLoader(fd, seed=1, generator=torch.Generator())
    # a torch DataLoader's kwargs dict (as the tutorials spread it) changes nothing
    spread = sy.FederatedDataLoader(fd, batch_size=4, **{"num_workers": 1, "pin_memory": True})
    assert _epoch(spread) == _epoch(sy.FederatedDataLoader(fd, batch_size=4))


# -- training --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> Any:
    return load_digits()


def test_training_with_the_loader_lowers_the_loss(bob, alice, digits) -> None:
    torch.manual_seed(0)
    train = TensorDataset(digits.x_train[:400].flatten(1), digits.y_train[:400])
    loader = sy.FederatedDataLoader(train.federate((bob, alice)), batch_size=25, shuffle=True)
    model = nn.Linear(64, 10)
    opt = optim.SGD(model.parameters(), lr=0.5)  # built before send, as the tutorials do
    epoch_losses = []
    for _ in range(3):
        total = 0.0
        for data, target in loader:
            model.send(data.location)
            opt.zero_grad()
            loss = F.cross_entropy(model(data), target)
            loss.backward()
            opt.step()
            model.get()
            total += loss.get().item()
        epoch_losses.append(total / len(loader))
    assert epoch_losses[-1] < 0.6 * epoch_losses[0], epoch_losses
    accuracy = (model(digits.x_test.flatten(1)).argmax(1) == digits.y_test).float().mean()
    assert accuracy > 0.8


def test_a_loader_over_private_data_trains_but_only_aggregates_leave(make_worker: Make, digits) -> None:
    x, y = digits.x_train[:120].flatten(1), digits.y_train[:120]
    bob = make_worker("bob", data={"x": x[:60], "y": y[:60]})
    alice = make_worker("alice", data={"x": x[60:], "y": y[60:]})
    secure_worker = make_worker("secure_worker")
    fd = sy.FederatedDataset([sy.BaseDataset(w.search("#x")[0], w.search("#y")[0]) for w in (bob, alice)])
    with pytest.raises(sy.PermissionDenied):
        fd["bob"].get()
    assert fd["bob"].location is bob  # a refusal changes nothing
    torch.manual_seed(0)
    model = nn.Linear(64, 10)
    models = {w.id: model.copy().send(w) for w in (bob, alice)}
    opts = {wid: optim.SGD(m.parameters(), lr=0.5) for wid, m in models.items()}
    loader = sy.FederatedDataLoader(fd, batch_size=20, shuffle=True, iter_per_worker=True)
    first: dict[str, float] = {}
    latest: dict[str, float] = {}
    for _ in range(3):
        for step in loader:
            for wid, (data, target) in step.items():
                assert data.owners == [wid] and target.owners == [wid]  # the batch is private too
                opts[wid].zero_grad()
                loss = F.cross_entropy(models[wid](data), target)
                loss.backward()
                opts[wid].step()
                latest[wid] = loss.get().item()  # a scalar metric may leave
                first.setdefault(wid, latest[wid])
    assert all(latest[wid] < first[wid] for wid in models), (first, latest)
    for remote in models.values():
        with pytest.raises(sy.PermissionDenied):
            remote.get()
        remote.move(secure_worker)
    average = ((models["bob"].weight.data + models["alice"].weight.data) / 2).get()
    assert average.shape == (10, 64) and torch.isfinite(average).all()
    with pytest.raises(sy.PermissionDenied):
        models["bob"].weight.data.get()
    gc.collect()
