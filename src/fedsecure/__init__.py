"""fedsecure: federated learning in which data never leaves its owner.

``import fedsecure as sy`` runs PySyft 0.2's tutorials: ``sy.TorchHook(torch)``,
``sy.VirtualWorker(hook, id="bob")``, ``tensor.send(bob)``, ``ptr.get()``,
``model.move(secure_worker)``; the workers enforce who may see what.
"""

import sys as _sys
import types as _types
from typing import TYPE_CHECKING

from fedsecure import optim
from fedsecure.errors import (
    FedsecureError,
    ObjectNotFound,
    OperationNotAllowed,
    PermissionDenied,
    ProtocolError,
    RemoteError,
    WorkerMismatch,
    WorkerUnavailable,
)
from fedsecure.pointer import (
    PointerTensor,
    SharedTensor,
    TorchHook,
    copy,
    fix_precision,
    get,
    hook,
    move,
    send,
)
from fedsecure.pointer import floptimizer as _floptimizer
from fedsecure.pointer.federated_data import BaseDataset, FederatedDataLoader, FederatedDataset
from fedsecure.pointer.inplace import get_, send_
from fedsecure.pointer.local import local_worker
from fedsecure.worker import Federation, Policy, VirtualWorker, WorkerClient

if TYPE_CHECKING:  # for type checkers; at run time see __getattr__ below
    from fedsecure.transport import TLS, AuthenticationFailed, WorkerProcess, connect

__version__ = "0.1.0"

# PySyft 0.2's module path for its per-worker optimizers: ``from fedsecure.federated.floptimizer
# import Optims`` (the class lives in the pointer layer).
federated = _types.ModuleType("fedsecure.federated", "PySyft 0.2's module path: federated.floptimizer.Optims")
federated.floptimizer = _floptimizer  # type: ignore[attr-defined]
_sys.modules.setdefault("fedsecure.federated", federated)
_sys.modules.setdefault("fedsecure.federated.floptimizer", _floptimizer)

# Loaded on first use: the network transport (gRPC, TLS), which one-process users never pay for,
# and the rest of PySyft 0.2's names (docs/pysyft.md).
_LAZY = {
    **dict.fromkeys(["TLS", "AuthenticationFailed", "WorkerProcess", "connect"], "fedsecure.transport"),
    **dict.fromkeys(["Plan", "func2plan"], "fedsecure.pointer.plan"),
    **dict.fromkeys(["create_sandbox", "PrivateGridNetwork"], "fedsecure.pointer.sandbox"),
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is not None:
        import importlib

        return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module 'fedsecure' has no attribute {name!r}")

__all__ = [
    "TLS",
    "AuthenticationFailed",
    "BaseDataset",
    "FederatedDataLoader",
    "FederatedDataset",
    "WorkerProcess",
    "connect",
    "FedsecureError",
    "Federation",
    "ObjectNotFound",
    "OperationNotAllowed",
    "PermissionDenied",
    "PointerTensor",
    "Policy",
    "ProtocolError",
    "RemoteError",
    "SharedTensor",
    "TorchHook",
    "VirtualWorker",
    "WorkerClient",
    "WorkerMismatch",
    "WorkerUnavailable",
    "copy",
    "fix_precision",
    "federated",
    "get",
    "get_",
    "hook",
    "local_worker",
    "move",
    "optim",
    "send",
    "send_",
]
