"""``fedsecure.optim``: torch's optimizers, run by the worker that holds the parameters.

Plain ``torch.optim`` works on remote parameters too: every update becomes a few ops
on pointers. These drop-in classes (same names, same arguments) build the optimizer
on the worker instead, next to the parameters and their gradients, so that
``step()`` and ``zero_grad()`` are one message each, sent without waiting. On local
parameters they are exactly torch's classes.

The optimizer's state (momentum buffers, Adam's moments) lives on the worker and
is not visible in ``optimizer.state`` here. Learning-rate schedulers work: each
step sends the groups' current settings.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fedsecure.errors import OperationNotAllowed, WorkerMismatch
from fedsecure.pointer.tensor import PointerTensor
from fedsecure.wire import messages as m
from fedsecure.wire.ids import new_id
from fedsecure.worker.allowlist import OPTIMIZER_HYPERPARAMETERS
from fedsecure.worker.client import WorkerClient


class _RemoteOptimizer:
    """Mixed into a torch optimizer class: sends ``step``/``zero_grad`` to the worker."""

    param_groups: list[dict[str, Any]]
    state: Any
    _fs_worker: WorkerClient | None
    _fs_id: int
    _fs_params: list[tuple[PointerTensor, int]]

    def _fs_setup(self, kind: str) -> None:
        params = [p for group in self.param_groups for p in group["params"]]
        pointers = [p for p in params if isinstance(p, PointerTensor)]
        self._fs_worker = None
        if not pointers:
            return
        if len(pointers) != len(params):
            raise WorkerMismatch("an optimizer's parameters must be all local or all on one worker")
        worker = pointers[0].location
        if any(p.location is not worker for p in pointers):
            names = sorted({p.location.id for p in pointers})
            raise WorkerMismatch(f"an optimizer's parameters must live on one worker, not {names}")
        self.state.clear()  # Adagrad makes state eagerly; the worker's copy keeps its own
        self._fs_worker, self._fs_id = worker, new_id()
        self._fs_params = [(p, p.id_at_location) for p in pointers]
        groups = [
            {"params": [p.id_at_location for p in group["params"]], **_settings(group)}
            for group in self.param_groups
        ]
        worker.request(m.MakeOptimizer(self._fs_id, kind, groups))

    def _fs_check(self) -> WorkerClient:
        worker = self._fs_worker
        assert worker is not None
        for p, obj_id in self._fs_params:
            if not isinstance(p, PointerTensor) or p.location is not worker or p.id_at_location != obj_id:
                raise WorkerMismatch(
                    "a parameter moved (or came back with get()) after this optimizer was made on "
                    f"{worker.id!r}; its state lives there: make a new optimizer where the parameters "
                    "are now, or use torch.optim, whose state follows the parameters"
                )
        return worker

    def _fs_zero_grad(self) -> None:
        worker = self._fs_check()
        worker.defer(m.OptimizerCall(self._fs_id, "zero_grad", []))
        worker.grad_epoch += 1  # every parameter's .grad is now None

    def _fs_step(self, closure: Callable[[], Any] | None) -> None:
        if closure is not None:
            raise OperationNotAllowed("step(closure) is not supported on remote parameters", op="step")
        worker = self._fs_check()
        groups = [_settings(group) for group in self.param_groups]
        worker.defer(m.OptimizerCall(self._fs_id, "step", groups))

    def __del__(self) -> None:
        worker = self.__dict__.get("_fs_worker")
        if worker is not None:
            worker.release(self._fs_id)


def _settings(group: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key in OPTIMIZER_HYPERPARAMETERS & group.keys():
        value = group[key]
        if isinstance(value, torch.Tensor):
            value = value.item()
        out[key] = value
    return out


def _drop_in(base: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """``base`` with its step and zero_grad sent to the worker when parameters are remote."""

    def __init__(self: Any, params: Any, *args: Any, **kwargs: Any) -> None:
        base.__init__(self, params, *args, **kwargs)
        self._fs_setup(base.__name__)

    def step(self: Any, closure: Callable[[], Any] | None = None) -> Any:
        if self._fs_worker is None:
            return base.step(self, closure)
        return self._fs_step(closure)

    def zero_grad(self: Any, set_to_none: bool = True) -> None:
        if self._fs_worker is None:
            base.zero_grad(self, set_to_none)
        else:
            self._fs_zero_grad()

    return type(
        base.__name__,
        (_RemoteOptimizer, base),
        {
            "__init__": __init__,
            "step": step,
            "zero_grad": zero_grad,
            "__module__": "fedsecure.optim",
            "__doc__": f"torch.optim.{base.__name__}, run on the worker that holds the parameters.",
        },
    )


SGD = _drop_in(torch.optim.SGD)
Adam = _drop_in(torch.optim.Adam)
AdamW = _drop_in(torch.optim.AdamW)
Adagrad = _drop_in(torch.optim.Adagrad)
RMSprop = _drop_in(torch.optim.RMSprop)

__all__ = ["SGD", "Adagrad", "Adam", "AdamW", "RMSprop"]
