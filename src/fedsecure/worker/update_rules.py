"""The optimizers a worker steps (`fedsecure.worker.allowlist.OPTIMIZERS`): SGD, Adam, AdamW,
Adagrad and RMSprop with torch.optim's settings, defaults, checks and update rules, written as
plain tensor operations: the same operations in the same order as torch.optim's per-parameter
implementation (the one it runs on the CPU), so that a step gives the same values
(tests/test_update_rules.py compares them over many steps and settings).

Why not torch.optim itself on the CPU: its classes import torch's compiler stack (torch._dynamo,
and sympy with it) the first time one is built or stepped, through the wrappers that keep the
compiler out of them. That is 70-85 MB and about a second in every process that trains
(`benchmarks/process_floor.py`), for training that never compiles anything. On an accelerator a
worker uses torch.optim's class (`optimizer_class`): its multi-tensor kernels launch fewer kernels
per step, and such a process pays far more for its device than for the import.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import torch

Settings = dict[str, Any]
Rule = Callable[[torch.Tensor, torch.Tensor, dict[str, Any], Settings], None]


def _at_least_zero(*names: str) -> Callable[[Settings], None]:
    def check(group: Settings) -> None:
        for name in names:
            if not group[name] >= 0.0:  # also refuses NaN
                raise ValueError(f"Invalid {name} value: {group[name]}")

    return check


def _betas(group: Settings) -> None:
    betas = group["betas"]
    if not isinstance(betas, tuple | list) or len(betas) != 2:
        raise ValueError(f"betas must be a pair of numbers, got {betas!r}")
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}")


def _nesterov(group: Settings) -> None:
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")


class Optimizer:
    """What the worker needs of a torch optimizer: ``param_groups`` (each with every setting),
    ``defaults``, ``state`` per parameter, ``add_param_group``, ``zero_grad`` and ``step``. Each
    group's settings are checked when it is added and again at each step (a scheduler on the model
    owner's side changes them between steps)."""

    name: ClassVar[str]
    DEFAULTS: ClassVar[Settings]
    CHECKS: ClassVar[tuple[Callable[[Settings], None], ...]]
    rule: ClassVar[Rule]

    def __init__(self, params: Iterable[Any], **settings: Any) -> None:
        self._known(settings)
        self.defaults: Settings = {**self.DEFAULTS, **settings}
        self.check_group(self.defaults)
        self.state: dict[torch.Tensor, dict[str, Any]] = {}
        self.param_groups: list[Settings] = []
        if isinstance(params, torch.Tensor):
            raise TypeError("params must be an iterable of tensors or of parameter groups (dicts), got one tensor")
        groups = list(params)
        if not groups:
            raise ValueError("optimizer got an empty parameter list")
        for group in groups if isinstance(groups[0], dict) else [{"params": groups}]:
            self.add_param_group(group)

    def _known(self, settings: Settings) -> None:
        if unknown := sorted(set(settings) - set(self.DEFAULTS)):
            raise TypeError(f"{self.name} got unexpected keyword argument(s) {unknown}; "
                            f"its settings are {', '.join(self.DEFAULTS)}")

    def check_group(self, group: Settings) -> None:
        """Raise ValueError (or TypeError) if a group's settings are not ones this optimizer accepts."""
        for check in self.CHECKS:
            check(group)

    def add_param_group(self, group: Settings) -> None:
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError("a parameter group must be a dict with 'params'")
        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        settings = {k: v for k, v in group.items() if k != "params"}
        self._known(settings)
        full = {**self.defaults, **settings}
        self.check_group(full)
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"an optimizer can only optimize tensors, got {type(p).__name__}")
            if not p.is_leaf:
                raise ValueError("can't optimize a non-leaf Tensor")
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        if len({id(p) for p in params} | seen) != len(params) + len(seen):
            raise ValueError("some parameters appear more than once (in one group or in several)")
        self.param_groups.append({"params": params, **full})

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                    continue
                if p.grad.grad_fn is not None:
                    p.grad.detach_()
                else:
                    p.grad.requires_grad_(False)
                p.grad.zero_()

    def step(self, closure: None = None, *, last: bool = False) -> None:
        """One update. ``last``: this optimizer takes no step after this one (a worker's own training
        loop says so), so a parameter's state that this step would start is not kept."""
        if closure is not None:
            raise TypeError(f"{self.name}.step takes no closure on a worker")
        with torch.no_grad():
            for group in self.param_groups:
                self.check_group(group)
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    if p.grad.is_sparse:
                        raise RuntimeError(f"{self.name} on a worker does not support sparse gradients")
                    state = self.state.get(p)
                    if state is None:
                        state = _Spent() if last else self.state.setdefault(p, {})
                    type(self).rule(p, p.grad, state, group)

    def __repr__(self) -> str:
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in self.defaults.items())})"


def _real(t: torch.Tensor) -> torch.Tensor:
    """A complex tensor as its real view (each element a pair), as torch.optim updates them."""
    return torch.view_as_real(t) if t.is_complex() else t


class _Spent(dict[str, Any]):
    """The state a rule is given for a parameter's last step, which starts it: not kept."""


def _sgd(p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: Settings) -> None:
    momentum, weight_decay = group["momentum"], group["weight_decay"]
    grad = -grad if group["maximize"] else grad
    if weight_decay != 0:
        grad = grad.add(p, alpha=weight_decay)
    if momentum != 0:
        buf = state.get("momentum_buffer")
        if buf is None and type(state) is _Spent:  # the first step is the last: the buffer would be the gradient
            buf = grad
        elif buf is None:
            buf = state["momentum_buffer"] = torch.clone(grad).detach()
        else:
            buf.mul_(momentum).add_(grad, alpha=1 - group["dampening"])
        grad = grad.add(buf, alpha=momentum) if group["nesterov"] else buf
    p.add_(grad, alpha=-group["lr"])


