"""Custom models as graphs of allow-listed operations (torch.fx).

A custom ``nn.Module`` whose forward pass ``torch.fx`` can trace is described as
the list of its graph's nodes, its submodules (each described on its own: an
allow-listed layer, an ``nn.Sequential`` or another graph) and the shapes and
dtypes of the parameters and buffers registered on it directly. A worker checks
every node (names, references, targets on the allow-list) and rebuilds the model as a
`GraphModel`, which interprets the graph node by node (no code is generated or run from the
description), and whose calls are all the worker's own: Tensor methods
and Python operators run through the checked functions in `graph_ops`, everything
else is a callable from `fedsecure.worker.allowlist.ALLOWED`. Models that do
not trace, or whose graph leaves that set, are not described (weights only).

A graph spec::

    {"type": "Graph", "training": bool,
     "children": [[name, spec], ...],                 # in registration order
     "tensors": [[name, "parameter" | "buffer", shape, dtype], ...],
     "frozen": [parameter names that do not require gradients],
     "nodes": [[name, op, target, args, kwargs], ...]}

Nodes and their arguments are checked in `fedsecure.worker.graph_nodes`.
Containers that a graph reaches into (``nn.ModuleList``, ``nn.ModuleDict``, a
plain ``nn.Module``) have the same spec without ``nodes``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from fedsecure.errors import ProtocolError
from fedsecure.wire.codec import DTYPE_NAMES, parse_dtype
from fedsecure.worker.graph_nodes import (
    CONTAINERS,
    MAX_ARG_DEPTH,
    MAX_ITEMS,
    MAX_NODES,
    NotDescribable,
    attribute_name,
    decode_nodes,
    encode_nodes,
)

__all__ = ["GRAPH", "KINDS", "MAX_ARG_DEPTH", "MAX_DEPTH", "MAX_NODES", "GraphModel", "build", "describe"]

Spec = dict[str, Any]
Describe = Callable[[nn.Module], Spec | None]
Build = Callable[[Any, int], nn.Module]

GRAPH = "Graph"
KINDS = frozenset({GRAPH, *CONTAINERS})
MAX_DEPTH = 32  # nesting of modules in modules
MAX_ELEMENTS = 1 << 30  # elements of one tensor registered on a graph
_KEYS = {"type", "training", "children", "tensors", "frozen"}


# -- describe (the model owner's side) -------------------------------------------------


class _Tracer(fx.Tracer):
    """Traces one module's own forward: every submodule call stays a call (described on its own)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def describe(module: nn.Module, describe_module: Describe) -> Spec | None:
    """The graph of a custom module, or None if it does not trace into allow-listed parts."""
    if module._forward_hooks or module._forward_pre_hooks or _shares_parts(module):
        return None
    try:
        children = [[name, _child(child, describe_module)] for name, child in module.named_children()]
        spec = _own(module, children)
        if isinstance(module, GraphModel):  # a worker's own
            nodes = encode_nodes(module.graph, module)
        elif isinstance(module, fx.GraphModule):  # traced by hand
            if type(module.graph._codegen) is not fx.graph.CodeGen:
                return None
            nodes = encode_nodes(module.graph, module)
        else:
            nodes = _trace(module)
    except NotDescribable:
        return None
    return {"type": GRAPH, **spec, "nodes": nodes}


def _shares_parts(module: nn.Module) -> bool:
    # Both ends list every tensor once, in the same order: a part used twice would differ.
    return (
        len(list(module.named_modules(remove_duplicate=False))) != len(list(module.named_modules()))
        or len(list(module.named_parameters(remove_duplicate=False))) != len(list(module.parameters()))
        or len(list(module.named_buffers(remove_duplicate=False))) != len(list(module.buffers()))
    )


def _child(child: nn.Module, describe_module: Describe) -> Spec:
    spec = describe_module(child)
    if spec is not None:
        return spec
    kind = next((k for k, cls in CONTAINERS.items() if type(child) is cls), None)
    if kind is None or child._forward_hooks or child._forward_pre_hooks:
        raise NotDescribable
    children = [[name, _child(c, describe_module)] for name, c in child.named_children()]
    return {"type": kind, **_own(child, children)}


def _own(module: nn.Module, children: list[list[Any]]) -> Spec:
    tensors: list[list[Any]] = []
    for kind, table in (("parameter", module._parameters), ("buffer", module._buffers)):
        for name, t in table.items():
            if t is None or t.dtype not in DTYPE_NAMES:
                raise NotDescribable
            tensors.append([name, kind, list(t.shape), DTYPE_NAMES[t.dtype]])
    names = [n for n, _ in children] + [t[0] for t in tensors]
    if not all(attribute_name(n) for n in names):
        raise NotDescribable
    frozen = [n for n, p in module._parameters.items() if p is not None and not p.requires_grad]
    return {"training": module.training, "children": children, "tensors": tensors, "frozen": frozen}


def _trace(module: nn.Module) -> list[list[Any]]:
    """Trace in both modes: a forward that reads ``self.training`` would bake one in."""
    modes = {m: m.training for m in module.modules()}
    before = set(vars(module))
    try:
        traced = []
        for mode in (module.training, not module.training):
            for m in modes:  # the flags only: a model's own train() may do more
                m.training = mode
            graph = _Tracer().trace(module)
            traced.append(encode_nodes(graph, module))
    except NotDescribable:
        raise
    except Exception as exc:  # anything the tracer cannot follow: data-dependent control flow, ...
        raise NotDescribable from exc
    finally:
        for m, mode in modes.items():
            m.training = mode
        for name in set(vars(module)) - before:  # constants the tracer attached
            delattr(module, name)
    if traced[0] != traced[1]:
        raise NotDescribable
    return traced[0]


