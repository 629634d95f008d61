"""`TorchHook`: adds the verbs ``send``, ``get``, ``move``, ``copy``, ``fix_precision``, ``tag`` and
``describe`` (with ``tags`` and ``description``) to torch.

It only adds names that torch does not have; it never replaces anything torch
defines, so every existing torch behaviour is unchanged. Without the hook the
same verbs are plain functions: ``fedsecure.send(x, worker)`` and friends.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from fedsecure.errors import OperationNotAllowed
from fedsecure.pointer.federated_data import federate
from fedsecure.pointer.inplace import get_, send_
from fedsecure.pointer.local import LocalWorker, local_worker
from fedsecure.pointer.module import copy_module, get_module, move_module, send_module
from fedsecure.pointer.shared import fix_precision
from fedsecure.pointer.tensor import PointerTensor, send_tensor
from fedsecure.worker.client import DESCRIPTION, TAGS, WorkerClient, describe, tag
from fedsecure.worker.virtual import Federation, default_federation


def send(obj: Any, worker: WorkerClient, *, private: bool = False, tags: Any = ()) -> Any:
    """Send a tensor (returns a pointer) or a model (returns the model, now remote)."""
    if isinstance(obj, nn.Module):
        return send_module(obj, worker, private=private)
    if isinstance(obj, torch.Tensor):
        return send_tensor(obj, worker, private=private, tags=tags)
    raise TypeError(f"send() takes a tensor or a torch.nn.Module, got {type(obj).__name__}")


def get(obj: Any) -> Any:
    """Fetch a pointer's value or a sent model's weights (the policy permitting)."""
    if isinstance(obj, PointerTensor):
        return obj.get()
    if isinstance(obj, nn.Module):
        return get_module(obj)
    if isinstance(obj, torch.Tensor):
        raise OperationNotAllowed("get() of a local tensor: it is already here", op="get")
    raise TypeError(f"get() takes a pointer or a sent model, got {type(obj).__name__}")


def move(obj: Any, worker: WorkerClient) -> Any:
    """Move a pointer's value or a sent model straight to ``worker`` (a local one is sent)."""
    if isinstance(obj, PointerTensor):
        return obj.move(worker)
    if isinstance(obj, nn.Module):
        from fedsecure.pointer.module import remote_of

        return send_module(obj, worker) if remote_of(obj) is None else move_module(obj, worker)
    if isinstance(obj, torch.Tensor):
        return send_tensor(obj, worker)
    raise TypeError(f"move() takes a tensor or a torch.nn.Module, got {type(obj).__name__}")


def copy(obj: Any) -> Any:
    """A copy: local objects are copied here, remote ones on their worker."""
    if isinstance(obj, PointerTensor):
        return obj.copy()
    if isinstance(obj, nn.Module):
        return copy_module(obj)
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone().requires_grad_(obj.requires_grad)
    raise TypeError(f"copy() takes a tensor or a torch.nn.Module, got {type(obj).__name__}")


def _tensor_send(
    self: torch.Tensor, worker: WorkerClient, *more: WorkerClient, private: bool = False, tags: Any = ()
) -> Any:
    """``t.send(bob)``: a pointer; ``t.send(bob, alice)``: a tuple of pointers, one per worker (PySyft
    returns one multi-pointer object there; its parts are these)."""
    if more:
        return tuple(send_tensor(self, w, private=private, tags=tags) for w in (worker, *more))
    return send_tensor(self, worker, private=private, tags=tags)


def _module_send(self: nn.Module, worker: WorkerClient, *, private: bool = False) -> nn.Module:
    return send_module(self, worker, private=private)


_VERBS: dict[type, dict[str, Any]] = {
    torch.Tensor: {
        "send": _tensor_send, "get": get, "move": move, "copy": copy, "fix_precision": fix_precision,
        "send_": send_, "get_": get_, "tag": tag, "describe": describe, "tags": TAGS,
        "description": DESCRIPTION,
    },
    nn.Module: {"send": _module_send, "get": get, "move": move, "copy": copy},
    Dataset: {"federate": federate},
}


class TorchHook:
    """``hook = fedsecure.TorchHook(torch)``: adds fedsecure's verbs to tensors and models.

    Calling it again is harmless. ``hook.federation`` is the in-process network
    the `VirtualWorker`s created with this hook join.
    """

    def __init__(self, torch_module: Any = torch, *, federation: Federation | None = None) -> None:
        if torch_module is not torch:
            raise TypeError("TorchHook expects the torch module: TorchHook(torch)")
        self.torch = torch_module
        self.federation = federation or default_federation
        for cls, verbs in _VERBS.items():
            for name, fn in verbs.items():
                existing = cls.__dict__.get(name)
                if existing is fn:
                    continue
                if hasattr(cls, name):
                    raise RuntimeError(
                        f"{cls.__qualname__}.{name} already exists; fedsecure never replaces torch "
                        f"behaviour. Use fedsecure.{name}(...) instead."
                    )
                setattr(cls, name, fn)

    @property
    def local_worker(self) -> LocalWorker:
        """This process, the model owner (id ``"me"``): the ``owner`` of every pointer."""
        return local_worker


def hook(torch_module: Any = torch) -> TorchHook:
    """Same as ``TorchHook(torch)``."""
    return TorchHook(torch_module)
