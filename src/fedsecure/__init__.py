"""fedsecure: federated learning in which data never leaves its owner.

``import fedsecure as sy`` runs PySyft 0.2's tutorials: ``sy.TorchHook(torch)``,
``sy.VirtualWorker(hook, id="bob")``, ``tensor.send(bob)``, ``ptr.get()``,
``model.move(secure_worker)``; the workers enforce who may see what.
"""

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
from fedsecure.pointer import PointerTensor, TorchHook, copy, get, hook, move, send
from fedsecure.transport import TLS, AuthenticationFailed, WorkerProcess, connect
from fedsecure.worker import Federation, Policy, VirtualWorker, WorkerClient

__version__ = "0.1.0"

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
    "TorchHook",
    "VirtualWorker",
    "WorkerClient",
    "WorkerMismatch",
    "WorkerUnavailable",
    "copy",
    "get",
    "hook",
    "move",
    "optim",
    "send",
]
