"""A worker's optimizers (`fedsecure.worker.update_rules`) step exactly as torch.optim's on the
CPU, check settings as it does, and do not import torch's compiler stack."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

import pytest
import torch

from fedsecure.worker import update_rules
from fedsecure.worker.allowlist import OPTIMIZERS

CASES: list[tuple[str, dict[str, Any]]] = [
    ("SGD", {"lr": 0.1}),
    ("SGD", {"lr": 0.05, "momentum": 0.9}),
    ("SGD", {"lr": 0.05, "momentum": 0.9, "dampening": 0.3, "weight_decay": 0.01}),
    ("SGD", {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 0.1, "maximize": True}),
    ("Adam", {"lr": 0.01}),
    ("Adam", {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.05, "amsgrad": True}),
    ("Adam", {"lr": 0.02, "maximize": True}),
    ("AdamW", {"lr": 0.01}),
    ("AdamW", {"lr": 0.01, "weight_decay": 0.3, "amsgrad": True}),
    ("Adagrad", {"lr": 0.1}),
    ("Adagrad", {"lr": 0.1, "lr_decay": 0.01, "weight_decay": 0.02, "initial_accumulator_value": 0.5,
                 "eps": 1e-8, "maximize": True}),
    ("RMSprop", {"lr": 0.01}),
    ("RMSprop", {"lr": 0.01, "alpha": 0.9, "momentum": 0.5, "centered": True, "weight_decay": 0.01}),
    ("RMSprop", {"lr": 0.01, "momentum": 0.3, "maximize": True}),
]


def _trajectory(make: Any, settings: dict[str, Any], dtype: torch.dtype = torch.float32,
                steps: int = 25, last: bool = False) -> list[torch.Tensor]:
    """Parameters after ``steps`` steps on a fixed problem, in two groups (the second with half the
    learning rate), one parameter without a gradient some steps, and zero_grad both ways; with
    ``last``, the final step is said to be the last (as a worker's training loop says it)."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(5, 3, generator=gen, dtype=dtype).requires_grad_(),
              torch.randn(3, generator=gen, dtype=dtype).requires_grad_(),
              torch.randn(4, 2, generator=gen, dtype=dtype).requires_grad_()]
    lr = settings["lr"]
    optimizer = make([{"params": params[:2]}, {"params": params[2:], "lr": lr / 2}], **settings)
    x = torch.randn(8, 5, generator=gen, dtype=dtype)
    for step in range(steps):
        optimizer.zero_grad(set_to_none=step % 2 == 0)
        out = (x @ params[0] + params[1]).tanh().abs().sum()
        if step % 3:  # the third parameter has no gradient in one step of three
            out = out + (params[2] ** 2).sum().abs()
        out.backward()
        if step % 3 == 0:
            params[2].grad = None
        if last and step == steps - 1:
            optimizer.step(last=True)
        else:
            optimizer.step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize(("name", "settings"), CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_the_same_values_as_torch_optim(name: str, settings: dict[str, Any]) -> None:
    ours = _trajectory(OPTIMIZERS[name], settings)
    theirs = _trajectory(getattr(torch.optim, name), settings)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same operations in the same order
    assert not torch.equal(ours[0], _trajectory(OPTIMIZERS[name], settings, steps=0)[0])  # it moved


@pytest.mark.parametrize(("name", "settings"), CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_a_last_step_keeps_no_new_state_and_moves_as_torch_optim(name: str, settings: dict[str, Any], steps: int) -> None:
    """One step that is also the last (a cross-device owner with one batch): SGD's momentum buffer
    would be a copy of the gradient, and is not made; the values are torch.optim's, bit for bit."""
    ours = _trajectory(OPTIMIZERS[name], settings, steps=steps, last=True)
    theirs = _trajectory(getattr(torch.optim, name), settings, steps=steps)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    p = torch.ones(3, requires_grad=True)
    optimizer = OPTIMIZERS[name]([p], **settings)
    p.grad = torch.full((3,), 0.5)
    optimizer.step(last=True)
    assert p not in optimizer.state  # nothing kept for a step that will not come


@pytest.mark.parametrize("name", ["SGD", "Adam", "RMSprop", "Adagrad"])
def test_complex_parameters_as_torch_optim(name: str) -> None:
    settings = {"lr": 0.01, "momentum": 0.5} if name in ("SGD", "RMSprop") else {"lr": 0.01}
    ours = _trajectory(OPTIMIZERS[name], settings, dtype=torch.complex64, steps=6)
    theirs = _trajectory(getattr(torch.optim, name), settings, dtype=torch.complex64, steps=6)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("name", "settings", "message"), [
    ("SGD", {"lr": -0.1}, "Invalid lr value: -0.1"),
    ("SGD", {"lr": float("nan")}, "Invalid lr value: nan"),
    ("SGD", {"lr": 0.1, "momentum": -1}, "Invalid momentum value"),
    ("SGD", {"lr": 0.1, "nesterov": True}, "Nesterov momentum requires a momentum and zero dampening"),
    ("Adam", {"betas": (0.9, 1.0)}, "Invalid beta parameter at index 1: 1.0"),
    ("Adam", {"betas": 0.9}, "betas must be a pair of numbers"),
    ("Adagrad", {"lr_decay": -1}, "Invalid lr_decay value"),
    ("RMSprop", {"alpha": -0.5}, "Invalid alpha value"),
])
def test_settings_are_checked(name: str, settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        OPTIMIZERS[name]([torch.zeros(2, requires_grad=True)], **settings)


def test_misuse_is_refused_with_what_to_change() -> None:
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['betas'\]; its settings are lr, momentum"):
        update_rules.SGD([p], betas=(0.9, 0.99))
    with pytest.raises(ValueError, match="empty parameter list"):
        update_rules.SGD([])
    with pytest.raises(TypeError, match="got one tensor"):
        update_rules.SGD(p)
    with pytest.raises(ValueError, match="non-leaf"):
        update_rules.SGD([p * 2])
    with pytest.raises(ValueError, match="more than once"):
        update_rules.SGD([{"params": [p]}, {"params": [p]}])
    sgd = update_rules.SGD([p], lr=0.1)
    sgd.param_groups[0]["lr"] = -1.0  # as a message could set it between steps
    p.grad = torch.ones(2)
    with pytest.raises(ValueError, match="Invalid lr value: -1.0"):
        sgd.step()
    assert torch.equal(p, torch.zeros(2))  # nothing written
    p.grad = torch.ones(2).to_sparse()
    sgd.param_groups[0]["lr"] = 0.1
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        sgd.step()


def test_accelerator_parameters_get_torch_optim() -> None:
    cpu = [torch.zeros(2, requires_grad=True)]
    assert update_rules.optimizer_class(update_rules.Adam, cpu) is update_rules.Adam
    meta = [torch.zeros(2, device="meta", requires_grad=True)]  # any device other than the CPU
    assert update_rules.optimizer_class(update_rules.Adam, meta) is torch.optim.Adam


def test_training_in_a_fresh_process_does_not_import_the_compiler() -> None:
    """torch.optim's classes import torch._dynamo and sympy (85 MB, over a second); a round of
    fl.fit with every optimizer must not, nor the worker's checks before it."""
    code = textwrap.dedent("""
        import sys, torch
        import fedsecure as sy
        from fedsecure import fl
        federation = sy.Federation()
        trust = sy.Policy(trusted_aggregators=frozenset({"agg"}), private_sends=False)
        owners = [sy.VirtualWorker(id=f"o{i}", federation=federation, policy=trust,
                                   data={"x": torch.randn(40, 1, 6, 6), "y": torch.randint(0, 3, (40,))})
                  for i in range(2)]
        agg = sy.VirtualWorker(id="agg", federation=federation, policy=sy.Policy(strict=True))
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Flatten(),
                                    torch.nn.Dropout(0.1), torch.nn.Linear(32, 3))
        for name in ("SGD", "Adam", "AdamW", "Adagrad", "RMSprop"):
            strategy = fl.FedAvg(training=fl.LocalTraining(epochs=1, batch_size=16, lr=0.01, optimizer=name),
                                 min_fit_workers=2)
            model, history = fl.fit(model, owners, strategy, rounds=1, aggregator=agg, seed=0,
                                    test_data=(torch.randn(10, 1, 6, 6), torch.randint(0, 3, (10,))))
        print(sorted(m for m in ("torch._dynamo", "sympy") if m in sys.modules), history.rows[-1]["train_loss"] > 0)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]", "True"], out.stdout


def test_a_workers_training_loop_steps_torch_optim_as_its_own() -> None:
    """On an accelerator a worker steps torch.optim's class (which has no ``last``): its training
    loop gives the same model with either, here on the CPU, one batch and several."""
    from torch import nn

    from fedsecure import fl
    from fedsecure.worker import training

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 3, generator=gen), torch.randint(0, 2, (10,), generator=gen)
    for batch_size in (16, 4):
        settings = training.parse(fl.LocalTraining(epochs=2, batch_size=batch_size, lr=0.1,
                                                   optimizer_args={"momentum": 0.9}).to_wire())
        models = []
        for make in (update_rules.SGD, torch.optim.SGD):
            torch.manual_seed(1)
            module = nn.Linear(3, 2)
            training.fit(module, x, y, settings, seed=5, optimizer=make(module.parameters(), lr=0.1, momentum=0.9))
            models.append(module.state_dict())
        for a, b in zip(*(m.values() for m in models), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
