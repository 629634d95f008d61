"""Pointers to pointers (``t.send(bob).send(alice)``): ops along the chain, and ``remote_get``.

As in PySyft, the model owner holds a pointer to a pointer held by the worker in the middle
(alice) to the value at the end of the chain (bob).
"""

from __future__ import annotations

from typing import Any

from fedsecure.errors import OperationNotAllowed, WorkerMismatch
from fedsecure.worker.client import WorkerClient


def chain_call(func: Any, op: str, args: Any, kwargs: dict[str, Any], pointer_type: type[Any]) -> Any:
    """An op on pointers to pointers (``x + x``), as PySyft runs it: the op runs on the worker at
    the end of the chains (bob), and the result is again a pointer held by the worker the operands
    point through (alice). The operands must all be chains through the same worker; the result of
    an in-place op is the operand itself. ``pointer_type``: the class of pointers."""
    through: list[WorkerClient] = []
    outer: dict[int, Any] = {}

    def strip(value: Any) -> Any:
        if isinstance(value, pointer_type):
            child = value._fs_child
            if child is None or (through and value._fs.worker is not through[0]):
                raise WorkerMismatch(
                    f"{op}: combines a pointer to a pointer with a pointer along another path; both "
                    "must point through the same worker (send both the same way, or get() one level)"
                )
            through[:1] = [value._fs.worker]
            outer[id(child)] = value
            return child
        if isinstance(value, list | tuple):
            return type(value)(strip(v) for v in value)
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items()}
        return value

    def wrap(value: Any) -> Any:
        if isinstance(value, pointer_type):
            same = outer.get(id(value))
            return same if same is not None else value.send(through[0])
        if isinstance(value, tuple):
            return tuple(wrap(v) for v in value)
        return value

    return wrap(func(*strip(list(args)), **strip(kwargs)))


def remote_get(ptr: Any) -> Any:
    """The worker in the middle of ``ptr``'s chain takes the value from the end of it (straight,
    worker to worker); ``ptr`` then points to the value there. Returns ``ptr``."""
    child = ptr._fs_child
    if child is None:
        raise OperationNotAllowed(
            "remote_get() is for a pointer to a pointer; this pointer's value is already on "
            f"{ptr._fs.worker.id!r} (get() fetches it here)",
            op="remote_get",
        )
    if child._fs_child is not None:
        remote_get(child)
    middle = ptr._fs.worker
    child.move(middle)
    middle.release(ptr._fs.id)  # the middle's record of the chain
    ptr._fs.id, ptr._fs_child = child._fs.id, None
    child._fs.live = False  # the value is this pointer's now
    return ptr
