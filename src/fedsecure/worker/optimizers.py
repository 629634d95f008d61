"""Optimizers next to their parameters (`fedsecure.optim`): `MakeOptimizer` builds an allow-listed
optimizer (torch.optim's update rules, `fedsecure.worker.update_rules`) over stored tensors,
`OptimizerCall` runs its ``zero_grad`` or ``step``, and a step labels every parameter it wrote
with what it read (the gradients, the optimizer's state)."""

from __future__ import annotations

from typing import Any

from fedsecure.errors import OperationNotAllowed, ProtocolError
from fedsecure.wire import messages as m
from fedsecure.worker import execute as ex
from fedsecure.worker import labels as lb
from fedsecure.worker import update_rules
from fedsecure.worker.allowlist import OPTIMIZERS, optimizer_settings
from fedsecure.worker.guards import refuse_op
from fedsecure.worker.store import Entry, Sender, WorkerState

_IDS = ("params",)  # a parameter group's tensors: ids, not a setting
_NOT_A_MAP = "a parameter group must be a map"


def make_optimizer(state: WorkerState, msg: m.MakeOptimizer, sender: Sender) -> Any:
    known = OPTIMIZERS.get(msg.kind)
    if known is None:
        raise OperationNotAllowed(f"optimizer {msg.kind!r} is not on the allow-list", op=msg.kind)
    groups = []
    for group in msg.groups:
        if not isinstance(group, dict):
            raise ProtocolError(_NOT_A_MAP)
        settings = optimizer_settings(group, skip=_IDS)
        ids = group.get("params")
        if not isinstance(ids, list) or not all(type(i) is int for i in ids):
            raise ProtocolError("a parameter group needs a list of object ids")
        groups.append({"params": [state.tensor(i) for i in ids], **settings})
    nbytes = 2 * sum(p.numel() * p.element_size() for g in groups for p in g["params"])  # at most two moments
    state.admit(nbytes, what=f"the state of {msg.kind}")
    try:
        optimizer = update_rules.optimizer_class(known, [p for g in groups for p in g["params"]])(groups)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"cannot build {msg.kind}: {exc}") from exc
    state.objects[msg.optimizer_id] = Entry(optimizer, nbytes=nbytes)
    return None


def optimizer_call(state: WorkerState, msg: m.OptimizerCall, sender: Sender) -> Any:
    optimizer = state.entry(msg.optimizer_id).obj
    if not isinstance(optimizer, update_rules.Stepper):
        raise OperationNotAllowed(f"object {msg.optimizer_id:#x} is not an optimizer", op=msg.method)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if msg.method == "zero_grad":
        optimizer.zero_grad(set_to_none=True)
        return None
    if msg.method != "step":
        raise OperationNotAllowed(f"optimizer method {msg.method!r} is not allowed", op=msg.method)
    if len(msg.groups) != len(optimizer.param_groups):
        raise ProtocolError("one settings map per parameter group is required")
    updates = [_group_update(optimizer, group, settings)
               for group, settings in zip(optimizer.param_groups, msg.groups, strict=True)]
    for group, update in zip(optimizer.param_groups, updates, strict=True):  # all checked, then all applied
        group.update(update)  # schedulers change lr between steps
    grads = [p.grad for p in params if p.grad is not None]
    labels = lb.union(params) | lb.union(grads)
    refuse_op(state, labels, "optimizer step")
    try:
        optimizer.step()
    finally:  # the step wrote every parameter from its gradient and the optimizer's state
        ex.label_writes(params, labels)
    failure = ex.first_failure([*params, *grads])
    if failure:
        ex.mark_failed(params, failure)
    return None


def _group_update(optimizer: update_rules.Stepper, group: dict[str, Any], settings: Any) -> dict[str, Any]:
    """A group's settings for a step, checked: allowed names and values, each one this optimizer has
    (any other would be ignored), values it accepts."""
    if not isinstance(settings, dict):
        raise ProtocolError(_NOT_A_MAP)
    checked = optimizer_settings(settings, skip=_IDS)
    if unknown := sorted(set(checked) - set(group)):
        raise ProtocolError(f"{type(optimizer).__name__} has no setting(s) {unknown}")
    if isinstance(optimizer, update_rules.Optimizer):
        try:
            optimizer.check_group({**group, **checked})
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"{type(optimizer).__name__}: {exc}") from None
    return checked
