"""Local training and evaluation on a worker: one message runs a whole round's work.

The model owner sends a configuration (`fedsecure.fl.LocalTraining.to_wire()`), never code: the
loss is a name from `LOSSES`, the optimizer a name from the optimizer allow-list with
allow-listed settings, and the loop below is the only one a worker runs. Everything received is
checked here, at the trust boundary, with errors that say what to change.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedsecure.errors import OperationNotAllowed, ProtocolError
from fedsecure.worker import device, dp_sgd, update_rules
from fedsecure.worker.allowlist import OPTIMIZERS, optimizer_settings

LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "cross_entropy": F.cross_entropy,
    "nll_loss": F.nll_loss,
    "mse_loss": F.mse_loss,
    "l1_loss": F.l1_loss,
    "smooth_l1_loss": F.smooth_l1_loss,
    "binary_cross_entropy_with_logits": F.binary_cross_entropy_with_logits,
}
_CLASSIFICATION = frozenset({"cross_entropy", "nll_loss"})
_MAX_EPOCHS = 10_000


@dataclass(frozen=True, slots=True)
class Settings:
    epochs: int
    batch_size: int
    optimizer: str
    lr: float
    optimizer_args: dict[str, Any]
    loss: str
    proximal_mu: float
    max_steps: int | None
    dp_sgd: dp_sgd.DPSGDSettings | None = None


def _number(config: dict[str, Any], key: str, *, integer: bool = False, minimum: float = 0.0) -> Any:
    value: Any = config.get(key)
    ok = type(value) is int if integer else isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value < minimum:
        kind = "an integer" if integer else "a number"
        raise ProtocolError(f"training setting {key!r} must be {kind} >= {minimum:g}, got {value!r}")
    return value


_DP_SGD_KEYS = {"noise_multiplier", "max_grad_norm", "delta"}


def _parse_dp_sgd(value: Any) -> dp_sgd.DPSGDSettings | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != _DP_SGD_KEYS:
        got = sorted(map(str, value)) if isinstance(value, dict) else type(value).__name__
        raise ProtocolError(
            f"dp_sgd must be null or a map with exactly the keys {sorted(_DP_SGD_KEYS)} "
            f"(fedsecure.fl.DPSGD(...).to_wire()), got {got}"
        )

    def setting(key: str, check: Callable[[float], bool], what: str) -> float:
        v = value[key]
        if not (isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and check(v)):
            raise ProtocolError(f"DP-SGD setting {key!r} must be {what}, got {v!r}")
        return float(v)

    return dp_sgd.DPSGDSettings(
        noise_multiplier=setting("noise_multiplier", lambda v: v >= 0, "a finite number >= 0"),
        max_grad_norm=setting("max_grad_norm", lambda v: v > 0, "a finite number > 0 (the per-record clip bound)"),
        delta=setting("delta", lambda v: 0 < v < 1, "a number in (0, 1), well below 1 / (records per worker)"),
    )


def parse(config: dict[str, Any]) -> Settings:
    """Check a received training configuration."""
    expected = {
        "epochs", "batch_size", "optimizer", "lr", "optimizer_args", "loss", "proximal_mu", "max_steps", "dp_sgd",
    }
    if not isinstance(config, dict):
        raise ProtocolError("the training configuration must be a map (fedsecure.fl.LocalTraining.to_wire())")
    if set(config) != expected:
        missing, extra = sorted(expected - set(config)), sorted(map(str, set(config) - expected))
        raise ProtocolError(f"training configuration: missing {missing}, unknown {extra}")
    optimizer = config["optimizer"]
    if optimizer not in OPTIMIZERS:
        raise OperationNotAllowed(
            f"optimizer {optimizer!r} is not on the allow-list ({', '.join(OPTIMIZERS)})", op=str(optimizer)
        )
    loss = config["loss"]
    if loss not in LOSSES:
        raise OperationNotAllowed(f"loss {loss!r} is not on the allow-list ({', '.join(LOSSES)})", op=str(loss))
    args = config["optimizer_args"]
    if not isinstance(args, dict):
        raise ProtocolError("optimizer_args must be a map of settings")
    optimizer_args = optimizer_settings(args, reserved={"lr"}, where=" here")  # lr is a setting of its own
    max_steps = config["max_steps"]
    return Settings(
        epochs=min(_number(config, "epochs", integer=True, minimum=1), _MAX_EPOCHS),
        batch_size=_number(config, "batch_size", integer=True, minimum=1),
        optimizer=optimizer,
        lr=float(_number(config, "lr")),
        optimizer_args=optimizer_args,
        loss=loss,
        proximal_mu=float(_number(config, "proximal_mu")),
        max_steps=None if max_steps is None else _number(config, "max_steps", integer=True, minimum=1),
        dp_sgd=_parse_dp_sgd(config["dp_sgd"]),
    )


def dp_plan(examples: int, settings: Settings) -> dp_sgd.Plan:
    """The DP-SGD steps `fit` runs on ``examples`` records, and their Poisson sampling rate."""
    return dp_sgd.plan(examples, settings.batch_size, settings.epochs, settings.max_steps)


def _check_data(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0]:
        raise ProtocolError(
            f"features {tuple(x.shape)} and targets {tuple(y.shape)} need the same number of rows"
        )
    if x.shape[0] == 0:
        raise ProtocolError("this worker holds no training rows under those tags")


def loss_of(settings_loss: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    fn = LOSSES[settings_loss]
    try:
        return fn(out, y)
    except (RuntimeError, ValueError, IndexError) as exc:
        raise ProtocolError(
            f"{settings_loss} cannot compare the model's output {tuple(out.shape)} {out.dtype} with the "
            f"targets {tuple(y.shape)} {y.dtype}: choose a loss that fits the data"
        ) from exc


def fit(module: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: Settings, seed: int,
        optimizer: update_rules.Stepper | None = None) -> tuple[int, float, int]:
    """Train ``module`` in place; return (examples, mean training loss, optimizer steps).

    With ``settings.dp_sgd``, the steps are DP-SGD's (`fedsecure.worker.dp_sgd`): Poisson samples
    of the records and noise drawn from this worker's own randomness, not from ``seed``."""
    if optimizer is None:  # the caller may have checked already (`check` returns the optimizer)
        optimizer = check(module, x, y, settings)
    params = [p for p in module.parameters() if p.requires_grad]
    if settings.dp_sgd is not None:
        module.train()
        with torch.enable_grad():
            mean_loss, dp_steps = dp_sgd.fit(
                module, x, y, optimizer, settings.dp_sgd, dp_plan(x.shape[0], settings),
                lambda out, target: loss_of(settings.loss, out, target), settings.proximal_mu,
            )
        return x.shape[0], mean_loss, dp_steps
    anchor = [p.detach().clone() for p in params] if settings.proximal_mu > 0 else []
    generator = torch.Generator().manual_seed(seed & (2**63 - 1))
    n, b = x.shape[0], settings.batch_size
    # The summed loss stays where the data is: reading it on the host every step would stop an
    # accelerator's queue each time (float64, the same sums as Python floats).
    total, count, steps = torch.zeros((), dtype=torch.float64, device=x.device), 0, 0
    layout = device.fast_format(module, x.device)
    module.train()
    planned = planned_steps(n, settings)
    # The last step keeps no new state (`update_rules.Optimizer`); torch.optim's, which a worker
    # steps on an accelerator, takes no such argument.
    last_step = partial(optimizer.step, last=True) if isinstance(optimizer, update_rules.Optimizer) else optimizer.step
    with torch.enable_grad(), seeded_dropout(module, seed, x.device):
        for _ in range(settings.epochs):
            order = torch.randperm(n, generator=generator).to(x.device)  # the same order on any device
            for start in range(0, n, b):
                index = order[start : start + b]
                xb, yb = device.laid_out(x[index], layout), y[index]
                optimizer.zero_grad(set_to_none=True)
                loss = loss_of(settings.loss, module(xb), yb)
                if anchor:  # FedProx: mu/2 * ||w - w_global||^2
                    prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
                    (loss + settings.proximal_mu / 2 * prox).backward()
                else:
                    loss.backward()
                (last_step if steps + 1 >= planned else optimizer.step)()
                total += loss.detach().double() * len(index)
                count += len(index)
                steps += 1
                if settings.max_steps is not None and steps >= settings.max_steps:
                    return n, float(total) / count, steps
    return n, float(total) / max(count, 1), steps


