"""Local DP-SGD on a worker (Abadi et al. 2016, "Deep Learning with Differential Privacy").

Each step draws a Poisson sample of the worker's records (each record with probability q,
independently), computes every sampled record's gradient on its own, clips it to L2 norm C, sums,
adds Gaussian noise N(0, (z C)^2) and divides by the expected batch size q n. Opacus'
`DPOptimizer` does the clipping, the noise and the scaling, then the allow-listed optimizer steps
on the noisy gradient.

Per-record gradients come from ``torch.func`` (``vmap`` over ``grad`` of the whole model applied to
one record at a time), not from Opacus' per-layer hooks (`GradSampleModule`). The hooks assume
that the model treats each row of a batch on its own; a model owner may send a model that does not
(``Softmax(dim=0)``, ``Flatten(start_dim=0)``, a traced graph that subtracts ``x.mean(0)``), and
then a "per-sample" gradient would depend on the other records and clipping would bound nothing.
Under ``vmap`` the model sees one record at a time whatever its layers do, so the bound holds for
every model the worker can build, graphs included. BatchNorm is refused: it needs batch statistics
and writes them into its buffers.

The randomness of the sampling and of the noise comes from a generator this worker seeds from
``secrets``; the seed in the `Fit` message (the model owner's) only drives plain training. Who
was sampled, and the noise, must stay secret for the accounting to hold.

`Ledger` keeps the steps run for one model owner; its epsilon is dp-accounting's RDP accountant's
for the Poisson-sampled Gaussian mechanism (add-or-remove-one record), as in
`fedsecure.privacy.Accountant`.
"""

from __future__ import annotations

import functools
import math
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedsecure.errors import OperationNotAllowed, ProtocolError
from fedsecure.worker import update_rules

INSTALL = "pip install 'fedsecure[dp-sgd]'"


@dataclass(frozen=True, slots=True)
class DPSGDSettings:
    """The checked ``dp_sgd`` part of a training configuration."""

    noise_multiplier: float
    max_grad_norm: float
    delta: float


@dataclass(frozen=True, slots=True)
class Plan:
    """How many steps a round runs, at which Poisson sampling rate."""

    sampling_rate: float
    steps: int
    expected_batch_size: int


def plan(examples: int, batch_size: int, epochs: int, max_steps: int | None) -> Plan:
    """Opacus' convention (`DPDataLoader`): an epoch is ceil(n / B) steps at rate q = 1 / that, so
    each step's expected batch is n q <= B records and an epoch sees each record once on average."""
    per_epoch = max(1, math.ceil(examples / batch_size))
    steps = per_epoch * epochs if max_steps is None else min(per_epoch * epochs, max_steps)
    return Plan(1.0 / per_epoch, steps, max(1, round(examples / per_epoch)))


def opacus() -> Any:
    """The Opacus package, imported only when a round asks for DP-SGD."""
    try:
        import opacus as package
        from opacus.optimizers import DPOptimizer  # noqa: F401
        from opacus.validators import ModuleValidator  # noqa: F401
    except ImportError as exc:
        raise OperationNotAllowed(
            f"this worker cannot run DP-SGD: Opacus is not installed where the worker runs ({INSTALL})",
            op="dp_sgd",
        ) from exc
    return package


def check_module(module: nn.Module) -> None:
    """Refuse models whose training DP-SGD cannot bound, with what to change."""
    package = opacus()
    for name, child in module.named_modules():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            raise OperationNotAllowed(
                f"DP-SGD cannot train {name or 'the model'} ({type(child).__name__}): BatchNorm normalises each "
                "record with statistics of the whole batch and stores them in its buffers, so clipping one "
                "record's gradient does not bound its influence. Use GroupNorm or LayerNorm instead, or no "
                "normalisation",
                op=type(child).__name__,
            )
    errors = package.validators.ModuleValidator.validate(module, strict=False)
    if errors:
        raise OperationNotAllowed(
            f"Opacus refuses this model for DP-SGD: {'; '.join(str(e) for e in errors)[:600]}", op="dp_sgd"
        )


class Ledger:
    """The DP-SGD steps one worker ran for one model owner, as runs of (sampling rate, noise
    multiplier, steps), and the epsilon they spent at a given delta."""

    def __init__(self, runs: Iterable[tuple[float, float, int]] = ()) -> None:
        self.runs: list[tuple[float, float, int]] = list(runs)

    def add(self, sampling_rate: float, noise_multiplier: float, steps: int) -> None:
        if steps <= 0:
            return
        q, z = float(sampling_rate), float(noise_multiplier)
        if self.runs and self.runs[-1][:2] == (q, z):  # rounds at the same rate and noise: one run
            self.runs[-1] = (q, z, self.runs[-1][2] + int(steps))
        else:
            self.runs.append((q, z, int(steps)))

    @property
    def steps(self) -> int:
        return sum(steps for _, _, steps in self.runs)

    def epsilon(self, delta: float) -> float:
        """Epsilon at ``delta`` of all the steps so far: 0 before any, inf once one ran without noise."""
        if not self.runs:
            return 0.0
        if any(z == 0 for _, z, _ in self.runs):
            return math.inf
        return _rdp_epsilon(tuple(self.runs), float(delta))

    @classmethod
    def combined(cls, ledgers: Iterable[Ledger]) -> Ledger:
        """All the steps of several ledgers composed: what a data owner spent over all model owners."""
        return cls(run for ledger in ledgers for run in ledger.runs)


