"""Local tensors that become pointers in place, and back: ``send_``, ``get_``, and a model's parameters.

PySyft moves a model's parameters in place: after ``model.send(bob)`` the *same* `nn.Parameter`
objects point to bob's copies, so an optimizer built before the send steps the remote weights, and
after ``model.get()`` the same objects hold the values again. fedsecure does the same by changing
the object's class (Python allows it between classes of one memory layout): a `nn.Parameter`
becomes a `PointerParameter` (a `PointerTensor` that is still a `nn.Parameter`), a plain tensor a
`PointerTensor`. While remote, the local storage is released: the object keeps only its shape, dtype
and ``requires_grad`` (on a one-element placeholder), so every torch call on it goes to the worker
through `PointerTensor.__torch_function__`, as for any pointer.

Only `torch.Tensor` and `nn.Parameter` objects convert; a tensor of another subclass is refused with
an error that says to send a plain copy.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch._C import DisableTorchFunctionSubclass

from fedsecure.errors import OperationNotAllowed
from fedsecure.pointer.tensor import PointerTensor, _Remote, send_tensor
from fedsecure.worker.client import WorkerClient


class PointerParameter(PointerTensor, nn.Parameter):
    """A model's parameter while the model is on a worker: the same object, now a pointer."""


_CONVERTIBLE: dict[type, type] = {nn.Parameter: PointerParameter, torch.Tensor: PointerTensor}
_FIELDS = ("_fs", "_fs_owners", "_fs_child", "_fs_grad", "_fs_local")


def convertible(t: torch.Tensor) -> bool:
    return type(t) in _CONVERTIBLE


def _require_convertible(t: torch.Tensor) -> type:
    cls = type(t)
    if cls not in _CONVERTIBLE:
        raise OperationNotAllowed(
            f"a {cls.__name__} cannot become a pointer in place (only torch.Tensor and nn.Parameter "
            "can); send a plain copy: torch.Tensor(t).send(worker)",
            op="send_",
        )
    return cls


def become_pointer(t: torch.Tensor, worker: WorkerClient, obj_id: int, owners: list[str]) -> PointerTensor:
    """Make the local tensor ``t`` a pointer to object ``obj_id`` on ``worker`` (its value is there)."""
    cls = _require_convertible(t)
    with torch.no_grad():
        t.grad = None  # a local gradient would go stale: the remote value is the one that changes
        # the storage goes; shape, dtype and requires_grad stay, on a one-element placeholder
        t.data = torch.zeros((), dtype=t.dtype).expand(t.shape)
    t.__class__ = _CONVERTIBLE[cls]
    t.__dict__.update(_fs=_Remote(worker, obj_id), _fs_owners=list(owners), _fs_child=None, _fs_grad=None,
                      _fs_local=cls)
    return t  # type: ignore[return-value]


def in_place(ptr: PointerTensor) -> bool:
    """Whether ``ptr`` was a local tensor made a pointer in place (so ``get_`` can restore it)."""
    return "_fs_local" in ptr.__dict__


def become_local(ptr: PointerTensor, value: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
    """Make the in-place pointer ``ptr`` the local tensor it was, holding ``value`` (and ``grad``).

    The worker has deleted its copy; the id is released so that no later request names it.
    """
    remote = ptr._fs
    if remote.live:
        remote.live = False
        remote.worker.release(remote.id)
    cls = ptr.__dict__["_fs_local"]
    for name in _FIELDS:
        ptr.__dict__.pop(name, None)
    t: torch.Tensor = ptr
    t.__class__ = cls
    with torch.no_grad():
        t.data = value
    if t.requires_grad:
        t.grad = grad
    return t


def send_(t: torch.Tensor, worker: WorkerClient) -> PointerTensor:
    """``t.send_(worker)``: send ``t`` and make ``t`` itself the pointer (PySyft's in-place send)."""
    if isinstance(t, PointerTensor):
        raise OperationNotAllowed("send_() of a pointer: it is already remote; use ptr.move(worker)", op="send_")
    _require_convertible(t)  # before anything is sent
    ptr = send_tensor(t, worker)
    remote = ptr._fs
    owners = ptr._fs_owners
    remote.live = False  # the id now belongs to t; the temporary pointer must not free it
    return become_pointer(t, worker, remote.id, owners)


def get_(ptr: Any) -> torch.Tensor:
    """``ptr.get_()``: fetch the value into this very object (a tensor sent with ``send_``, or a sent
    model's parameter). A pointer made on the worker (an op's result) has no local object to
    return to: ``x = x.get()`` is the way there."""
    if not isinstance(ptr, PointerTensor):
        raise OperationNotAllowed("get_() of a local tensor: it is already here", op="get_")
    if not in_place(ptr):
        raise OperationNotAllowed(
            "get_() restores a tensor that was sent in place (t.send_(worker), or a model's parameter); "
            "this pointer was made on the worker, so fetch a new tensor instead: x = x.get()",
            op="get_",
        )
    value = PointerTensor.get(ptr)  # releases the remote copy, checked by the worker's policy
    if not isinstance(value, torch.Tensor) or isinstance(value, PointerTensor):
        raise OperationNotAllowed("get_() of a pointer to a pointer: get() it one level at a time", op="get_")
    with DisableTorchFunctionSubclass():
        grad = value.grad
    return become_local(ptr, value.detach(), grad)
