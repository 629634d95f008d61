"""Models on the wire: an architecture built only from allow-listed parts, plus weights.

A worker never runs model code it was sent. It builds the model itself from a
description naming layer types from the table below (exact types: a subclass
could override ``forward``) and their constructor arguments, or, for a custom
module that torch.fx traces into allow-listed operations, its graph (see
`fedsecure.worker.graphs`), then loads the weights. Models with other parts are
not described; they are sent as weights only and their forward pass runs op by
op on pointers (see fedsecure.pointer).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fedsecure.errors import OperationNotAllowed, ProtocolError
from fedsecure.worker import graphs


def _args(*names: str) -> Callable[[nn.Module], dict[str, Any]]:
    def extract(m: nn.Module) -> dict[str, Any]:
        return {n: getattr(m, n) for n in names}

    return extract


def _with_bias(*names: str) -> Callable[[nn.Module], dict[str, Any]]:
    base = _args(*names)

    def extract(m: nn.Module) -> dict[str, Any]:
        return {**base(m), "bias": getattr(m, "bias", None) is not None}

    return extract


_CONV = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")
_NORM = ("num_features", "eps", "momentum", "affine", "track_running_stats")

# layer type -> how to read its constructor arguments back from an instance
LAYERS: dict[str, tuple[type[nn.Module], Callable[[nn.Module], dict[str, Any]]]] = {
    "Linear": (nn.Linear, _with_bias("in_features", "out_features")),
    "Conv1d": (nn.Conv1d, _with_bias(*_CONV)),
    "Conv2d": (nn.Conv2d, _with_bias(*_CONV)),
    "MaxPool1d": (nn.MaxPool1d, _args("kernel_size", "stride", "padding", "dilation", "ceil_mode")),
    "MaxPool2d": (nn.MaxPool2d, _args("kernel_size", "stride", "padding", "dilation", "ceil_mode")),
    "AvgPool2d": (nn.AvgPool2d, _args("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")),
    "AdaptiveAvgPool2d": (nn.AdaptiveAvgPool2d, _args("output_size")),
    "BatchNorm1d": (nn.BatchNorm1d, _args(*_NORM)),
    "BatchNorm2d": (nn.BatchNorm2d, _args(*_NORM)),
    "LayerNorm": (nn.LayerNorm, _args("normalized_shape", "eps", "elementwise_affine")),
    "GroupNorm": (nn.GroupNorm, _args("num_groups", "num_channels", "eps", "affine")),
    "Embedding": (nn.Embedding, _args("num_embeddings", "embedding_dim", "padding_idx")),
    "Dropout": (nn.Dropout, _args("p")),
    "Dropout2d": (nn.Dropout2d, _args("p")),
    "Flatten": (nn.Flatten, _args("start_dim", "end_dim")),
    "ReLU": (nn.ReLU, lambda m: {}),  # in-place variants are built out of place
    "ReLU6": (nn.ReLU6, lambda m: {}),
    "LeakyReLU": (nn.LeakyReLU, _args("negative_slope")),
    "ELU": (nn.ELU, _args("alpha")),
    "GELU": (nn.GELU, _args("approximate")),
    "SiLU": (nn.SiLU, lambda m: {}),
    "Sigmoid": (nn.Sigmoid, lambda m: {}),
    "Tanh": (nn.Tanh, lambda m: {}),
    "Softplus": (nn.Softplus, _args("beta", "threshold")),
    "Softmax": (nn.Softmax, _args("dim")),
    "LogSoftmax": (nn.LogSoftmax, _args("dim")),
    "Identity": (nn.Identity, lambda m: {}),
    "Sequential": (nn.Sequential, lambda m: {}),
}
_TYPE_NAMES = {cls: name for name, (cls, _) in LAYERS.items()}
_ALLOCATING = frozenset(cls for cls, _ in LAYERS.values() if "device" in cls.__init__.__code__.co_varnames)
_SCALAR = (bool, int, float, str, type(None))
_SPEC_KEYS = {"type", "args", "children", "training", "frozen"}


def describe(module: nn.Module) -> dict[str, Any] | None:
    """The architecture of ``module``, or None if it uses parts outside the allow-list."""
    name = _TYPE_NAMES.get(type(module))
    if name is None:
        return graphs.describe(module, describe)
    if module._forward_hooks or module._forward_pre_hooks:
        return None
    children = []
    for child_name, child in module.named_children():
        spec = describe(child)
        if spec is None:
            return None
        children.append([child_name, spec])
    if name != "Sequential" and children:
        return None
    args = LAYERS[name][1](module)
    frozen = sorted(n for n, p in module._parameters.items() if p is not None and not p.requires_grad)
    return {
        "type": name,
        "args": args,
        "children": children,
        "training": module.training,
        "frozen": frozen,  # parameters that do not require gradients (a frozen layer)
    }


def _valid_arg(value: Any) -> bool:
    if isinstance(value, _SCALAR):
        return True
    return isinstance(value, tuple | list) and len(value) <= 8 and all(
        type(v) is int for v in value
    )


_META = torch.device("meta")


def _no_values() -> None:
    pass


def _zeros(module: nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters(recurse=False):
            p.zero_()


def _zero_initialised(cls: type[nn.Module], args: dict[str, Any], device: torch.device | None) -> nn.Module:
    """``cls(**args)`` with zeros for weights instead of random ones: a built module's weights are
    all overwritten by those that came with its description, and drawing them first took most of
    the time of building a model (`benchmarks/model_transfer.py`). Zeros, not the memory as
    allocated: that could hold what this process freed before, another owner's data. ``device``
    goes to the layers that make tensors (a layer without them takes no ``device``). On the meta
    device nothing is filled: there are no values."""
    if device is not None and cls in _ALLOCATING:
        args = {**args, "device": device}
    module = cls.__new__(cls)
    # found before the class's method; on the meta device there is nothing to fill
    module.__dict__["reset_parameters"] = _no_values if device == _META else lambda: _zeros(module)
    try:
        cls.__init__(module, **args)
    finally:
        module.__dict__.pop("reset_parameters", None)
    return module


def build(spec: Any, depth: int = 0, *, device: torch.device | None = None) -> nn.Module:
    """Build a module from a description received from a peer (validated here). Its weights are
    zeros, not drawn at random: `load_state` gives them the values that came with it. On the meta
    ``device`` they take no memory (`receive`)."""
    if isinstance(spec, dict) and spec.get("type") in graphs.KINDS:
        return graphs.build(spec, depth, lambda child, d: build(child, d, device=device), device)
    if depth > 32 or not isinstance(spec, dict) or set(spec) != _SPEC_KEYS:
        raise ProtocolError("malformed module description")
    kind, args, children = spec["type"], spec["args"], spec["children"]
    if kind not in LAYERS:
        raise OperationNotAllowed(f"layer type {kind!r} is not on the allow-list", op=str(kind))
    if not isinstance(args, dict) or not all(
        isinstance(k, str) and _valid_arg(v) for k, v in args.items()
    ):
        raise ProtocolError(f"malformed arguments for {kind}")
    if "device" in args:  # the receiver decides where its tensors live
        raise ProtocolError(f"{kind}: a model's description does not choose a device, got device={args['device']!r}")
    if not isinstance(children, list) or len(children) > 10_000:
        raise ProtocolError("malformed children")
    if kind != "Sequential" and children:
        raise ProtocolError(f"{kind} has no children")
    cls = LAYERS[kind][0]
    try:
        if kind == "Sequential":
            module: nn.Module = cls()
            for item in children:
                if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
                    raise ProtocolError("malformed child")
                if not item[0].isidentifier() and not item[0].isdigit():
                    raise ProtocolError(f"bad child name {item[0]!r}")
                module.add_module(item[0], build(item[1], depth + 1, device=device))
        else:
            module = _zero_initialised(cls, args, device)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"cannot build {kind}({args}): {exc}") from exc
    module.training = bool(spec["training"])  # children keep their own modes
    frozen = spec["frozen"]
    if not isinstance(frozen, list) or not all(
        isinstance(n, str) and module._parameters.get(n) is not None for n in frozen
    ):
        raise ProtocolError(f"malformed list of frozen parameters for {kind}")
    for n in frozen:
        module._parameters[n].requires_grad_(False)  # type: ignore[union-attr]
    return module


def state_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters then buffers, in a fixed order both ends agree on: ``named_parameters()`` then
    ``named_buffers()`` (names, order and a tensor shared by two modules listed once, as torch
    lists them), from one walk of the module tree instead of two: a round reads it about ten
    times per owner."""
    params: list[tuple[str, torch.Tensor]] = []
    buffers: list[tuple[str, torch.Tensor]] = []
    seen_params: set[int] = set()
    seen_buffers: set[int] = set()
    for prefix, sub in module.named_modules():
        dot = prefix + "." if prefix else ""
        for name, p in sub._parameters.items():
            if p is not None and id(p) not in seen_params:
                seen_params.add(id(p))
                params.append((dot + name, p))
        for name, b in sub._buffers.items():
            if b is not None and id(b) not in seen_buffers:
                seen_buffers.add(id(b))
                buffers.append((dot + name, b))
    return params + buffers


