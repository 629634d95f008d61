"""The pass a worker runs before it trains or evaluates a model on data (`fedsecure.worker.rounds`):
one forward pass and the loss on a batch of zeros, through zeros of the model's own shapes. What it
raises depends on metadata alone (shapes, dtypes, the model's structure), never on a value, so a
model that does not fit the data is refused with a full explanation before anything touches a
value, and a failure of the real pass afterwards can only come from the values.

Zeros, not meta tensors: torch runs many operations on meta tensors through its Python
decompositions, and those import its compiler stack (torch._dynamo, and sympy with it), 70-85 MB and
about a second in every process that trains (`benchmarks/process_floor.py`). Zeros of the model's
shapes rather than its weights: a weight may derive from an owner's data, and an operation such as
``binary_cross_entropy`` raises on some values. The pass allocates one copy of the model and one
batch's activations, once per model structure and data shape in a process (a pass that succeeded
is remembered by its metadata: a round of many owners trains one description on data of one shape).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from fedsecure.errors import FedsecureError, ProtocolError
from fedsecure.worker.modules import state_tensors

_PASSED: dict[tuple[Any, ...], None] = {}  # passes that ran without error, most recent last
_PASSED_MAX = 512
_passed_lock = threading.Lock()


def _structure(module: nn.Module, tensors: list[tuple[str, torch.Tensor]]) -> tuple[Any, ...]:
    """Everything of ``module`` that its pass depends on: each submodule's class and settings (a
    traced module's code), each of its ``tensors``' shape, dtype and grad flag."""
    parts: list[Any] = [(name, type(m).__qualname__, m.extra_repr(), m.code if isinstance(m, GraphModule) else None)
                        for name, m in module.named_modules()]
    parts += [(name, tuple(t.shape), t.dtype, t.requires_grad) for name, t in tensors]
    return tuple(parts)


def dry_run(module: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
            loss: Callable[[torch.Tensor, torch.Tensor], Any], loss_name: str) -> None:
    """Raise `ProtocolError` if ``module`` cannot take a batch of ``x`` and score it against ``y``
    with ``loss`` (named ``loss_name``), judged on zeros of their shapes and dtypes."""
    b = max(1, min(batch_size, x.shape[0]))
    tensors = state_tensors(module)
    key = (loss_name, b, tuple(x.shape[1:]), x.dtype, tuple(y.shape[1:]), y.dtype, _structure(module, tensors))
    with _passed_lock:
        if key in _PASSED:
            return
    _pass(module, tensors, x, y, b, loss)
    with _passed_lock:
        _PASSED[key] = None
        if len(_PASSED) > _PASSED_MAX:
            del _PASSED[next(iter(_PASSED))]


def _pass(module: nn.Module, tensors: list[tuple[str, torch.Tensor]], x: torch.Tensor, y: torch.Tensor, b: int,
          loss: Callable[[torch.Tensor, torch.Tensor], Any]) -> None:
    state = {name: torch.zeros(t.shape, dtype=t.dtype, requires_grad=t.requires_grad) for name, t in tensors}
    xb = torch.zeros((b, *x.shape[1:]), dtype=x.dtype)
    yb = torch.zeros((b, *y.shape[1:]), dtype=y.dtype)
    try:
        with torch.random.fork_rng(devices=[]):  # a dropout layer draws: the process's generator stays as it was
            loss(torch.func.functional_call(module, state, (xb,)), yb)
    except FedsecureError:
        raise
    except Exception as exc:  # zeros hold no owner's value: the message quotes none
        raise ProtocolError(f"the model cannot run on data of shape {tuple(x.shape)} {x.dtype} with targets "
                            f"{tuple(y.shape)} {y.dtype}: {type(exc).__name__}: {exc}") from None
