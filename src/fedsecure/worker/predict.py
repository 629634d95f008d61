"""Prediction on meta tensors: what a call will return (shapes, dtypes, views, bytes), computed from
its inputs' metadata before it runs (`fedsecure.worker.execute`, promise 2).

A meta tensor has a shape, strides and a dtype but no data, so whatever is computed on it cannot
depend on a value. An op whose result shape would (``nonzero``, ``unique``, ``x[x > 0]``) has no
meta result and is unpredictable; the guarded path refuses it on labelled inputs. Predictions are
cached by the inputs' metadata.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, NoReturn

import torch
from torch import nn

from fedsecure.errors import OperationNotAllowed
from fedsecure.worker import labels as lb

_MAX_CACHE = 4096


class Unpredictable(Exception):
    """The result's metadata cannot be computed from the inputs' metadata."""


def _signature(value: Any) -> Any:
    """A hashable key of ``value``'s metadata (tensors by shape, stride, dtype and grad flag)."""
    if isinstance(value, torch.Tensor):  # the common case first: this runs on every guarded call
        return (value.shape, value.stride(), value.dtype, value.requires_grad)
    kind = type(value)
    if kind is float:  # a float's value decides no shape or dtype (Adam's step sizes change every step)
        return kind
    if kind in _VALUED:
        return (kind, value)
    if kind is list or kind is tuple:  # tensors inline, as above (one call less each)
        return (kind, *[(v.shape, v.stride(), v.dtype, v.requires_grad) if isinstance(v, torch.Tensor)
                        else _signature(v) for v in value])
    if kind is dict:
        return ("D", *[(k, _signature(v)) for k, v in value.items()])
    if kind is slice:
        return ("S", _signature(value.start), _signature(value.stop), _signature(value.step))
    if value is Ellipsis or isinstance(value, torch.dtype):
        return value
    raise TypeError  # not cached: predicted every time


_VALUED = frozenset({int, bool, str, type(None)})


def _to_meta(value: Any, inputs: dict[int, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        meta = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta",
                                   requires_grad=value.requires_grad)
        inputs[id(meta)] = value
        return meta
    if isinstance(value, list | tuple):
        return type(value)(_to_meta(v, inputs) for v in value)
    if isinstance(value, dict):
        return {k: _to_meta(v, inputs) for k, v in value.items()}
    # a worker's tensors are on its CPU: a move there (``x.to("cpu")``) is, on meta, a move to meta
    if (type(value) is torch.device and value.type == "cpu") or (type(value) is str and value == "cpu"):
        return _META
    return value


_META = torch.device("meta")


class Spec:
    """What a call returns, by metadata: a tensor spec, a plain value, or a sequence of specs."""

    __slots__ = ("shape", "dtype", "requires_grad", "view", "input", "plain", "items")

    def __init__(self) -> None:
        self.shape: tuple[int, ...] = ()
        self.dtype: torch.dtype = torch.float32
        self.requires_grad = False
        self.view = False  # shares memory with an input: allocates nothing
        self.input = -1  # the position (in the call's tensor inputs) of an input returned as is
        self.plain: Any = None
        self.items: list[Spec] | None = None

    @property
    def nbytes(self) -> int:
        if self.items is not None:
            return sum(item.nbytes for item in self.items)
        if self.plain is not None or self.view or self.input >= 0:
            return 0
        numel = 1
        for n in self.shape:
            numel *= n
        return numel * self.dtype.itemsize


def _spec(out: Any, inputs: dict[int, torch.Tensor], order: dict[int, int]) -> Spec:
    spec = Spec()
    if isinstance(out, torch.Tensor):
        if out.device.type != "meta":
            raise Unpredictable
        spec.shape, spec.dtype, spec.requires_grad = tuple(out.shape), out.dtype, out.requires_grad
        spec.view = out._is_view()
        real = inputs.get(id(out))
        if real is not None:
            spec.input = order[id(real)]
        return spec
    if isinstance(out, list | tuple):
        spec.items = [_spec(o, inputs, order) for o in out]
        return spec
    if out is None or isinstance(out, int | float | bool | torch.Size):
        spec.plain = out if out is not None else ()
        return spec
    raise Unpredictable


_cache: dict[Any, Spec | None] = {}
_module_cache: weakref.WeakKeyDictionary[nn.Module, dict[Any, Spec | None]] = weakref.WeakKeyDictionary()


def predict(op: str, fn: Callable[..., Any], args: Any, kwargs: Any, tensors: list[torch.Tensor],
            grad_enabled: bool, module: nn.Module | None = None, *, cached: bool = True) -> Spec | None:
    """The metadata of ``fn(*args, **kwargs)`` computed on meta tensors; None when it cannot be
    predicted (a value-dependent shape, or no meta kernel). Cached by the inputs' metadata (float
    arguments by type only: ``cached=False`` checks the exact call, as a failure does)."""
    try:
        if not cached:
            raise TypeError
        key: Any = (op, _signature(args), _signature(kwargs) if kwargs else None, module is not None and module.training,
                    grad_enabled)
        cache = _cache if module is None else _module_cache.setdefault(module, {})
        if key in cache:
            return cache[key]
    except TypeError:
        key, cache = None, {}
    order = {id(t): i for i, t in enumerate(tensors)}
    inputs: dict[int, torch.Tensor] = {}
    try:
        with torch.set_grad_enabled(grad_enabled):
            spec: Spec | None = _run_on_meta(fn, args, kwargs, module, inputs, order)
    except Exception:
        spec = None
    if key is not None:
        if len(cache) >= _MAX_CACHE:
            cache.clear()
        cache[key] = spec
    return spec


def _run_on_meta(fn: Callable[..., Any], args: Any, kwargs: Any, module: nn.Module | None,
                 inputs: dict[int, torch.Tensor], order: dict[int, int]) -> Spec:
    meta_args, meta_kwargs = _to_meta(args, inputs), _to_meta(kwargs, inputs)
    if module is None:
        out = fn(*meta_args, **meta_kwargs)
    else:
        state = {name: _to_meta(t, inputs) for name, t in [*module.named_parameters(), *module.named_buffers()]}
        out = torch.func.functional_call(module, state, tuple(meta_args), meta_kwargs)
    return _spec(out, inputs, order)


def refuse_unpredictable(op: str, labels: lb.Labels, worker: str) -> NoReturn:
    raise OperationNotAllowed(
        f"{op} cannot run on {worker!r} on values derived from private data of {lb.owners(labels)}: the shape "
        "of its result would depend on those values (or cannot be computed from shapes alone), which would "
        "reveal them. Use a form with a fixed shape (e.g. a mask multiplied in, torch.where(c, a, b), "
        "sums instead of selections)",
        op=op,
    )


def placeholder(spec: Spec, tensors: list[torch.Tensor]) -> Any:
    """A result of the predicted metadata with no meaning: NaN for floating types, zero otherwise
    (an input returned in place is returned as it now is)."""
    if spec.items is not None:
        return tuple(placeholder(item, tensors) for item in spec.items)
    if spec.plain is not None:
        return None if spec.plain == () else spec.plain
    if spec.input >= 0:
        return tensors[spec.input]
    if spec.dtype.is_floating_point or spec.dtype.is_complex:
        out = torch.full(spec.shape, float("nan"), dtype=spec.dtype)
    else:
        out = torch.zeros(spec.shape, dtype=spec.dtype)
    if spec.requires_grad and (spec.dtype.is_floating_point or spec.dtype.is_complex):
        out.requires_grad_(True)
    return out