def load_state(module: nn.Module, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copy ``tensors`` into a freshly built module; return its own tensors in the same order."""
    own = [t for _, t in state_tensors(module)]
    _check_fit(own, tensors)
    with torch.no_grad():
        for mine, theirs in zip(own, tensors, strict=True):
            mine.copy_(theirs)
    return own


def receive(spec: Any, tensors: list[torch.Tensor]) -> tuple[nn.Module, list[torch.Tensor]]:
    """The module of a received description around the received ``tensors`` themselves, and its
    tensors in `state_tensors` order. Built on the meta device (no memory to allocate or fill;
    `benchmarks/model_transfer.py`: McMahan's CNN from its message 4.3 ms, 8.2 ms zero-filled and
    copied into), then each parameter and buffer becomes its tensor. Only for tensors that nothing
    else refers to: those just decoded from a message, or computed or copied for the module."""
    module, shared = on_meta(spec)
    if shared:
        module = _copied(module)
    # state_tensors' order: each submodule's parameters, then each submodule's buffers. No layer
    # on the allow-list keeps another reference to its tensors (tests/test_fx_models.py checks).
    subs = list(module.modules())
    slots: list[tuple[dict[str, Any], str, torch.Tensor]] = [
        *((sub._parameters, k, p) for sub in subs for k, p in sub._parameters.items() if p is not None),
        *((sub._buffers, k, b) for sub in subs for k, b in sub._buffers.items() if b is not None),
    ]
    _check_fit([t for _, _, t in slots], tensors)
    own: list[torch.Tensor] = []
    for (where, k, mine), theirs in zip(slots, tensors, strict=True):
        theirs = theirs.detach().contiguous()
        where[k] = nn.Parameter(theirs, requires_grad=mine.requires_grad) if isinstance(mine, nn.Parameter) else theirs
        own.append(where[k])
    return module, own


_SKELETONS: dict[str, nn.Module] = {}  # a description's text -> its module on the meta device, oldest first
_SKELETONS_MAX = 64
_skeletons_lock = threading.Lock()


def on_meta(spec: Any) -> tuple[nn.Module, bool]:
    """The module of a received description on the meta device (built, and so checked, with
    `build`), and whether it is shared: to be read only, or copied (`receive`) before anything in
    it changes. A description seen before is not built again: every owner of a round receives the
    same one twice (the model, then the trained model at the aggregator), and `build` spends most
    of its time in the layers' constructors (`benchmarks/model_transfer.py` measures both). Only
    trees of the allow-listed layers are kept, not traced graphs, and descriptions of up to 64 KB."""
    key = repr(spec)
    template = _SKELETONS.get(key)
    if template is not None:
        return template, True
    module = build(spec, device=_META)
    if len(key) > 65536 or not all(type(m) in _TYPE_NAMES for m in module.modules()):
        return module, False
    with _skeletons_lock:
        _SKELETONS[key] = module
        if len(_SKELETONS) > _SKELETONS_MAX:
            del _SKELETONS[next(iter(_SKELETONS))]
    return module, True


_CONTAINERS = (dict, set, list)  # a tuple: ``dict | set | list`` would be built anew for every item


def _copied(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s tree that shares none of its containers (parameters, buffers, hooks,
    children, a layer's lists): only the tensors and the immutable settings, which `receive`
    replaces or never changes."""
    copy = object.__new__(type(module))
    state = {k: v.copy() if isinstance(v, _CONTAINERS) else v for k, v in module.__dict__.items()}
    state["_modules"] = {k: None if c is None else _copied(c) for k, c in module._modules.items()}
    copy.__dict__.update(state)
    return copy


def _check_fit(own: list[torch.Tensor], tensors: list[torch.Tensor]) -> None:
    """Every received tensor fits its slot (all checked before any is used)."""
    if len(own) != len(tensors):
        raise ProtocolError(f"the module has {len(own)} tensors, the message {len(tensors)}")
    for mine, theirs in zip(own, tensors, strict=True):
        if mine.shape != theirs.shape or mine.dtype != theirs.dtype:
            raise ProtocolError(
                f"weight of shape {tuple(theirs.shape)} {theirs.dtype} does not fit {tuple(mine.shape)} {mine.dtype}"
            )