def _adam(p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: Settings) -> None:
    lr, (beta1, beta2), weight_decay, amsgrad = group["lr"], group["betas"], group["weight_decay"], group["amsgrad"]
    if not state:
        state["step"] = 0.0
        for key in ("exp_avg", "exp_avg_sq", *(("max_exp_avg_sq",) if amsgrad else ())):
            state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
    grad = -grad if group["maximize"] else grad
    state["step"] += 1
    if weight_decay != 0:
        if group["decoupled_weight_decay"]:
            p.mul_(1 - lr * weight_decay)
        else:
            grad = grad.add(p, alpha=weight_decay)
    grad, exp_avg, exp_avg_sq, p = _real(grad), _real(state["exp_avg"]), _real(state["exp_avg_sq"]), _real(p)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step = state["step"]
    step_size = lr / (1 - beta1**step)
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    if amsgrad:
        largest = _real(state["max_exp_avg_sq"])
        torch.maximum(largest, exp_avg_sq, out=largest)
        denom = (largest.sqrt() / bias_correction2_sqrt).add_(group["eps"])
    else:
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(group["eps"])
    p.addcdiv_(exp_avg, denom, value=-step_size)


def _adagrad(p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: Settings) -> None:
    if not state:
        state["step"] = 0.0
        state["sum"] = torch.full_like(p, group["initial_accumulator_value"], memory_format=torch.preserve_format)
    state["step"] += 1
    grad = -grad if group["maximize"] else grad
    if group["weight_decay"] != 0:
        grad = grad.add(p, alpha=group["weight_decay"])
    clr = group["lr"] / (1 + (state["step"] - 1) * group["lr_decay"])
    grad, total, p = _real(grad), _real(state["sum"]), _real(p)
    total.addcmul_(grad, grad, value=1)
    p.addcdiv_(grad, total.sqrt().add_(group["eps"]), value=-clr)


def _rmsprop(p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: Settings) -> None:
    alpha, momentum = group["alpha"], group["momentum"]
    if not state:
        state["step"] = 0.0
        for key in ("square_avg", *(("momentum_buffer",) if momentum > 0 else ()),
                    *(("grad_avg",) if group["centered"] else ())):
            state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
    state["step"] += 1
    grad = -grad if group["maximize"] else grad
    if group["weight_decay"] != 0:
        grad = grad.add(p, alpha=group["weight_decay"])
    grad, square_avg, p = _real(grad), _real(state["square_avg"]), _real(p)
    square_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha)
    if group["centered"]:
        grad_avg = _real(state["grad_avg"])
        grad_avg.lerp_(grad, 1 - alpha)
        avg = square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()
    else:
        avg = square_avg.sqrt()
    avg = avg.add_(group["eps"])
    if momentum > 0:
        buf = _real(state["momentum_buffer"])
        buf.mul_(momentum).addcdiv_(grad, avg)
        p.add_(buf, alpha=-group["lr"])
    else:
        p.addcdiv_(grad, avg, value=-group["lr"])


def _optimizer(name: str, rule: Rule, defaults: Settings, *checks: Callable[[Settings], None]) -> type[Optimizer]:
    doc = f"torch.optim.{name}'s update as a worker runs it on the CPU (settings: {', '.join(defaults)})."
    return type(name, (Optimizer,), {"name": name, "DEFAULTS": defaults, "CHECKS": checks,
                                     "rule": staticmethod(rule), "__doc__": doc, "__module__": __name__})


_ADAM = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False, "maximize": False}
SGD = _optimizer("SGD", _sgd, {"lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0,
                               "nesterov": False, "maximize": False},
                 _at_least_zero("lr", "momentum", "weight_decay"), _nesterov)
Adam = _optimizer("Adam", _adam, {**_ADAM, "decoupled_weight_decay": False},
                  _at_least_zero("lr", "eps", "weight_decay"), _betas)
AdamW = _optimizer("AdamW", _adam, {**_ADAM, "weight_decay": 1e-2, "decoupled_weight_decay": True},
                   _at_least_zero("lr", "eps", "weight_decay"), _betas)
Adagrad = _optimizer("Adagrad", _adagrad, {"lr": 1e-2, "lr_decay": 0.0, "weight_decay": 0.0,
                                           "initial_accumulator_value": 0.0, "eps": 1e-10, "maximize": False},
                     _at_least_zero("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps"))
RMSprop = _optimizer("RMSprop", _rmsprop, {"lr": 1e-2, "alpha": 0.99, "eps": 1e-8, "weight_decay": 0.0,
                                           "momentum": 0.0, "centered": False, "maximize": False},
                     _at_least_zero("lr", "eps", "momentum", "weight_decay", "alpha"))

Stepper = Optimizer | torch.optim.Optimizer
"""An optimizer a worker steps: one of this module's, or torch.optim's on an accelerator."""


def optimizer_class(cls: type[Optimizer], params: Sequence[torch.Tensor]) -> Callable[..., Stepper]:
    """``cls`` for parameters on the CPU; torch.optim's class of that name for ``params`` on an
    accelerator (see the module's docstring)."""
    if any(p.device.type != "cpu" for p in params):
        return getattr(torch.optim, cls.name)  # type: ignore[no-any-return]
    return cls