_DROPOUTS = (nn.Dropout, nn.Dropout2d)  # exactly these types: a subclass may change what the layer does
_DROPOUT_STREAM = 0x6A09E667F3BCC909  # the dropout masks' seed: the training seed xor this constant


@contextlib.contextmanager
def seeded_dropout(module: nn.Module, seed: int, where: torch.device) -> Iterator[None]:
    """Within this block, ``module``'s `nn.Dropout` and `nn.Dropout2d` layers draw their masks from a
    generator of their own, seeded from the training ``seed``, instead of torch's one global
    generator: owners that train at the same time in one process (threads of a host, an actor
    or the local mode) would otherwise draw from it in an order that varies from run to run, and
    the same owner would draw other masks in another process. A seeded fit is then the same in
    every mode and at any concurrency. Each layer still drops each element (each channel for
    `Dropout2d`) with probability ``p`` and scales the rest by ``1 / (1 - p)``."""
    layers = [m for m in module.modules() if isinstance(m, nn.Dropout | nn.Dropout2d) and type(m) in _DROPOUTS]
    if not layers:
        yield
        return
    generator = torch.Generator(device=where).manual_seed((seed ^ _DROPOUT_STREAM) & (2**63 - 1))
    for layer in layers:
        layer.forward = partial(_dropout, layer, generator)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def _dropout(layer: nn.Dropout | nn.Dropout2d, generator: torch.Generator, x: torch.Tensor) -> torch.Tensor:
    p = layer.p
    if not layer.training or p == 0:
        return x
    channels = type(layer) is nn.Dropout2d
    if channels and x.dim() < 2:
        return nn.Dropout2d.forward(layer, x)  # type: ignore[arg-type]  # torch's error for an input without channels
    if p == 1:
        return x * 0
    # One draw per element, or per channel of each sample (torch's feature dropout: shape N, C, 1, ...).
    shape = (*x.shape[:2], *(1,) * (x.dim() - 2)) if channels else x.shape
    keep = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(1 - p, generator=generator)
    return x * keep.div_(1 - p)