# -- build (the worker's side) ----------------------------------------------------------


class GraphModel(nn.Module):
    """A custom model a worker built from a graph description.

    Its forward pass interprets the checked graph node by node (`torch.fx.Interpreter`): no
    Python source is generated from the description and nothing is executed but the calls the
    checks allowed. (A ``torch.fx.GraphModule`` would compile generated source with ``exec``.)
    """

    graph: fx.Graph

    def __init__(self, graph: fx.Graph) -> None:
        super().__init__()
        object.__setattr__(self, "graph", graph)  # an attribute, not a submodule

    def forward(self, *args: Any) -> Any:
        return fx.Interpreter(self, garbage_collect_values=True, graph=self.graph).run(*args)


def build(spec: Spec, depth: int, build_module: Build, device: torch.device | None = None) -> nn.Module:
    """Rebuild a graph (or a container a graph reaches into) from a peer's description; its own
    tensors zeros on ``device`` (``build_module`` builds the layers in it)."""
    kind = spec.get("type")
    keys = _KEYS | {"nodes"} if kind == GRAPH else _KEYS
    if depth > MAX_DEPTH:
        raise ProtocolError(f"modules nested deeper than {MAX_DEPTH} levels")
    if set(spec) != keys:
        raise ProtocolError(f"a {kind} description has exactly the keys {sorted(keys)}, got {sorted(spec)}")
    root = CONTAINERS.get(str(kind), nn.Module)()
    _add_children(root, str(kind), spec["children"], depth, build_module)
    _add_tensors(root, spec["tensors"], spec["frozen"], device)
    if kind != GRAPH:
        root.training = bool(spec["training"])
        return root
    graph = decode_nodes(spec["nodes"], root)
    try:
        graph.lint()
    except (RuntimeError, ValueError, TypeError, AttributeError) as exc:
        raise ProtocolError(f"the graph does not form a valid model: {exc}") from exc
    module = GraphModel(graph)
    # The description's order of submodules and tensors: the weights message lists them in it.
    for attr in ("_modules", "_parameters", "_buffers"):
        object.__setattr__(module, attr, getattr(root, attr))
    module.training = bool(spec["training"])
    return module


def _add_children(root: nn.Module, kind: str, children: Any, depth: int, build_module: Build) -> None:
    if not isinstance(children, list) or len(children) > MAX_ITEMS:
        raise ProtocolError(f"{kind}: children must be a list of at most {MAX_ITEMS} [name, description] pairs")
    for i, item in enumerate(children):
        if not (isinstance(item, list | tuple) and len(item) == 2 and attribute_name(item[0])):
            raise ProtocolError(
                f"{kind}: child {i} must be [name, description] with an identifier as name "
                f"that no model attribute has, got {str(item)[:80]}"
            )
        name = item[0]
        if name in root._modules:
            raise ProtocolError(f"{kind}: two children are named {name!r}")
        if kind == "ModuleList" and name != str(i):
            raise ProtocolError(f"ModuleList: child {i} must be named {str(i)!r}, got {name!r}")
        root.add_module(name, build_module(item[1], depth + 1))


def _add_tensors(root: nn.Module, tensors: Any, frozen: Any, device: torch.device | None) -> None:
    if not isinstance(tensors, list) or len(tensors) > MAX_ITEMS:
        raise ProtocolError(f"tensors must be a list of at most {MAX_ITEMS} [name, kind, shape, dtype]")
    if not isinstance(frozen, list) or not all(isinstance(n, str) for n in frozen):
        raise ProtocolError("frozen must be a list of parameter names")
    for item in tensors:
        if not (isinstance(item, list | tuple) and len(item) == 4):
            raise ProtocolError(f"a tensor is described as [name, kind, shape, dtype], got {str(item)[:80]}")
        name, kind, shape, dtype_name = item
        if not attribute_name(name) or name in root._modules or hasattr(root, name):
            raise ProtocolError(f"tensor name {name!r} is not an identifier, or is taken")
        if kind not in ("parameter", "buffer"):
            raise ProtocolError(f"tensor {name!r}: kind must be 'parameter' or 'buffer', got {kind!r}")
        if not (isinstance(shape, list | tuple) and len(shape) <= 32 and all(type(d) is int and d >= 0 for d in shape)):
            raise ProtocolError(f"tensor {name!r}: shape must be a list of at most 32 sizes >= 0, got {shape!r}")
        numel = 1
        for d in shape:
            numel *= d
        if numel > MAX_ELEMENTS:
            raise ProtocolError(f"tensor {name!r} has {numel} elements, over the limit of {MAX_ELEMENTS}")
        value = torch.zeros(tuple(shape), dtype=parse_dtype(dtype_name), device=device)
        if kind == "buffer":
            root.register_buffer(name, value)
            continue
        trainable = name not in frozen
        if trainable and not (value.is_floating_point() or value.is_complex()):
            raise ProtocolError(f"parameter {name!r} of dtype {dtype_name} cannot require gradients")
        root.register_parameter(name, nn.Parameter(value, requires_grad=trainable))
    for name in frozen:
        if root._parameters.get(name) is None:
            raise ProtocolError(f"frozen names {name!r}, which is not a parameter of this module")


