"""The nodes of a graph model: encoded by the model owner, checked and decoded by a worker.

A node is ``[name, op, target, args, kwargs]`` (see `fedsecure.worker.graphs`). Arguments are
plain values (None, bool, int, float, str, tuples, lists, Ellipsis, torch dtypes and memory
formats), ``{"node": name}`` (an earlier node's value), ``{"slice": [start, stop, step]}`` and
``{"dict": {key: value}}``; anything else is never sent. A worker checks every name, reference,
target and argument before torch.fx generates any code from them.
"""

from __future__ import annotations

import keyword
from typing import Any

import torch
from torch import fx, nn

from fedsecure.errors import OperationNotAllowed, ProtocolError
from fedsecure.worker import graph_ops as ops

CONTAINERS: dict[str, type[nn.Module]] = {"ModuleList": nn.ModuleList, "ModuleDict": nn.ModuleDict, "Module": nn.Module}
"""modules a graph reaches into but never calls."""
MAX_NODES = 10_000
MAX_ITEMS = 10_000  # items of one argument (and children, tensors of a module)
MAX_ARG_DEPTH = 16  # nesting of an argument (tuples in lists in ...)
_OPS = ("placeholder", "get_attr", "call_module", "call_function", "call_method", "output")


class NotDescribable(Exception):
    """Raised while describing: the model travels as weights only."""


# -- the model owner's side ---------------------------------------------------------------


def encode_nodes(graph: fx.Graph, module: nn.Module) -> list[list[Any]]:
    out = []
    for node in graph.nodes:
        op, target = node.op, node.target
        if op == "call_function" or op == "call_method":
            named = ops.spec_of(op, target)
            if named is None:
                raise NotDescribable
            op, target = named
        elif op == "get_attr":
            if not isinstance(target, str) or not is_tensor(module, target):
                raise NotDescribable
        elif op == "call_module":
            if not isinstance(target, str) or not is_callable(resolve_module(module, target)):
                raise NotDescribable
        elif op == "placeholder" and not (isinstance(target, str) and identifier(target)):
            raise NotDescribable  # *args, **kwargs
        out.append([node.name, op, target, _encode(list(node.args), 0), _encode_kwargs(node.kwargs)])
    return out


def _encode(value: Any, depth: int) -> Any:
    if depth > MAX_ARG_DEPTH:
        raise NotDescribable
    kind = type(value)
    if kind in (bool, int, float, str, type(None)) or value is Ellipsis:
        return value
    if isinstance(value, torch.dtype | torch.memory_format):
        return value
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if kind is tuple or kind is torch.Size:
        return tuple(_encode(v, depth + 1) for v in value)
    if isinstance(value, list):
        return [_encode(v, depth + 1) for v in value]
    if isinstance(value, dict) and all(type(k) is str for k in value):
        return {"dict": {k: _encode(v, depth + 1) for k, v in value.items()}}
    if kind is slice:
        return {"slice": [_encode(v, depth + 1) for v in (value.start, value.stop, value.step)]}
    raise NotDescribable  # a function, an object, a tensor constant: never sent


def _encode_kwargs(kwargs: Any) -> dict[str, Any]:
    return {k: _encode(v, 1) for k, v in kwargs.items()}


# -- names and attribute paths (both ends) ----------------------------------------------


def identifier(name: Any) -> bool:
    # ASCII only: Python folds Unicode identifiers (NFKC), so "ｔｏｒｃｈ" would be the name "torch"
    return (
        isinstance(name, str)
        and name.isascii()
        and name.isidentifier()
        and not keyword.iskeyword(name)
        and name != "self"
    )


def attribute_name(name: Any) -> bool:
    """A child or tensor name: an identifier (or a ModuleList index) that shadows nothing."""
    if not isinstance(name, str) or not 0 < len(name) <= 128:
        return False
    if name.isascii() and name.isdigit():
        return True
    return identifier(name) and not name.startswith("__") and not hasattr(fx.GraphModule, name) and name not in _INSTANCE


