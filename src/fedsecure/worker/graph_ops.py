"""The calls a graph model may make, and the checked functions a worker runs for them.

A graph node names its call by a string: an op from the allow-list (``torch.relu``,
``F.max_pool2d``), a Tensor method (``flatten``, ``view``), one of the Python
operators below (``operator.add``), or ``getattr`` of a tensor attribute from
`ATTRIBUTES`. Traced code applies operators and methods to whatever a node
produced, so a worker runs them through small checks: methods only on tensors,
operators on tensors, numbers or short tuples (``x.shape[:2] + (4,)``), never on
values that could grow without bound (``"a" * 10**12``).

Left out of graphs although allowed op by op: ``backward`` (gradients written
inside a forward pass would escape the worker's labels) and property setters
(``Tensor.grad.__set__``, ``Tensor.data.__set__``).
"""

from __future__ import annotations

import builtins
import operator
from collections.abc import Callable
from typing import Any

import torch

from fedsecure.errors import OperationNotAllowed
from fedsecure.worker.allowlist import ALLOWED, NAME_OF

OPERATORS = "add sub mul truediv floordiv mod pow matmul neg pos abs invert and_ or_ xor getitem eq ne lt le gt ge"
ATTRIBUTES = frozenset({"shape", "dtype", "ndim", "T", "mT"})
GRAPH_METHODS = ("size", "dim", "numel")  # shape queries: answered locally op by op, needed in graphs
_EXCLUDED = frozenset({"Tensor.backward"})
_ANY_OPERANDS = frozenset({"getitem", "eq", "ne", "lt", "le", "gt", "ge"})  # cannot grow a value
_MAX_INT = 1 << 64
_MAX_SEQUENCE = 1024

FUNCTIONS: dict[str, Callable[..., Any]] = {
    name: fn for name, fn in ALLOWED.items() if name not in _EXCLUDED and name.count(".") == 1
}
"""call_function targets from the allow-list: op name -> callable."""


def _plain_operands(name: str, args: tuple[Any, ...]) -> None:
    if name in _ANY_OPERANDS:
        return
    if all(isinstance(a, int | float) for a in args):
        if any(isinstance(a, int) and abs(a) > _MAX_INT for a in args):
            raise OperationNotAllowed(f"operator.{name}: integers in a graph stay below 2**64", op=name)
        if name == "pow" and isinstance(args[1], int) and abs(args[1]) > 64:
            raise OperationNotAllowed("operator.pow: integer exponents in a graph stay within 64", op=name)
        return
    sequences = [a for a in args if isinstance(a, tuple | list)]
    if name == "add" and len(sequences) == 2 and len(args[0]) + len(args[1]) <= _MAX_SEQUENCE:
        return
    if name == "mul" and len(sequences) == 1 and any(type(a) is int for a in args):
        count = next(a for a in args if type(a) is int)
        if len(sequences[0]) * count <= _MAX_SEQUENCE:
            return
    kinds = ", ".join(type(a).__name__ for a in args)
    raise OperationNotAllowed(
        f"operator.{name} of ({kinds}): graph operators take tensors, numbers, or tuples of at most "
        f"{_MAX_SEQUENCE} items",
        op=f"operator.{name}",
    )


def _operator(name: str) -> Callable[..., Any]:
    fn = getattr(operator, name)

    def run(*args: Any) -> Any:
        if any(isinstance(a, torch.Tensor) for a in args):
            return fn(*args)
        _plain_operands(name, args)
        result = fn(*args)
        if type(result) is int and abs(result) > _MAX_INT:
            raise OperationNotAllowed(f"operator.{name}: integers in a graph stay below 2**64", op=name)
        return result

    run.__name__ = run.__qualname__ = f"checked_{name.rstrip('_')}"
    return run


def _method(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(self, torch.Tensor):
            raise OperationNotAllowed(
                f"method {name!r} called on a {type(self).__name__}: graph methods are Tensor methods",
                op=f"Tensor.{name}",
            )
        return fn(self, *args, **kwargs)

    run.__name__ = run.__qualname__ = f"tensor_{name.strip('_')}"
    return run


def tensor_attribute(obj: Any, name: str) -> Any:
    """``x.shape`` and friends in traced code."""
    if not isinstance(obj, torch.Tensor) or name not in ATTRIBUTES:
        raise OperationNotAllowed(
            f"attribute {name!r} of a {type(obj).__name__}: graphs read only {sorted(ATTRIBUTES)} of tensors",
            op="getattr",
        )
    return getattr(obj, name)


_RAW_OPERATORS = {f"operator.{n}": getattr(operator, n) for n in OPERATORS.split()}
_CHECKED_OPERATORS = {f"operator.{n}": _operator(n) for n in OPERATORS.split()}
METHODS: dict[str, Callable[..., Any]] = {
    name[len("Tensor."):]: _method(name[len("Tensor."):], fn)
    for name, fn in FUNCTIONS.items()
    if name.startswith("Tensor.")
}
METHODS.update({n: _method(n, getattr(torch.Tensor, n)) for n in GRAPH_METHODS})
"""call_method targets: Tensor method name -> the checked function a worker runs."""

_SPEC_OF: dict[Any, tuple[str, str]] = {}
for _name, _fn in _RAW_OPERATORS.items():
    _SPEC_OF[_fn] = ("call_function", _name)
for _name, _fn in _CHECKED_OPERATORS.items():
    _SPEC_OF[_fn] = ("call_function", _name)
for _name, _fn in METHODS.items():
    _SPEC_OF[_fn] = ("call_method", _name)
_SPEC_OF[builtins.getattr] = _SPEC_OF[tensor_attribute] = ("call_function", "getattr")


def spec_of(op: str, target: Any) -> tuple[str, str] | None:
    """How a traced (or worker-built) node's call is named in a spec; None if it is not allowed."""
    if op == "call_method":
        return (op, target) if isinstance(target, str) and target in METHODS else None
    try:
        known = _SPEC_OF.get(target)
        name = NAME_OF.get(target)
    except TypeError:  # unhashable
        return None
    if known is not None:
        return known
    return ("call_function", name) if name in FUNCTIONS else None


def runtime(op: str, target: Any) -> Callable[..., Any] | None:
    """The function a worker runs for a node's call (None: not allowed)."""
    if not isinstance(target, str):
        return None
    if op == "call_method":
        return METHODS.get(target)
    if op != "call_function":
        return None
    if target == "getattr":
        return tensor_attribute
    return _CHECKED_OPERATORS.get(target) or FUNCTIONS.get(target)


def check_static(node: str, target: str, args: tuple[Any, ...]) -> None:
    """Checks a worker can make before running anything."""
    if target == "getattr" and not (len(args) == 2 and isinstance(args[1], str) and args[1] in ATTRIBUTES):
        raise OperationNotAllowed(
            f"graph node {node!r}: getattr takes a node and one of {sorted(ATTRIBUTES)}, got {str(args)[:80]}",
            op="getattr",
        )