@functools.lru_cache(maxsize=128)
def _rdp_epsilon(runs: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """dp-accounting's RDP accountant, as `fedsecure.privacy.Accountant` (kind "rdp") asks it; called
    here directly since the worker layer does not import the privacy layer above it."""
    import dp_accounting as dpa

    accountant = dpa.rdp.RdpAccountant()
    for q, z, steps in runs:
        accountant.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), steps)
    return float(accountant.get_epsilon(delta))


def _per_record(
    module: nn.Module, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> Callable[..., tuple[dict[str, torch.Tensor], torch.Tensor]]:
    from torch.func import functional_call, grad_and_value, vmap

    def one(trained: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(module, trained, (x.unsqueeze(0),), strict=False)
        return loss(out, y.unsqueeze(0))

    return vmap(grad_and_value(one), in_dims=(None, 0, 0), randomness="different")  # type: ignore[no-any-return]


def fit(
    module: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: update_rules.Stepper,
    dp: DPSGDSettings,
    schedule: Plan,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    proximal_mu: float,
) -> tuple[float, int]:
    """Run ``schedule.steps`` DP-SGD steps of ``optimizer`` on ``module``; (mean loss, steps)."""
    package = opacus()
    named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    trained = set(map(id, params))
    fixed = {k: t.detach().clone() for k, t in module.state_dict(keep_vars=True).items() if id(t) not in trained}
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    device = params[0].device if params else torch.device("cpu")  # Opacus draws its noise there
    private = torch.Generator(device=device).manual_seed(secrets.randbits(63))
    dp_optimizer = package.optimizers.DPOptimizer(
        optimizer,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        expected_batch_size=schedule.expected_batch_size,
        loss_reduction="mean",
        generator=private,
    )
    per_record = _per_record(module, loss)
    n = x.shape[0]
    total, count = 0.0, 0
    try:
        for _ in range(schedule.steps):
            index = (torch.rand(n, generator=private, device=device) < schedule.sampling_rate).nonzero().squeeze(1)
            dp_optimizer.zero_grad(set_to_none=True)
            total += _record_gradients(per_record, named, x, y, index)
            count += len(index)
            if dp_optimizer.pre_step():  # clip, sum, add noise, divide by the expected batch size
                for p, a in zip(params, anchor, strict=False):  # FedProx: mu (w - w_global), data-free
                    if p.grad is not None:
                        p.grad.add_(p.detach() - a, alpha=proximal_mu)
                optimizer.step()
    finally:
        for p in params:
            for attr in ("grad_sample", "summed_grad"):
                if hasattr(p, attr):
                    delattr(p, attr)
            p.grad = None
    _check_unchanged(module, fixed)
    return (total / count if count else math.nan), schedule.steps


def _record_gradients(
    per_record: Callable[..., tuple[dict[str, torch.Tensor], torch.Tensor]],
    named: list[tuple[str, nn.Parameter]],
    x: torch.Tensor,
    y: torch.Tensor,
    index: torch.Tensor,
) -> float:
    """Each sampled record's own gradient, where Opacus reads it (``grad_sample``); the sample's
    summed loss. An empty Poisson sample has no gradients: its step is noise alone."""
    if not len(index):
        for _, p in named:
            setattr(p, "grad_sample", p.new_zeros((0, *p.shape)))  # noqa: B010
        return 0.0
    current = {name: p.detach() for name, p in named}
    try:
        grads, losses = per_record(current, x[index], y[index])
    except ProtocolError:
        raise
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        raise ProtocolError(
            f"DP-SGD cannot compute this model's gradient one record at a time: {exc}"[:800]
        ) from exc
    for name, p in named:
        setattr(p, "grad_sample", grads[name].detach())  # noqa: B010 (Opacus reads it)
    return float(losses.sum())


def _check_unchanged(module: nn.Module, fixed: dict[str, torch.Tensor]) -> None:
    """Only clipped, noised gradient steps may change a model under DP-SGD: not its forward pass."""
    after = module.state_dict(keep_vars=True)
    for name, before in fixed.items():
        if not torch.equal(before, after[name]):
            raise ProtocolError(
                "the model changed its buffers or frozen weights while training with DP-SGD: "
                "only clipped, noised gradient steps may change a model under DP-SGD"
            )
