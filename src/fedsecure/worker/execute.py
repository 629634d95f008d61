"""The one guarded execution path: every op, module call and backward pass on a worker.

Three promises hold for work on labelled inputs (values derived from private data), whatever the
model owner sends:

1. **Every write is labelled, on every exit path.** A call may write to its inputs (in-place ops,
   ``x[i] = v``, ``copy_`` inside a traced model, batch norm's running statistics, gradients
   accumulated by a backward pass that fails halfway). Whether the call returns, raises or is
   interrupted, everything it could have written carries the union of its inputs' labels before
   anyone can ask for it again (`label_writes`, called from a ``finally``).
2. **Metadata does not depend on values.** The result's shapes and dtypes are predicted on meta
   tensors (shapes and dtypes, no data) before the call runs. An op whose result shape would depend
   on the values (``x[x > 0]``, ``nonzero``, ``unique``, ``bincount``, ...) cannot be predicted and
   is refused on labelled inputs; the refusal itself depends on metadata only.
3. **Whether a call fails does not depend on values**, where the owners switched metrics off. An
   op that is valid for the inputs' metadata can still fail on their values (an out-of-range
   index or class label, a singular matrix, negative probabilities). Each such failure would be a
   one-bit answer about the data. When every owner of the inputs allows metrics, that bit is no
   more than a metric already reveals, and the error is reported at once (its text withheld).
   When some owner allows no metrics, the call succeeds as the prediction says: its results hold
   NaN (or zero for integers), carry the labels, and are marked *undefined*; releasing one later
   is refused by the release rules anyway, and where a rule would allow it, the refusal names the
   failed op instead of returning a meaningless value.

The same prediction gives the bytes a call will allocate, so a worker's memory quota is checked
before anything is allocated. How a call's metadata is predicted is `fedsecure.worker.predict`;
how its inputs are found and its results stored is `fedsecure.worker.ops`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from fedsecure.errors import FedsecureError, RemoteError
from fedsecure.worker import labels as lb
from fedsecure.worker.guards import refuse_op
from fedsecure.worker.predict import Spec, placeholder, predict, refuse_unpredictable
from fedsecure.worker.store import WorkerState

_FAILED = "_fedsecure_failed"
# Ops that read a value out as a Python number: the release rules govern them (checked before they
# run, so that how they fail on a value, NaN to int, cannot show where the rules would refuse anyway),
# and they have no meta form.
VALUE_READS = frozenset({"Tensor.item", "Tensor.tolist", "Tensor.__bool__", "Tensor.__int__", "Tensor.__float__",
                         "Tensor.__index__"})
# Ops run without a prediction: value reads, and ops that only write or read a gradient (guarded all the same).
UNPREDICTED = VALUE_READS | {"Tensor.backward", "Tensor.data.__set__", "Tensor.grad.__get__", "Tensor.grad.__set__"}
_marked = False  # whether any tensor in this process was ever marked undefined (a fast path when not)


def failed(t: Any) -> str | None:
    """The op whose failure on private data left ``t`` undefined, or None."""
    return getattr(t, _FAILED, None)


def mark_failed(tensors: Iterable[Any], op: str) -> None:
    global _marked
    _marked = True
    for t in tensors:
        if isinstance(t, torch.Tensor) and not failed(t):
            setattr(t, _FAILED, op)


def first_failure(tensors: Iterable[Any]) -> str | None:
    if not _marked:
        return None
    for t in tensors:
        reason = getattr(t, _FAILED, None)
        if reason:
            return reason  # type: ignore[no-any-return]
    return None


@functools.lru_cache(maxsize=1024)
def hides_failures(labels: lb.Labels) -> bool:
    """Failures on values are hidden when some owner of the inputs allows no metrics."""
    return bool(labels) and min(label.max_metric_numel for label in labels) < 1


def written(op: str, args: Any, tensors: list[torch.Tensor], versions: list[int]) -> list[torch.Tensor]:
    """What a failed call may have written: tensors whose version moved, and the target of an
    in-place op (``x[i] = v``, ``add_``, ``+=``), which may hold part of the result without a bump."""
    out = [t for t, v in zip(tensors, versions, strict=True) if t._version != v]
    name = op.rsplit(".", 1)[-1]
    inplace = name == "__setitem__" or (name.endswith("_") and not name.endswith("__")) or (
        name.startswith("__i") and name not in ("__int__", "__index__", "__invert__"))
    if inplace and args and isinstance(args[0], torch.Tensor) and not any(args[0] is t for t in out):
        out.append(args[0])
    return out


def label_writes(tensors: Iterable[torch.Tensor], labels: lb.Labels, modules: Iterable[nn.Module] = ()) -> None:
    """Label everything a call could have written: its tensor inputs, their gradients, and the
    state of the modules it ran (parameters, buffers such as running statistics, gradients)."""
    if not labels:
        return
    for t in tensors:
        lb.add_labels(t, labels)
        if t.is_leaf and t.grad is not None:
            lb.add_labels(t.grad, labels)
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            lb.add_labels(t, labels)
            if t.grad is not None:
                lb.add_labels(t.grad, labels)


# -- the path -----------------------------------------------------------------------------


def run(
    state: WorkerState,
    op: str,
    fn: Callable[..., Any],
    args: list[Any],
    kwargs: dict[str, Any],
    tensors: list[torch.Tensor],
    labels: lb.Labels,
    grad_enabled: bool,
    module: nn.Module | None = None,
) -> Any:
    """Run one op (or a module's forward) on ``state``'s worker: ``tensors`` are its tensor inputs
    (a module's own included), ``labels`` their union. Returns what ``fn`` returned, or, where a
    failure on private values must not show, a placeholder of the predicted metadata."""
    spec = None
    if labels or state._memory_quota is not None:  # the attribute, not the property: this runs on every op
        spec = _before(state, op, fn, args, kwargs, tensors, labels, grad_enabled, module)
    versions = [t._version for t in tensors]
    modules = [module] if module is not None else []
    try:
        if grad_enabled == torch.is_grad_enabled():
            result = fn(*args, **kwargs)
        else:
            with torch.set_grad_enabled(grad_enabled):
                result = fn(*args, **kwargs)
    except FedsecureError:
        label_writes(tensors, labels, modules)
        raise
    except Exception as exc:
        if spec is not None and hides_failures(labels):  # the exact call, floats and all
            spec = predict(op, fn, args, kwargs, tensors, grad_enabled, module, cached=False)
        if spec is None or not hides_failures(labels):
            label_writes(tensors, labels, modules)  # the failure shows anyway: label all it touched
            raise _failure(op, exc, labels, state.id) from None
        result = _undefined(op, spec, args, tensors, labels, versions)
    except BaseException:
        label_writes(tensors, labels, modules)
        raise
    # Whatever an op wrote to (in-place ops, out-of-place ops with side effects such as
    # batch_norm's running stats) now derives from all of its inputs.
    for t, v in zip(tensors, versions, strict=True):
        if t._version != v:
            lb.add_labels(t, labels)
    _record_inputs(result, tensors)
    if op == "F.batch_norm":  # writes running stats without bumping their versions
        label_writes(tensors, labels)
    if module is not None and module.training:  # so does a module's forward, to its buffers
        label_writes(list(module.buffers()), labels)
    if op == "Tensor.data.__set__":
        lb.merge(args[0], args[1])
    failure = first_failure(tensors)
    if failure:
        mark_failed(_tensors_in(result), failure)
    return result


def _before(
    state: WorkerState,
    op: str,
    fn: Callable[..., Any],
    args: list[Any],
    kwargs: dict[str, Any],
    tensors: list[torch.Tensor],
    labels: lb.Labels,
    grad_enabled: bool,
    module: nn.Module | None,
) -> Spec | None:
    """What is refused before a call on labelled inputs or under a memory quota runs: the rules
    against pointer ops, the release rules for a value read, a result whose metadata would depend
    on values, and a result over the quota. Returns the predicted result."""
    if labels:
        if state.policy.strict or lb.training_only(labels):
            refuse_op(state, labels, op)
        if op in VALUE_READS and tensors and tensors[0].numel() == 1:  # the release rules first
            lb.check_release(labels, tensors[0].numel(), scalar=tensors[0].dim() == 0, holder=state.id,
                             policy=state.policy, aggregate=False, what=f"the result of {op}")
    if op in UNPREDICTED:
        return None
    spec = predict(op, fn, args, kwargs, tensors, grad_enabled, module)
    if spec is None and labels:
        refuse_unpredictable(op, labels, state.id)
    if spec is not None and state._memory_quota is not None:
        state.admit(spec.nbytes, what=f"the result of {op}")
    return spec


def _failure(op: str, exc: Exception, labels: lb.Labels, worker: str) -> RemoteError:
    """The error reported for a call that failed where the failure may show."""
    detail = (
        f"{type(exc).__name__}: {exc}"
        if not labels  # not even the exception's type: it can differ with the values
        else f"details withheld: the inputs derive from private data of {lb.owners(labels)}"
    )
    return RemoteError(f"{op} failed on {worker!r}: {detail}", op=op, worker=worker)


def _undefined(op: str, spec: Spec, args: list[Any], tensors: list[torch.Tensor], labels: lb.Labels,
               versions: list[int]) -> Any:
    """The result of a call whose failure depends on private values that no owner lets out even as
    a metric: it must not show. The call "succeeds" as predicted; what it wrote and returned is
    undefined. Only what it may have written is labelled, as on success: labelling what it only
    read would itself show the failure."""
    changed = written(op, args, tensors, versions)
    label_writes(changed, labels)  # a module's buffers afterwards, as on success
    result = placeholder(spec, tensors)
    mark_failed([*changed, *_tensors_in(result)], op)
    return result


def _tensors_in(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, tuple | list):
        return [t for v in value for t in _tensors_in(v)]
    return []


# -- backward passes ------------------------------------------------------------------------

_INPUT_CELLS = "fedsecure_inputs"


def _record_inputs(result: Any, tensors: list[torch.Tensor]) -> None:
    """Remember, on the autograd node that made ``result``, the label cells of its inputs.

    A backward pass recomputes with the tensors saved in the forward pass; if private
    data was written into one of them since (through ``.data``, which autograd does not
    see), the gradients depend on it. The cells are read again at backward time.
    """
    if isinstance(result, torch.Tensor):
        node = result.grad_fn
        if node is not None:
            node.metadata[_INPUT_CELLS] = lb.cells(tensors)  # type: ignore[index]
    elif isinstance(result, tuple | list):
        for r in result:
            _record_inputs(r, tensors)


def _graph(root: torch.Tensor) -> tuple[list[torch.Tensor], lb.Labels]:
    """The leaves whose ``.grad`` a backward pass from ``root`` writes, and the current
    labels of every tensor the pass reads."""
    fn = root.grad_fn
    if fn is None:
        return ([root] if root.requires_grad else []), lb.labels_of(root)
    leaves: list[torch.Tensor] = []
    labels = lb.labels_of(root)
    seen, stack = {fn}, [fn]
    while stack:
        node = stack.pop()
        variable = getattr(node, "variable", None)
        if variable is not None:
            leaves.append(variable)
            labels = labels | lb.labels_of(variable)
        recorded = node.metadata.get(_INPUT_CELLS)  # type: ignore[attr-defined]
        if recorded:
            labels = labels | lb.union_cells(recorded)
        for nxt, _ in node.next_functions:
            if nxt is not None and nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return leaves, labels


def backward(
    loss: torch.Tensor,
    gradient: torch.Tensor | None = None,
    retain_graph: bool | None = None,
    create_graph: bool = False,
    inputs: Any = None,
) -> None:
    """``loss.backward()``, then label every gradient it wrote with the labels of
    everything the backward pass read (the op ``Tensor.backward`` runs this on the path)."""
    leaves, labels = _graph(loss)
    if gradient is not None:
        labels = labels | lb.labels_of(gradient)
    try:
        loss.backward(gradient, retain_graph, create_graph, inputs)
    finally:  # a pass that fails halfway has accumulated some gradients already
        if labels:
            for leaf in leaves:
                if leaf.grad is not None:
                    lb.add_labels(leaf.grad, labels)
