"""Where a worker trains: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``, or ``"auto"`` (CUDA when
torch sees a GPU, else MPS, else the CPU).

A worker on an accelerator keeps its private data there (moved once, when it is loaded), and for
each `Fit` or `Evaluate` trains a twin of the stored model on the device, then copies the result
back into the stored model, which stays on the CPU with everything else the worker holds: the
model owner's tensors, the aggregator's inputs and what travels on the wire. With CUDA, transfers
go through pinned host memory. On the CPU nothing is copied: the stored model trains in place.
There, a model of built-in layers with a 2-d convolution is fed channels-last batches
(`fast_format`, `laid_out`): oneDNN's convolutions then run in that layout and carry it through the
convolution stack, without reordering each activation (`benchmarks/device.py --layouts`).
Training and evaluation keep their running sums on the device and read them once at the end
(`fedsecure.worker.training`), so no batch waits for the host.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import torch
from torch import nn

from fedsecure.errors import FedsecureError
from fedsecure.worker.modules import LAYERS, state_tensors

CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
_NAME = re.compile(r"auto|cpu|cuda|cuda:\d+|mps")
CPU = torch.device("cpu")


class DeviceError(FedsecureError, ValueError):
    """A device name that is not one of `CHOICES`, or a device this machine does not have."""


def check_name(name: Any) -> str:
    """``name`` if it is one of `CHOICES` (N a GPU's index), else a `DeviceError` listing them."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise DeviceError(f"device must be one of {', '.join(map(repr, CHOICES))} (N: a GPU's index), got {name!r}")
    return name


def _mps() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve(name: str | torch.device) -> torch.device:
    """The device ``name`` stands for on this machine; a `DeviceError` saying what to use instead
    when the machine does not have it."""
    if isinstance(name, torch.device):
        name = str(name)
    if check_name(name) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if _mps() else CPU
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} needs a CUDA GPU, and torch sees none here (torch "
                              f"{torch.__version__}, torch.cuda.is_available() is False): set "
                              'device = "cpu" (or "auto", which takes a GPU only where there is one)')
        index = 0 if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise DeviceError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                              f"numbered from 0; choose one of them, or device = \"auto\"")
        return torch.device("cuda", index)
    if device.type == "mps" and not _mps():
        raise DeviceError('device "mps" needs Apple\'s Metal backend, which torch does not see here: '
                          'set device = "cpu" (or "auto")')
    return device


_BUILT_IN = frozenset(cls for cls, _ in LAYERS.values())


def fast_format(module: nn.Module, device: torch.device) -> torch.memory_format:
    """The layout of the batches ``module`` runs fastest on ``device``: channels-last on the CPU for
    a float32 model with a 2-d convolution made only of built-in layers (whose results do not
    depend on the layout; a graph model's own ``view`` would), else the contiguous format. Not for
    float64, which oneDNN does not run: torch's own channels-last kernels were the slower there."""
    if device.type == "cpu":
        kinds = {type(m) for m in module.modules()}
        if nn.Conv2d in kinds and kinds <= _BUILT_IN and all(p.dtype == torch.float32 for p in module.parameters()):
            return torch.channels_last
    return torch.contiguous_format


def laid_out(batch: torch.Tensor, layout: torch.memory_format) -> torch.Tensor:
    """``batch`` in ``layout`` (a 4-d one; others as they are). Made explicitly: a 1-channel batch
    is channels-last and contiguous at once, and only fresh channels-last strides (a channel stride
    of 1) make torch's convolution choose that layout."""
    if layout == torch.contiguous_format or batch.dim() != 4:
        return batch
    return torch.empty(batch.shape, dtype=batch.dtype, device=batch.device, memory_format=layout).copy_(batch)


def dense_strides(shape: torch.Size) -> tuple[int, ...]:
    """The strides torch gives a fresh contiguous tensor of ``shape``."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of ``t`` on ``device`` (through pinned memory from a CPU tensor to CUDA)."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device, copy=True)


def twin(module: nn.Module, device: torch.device) -> nn.Module:
    """A copy of ``module`` on ``device`` (its tensors copied straight there, none kept on the CPU,
    and none of the stored tensors' own attributes copied)."""
    memo: dict[int, Any] = {}
    for _, t in state_tensors(module):
        blank = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(blank, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else blank
    work = copy.deepcopy(module, memo).to_empty(device=device)
    with torch.no_grad():
        for (_, dst), (_, src) in zip(state_tensors(work), state_tensors(module), strict=True):
            dst.copy_(src.pin_memory() if device.type == "cuda" else src, non_blocking=device.type == "cuda")
    return work


def copy_back(work: nn.Module, module: nn.Module) -> None:
    """Write the trained twin's values into the stored model's own tensors, in place."""
    pairs = list(zip(state_tensors(work), state_tensors(module), strict=True))
    with torch.no_grad():
        cuda = [(w, torch.empty_like(t, device="cpu", pin_memory=True), t)
                for (_, w), (_, t) in pairs if w.device.type == "cuda"]
        for w, staging, _ in cuda:
            staging.copy_(w, non_blocking=True)
        if cuda:
            torch.cuda.synchronize(cuda[0][0].device)
        for _, staging, t in cuda:
            t.copy_(staging)
        for (_, w), (_, t) in pairs:
            if w.device.type != "cuda":
                t.copy_(w)