def check(module: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: Settings) -> update_rules.Stepper:
    """Everything `fit` checks before it reads a value (metadata only); the optimizer it would use."""
    _check_data(x, y)
    if settings.dp_sgd is not None:
        dp_sgd.check_module(module)
    params = [p for p in module.parameters() if p.requires_grad]
    try:
        cls = update_rules.optimizer_class(OPTIMIZERS[settings.optimizer], params)
        return cls(params, lr=settings.lr, **settings.optimizer_args)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"cannot build {settings.optimizer}: {exc}") from exc


def planned_steps(examples: int, settings: Settings) -> int:
    """The optimizer steps `fit` takes on ``examples`` rows (a function of counts, not values)."""
    return dp_plan(examples, settings).steps


def check_evaluation(x: torch.Tensor, y: torch.Tensor, loss: str, batch_size: int) -> None:
    """Everything `evaluate` checks before it reads a value."""
    _check_data(x, y)
    if loss not in LOSSES:
        raise OperationNotAllowed(f"loss {loss!r} is not on the allow-list ({', '.join(LOSSES)})", op=str(loss))
    if type(batch_size) is not int or batch_size < 1:
        raise ProtocolError(f"batch_size must be a positive integer, got {batch_size!r}")


def evaluate(module: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str, batch_size: int) -> torch.Tensor:
    """``[summed loss, correct predictions, examples]`` of ``module`` on (x, y), as float64."""
    check_evaluation(x, y, loss, batch_size)
    layout = device.fast_format(module, x.device)
    module.eval()
    # Summed where the data is, read once at the end (as in `fit`).
    loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            out = module(device.laid_out(xb, layout))
            loss_sum += loss_of(loss, out, yb).double() * len(xb)
            if loss in _CLASSIFICATION and out.dim() == 2:
                correct += (out.argmax(1) == yb).sum()
    return torch.tensor([float(loss_sum), float(correct), float(x.shape[0])], dtype=torch.float64)
