"""Plans: a function or a model that travels to a worker as one checked graph (PySyft 0.2's Plans).

``@sy.func2plan()`` makes a function of tensors a `FunctionPlan`; ``class Net(sy.Plan)`` is a model
written like an ``nn.Module``. ``plan.build(example, ...)`` traces it with torch.fx and checks it as
a worker will (docs/allowlist.md, docs/models.md), naming any operation a worker would refuse.

On the wire a plan is nothing new: it is the graph of allow-listed operations that custom models
travel as (`fedsecure.worker.modules.describe`), which the worker checks and interprets like any
model graph. ``pointer_plan = plan.send(worker)`` sends a copy of a function plan, its state tensors
as the graph's buffers, and ``pointer_plan(ptr)`` runs it there in one message. A ``Plan`` subclass
is sent like a model: the net itself becomes remote until ``net.get()``. The idea is PySyft 0.2.9's.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx, nn

from fedsecure.errors import FedsecureError, OperationNotAllowed, WorkerMismatch
from fedsecure.pointer.hook import get as get_object
from fedsecure.pointer.hook import send as send_object
from fedsecure.pointer.module import remote_of
from fedsecure.pointer.tensor import PointerTensor
from fedsecure.worker import graph_ops
from fedsecure.worker.client import WorkerClient
from fedsecure.worker.graph_nodes import is_tensor
from fedsecure.worker.graphs import GraphModel
from fedsecure.worker.modules import LAYERS, build, describe, load_state, state_tensors

__all__ = ["FunctionPlan", "Plan", "PlanBuildError", "PlanNotBuilt", "PointerPlan", "State", "func2plan"]

_CALLS = ("call_function", "call_method", "call_module")
_LAYER_TYPES = tuple(cls for cls, _ in LAYERS.values())


class PlanNotBuilt(OperationNotAllowed):
    """A plan was sent before it was built. Also a ``RuntimeError``, as PySyft raised."""

    def __init__(self, message: str) -> None:
        super().__init__(message, op="send")


class PlanBuildError(FedsecureError, ValueError):
    """A plan could not be built: its function does not trace, or fails on the example inputs."""


# -- tracing and checking (the model owner's side) -------------------------------------------------


class _Tracer(fx.Tracer):
    """Keeps submodule calls as calls (each is checked on its own, as models are); for a function
    plan, traces the function on placeholders named after its inputs, with its state as buffers."""

    def __init__(self, plan: FunctionPlan | None = None) -> None:
        super().__init__()
        self.plan = plan

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True

    def create_args_for_root(self, root_fn: Any, is_module: bool, concrete_args: Any = None) -> Any:
        plan = self.plan
        if plan is None:
            return super().create_args_for_root(root_fn, is_module, concrete_args)
        inputs = [self.create_proxy("placeholder", name, (), {}) for name in plan.input_names]

        def run(*args):  # unannotated: torch.fx would copy a return annotation into the graph
            return plan._run(args)

        return run, inputs


def _trace(root: nn.Module, tracer: _Tracer, plan: str) -> fx.Graph:
    before = set(vars(root))
    try:
        return tracer.trace(root)
    except Exception as exc:  # anything torch.fx cannot follow
        raise PlanBuildError(
            f"plan {plan!r} cannot be traced into a graph ({type(exc).__name__}: {exc}). A plan is a fixed "
            "sequence of tensor operations on its inputs and state: no Python control flow on tensor values "
            "(`if x.sum() > 0:`), no conversions to Python numbers (`float(x)`), and layers it calls are its "
            "own (write a network with layers as a sy.Plan subclass)"
        ) from exc
    finally:
        for name in set(vars(root)) - before:  # constants the tracer attached
            delattr(root, name)


def _call_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    target = node.target
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", None)
    if name is None:
        return repr(target)[:80]
    return f"{module.lstrip('_')}.{name}" if module else name


def _check_nodes(graph: fx.Graph, root: nn.Module, plan: str) -> None:
    """Name the first operation a worker would refuse (before describe, which only says no)."""
    for node in graph.nodes:
        if node.op in ("call_function", "call_method") and graph_ops.spec_of(node.op, node.target) is None:
            name = _call_name(node)
            raise OperationNotAllowed(
                f"plan {plan!r}: {name} (graph node {node.name!r}) is not on the workers' allow-list, so "
                "no worker would run it. Write the plan with allow-listed operations (docs/allowlist.md "
                "lists them; docs/models.md says what a graph may hold)",
                op=name,
            )
        if node.op == "call_module":
            sub = root.get_submodule(str(node.target))
            if describe(sub) is None:
                _check_module(sub, f"{plan}.{node.target}")
        if node.op == "get_attr" and not is_tensor(root, str(node.target)):
            raise OperationNotAllowed(
                f"plan {plan!r} uses a tensor that is neither an input nor one of its own tensors (graph "
                f"node {node.name!r}): a graph carries no tensor constants. Pass the tensor as an input, "
                "give it as state=(tensor, ...) to func2plan, or register it on the model "
                "(register_buffer or nn.Parameter)",
                op="get_attr",
            )


def _check_module(module: nn.Module, path: str) -> None:
    if module._forward_hooks or module._forward_pre_hooks:
        raise OperationNotAllowed(f"plan {path!r}: a layer with forward hooks cannot travel as a graph", op=path)
    if isinstance(module, nn.Sequential):
        for name, child in module.named_children():
            if describe(child) is None:
                _check_module(child, f"{path}.{name}")
    elif type(module) not in _LAYER_TYPES:
        _check_nodes(_trace(module, _Tracer(), path), module, path)
    raise OperationNotAllowed(
        f"plan {path!r}: the layer {type(module).__name__} cannot travel as a graph: use layers from the "
        "layer table of docs/models.md, or a module whose forward torch.fx traces into allow-listed "
        "operations (it must not read self.training, nor use a parameter or layer in two places)",
        op=type(module).__name__,
    )


def _check_examples(plan: str, inputs: Sequence[str], examples: Sequence[Any]) -> None:
    if len(examples) != len(inputs):
        raise PlanBuildError(
            f"plan {plan!r} takes {len(inputs)} input(s) ({', '.join(inputs)}); build() got "
            f"{len(examples)} example tensor(s): give one example per input"
        )
    for name, t in zip(inputs, examples, strict=True):
        if not isinstance(t, torch.Tensor) or isinstance(t, PointerTensor):
            raise PlanBuildError(
                f"plan {plan!r}: the example for {name!r} must be a local tensor of the shape and dtype the "
                f"plan will be called with (for a pointer p, torch.zeros(p.shape)), got {type(t).__name__}"
            )


def _run_as_worker(module: nn.Module, spec: dict[str, Any], examples: Sequence[torch.Tensor], plan: str) -> Any:
    """Build ``spec`` as a worker does (every check a worker makes), then run the examples on it."""
    built = build(copy.deepcopy(spec))
    load_state(built, [t.detach() for _, t in state_tensors(module)])
    try:
        with torch.no_grad():
            return built(*examples)
    except FedsecureError:
        raise
    except Exception as exc:
        shapes = ", ".join(str(tuple(t.shape)) for t in examples)
        raise PlanBuildError(
            f"plan {plan!r} fails on example inputs of shape {shapes}: {exc}. Give examples of the shape "
            "and dtype the plan will be called with"
        ) from exc


def _not_offered(what: str) -> OperationNotAllowed:
    return OperationNotAllowed(
        f"{what}; workers run only the plan's graph description. print(plan) shows its inputs and number "
        "of operations, plan.graph_spec() the graph itself",
        op=what.split(":")[0],
    )


# -- plans -------------------------------------------------------------------------------------------


class Plan(nn.Module):
    """A model that is built (traced and checked) before it is sent: subclass it like ``nn.Module``.

    ``net.build(example, ...)`` traces ``forward``; ``net.send(worker)`` sends the net as a graph
    (the net itself becomes remote, as ``model.send`` does; sending an unbuilt plan raises
    `PlanNotBuilt`); ``net(ptr)`` then runs there, one message; ``net.get()`` brings it back.
    """

    def __init__(self, *, name: str | None = None) -> None:
        super().__init__()
        self._plan_name = name or type(self).__name__
        self._plan_graph: fx.Graph | None = None
        self._plan_inputs: tuple[str, ...] = ()
        self._plan_ops = 0

    @property
    def is_built(self) -> bool:
        return self._plan_graph is not None

    @property
    def location(self) -> WorkerClient | None:
        """The worker this plan lives on, or None while it is here."""
        remote = remote_of(self)
        return None if remote is None else remote.worker

    def build(self, *examples: torch.Tensor) -> Plan:
        """Trace the plan on example inputs and check it as a worker would; returns the plan."""
        remote = remote_of(self)
        if remote is not None:
            raise OperationNotAllowed(
                f"plan {self._plan_name!r} lives on {remote.worker.id!r}: get() it before building it again",
                op="build",
            )
        graph = self._trace_graph()
        inputs = tuple(str(n.target) for n in graph.nodes if n.op == "placeholder")
        _check_examples(self._plan_name, inputs, examples)
        _check_nodes(graph, self, self._plan_name)
        module = self._sendable(graph)
        spec = self._describe(module)
        _run_as_worker(module, spec, examples, self._plan_name)
        self._built(graph, inputs)
        return self

    def graph_spec(self) -> dict[str, Any]:
        """The description a worker receives for this plan (a graph, see docs/models.md)."""
        return self._describe(self._sendable(self._require_built("described")))

    def send(self, worker: WorkerClient) -> Any:
        """Send the plan to ``worker``; see the class docstring."""
        self._require_built("sent")
        if remote_of(self) is None:
            self._describe(self)  # it may have changed since it was built: it must still be a graph
        return send_object(self, worker)

    def get(self) -> Plan:
        """Bring a sent plan back (its worker's policy permitting)."""
        return get_object(self)  # type: ignore[no-any-return]

    # PySyft's Plan offered these; a fedsecure plan is a checked graph, never code to run or export.
    @property
    def code(self) -> str:
        raise _not_offered("plan.code: a plan is a checked graph of allow-listed operations, not Python source")

    @property
    def torchscript(self) -> Any:
        raise _not_offered("plan.torchscript: plans are not translated to TorchScript")

    def add_translation(self, *_: Any, **__: Any) -> Plan:
        raise _not_offered("add_translation(): plans are not translated to other frameworks")

    def __repr__(self) -> str:  # the summary, then the layers as nn.Module shows them
        return self._summary() if not self._modules else f"{self._summary()}\n{super().__repr__()}"

    # -- shared by function plans ----------------------------------------------------------------

    def _summary(self) -> str:
        inputs = self._plan_inputs if self.is_built else self._declared_inputs()
        head = f"<{self._kind()} {self._plan_name}({', '.join(inputs)})"
        if not self.is_built:
            return f"{head}: not built; call build(example, ...)>"
        where = "here" if self.location is None else f"on {self.location.id!r}"
        return f"{head}: built, {self._plan_ops} operations, {where}>"

    def _kind(self) -> str:
        return type(self).__name__

    def _declared_inputs(self) -> tuple[str, ...]:
        params = list(inspect.signature(type(self).forward).parameters)
        return tuple(params[1:])

    def _trace_graph(self) -> fx.Graph:
        return _trace(self, _Tracer(), self._plan_name)

    def _sendable(self, graph: fx.Graph) -> nn.Module:
        return self

    def _describe(self, module: nn.Module) -> dict[str, Any]:
        spec = describe(module)
        if spec is None or spec.get("type") != "Graph":
            raise OperationNotAllowed(
                f"plan {self._plan_name!r} cannot travel as a graph of allow-listed operations: its forward "
                "reads self.training, uses a parameter or layer in two places (tied weights), has forward "
                "hooks, or passes a function or another object as an argument (docs/models.md)",
                op="send",
            )
        return spec

    def _built(self, graph: fx.Graph, inputs: tuple[str, ...]) -> None:
        self._plan_graph = graph
        self._plan_inputs = inputs
        self._plan_ops = sum(n.op in _CALLS for n in graph.nodes)

    def _require_built(self, verb: str) -> fx.Graph:
        if self._plan_graph is None:
            raise PlanNotBuilt(
                f"plan {self._plan_name!r} is not built, so it cannot be {verb} yet: call "
                f"{self._plan_name}.build(example, ...) with one example tensor per input, or give "
                "args_shape=[shape, ...] to func2plan"
            )
        return self._plan_graph


class State:
    """A function plan's state: ``state.read()`` returns its state tensors, as a tuple.

    They travel with the plan, as buffers of its graph. While the plan is traced, ``read()`` gives
    the graph's references to them.
    """

    def __init__(self, plan: FunctionPlan, names: Sequence[str]) -> None:
        self._plan = plan
        self._names = tuple(names)
        self._tracer: _Tracer | None = None

    def read(self) -> tuple[Any, ...]:
        tracer = self._tracer
        if tracer is not None:
            return tuple(tracer.create_proxy("get_attr", n, (), {}) for n in self._names)
        return tuple(self._plan.get_buffer(n) for n in self._names)

    def __repr__(self) -> str:
        return f"State({', '.join(self._names) or 'empty'})"


def _function_inputs(function: Callable[..., Any], name: str, has_state: bool) -> tuple[str, ...]:
    params = inspect.signature(function).parameters
    for p in params.values():
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) or p.default is not p.empty:
            raise PlanBuildError(
                f"plan {name!r}: its inputs must be plain positional parameters without defaults "
                f"(def {name}(x, y)); {p} is not"
            )
    takes_state = "state" in params
    if has_state and not takes_state:
        raise PlanBuildError(
            f"plan {name!r} was given state=(...) but has no parameter named state: add one and read it "
            f"with state.read() (def {name}(x, state): bias, = state.read())"
        )
    if takes_state and not has_state:
        raise PlanBuildError(
            f"plan {name!r} has a parameter named state: give its tensors with "
            "@sy.func2plan(state=(tensor, ...))"
        )
    return tuple(n for n in params if n != "state")