_INSTANCE = frozenset(vars(fx.GraphModule(nn.Module(), fx.Graph())))  # attributes every GraphModule sets


def resolve_module(root: nn.Module, path: str) -> nn.Module | None:
    module: nn.Module | None = root
    for part in path.split("."):
        module = module._modules.get(part) if module is not None else None
    return module


def is_tensor(root: nn.Module, path: str) -> bool:
    prefix, _, name = path.rpartition(".")
    owner = resolve_module(root, prefix) if prefix else root
    return owner is not None and (
        owner._parameters.get(name) is not None or owner._buffers.get(name) is not None
    )


def is_callable(module: nn.Module | None) -> bool:
    return module is not None and not any(type(module) is cls for cls in CONTAINERS.values())


# -- the worker's side -------------------------------------------------------------------


def decode_nodes(nodes: Any, root: nn.Module) -> fx.Graph:
    if not isinstance(nodes, list) or not 2 <= len(nodes) <= MAX_NODES:
        raise ProtocolError(f"a graph has between 2 and {MAX_NODES} nodes (inputs, operations, output)")
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    inputs_done = False
    for i, entry in enumerate(nodes):
        if not (isinstance(entry, list | tuple) and len(entry) == 5):
            raise ProtocolError(f"graph node {i} must be [name, op, target, args, kwargs]")
        name, op, target, args, kwargs = entry
        if not identifier(name) or len(name) > 128:
            raise ProtocolError(f"graph node {i}: name {str(name)[:80]!r} is not an identifier")
        if name in env:
            raise ProtocolError(f"graph node {i}: two nodes are named {name!r}")
        if op not in _OPS:
            raise ProtocolError(f"graph node {name!r}: op {str(op)[:40]!r} is not one of {', '.join(_OPS)}")
        if (op == "output") != (i == len(nodes) - 1):
            raise ProtocolError(f"graph node {name!r}: the output node comes last, and only there")
        if op == "placeholder" and inputs_done:
            raise ProtocolError(f"graph node {name!r}: inputs (placeholders) come first")
        inputs_done = op != "placeholder"
        if not isinstance(args, list | tuple) or not isinstance(kwargs, dict):
            raise ProtocolError(f"graph node {name!r}: args must be a list and kwargs a map")
        if not all(identifier(k) for k in kwargs):
            raise ProtocolError(f"graph node {name!r}: keyword argument names must be identifiers")
        fx_args = tuple(_decode(a, env, name, 1) for a in args)
        fx_kwargs = {k: _decode(v, env, name, 1) for k, v in kwargs.items()}
        fx_op, fx_target = _target(name, op, target, fx_args, fx_kwargs, root)
        node = graph.create_node(fx_op, fx_target, fx_args, fx_kwargs, name=name)
        if node.name != name:
            raise ProtocolError(f"graph node name {name!r} is reserved in generated code; rename it")
        env[name] = node
    return graph


