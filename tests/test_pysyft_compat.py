"""PySyft 0.2 semantics the tutorials rely on: models and parameters move in place, gradients come
back with get, pointer chains, in-place send_/get_, per-worker optimizers."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from torch import nn
from torch._C import DisableTorchFunctionSubclass

import fedsecure as sy
from fedsecure.federated.floptimizer import Optims
from fedsecure.worker.modules import describe

DATA = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1.0]])
TARGET = torch.tensor([[0], [0], [1], [1.0]])


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    opt.zero_grad()
    loss = ((model(x) - y) ** 2).sum()
    loss.backward()
    opt.step()
    return loss


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.1),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    lambda p: torch.optim.Adam(p, lr=0.1),
])
@pytest.mark.parametrize("describable", [True, False])
def test_an_optimizer_built_before_send_steps_the_remote_weights(bob, make_opt, describable) -> None:
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    if not describable:  # weights only: the forward pass runs op by op
        class Custom(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.lin = model

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.lin(x) if bool(x.sum() > -1e9) else x  # data-dependent: fx cannot trace it

        model = Custom()
        assert describe(model) is None
    reference = copy.deepcopy(model)
    params = list(model.parameters())
    opt, ref_opt = make_opt(model.parameters()), make_opt(reference.parameters())
    x, y = DATA.send(bob), TARGET.send(bob)
    for _ in range(3):
        model.send(bob)
        assert list(model.parameters()) == params and all(isinstance(p, sy.PointerTensor) for p in params)
        remote_loss = _step(model, opt, x, y).get()
        model.get()
        assert all(type(p) is nn.Parameter for p in params) and list(model.parameters()) == params
        local_loss = _step(reference, ref_opt, DATA, TARGET)
        assert torch.allclose(remote_loss, local_loss.detach(), atol=1e-6)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), "the remote steps must be the steps torch takes locally"
        assert p.grad is not None and torch.allclose(p.grad, q.grad, atol=1e-6)


def test_an_optimizer_built_after_send_keeps_working_after_get(bob) -> None:
    model = nn.Linear(2, 1).send(bob)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = DATA.send(bob), TARGET.send(bob)
    first = _step(model, opt, x, y).get()
    model.get()
    for _ in range(20):
        last = _step(model, opt, DATA, TARGET)  # now local: the same parameter objects
    assert last < first


def test_while_remote_the_local_storage_is_released(bob) -> None:
    model = nn.Linear(1000, 100)
    model.send(bob)
    with DisableTorchFunctionSubclass():
        assert model.weight.shape == (100, 1000)
        assert model.weight.untyped_storage().nbytes() <= 8
    model.get()
    assert model.weight.untyped_storage().nbytes() == 100 * 1000 * 4


def test_gradients_come_back_with_get(bob) -> None:
    x = torch.tensor([1, 2, 3, 4, 5.0], requires_grad=True).send(bob)
    y = torch.tensor([1, 1, 1, 1, 1.0], requires_grad=True).send(bob)
    (x * y).sum().backward()
    x = x.get()
    assert torch.equal(x.grad, torch.ones(5))
    model = nn.Linear(2, 1).send(bob)
    (model(DATA.send(bob)) ** 2).sum().backward()
    weight_grad = model.weight.grad.copy().get()
    model.get()
    assert torch.equal(model.weight.grad, weight_grad)


def test_sends_and_gets_leave_nothing_behind(bob) -> None:
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = DATA.send(bob), TARGET.send(bob)
    for _ in range(5):
        model.send(bob)
        _step(model, opt, x, y).get()
        model.get()
    gc.collect()
    assert bob.object_count() == 2  # x and y


def _private_owner(federation, values: torch.Tensor) -> sy.VirtualWorker:
    return sy.VirtualWorker(id="bob", federation=federation, data={"x": values})


@pytest.mark.parametrize("seed", [1, 2])
def test_a_model_trained_on_private_data_stays_and_the_refusal_does_not_depend_on_it(federation, seed) -> None:
    """The same program against two private data sets: the same refusal, the model still remote."""
    messages = []
    for data_seed in (seed, seed + 10):
        torch.manual_seed(data_seed)
        bob = _private_owner(sy.Federation(), torch.randn(4, 2))
        torch.manual_seed(0)
        model = nn.Linear(2, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model.send(bob)
        (model(bob.search("x")[0]) ** 2).sum().backward()  # gradients private to bob; weights not yet
        with pytest.raises(sy.PermissionDenied, match="aggregat") as err:
            model.get()
        messages.append(str(err.value))
        assert isinstance(model.weight, sy.PointerTensor), "a refused get must lose nothing"
        opt.step()
        with pytest.raises(sy.PermissionDenied):
            model.get()
    assert messages[0] == messages[1]


def test_send_and_get_in_place(bob) -> None:
    t = torch.tensor([1.0, 2.0])
    same = t.send_(bob)
    assert same is t and isinstance(t, sy.PointerTensor) and t.location is bob
    t.mul_(3)
    assert t.get_() is t and type(t) is torch.Tensor and torch.equal(t, torch.tensor([3.0, 6.0]))
    made_there = torch.ones(2).send(bob) + 1
    with pytest.raises(sy.OperationNotAllowed, match=r"x = x.get\(\)"):
        made_there.get_()


def test_ops_on_pointer_chains_run_at_the_end_of_the_chain(bob, alice) -> None:
    x = torch.tensor([1, 2, 3]).send(bob).send(alice)
    y = x + x
    assert y.location is alice and bob.object_count() == 2 and alice.object_count() == 2
    assert torch.equal(y.get().get(), torch.tensor([2, 4, 6]))
    x.add_(1)
    assert torch.equal(x.get().get(), torch.tensor([2, 3, 4]))
    plain = torch.tensor([1, 2, 3]).send(alice)
    with pytest.raises(sy.WorkerMismatch, match="same worker"):
        torch.tensor([1, 2, 3]).send(bob).send(alice) + plain


def test_remote_get_brings_the_value_to_the_middle(bob, alice, federation) -> None:
    x = torch.tensor([1, 2, 3]).send(bob).send(alice)
    before = sum(federation.link_bytes.values())
    assert x.remote_get() is x and x.location is alice
    assert bob.object_count() == 0 and alice.object_count() == 1
    assert sum(federation.link_bytes.values()) > before, "the value went from bob to alice directly"
    x.move(bob)
    assert torch.equal(x.get(), torch.tensor([1, 2, 3]))
    with pytest.raises(sy.OperationNotAllowed, match="pointer to a pointer"):
        torch.ones(1).send(bob).remote_get()


def test_sending_to_several_workers_gives_one_pointer_each(bob, alice) -> None:
    a, b = torch.tensor([1.0]).send(bob, alice)
    assert a.location is bob and b.location is alice
    assert torch.equal(a.get(), b.get())


def test_optims_keeps_one_optimizer_per_worker(bob, alice) -> None:
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    optims = Optims(["bob", alice], optim=torch.optim.Adam(model.parameters(), lr=0.1))
    assert optims.get_optim("bob") is not optims.get_optim(alice)
    assert optims.get_optim(bob).defaults["lr"] == 0.1
    sets = [(DATA[:2].send(bob), TARGET[:2].send(bob)), (DATA[2:].send(alice), TARGET[2:].send(alice))]
    losses = []
    for _ in range(10):
        for x, y in sets:
            model.send(x.location)
            losses.append(_step(model, optims.get_optim(x.location.id), x, y).get().item())
            model.get()
    assert losses[-1] < losses[1] and losses[-2] < losses[0]
    assert sum(losses[-2:]) < sum(losses[:2]) / 2  # both owners' losses together
    assert optims.count_vals() == 4  # Adam state for 2 parameters on each of 2 workers
    with pytest.raises(KeyError, match="charlie"):
        optims.get_optim("charlie")
    with pytest.raises(TypeError, match="Optimizer"):
        Optims(["bob"], optim=model)  # type: ignore[arg-type]


def test_a_worker_side_optimizer_says_so_when_its_parameters_came_back(bob) -> None:
    model = nn.Linear(2, 1).send(bob)
    opt = sy.optim.SGD(model.parameters(), lr=0.1)
    _step(model, opt, DATA.send(bob), TARGET.send(bob))
    model.get()
    with pytest.raises(sy.WorkerMismatch, match="came back with get"):
        opt.step()


@pytest.mark.parametrize("device", [torch.device("cpu"), "cpu"])
def test_moving_private_data_to_the_workers_device_is_allowed(federation, device) -> None:
    """PySyft's Part 6 calls data.to(device) on every batch; on private data too."""
    bob = _private_owner(federation, torch.randn(4, 2))
    x = bob.search("x")[0]
    assert x.to(device).shape == (4, 2)
    moved = x.to(device=device, dtype=torch.float64)
    assert moved.dtype == torch.float64 and moved.owners == ["bob"]