class FunctionPlan(Plan):
    """A function of tensors made a plan by `func2plan`; calling it here runs the function.

    ``plan.send(worker)`` sends a copy and returns a `PointerPlan`; the plan itself stays here and
    can be sent again, to the same or another worker.
    """

    def __init__(self, function: Callable[..., Any], *, state: Sequence[torch.Tensor] = (), name: str | None = None) -> None:
        if not callable(function):
            raise TypeError(f"func2plan decorates a function, got {type(function).__name__}")
        name = name or str(getattr(function, "__name__", "plan"))
        super().__init__(name=name)
        if not isinstance(state, tuple | list) or not all(
            isinstance(t, torch.Tensor) and not isinstance(t, PointerTensor) for t in state
        ):
            raise TypeError(f"plan {name!r}: state must be a tuple of local tensors, state=(torch.tensor([1]),)")
        self._function = function
        self.input_names = _function_inputs(function, name, bool(state))
        self._takes_state = bool(state)
        for i, t in enumerate(state):
            self.register_buffer(f"state_{i}", t.detach().clone())
        self.state = State(self, [f"state_{i}" for i in range(len(state))])

    def forward(self, *args: Any) -> Any:
        return self._run(args)

    def _run(self, args: Sequence[Any]) -> Any:
        if self._takes_state:
            return self._function(*args, state=self.state)
        return self._function(*args)

    def send(self, worker: WorkerClient) -> PointerPlan:  # type: ignore[override]
        """Send a copy of this plan to ``worker``; returns the `PointerPlan` that runs it there."""
        graph = self._require_built("sent")
        if not isinstance(worker, WorkerClient):
            raise TypeError(f"send() needs a worker, got {type(worker).__name__}")
        module = self._sendable(graph)
        self._describe(module)
        send_object(module, worker)
        return PointerPlan(self, module)

    def get(self) -> Plan:
        message = f"plan {self._plan_name!r} is here already; a copy that send() made comes back with pointer_plan.get()"
        raise OperationNotAllowed(message, op="get")

    def _kind(self) -> str:
        return "Plan"

    def _declared_inputs(self) -> tuple[str, ...]:
        return self.input_names

    def _trace_graph(self) -> fx.Graph:
        tracer = _Tracer(self)
        self.state._tracer = tracer
        try:
            return _trace(self, tracer, self._plan_name)
        finally:
            self.state._tracer = None

    def _sendable(self, graph: fx.Graph) -> nn.Module:
        """A fresh module holding the graph and copies of the state: what is sent."""
        module = GraphModel(graph)
        for name, buffer in self._buffers.items():
            if buffer is not None:
                module.register_buffer(name, buffer.detach().clone())
        return module


