"""Layer 3: pointers to tensors and models on workers, and the torch hook."""

from fedsecure.pointer.hook import TorchHook, copy, get, hook, move, send
from fedsecure.pointer.module import aggregate as _aggregate
from fedsecure.pointer.shared import SharedTensor, fix_precision
from fedsecure.pointer.tensor import PointerTensor
from fedsecure.worker.client import register_pointer_factory


class _Factory:
    tensor = staticmethod(PointerTensor._from_meta)
    aggregate = staticmethod(_aggregate)


register_pointer_factory(_Factory())

__all__ = ["PointerTensor", "SharedTensor", "TorchHook", "copy", "fix_precision", "get", "hook", "move", "send"]
