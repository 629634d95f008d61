"""Hostile graph descriptions: a worker refuses them with clear errors and serves on."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import fedsecure as sy
from fedsecure.wire import messages as m
from fedsecure.wire.codec import Ref
from fedsecure.wire.ids import new_id
from fedsecure.worker import graphs
from fedsecure.worker.modules import build, describe

Spec = dict[str, Any]


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.scale = nn.Parameter(torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x)) * self.scale


BASE: Spec = describe(Tiny())  # type: ignore[assignment]


def test_the_base_description_is_what_the_mutations_assume() -> None:
    assert [n[:3] for n in BASE["nodes"]] == [
        ["x", "placeholder", "x"],
        ["fc", "call_module", "fc"],
        ["relu", "call_function", "torch.relu"],
        ["scale", "get_attr", "scale"],
        ["mul", "call_function", "operator.mul"],
        ["output", "output", "output"],
    ]
    build(BASE)  # and a worker builds it


def node(spec: Spec, name: str) -> list[Any]:
    return next(n for n in spec["nodes"] if n[0] == name)


def call(target: str, op: str = "call_function", args: Any = None) -> Callable[[Spec], None]:
    def mutate(spec: Spec) -> None:
        node(spec, "relu")[1:4] = [op, target, [{"node": "fc"}] if args is None else args]

    return mutate


def setter(name: str, index: int, value: Any) -> Callable[[Spec], None]:
    def mutate(spec: Spec) -> None:
        node(spec, name)[index] = value

    return mutate


def many_nodes(spec: Spec) -> None:
    op = ["n", "call_function", "torch.relu", [{"node": "x"}], {}]
    spec["nodes"][1:-1] = [[f"n{i}", *op[1:]] for i in range(graphs.MAX_NODES)]
    spec["nodes"][-1][3] = [{"node": "x"}]


def deep_argument(spec: Spec) -> None:
    value: Any = {"node": "fc"}
    for _ in range(graphs.MAX_ARG_DEPTH + 2):
        value = [value]
    node(spec, "relu")[3] = value


def nested_modules(spec: Spec) -> None:
    inner: Spec = {"type": "Module", "training": True, "children": [], "tensors": [], "frozen": []}
    for _ in range(graphs.MAX_DEPTH + 2):
        inner = {**inner, "children": [["c", inner]]}
    spec["children"].append(["deep", inner])


def container_call(spec: Spec) -> None:
    spec["children"].append(["blocks", {"type": "ModuleList", "training": True, "children": [],
                                        "tensors": [], "frozen": []}])
    node(spec, "fc")[2] = "blocks"


def foreign_layer(spec: Spec) -> None:
    spec["children"][0][1]["type"] = "os.system"  # the layer fc calls


def swap(first: int, second: int) -> Callable[[Spec], None]:
    def mutate(spec: Spec) -> None:
        nodes = spec["nodes"]
        nodes[first], nodes[second] = nodes[second], nodes[first]

    return mutate


def tensor(index: int, value: Any) -> Callable[[Spec], None]:
    def mutate(spec: Spec) -> None:
        spec["tensors"][0][index] = value

    return mutate


NOT_ALLOWED = sy.OperationNotAllowed
BAD = sy.ProtocolError
HOSTILE: list[tuple[str, Callable[[Spec], None], type[Exception], str]] = [
    # calls outside the allow-list
    ("os.system", call("os.system"), NOT_ALLOWED, "not on the allow-list"),
    ("builtins.eval", call("builtins.eval"), NOT_ALLOWED, "not on the allow-list"),
    ("eval", call("eval"), NOT_ALLOWED, "not on the allow-list"),
    ("torch.load", call("torch.load"), NOT_ALLOWED, "not on the allow-list"),
    ("torch.save", call("torch.save"), NOT_ALLOWED, "not on the allow-list"),
    ("__import__", call("__import__"), NOT_ALLOWED, "not on the allow-list"),
    ("grad setter", call("Tensor.grad.__set__"), NOT_ALLOWED, "not on the allow-list"),
    ("backward", call("Tensor.backward"), NOT_ALLOWED, "not on the allow-list"),
    ("method __reduce__", call("__reduce__", "call_method"), NOT_ALLOWED, "not on the allow-list"),
    ("method __setattr__", call("__setattr__", "call_method"), NOT_ALLOWED, "not on the allow-list"),
    ("method backward", call("backward", "call_method"), NOT_ALLOWED, "not on the allow-list"),
    ("method by path", call("fc.forward", "call_method"), NOT_ALLOWED, "not on the allow-list"),
    ("getattr __class__", call("getattr", args=[{"node": "fc"}, "__class__"]), NOT_ALLOWED, "getattr takes"),
    ("getattr grad", call("getattr", args=[{"node": "fc"}, "grad"]), NOT_ALLOWED, "getattr takes"),
    ("layer not on the allow-list", foreign_layer, NOT_ALLOWED, "not on the allow-list"),
    # references
    ("dangling", call("torch.relu", args=[{"node": "nowhere"}]), BAD, "not an earlier node"),
    ("forward reference", call("torch.relu", args=[{"node": "mul"}]), BAD, "not an earlier node"),
    ("cycle", call("torch.relu", args=[{"node": "relu"}]), BAD, "not an earlier node"),
    ("uses the output", swap(4, 5), BAD, "output node comes last"),
    ("input after an op", lambda s: s["nodes"].insert(2, ["y", "placeholder", "y", [], {}]), BAD, "come first"),
    # names
    ("code as a name", setter("relu", 0, "x); import os; os.system('sh'); ("), BAD, "not an identifier"),
    ("keyword name", setter("relu", 0, "import"), BAD, "not an identifier"),
    ("name self", setter("relu", 0, "self"), BAD, "not an identifier"),
    ("name shadowing torch", setter("relu", 0, "torch"), BAD, "reserved"),
    ("duplicate names", setter("relu", 0, "fc"), BAD, "two nodes"),
    ("input named like code", setter("x", 2, "x=__import__('os')"), BAD, "not an identifier"),
    ("keyword argument name", setter("relu", 4, {"a=1)#": 1}), BAD, "identifiers"),
    ("look-alike name", setter("relu", 0, "\uff54\uff4f\uff52\uff43\uff48"), BAD, "not an identifier"),
    ("out= argument", setter("relu", 4, {"out": {"node": "x"}}), NOT_ALLOWED, "out= argument"),
    ("unknown op", setter("relu", 1, "call_python"), BAD, "is not one of"),
    # attributes and submodules
    ("get_attr missing", setter("scale", 2, "nothing"), BAD, "no parameter or buffer"),
    ("get_attr of a module", setter("scale", 2, "fc"), BAD, "no parameter or buffer"),
    ("get_attr dunder", setter("scale", 2, "fc.__class__"), BAD, "not a dotted name"),
    ("call_module missing", setter("fc", 2, "nothing"), BAD, "no submodule"),
    ("call_module container", container_call, BAD, "container"),
    ("deeply nested modules", nested_modules, BAD, "deeper"),
    # sizes and values
    ("too many nodes", many_nodes, BAD, "between 2 and"),
    ("deep argument", deep_argument, BAD, "deeper"),
    ("tensor argument", call("torch.relu", args=[torch.ones(3)]), BAD, "type Tensor is not allowed"),
    ("object reference argument", call("torch.relu", args=[Ref(1)]), BAD, "type Ref is not allowed"),
    ("huge tensor", tensor(2, [1 << 20, 1 << 20]), BAD, "elements"),
    ("unknown dtype", tensor(3, "object"), BAD, "unknown dtype"),
    ("tensor named like an attribute", tensor(0, "forward"), BAD, "is not an identifier, or is taken"),
    ("frozen unknown", lambda s: s.update(frozen=["nothing"]), BAD, "not a parameter"),
    ("missing key", lambda s: s.pop("nodes"), BAD, "exactly the keys"),
]

@pytest.mark.parametrize(("mutate", "error", "match"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_a_hostile_graph_is_refused(mutate: Callable[[Spec], None], error: type[Exception], match: str) -> None:
    spec = copy.deepcopy(BASE)
    mutate(spec)
    with pytest.raises(error, match=match):
        build(spec)


@pytest.mark.parametrize("name", ["os.system", "torch.load", "method __reduce__", "cycle", "code as a name"])
def test_a_worker_refuses_a_hostile_graph_and_serves_on(bob: sy.VirtualWorker, name: str) -> None:
    _, mutate, error, match = next(h for h in HOSTILE if h[0] == name)
    spec = copy.deepcopy(BASE)
    mutate(spec)
    tensors = [torch.zeros(2, 3), torch.zeros(2), torch.zeros(2)]  # fc.weight, fc.bias, scale
    with pytest.raises(error, match=match):
        bob.request(m.PutModule(new_id(), spec, tensors, [new_id() for _ in tensors], False))
    assert bob.object_count() == 0
    model = Tiny().send(bob)  # the worker serves on
    assert model(torch.ones(1, 3).send(bob)).get().shape == (1, 2)


def _graph(op: str, target: str, args: list[Any]) -> Spec:
    nodes = [["a", "placeholder", "a", [], {}], ["r", op, target, args, {}], ["output", "output", "output", [{"node": "r"}], {}]]
    return {"type": "Graph", "training": False, "children": [], "tensors": [], "frozen": [], "nodes": nodes}


@pytest.mark.parametrize(
    ("op", "target", "args", "value"),
    [
        ("call_function", "operator.mul", [{"node": "a"}, 1 << 40], "a"),
        ("call_function", "operator.mul", [{"node": "a"}, 1 << 40], [0]),
        ("call_function", "operator.pow", [{"node": "a"}, 1 << 40], 10),
        ("call_function", "operator.add", [{"node": "a"}, {"node": "a"}], "text"),
        ("call_function", "operator.mod", [{"node": "a"}, 1], "%s"),
        ("call_method", "__mul__", [{"node": "a"}, 1 << 40], "a"),
        ("call_method", "__pow__", [{"node": "a"}, 1 << 40], 10),
        ("call_function", "getattr", [{"node": "a"}, "shape"], (1, 2)),
    ],
    ids=["str*n", "list*n", "int**n", "str+str", "format", "str.__mul__", "int.__pow__", "shape of a tuple"],
)
def test_graph_calls_on_plain_values_cannot_grow_them(op: str, target: str, args: list[Any], value: Any) -> None:
    module = build(_graph(op, target, args))
    with pytest.raises(sy.OperationNotAllowed):
        module(value)


@pytest.mark.parametrize(
    ("target", "args", "value", "expected"),
    [
        ("operator.add", [{"node": "a"}, (4,)], (2, 3), (2, 3, 4)),
        ("operator.mul", [{"node": "a"}, 3], 7, 21),
        ("operator.pow", [{"node": "a"}, 2], 9, 81),
        ("operator.getitem", [{"node": "a"}, {"slice": [None, 2, None]}], (5, 6, 7), (5, 6)),
    ],
)
def test_graph_operators_on_small_plain_values_work(target: str, args: list[Any], value: Any, expected: Any) -> None:
    assert build(_graph("call_function", target, args))(value) == expected


@pytest.mark.parametrize("graph", [False, True])
def test_a_model_described_far_larger_than_its_weights_allocates_nothing(bob: sy.VirtualWorker, graph: bool) -> None:
    """A description of 10^12 weights that come with a handful: the worker builds the description
    without memory and refuses the weights that do not fit, instead of first allocating 4 TB."""
    spec = copy.deepcopy(BASE) if graph else describe(nn.Sequential(nn.Linear(3, 2)))
    spec["children"][0][1]["args"].update(in_features=10**6, out_features=10**6)
    tensors = [torch.zeros(2, 3), torch.zeros(2), torch.zeros(2)][: 3 if graph else 2]
    with pytest.raises(sy.ProtocolError, match="does not fit"):
        bob.request(m.PutModule(new_id(), spec, tensors, [new_id() for _ in tensors], False))
    assert bob.object_count() == 0
