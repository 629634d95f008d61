"""Where a worker trains: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``, or ``"auto"`` (CUDA when
torch sees a GPU, else MPS, else the CPU).

A worker on an accelerator keeps its private data there (moved once, when it is loaded), and for
each `Fit` or `Evaluate` trains a twin of the stored model on the device, then copies the result
back into the stored model, which stays on the CPU with everything else the worker holds: the
model owner's tensors, the aggregator's inputs and what travels on the wire. With CUDA, transfers
go through pinned host memory. On the CPU the stored model trains in place, except a model of
built-in layers with a 2-d convolution: it trains and evaluates in a twin whose 4-d weights are
channels-last (`fast_format`), the layout oneDNN's CPU convolutions run in without reordering
each activation (`benchmarks/device.py --layouts` measures both).
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


_BUILT_IN = frozenset(cls for cls, _ in LAYERS.values())


MIN_ROWS = 128
"""The fewest rows a pass must run through a model before a channels-last twin pays for its copies
(`benchmarks/device.py --break-even`, one fit, twin and copy back included: McMahan's CNN on 6 rows
of Fashion-MNIST took 1.20x as long channels-last, on 128 rows 0.87x; its 8x8 variant on the digits
1.45x and 0.97x)."""


def fast_format(module: nn.Module, device: torch.device, rows: int) -> torch.memory_format:
    """The memory format ``module`` runs ``rows`` rows fastest in on ``device``: channels-last on the
    CPU for a model with a 2-d convolution made only of built-in layers (whose results do not
    depend on the layout; a graph model's ``view`` would), from `MIN_ROWS` rows; else the
    contiguous format."""
    if device.type == "cpu" and rows >= MIN_ROWS:
        kinds = {type(m) for m in module.modules()}
        if nn.Conv2d in kinds and kinds <= _BUILT_IN:
            return torch.channels_last
    return torch.contiguous_format


def working_copy(module: nn.Module, device: torch.device, rows: int) -> nn.Module:
    """What runs ``rows`` rows through ``module`` on ``device``: the module itself where it is there
    already in the layout that runs fastest, else a `twin` (on the device, in its `fast_format`);
    `copy_back` returns a trained twin's values."""
    layout = fast_format(module, device, rows)
    if layout == torch.contiguous_format and all(t.device == device for _, t in state_tensors(module)):
        return module
    return twin(module, device, layout)


def twin(module: nn.Module, device: torch.device, layout: torch.memory_format = torch.contiguous_format) -> nn.Module:
    """A copy of ``module`` on ``device`` (its tensors copied straight there, none kept on the CPU,
    and none of the stored tensors' own attributes copied), its 4-d tensors in ``layout``. Made
    without meta tensors: a meta tensor in a layout other than the contiguous one runs torch's
    Python reference code, which imports sympy."""
    memo: dict[int, Any] = {}
    cuda = device.type == "cuda"
    with torch.no_grad():
        for _, t in state_tensors(module):
            copied = torch.empty_like(t, device=device, memory_format=layout if t.dim() == 4 else torch.contiguous_format)
            copied.copy_(t.pin_memory() if cuda else t, non_blocking=cuda)
            memo[id(t)] = nn.Parameter(copied, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else copied
    return copy.deepcopy(module, memo)


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