class PointerPlan:
    """A plan sent to a worker: ``pointer_plan(ptr, ...)`` runs it there, one message, and returns
    pointers. ``pointer_plan.get()`` frees the worker's copy and returns the local plan."""

    def __init__(self, plan: FunctionPlan, module: nn.Module) -> None:
        remote = remote_of(module)
        assert remote is not None and remote.module_id is not None  # sent as a graph
        self._plan = plan
        self._module: nn.Module | None = module
        self.location: WorkerClient = remote.worker

    def __call__(self, *args: Any) -> Any:
        module = self._live("call")
        inputs = self._plan.input_names
        if len(args) != len(inputs):
            raise TypeError(f"plan {self._plan._plan_name!r} takes {len(inputs)} input(s) ({', '.join(inputs)})")
        for name, a in zip(inputs, args, strict=True):
            if not isinstance(a, PointerTensor) or a.location is not self.location:
                where = "a local tensor" if not isinstance(a, PointerTensor) else f"a pointer to {a.location.id!r}"
                raise WorkerMismatch(
                    f"plan {self._plan._plan_name!r} runs on {self.location.id!r}, but {name!r} is {where}: "
                    f"send or move it there first (t.send({self.location.id}))"
                )
        return module(*args)

    def get(self) -> FunctionPlan:
        module = self._live("get")
        get_object(module)
        self._module = None
        return self._plan

    def _live(self, verb: str) -> nn.Module:
        if self._module is None:
            raise OperationNotAllowed(
                f"this pointer plan was brought back with get(); send the plan again to {verb} it there",
                op=verb,
            )
        return self._module

    def __repr__(self) -> str:
        plan, back = self._plan, "" if self._module is not None else " (brought back)"
        inputs = ", ".join(plan.input_names)
        return f"<PointerPlan {plan._plan_name}({inputs}) on {self.location.id!r}: {plan._plan_ops} operations{back}>"