def _target(name: str, op: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any], root: nn.Module) -> tuple[str, Any]:
    def no_arguments() -> None:
        if args or kwargs:
            raise ProtocolError(f"graph node {name!r}: {op} takes no arguments")

    if op == "placeholder":
        if not identifier(target):
            raise ProtocolError(f"graph node {name!r}: input name {str(target)[:80]!r} is not an identifier")
        if kwargs or len(args) > 1 or any(_has_node(a) for a in args):
            raise ProtocolError(f"graph node {name!r}: an input has at most a plain default value")
        return op, target
    if op == "output":
        if target != "output" or len(args) != 1 or kwargs:
            raise ProtocolError(f"graph node {name!r}: the output node is ['output', (value,), {{}}]")
        return op, target
    if op in ("get_attr", "call_module"):
        if not isinstance(target, str) or not all(attribute_name(p) for p in target.split(".")):
            raise ProtocolError(f"graph node {name!r}: {op} target {str(target)[:80]!r} is not a dotted name")
        if op == "get_attr":
            no_arguments()
            if not is_tensor(root, target):
                raise ProtocolError(f"graph node {name!r}: the model has no parameter or buffer {target!r}")
            return op, target
        module = resolve_module(root, target)
        if module is None:
            raise ProtocolError(f"graph node {name!r}: the model has no submodule {target!r}")
        if not is_callable(module):
            raise ProtocolError(f"graph node {name!r}: {target!r} is a container, not a layer to call")
        return op, target
    fn = ops.runtime(op, target)
    if fn is None:
        raise OperationNotAllowed(
            f"graph node {name!r} calls {str(target)[:80]!r} ({op}), which is not on the allow-list "
            "(see docs/allowlist.md and docs/models.md)",
            op=str(target)[:80],
        )
    if op == "call_method" and not args:
        raise ProtocolError(f"graph node {name!r}: a method call needs the tensor it is called on")
    if "out" in kwargs:
        raise OperationNotAllowed(f"graph node {name!r}: the out= argument is not supported", op=str(target))
    ops.check_static(name, target, args)
    return "call_function", fn


def _has_node(value: Any) -> bool:
    if isinstance(value, fx.Node):
        return True
    if isinstance(value, list | tuple):
        return any(_has_node(v) for v in value)
    if isinstance(value, dict):
        return any(_has_node(v) for v in value.values())
    if isinstance(value, slice):
        return any(_has_node(v) for v in (value.start, value.stop, value.step))
    return False


def _decode(value: Any, env: dict[str, fx.Node], node: str, depth: int) -> Any:
    if depth > MAX_ARG_DEPTH:
        raise ProtocolError(f"graph node {node!r}: arguments nested deeper than {MAX_ARG_DEPTH} levels")
    kind = type(value)
    if kind in (bool, int, float, str, type(None)) or value is Ellipsis:
        return value
    if isinstance(value, torch.dtype | torch.memory_format):
        return value
    if kind is tuple or kind is list:
        if len(value) > MAX_ITEMS:
            raise ProtocolError(f"graph node {node!r}: an argument has over {MAX_ITEMS} items")
        items = [_decode(v, env, node, depth + 1) for v in value]
        return tuple(items) if kind is tuple else items
    if kind is dict and len(value) == 1:
        (tag, inner), = value.items()
        if tag == "node":
            if not isinstance(inner, str) or inner not in env:
                raise ProtocolError(
                    f"graph node {node!r} uses {str(inner)[:80]!r}, which is not an earlier node "
                    "(references point backwards: no cycles, no forward references)"
                )
            if env[inner].op == "output":
                raise ProtocolError(f"graph node {node!r} uses the output node")
            return env[inner]
        if tag == "slice" and isinstance(inner, list) and len(inner) == 3:
            return slice(*(_decode(v, env, node, depth + 1) for v in inner))
        if tag == "dict" and isinstance(inner, dict) and len(inner) <= MAX_ITEMS:
            if not all(type(k) is str for k in inner):
                raise ProtocolError(f"graph node {node!r}: map arguments have string keys")
            return {k: _decode(v, env, node, depth + 1) for k, v in inner.items()}
    raise ProtocolError(
        f"graph node {node!r}: an argument of type {kind.__name__} is not allowed (arguments are "
        "numbers, strings, None, tuples, lists, Ellipsis, dtypes, {'node': name}, {'slice': [a, b, c]} "
        "or {'dict': {...}})"
    )


def check_placeholders(module: fx.GraphModule) -> None:
    forward = type(module).forward  # compiled from the generated code: its globals are that code's
    taken = set(forward.__globals__ if hasattr(forward, "__globals__") else module.graph.python_code("self").globals)
    for node in module.graph.nodes:
        if node.op != "placeholder":
            continue
        if node.target in taken:
            raise ProtocolError(f"input name {node.target!r} is reserved in generated code, or used twice")
        taken.add(node.target)
