"""Models on workers: send, train with plain torch.optim, move, copy, get."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn, optim

import fedsecure as sy


def _train(model: nn.Module, make_opt: Callable, x: torch.Tensor, y: torch.Tensor, steps: int) -> list[float]:  # type: ignore[type-arg]
    opt = make_opt(model.parameters())
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        value = loss.get() if isinstance(loss, sy.PointerTensor) else loss
        losses.append(float(value.detach()))
    return losses


class Custom(nn.Module):
    """Neither allow-listed layers nor traceable (a branch on the input's shape): it travels as
    weights only and its forward pass runs op by op on pointers."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = 2 if x.dim() == 2 else 1
        return self.b(torch.tanh(self.a(x)) * scale)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: optim.SGD(p, lr=0.1),
        lambda p: optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
        lambda p: optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
        lambda p: optim.Adam(p, lr=0.01),
        lambda p: optim.AdamW(p, lr=0.01),
    ],
    ids=["sgd", "momentum+wd", "nesterov", "adam", "adamw"],
)
@pytest.mark.parametrize("arch", ["sequential", "custom"])
def test_remote_training_matches_local_training(bob: sy.VirtualWorker, make_opt, arch: str) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)) if arch == "sequential" else Custom()
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    local = model.copy()
    remote = model.copy().send(bob)
    assert all(isinstance(p, sy.PointerTensor) for p in remote.parameters())
    local_losses = _train(local, make_opt, x, y, 6)
    remote_losses = _train(remote, make_opt, x.send(bob), y.send(bob), 6)
    assert remote_losses == pytest.approx(local_losses, rel=1e-5, abs=1e-6)
    trained = remote.get()
    for p, q in zip(trained.parameters(), local.parameters(), strict=True):
        assert isinstance(p, nn.Parameter)
        assert torch.allclose(p, q, atol=1e-6)


def test_optimizer_state_lives_next_to_the_weights(bob: sy.VirtualWorker) -> None:
    model = nn.Linear(2, 1).send(bob)
    opt = optim.Adam(model.parameters(), lr=0.1)
    loss = model(torch.ones(3, 2).send(bob)).sum()
    loss.backward()
    opt.step()
    state = opt.state[model.weight]
    assert isinstance(state["exp_avg"], sy.PointerTensor) and state["exp_avg"].location is bob
    assert isinstance(state["exp_avg_sq"], sy.PointerTensor)


def test_forward_of_an_allow_listed_model_is_one_message(bob: sy.VirtualWorker) -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 10)
    )
    x = torch.randn(2, 1, 8, 8)
    expected = model(x)
    remote = model.copy().send(bob)
    px = x.send(bob)
    sent = bob.bytes_sent
    out = remote(px)
    assert bob.bytes_sent - sent < 200  # one small message, however deep the model
    assert isinstance(out, sy.PointerTensor) and out.shape == expected.shape
    assert torch.allclose(out.get(), expected, atol=1e-6)


def test_model_send_move_get(bob: sy.VirtualWorker, secure_worker: sy.VirtualWorker) -> None:
    model = nn.Linear(2, 1)
    weight = model.weight.detach().clone()
    remote = model.copy().send(bob)
    assert remote.weight.location is bob
    assert isinstance(remote.weight.data, sy.PointerTensor)
    remote.move(secure_worker)
    assert remote.weight.location is secure_worker and remote.bias.location is secure_worker
    assert bob.object_count() == 0
    back = remote.get()
    assert torch.equal(back.weight, weight)
    assert isinstance(back.weight, nn.Parameter)
    assert torch.equal(back(torch.ones(1, 2)), model(torch.ones(1, 2)))


def test_custom_models_move_and_get(bob: sy.VirtualWorker, alice: sy.VirtualWorker) -> None:
    model = Custom()
    expected = model(torch.ones(2, 3))
    remote = model.copy().send(bob).move(alice)
    assert all(p.location is alice for p in remote.parameters())
    assert torch.allclose(remote(torch.ones(2, 3).send(alice)).get(), expected)
    assert torch.allclose(remote.get()(torch.ones(2, 3)), expected)


def test_copy_of_a_remote_model_is_independent(bob: sy.VirtualWorker) -> None:
    remote = nn.Linear(2, 1).send(bob)
    twin = remote.copy()
    assert twin.weight.location is bob and twin.weight.id_at_location != remote.weight.id_at_location
    with torch.no_grad():
        twin.weight.add_(1.0)
    assert torch.allclose(twin.get().weight, remote.get().weight + 1.0)


def test_train_and_eval_modes_reach_the_worker(bob: sy.VirtualWorker) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.9))
    remote = model.send(bob)
    x = torch.ones(64, 4).send(bob)
    remote.eval()
    first, second = remote(x).get(), remote(x).get()
    assert torch.equal(first, second)  # no dropout in eval mode
    remote.train()
    assert not torch.equal(remote(x).get(), remote(x).get())


def test_batchnorm_buffers_travel(bob: sy.VirtualWorker) -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    remote = model.copy().send(bob)
    remote(torch.randn(8, 3).send(bob))
    back = remote.get()
    assert back[1].num_batches_tracked.item() == 1
    assert not torch.equal(back[1].running_mean, torch.zeros(3))


def test_sending_a_sent_model_again_is_refused(bob: sy.VirtualWorker, alice: sy.VirtualWorker) -> None:
    remote = nn.Linear(2, 1).send(bob)
    with pytest.raises(sy.OperationNotAllowed, match="move"):
        remote.send(alice)