def func2plan(
    args_shape: Sequence[Sequence[int]] | None = None, state: Sequence[torch.Tensor] | None = None
) -> Callable[[Callable[..., Any]], FunctionPlan]:
    """``@sy.func2plan()``: make a function of tensors a `FunctionPlan`.

    With ``args_shape=[shape, ...]`` (one per input; a -1 size is taken as 1) the plan is built at
    once on example tensors of those shapes; otherwise call ``plan.build(example, ...)``.
    ``state=(tensor, ...)`` gives tensors the function reads with ``state.read()`` through its
    parameter named ``state``; they travel with the plan.
    """
    if callable(args_shape):
        raise TypeError("write the decorator with parentheses: @sy.func2plan()")

    def decorate(function: Callable[..., Any]) -> FunctionPlan:
        plan = FunctionPlan(function, state=tuple(state or ()))
        if args_shape is not None:
            plan.build(*_examples(plan._plan_name, args_shape))
        return plan

    return decorate


def _examples(plan: str, args_shape: Any) -> list[torch.Tensor]:
    shapes: list[Any] = list(args_shape) if isinstance(args_shape, list | tuple) else [None]
    for shape in shapes:
        if not isinstance(shape, list | tuple | torch.Size) or not all(type(d) is int and d >= -1 for d in shape):
            raise TypeError(
                f"plan {plan!r}: args_shape is a list of shapes, one per input, each a tuple of sizes (-1 "
                f"for any size): args_shape=[(-1, 2)]; got {args_shape!r}"
            )
    return [torch.ones([1 if d == -1 else d for d in shape]) for shape in shapes]
