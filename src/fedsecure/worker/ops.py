"""Pointer ops: `Call` (one allow-listed op) and `CallModule` (a stored model's forward pass).

Both find their inputs here (`Ref`s become stored tensors), run on the one guarded path
(`fedsecure.worker.execute.run`), and store what comes back: a tensor result under the id the
caller chose, with its inputs' labels; a plain value only where the release rules let it leave.
"""

from __future__ import annotations

from typing import Any

import torch

from fedsecure.errors import OperationNotAllowed
from fedsecure.wire import messages as m
from fedsecure.wire.codec import Ref
from fedsecure.wire.ids import new_id
from fedsecure.worker import execute as ex
from fedsecure.worker import labels as lb
from fedsecure.worker.allowlist import ALLOWED
from fedsecure.worker.guards import refuse_op, refuse_undefined
from fedsecure.worker.modules import state_tensors
from fedsecure.worker.store import Entry, Sender, WorkerState, meta

_PLAIN = frozenset({int, float, bool, str, type(None)})
# Allowed ops whose result shares memory with an input without being a view
# (views say so themselves: Tensor._is_view()). Ops returning an input itself
# (x.float() of a float tensor) are caught as in-place results.
_ALIASING = frozenset({"Tensor.detach", "torch.detach", "Tensor.data.__get__"})


def call(state: WorkerState, msg: m.Call, sender: Sender) -> Any:
    fn = ALLOWED.get(msg.op)
    if fn is None:
        raise OperationNotAllowed(
            f"operation {msg.op!r} is not on {state.id!r}'s allow-list "
            "(see docs/allowlist.md)",
            op=msg.op,
        )
    if "out" in msg.kwargs:
        raise OperationNotAllowed(f"{msg.op}: the out= argument is not supported", op=msg.op)
    tensors: list[torch.Tensor] = []
    ids: dict[int, int] = {}
    args = resolve(state, msg.args, tensors, ids)
    kwargs = resolve(state, msg.kwargs, tensors, ids)
    if msg.op == "Tensor.backward":
        fn = ex.backward
    labels = lb.union(tensors)
    result = ex.run(state, msg.op, fn, args, kwargs, tensors, labels, msg.grad_enabled)
    return outputs(state, result, msg.op, tensors, ids, labels, msg.result_id)


def call_module(state: WorkerState, msg: m.CallModule, sender: Sender) -> Any:
    _, module = state.module(msg.module_id)
    tensors: list[torch.Tensor] = []
    ids: dict[int, int] = {}
    args = resolve(state, msg.args, tensors, ids)
    kwargs = resolve(state, msg.kwargs, tensors, ids)
    tensors.extend(t for _, t in state_tensors(module))
    labels = lb.union(tensors)
    refuse_op(state, labels, "model.forward")  # before train() changes anything
    if module.training != msg.training:
        module.train(msg.training)
    result = ex.run(state, "model.forward", module, args, kwargs, tensors, labels, msg.grad_enabled, module)
    return outputs(state, result, "model.forward", tensors, ids, labels, msg.result_id)


def resolve(state: WorkerState, value: Any, tensors: list[torch.Tensor], ids: dict[int, int]) -> Any:
    """Replace `Ref`s by stored tensors, collecting every tensor input."""
    kind = type(value)
    if kind in _PLAIN:
        return value
    if kind is Ref:
        t = state.tensor(value.id)
        tensors.append(t)
        ids[id(t)] = value.id
        return t
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return value
    if isinstance(value, list):
        return [resolve(state, v, tensors, ids) for v in value]
    if isinstance(value, tuple):
        return tuple(resolve(state, v, tensors, ids) for v in value)
    if isinstance(value, dict):
        return {k: resolve(state, v, tensors, ids) for k, v in value.items()}
    return value


def outputs(
    state: WorkerState,
    result: Any,
    op: str,
    tensors: list[torch.Tensor],
    ids: dict[int, int],
    labels: lb.Labels,
    result_id: int | None,
) -> Any:
    """What the caller gets back: a stored tensor's metadata, a plain value under the release
    rules, or a tuple of those."""
    if isinstance(result, torch.Tensor):
        if result.device.type not in ("cpu", "cuda") or result.layout != torch.strided:
            raise OperationNotAllowed(
                f"{op} produced a {result.device.type} {result.layout} tensor; workers hold "
                "dense tensors on their own devices",
                op=op,
            )
        known = ids.get(id(result))
        if known is not None and any(result is t for t in tensors):
            return meta(known, result)  # in place: the caller's pointer stays valid
        if result._is_view() or op in _ALIASING:  # shares an input's memory
            ptr = result.untyped_storage().data_ptr() if result.numel() else 0
            source = next(
                (t for t in tensors if ptr and t.numel() and t.untyped_storage().data_ptr() == ptr),
                None,
            )
            if source is not None:
                lb.share_cell(result, source)
        lb.add_labels(result, labels)
        obj_id = result_id if result_id is not None else new_id()
        state.objects[obj_id] = Entry(result)
        return meta(obj_id, result)
    if result is None:
        return None
    if _plain(result):
        lb.check_release(
            labels,
            _count_scalars(result),
            scalar=not isinstance(result, list | tuple),
            holder=state.id,
            policy=state.policy,
            aggregate=False,
            what=f"the result of {op}",
        )
        refuse_undefined(ex.first_failure(tensors), f"the result of {op}", state.id)
        return result
    if isinstance(result, tuple | list):  # several tensors (split, max(dim), ...)
        return tuple(
            outputs(state, r, op, tensors, ids, labels, result_id if i == 0 else None)
            for i, r in enumerate(result)
        )
    raise OperationNotAllowed(
        f"{op} returned a {type(result).__name__}, which cannot leave a worker", op=op
    )


def _count_scalars(value: Any) -> int:
    if isinstance(value, list | tuple):
        return sum(_count_scalars(v) for v in value)
    return 1


def _plain(value: Any) -> bool:
    if isinstance(value, bool | int | float):
        return True
    return isinstance(value, list | tuple) and all(_plain(v) for v in value)