def test_many_rounds_do_not_leak_remote_objects(
    bob: sy.VirtualWorker, alice: sy.VirtualWorker, secure_worker: sy.VirtualWorker
) -> None:
    """PySyft 0.2 leaked an object per op; here the counts stay flat round after round."""
    data = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1.0]])
    target = torch.tensor([[0], [0], [1], [1.0]])
    bobs = (data[:2].send(bob), target[:2].send(bob))
    alices = (data[2:].send(alice), target[2:].send(alice))
    model = nn.Linear(2, 1)
    counts = []
    for r in range(30):
        models = []
        for (x, y), worker in ((bobs, bob), (alices, alice)):
            m = model.copy().send(worker)
            opt = optim.SGD(m.parameters(), lr=0.1, momentum=0.5)
            for _ in range(3):
                opt.zero_grad()
                loss = ((m(x) - y) ** 2).sum()
                loss.backward()
                opt.step()
                loss.get()
            models.append(m.move(secure_worker))
        with torch.no_grad():
            model.weight.set_(((models[0].weight.data + models[1].weight.data) / 2).get())
            model.bias.set_(((models[0].bias.data + models[1].bias.data) / 2).get())
        del models, m, opt, loss
        if r in (2, 15, 29):  # each count collects garbage in the whole process first: not every round
            counts.append((bob.object_count(), alice.object_count(), secure_worker.object_count()))
    assert counts == [(2, 2, 0)] * 3, counts


def test_copy_of_a_remote_custom_model_trains_independently(bob: sy.VirtualWorker) -> None:
    torch.manual_seed(0)
    remote = Custom().send(bob)
    twin = remote.copy()
    assert all(p.location is bob for p in twin.parameters())
    assert all(p.requires_grad for p in twin.parameters())
    x, y = torch.randn(4, 3).send(bob), torch.randn(4, 1).send(bob)
    before = [p.copy().get() for p in remote.parameters()]
    losses = _train(twin, lambda p: optim.SGD(p, lr=0.05), x, y, 5)
    assert losses[-1] < losses[0]
    for p, b in zip(remote.parameters(), before, strict=True):
        assert torch.equal(p.copy().get(), b)  # the original did not move


@pytest.mark.parametrize(
    "name, settings",
    [
        ("SGD", {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}),
        ("Adam", {"lr": 0.01}),
        ("AdamW", {"lr": 0.01, "weight_decay": 0.1}),
        ("Adagrad", {"lr": 0.05}),
        ("RMSprop", {"lr": 0.01}),
    ],
)
def test_fedsecure_optim_runs_torchs_optimizer_on_the_worker(bob: sy.VirtualWorker, name: str, settings: dict) -> None:  # type: ignore[type-arg]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    local, remote = model.copy(), model.copy().send(bob)
    local_opt = getattr(optim, name)(local.parameters(), **settings)
    remote_opt = getattr(sy.optim, name)(remote.parameters(), **settings)
    assert isinstance(remote_opt, getattr(optim, name))
    schedules = [optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (local_opt, remote_opt)]
    px, py = x.send(bob), y.send(bob)
    for _ in range(5):
        for m_, o, a, b in ((local, local_opt, x, y), (remote, remote_opt, px, py)):
            o.zero_grad()
            ((m_(a) - b) ** 2).mean().backward()
            o.step()
        for s in schedules:
            s.step()
    assert remote_opt.state == {}  # the state lives on the worker
    for p, q in zip(remote.get().parameters(), local.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)


def test_fedsecure_optim_sends_one_message_per_step(bob: sy.VirtualWorker) -> None:
    remote = nn.Linear(2, 1).send(bob)
    opt = sy.optim.SGD(remote.parameters(), lr=0.1)
    x = torch.ones(4, 2).send(bob)
    remote(x).sum().backward()
    sent = bob.bytes_sent
    opt.step()
    opt.zero_grad()
    assert bob.bytes_sent == sent  # queued, not waited for
    assert remote.weight.grad is None  # the read sends them first, then asks
    assert not torch.equal(remote.weight.copy().get(), nn.Linear(2, 1).weight)


def test_fedsecure_optim_on_local_parameters_is_torchs(bob: sy.VirtualWorker) -> None:
    model = nn.Linear(2, 1)
    opt = sy.optim.Adam(model.parameters(), lr=0.1)
    model(torch.ones(3, 2)).sum().backward()
    opt.step()
    assert "exp_avg" in opt.state[model.weight]


def test_fedsecure_optim_refuses_parameters_that_moved_or_are_mixed(
    bob: sy.VirtualWorker, alice: sy.VirtualWorker
) -> None:
    remote = nn.Linear(2, 1).send(bob)
    opt = sy.optim.SGD(remote.parameters(), lr=0.1)
    remote.move(alice)
    with pytest.raises(sy.WorkerMismatch, match="moved"):
        opt.step()
    with pytest.raises(sy.WorkerMismatch, match="all local or all on one worker"):
        sy.optim.SGD([*nn.Linear(2, 1).parameters(), *remote.parameters()], lr=0.1)


def test_frozen_layers_stay_frozen_on_the_worker(bob: sy.VirtualWorker, alice: sy.VirtualWorker) -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    for p in model[0].parameters():
        p.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    remote = model.copy().send(bob)
    assert [p.requires_grad for p in remote.parameters()] == [False, False, True, True]
    opt = sy.optim.SGD([p for p in remote.parameters() if p.requires_grad], lr=0.5)
    remote(torch.ones(4, 2).send(bob)).sum().backward()
    opt.step()
    back = remote.move(alice).copy().get()
    assert torch.equal(back[0].weight, frozen) and not back[0].weight.requires_grad
    assert not torch.equal(back[2].weight, model[2].weight)
