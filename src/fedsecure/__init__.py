"""fedsecure: federated learning in which data never leaves its owner.

``import fedsecure as sy`` runs PySyft 0.2's tutorials: ``sy.TorchHook(torch)``,
``sy.VirtualWorker(hook, id="bob")``, ``tensor.send(bob)``, ``ptr.get()``,
``model.move(secure_worker)``; the workers enforce who may see what.
"""

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
from fedsecure.worker import Federation, Policy, VirtualWorker, WorkerClient

if TYPE_CHECKING:  # for type checkers; at run time see __getattr__ below
    from fedsecure.transport import TLS, AuthenticationFailed, WorkerProcess, connect

__version__ = "0.1.0"

# The network transport (gRPC, TLS) loads on first use: one-process users never pay for it.
_TRANSPORT = {"TLS", "AuthenticationFailed", "WorkerProcess", "connect"}


def __getattr__(name: str) -> object:
    if name in _TRANSPORT:
        from fedsecure import transport

        return getattr(transport, name)
    raise AttributeError(f"module 'fedsecure' has no attribute {name!r}")

__all__ = [
    "TLS",
    "AuthenticationFailed",
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
    "get",
    "hook",
    "move",
    "optim",
    "send",
]
