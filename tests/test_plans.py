"""Plans (PySyft 0.2's Part 8): built by tracing, checked against the allow-list, sent as model graphs."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fedsecure as sy
from fedsecure.pointer.plan import PlanBuildError, PlanNotBuilt, PointerPlan
from fedsecure.wire import messages as m
from fedsecure.wire.ids import new_id


def double_abs(x: torch.Tensor) -> torch.Tensor:
    x = x + x
    return torch.abs(x)


class Net(sy.Plan):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2, 3)
        self.fc2 = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x))
        return F.log_softmax(self.fc2(x), dim=0)


class Counting(sy.Federation):
    """A federation that counts the requests the model owner sends to its workers."""

    def __init__(self) -> None:
        super().__init__()
        self.requests = 0

    def call(self, worker_id: str, data: bytes, sender: Any) -> bytes:
        self.requests += 1
        return super().call(worker_id, data, sender)


# -- building ---------------------------------------------------------------------------------------


def test_a_plan_is_built_by_build_and_its_repr_says_so() -> None:
    plan = sy.func2plan()(double_abs)
    assert isinstance(plan, sy.Plan)
    assert not plan.is_built
    assert "double_abs(x): not built" in repr(plan)
    assert plan.build(torch.tensor([1.0, -2.0])) is plan
    assert plan.is_built
    assert repr(plan) == "<Plan double_abs(x): built, 2 operations, here>"


@pytest.mark.parametrize("build", [False, True])
def test_calling_a_plan_on_local_tensors_runs_the_function(build: bool) -> None:
    plan = sy.func2plan()(double_abs)
    if build:
        plan.build(torch.zeros(3))
    x = torch.tensor([-1.0, 2.0, -3.5])
    assert torch.equal(plan(x), double_abs(x))


def test_args_shape_builds_at_once_with_minus_one_taken_as_one(bob: sy.VirtualWorker) -> None:
    plan = sy.func2plan(args_shape=[(-1, 1)])(double_abs)
    assert plan.is_built
    x = torch.tensor([[-1.0], [2.0], [-3.0], [0.5], [7.0]])  # any first size: the graph has no shapes in it
    assert torch.equal(plan.send(bob)(x.send(bob)).get(), double_abs(x))


def test_state_tensors_are_read_with_state_read_and_travel_as_buffers(bob: sy.VirtualWorker) -> None:
    @sy.func2plan(args_shape=[(1, 2)], state=(torch.tensor([1]),))
    def plan_abs(x: torch.Tensor, state: Any) -> torch.Tensor:
        (bias,) = state.read()
        return x.abs() + bias

    x = torch.tensor([[1.0, -1.0]])
    assert torch.equal(plan_abs(x), torch.tensor([[2.0, 2.0]]))
    spec = plan_abs.graph_spec()
    assert spec["tensors"] == [["state_0", "buffer", [1], "int64"]]
    assert ["state_0", "get_attr", "state_0", [], {}] in spec["nodes"]
    assert torch.equal(plan_abs.send(bob)(x.send(bob)).get(), torch.tensor([[2.0, 2.0]]))


@pytest.mark.parametrize(
    ("function", "message"),
    [
        (lambda x: x + 1, r"given state=\(\.\.\.\) but has no parameter named state"),
        (lambda x, *rest: x, "plain positional parameters"),
    ],
    ids=["no state parameter", "varargs"],
)
def test_a_function_plan_says_what_its_signature_lacks(function: Callable[..., Any], message: str) -> None:
    with pytest.raises(PlanBuildError, match=message):
        sy.func2plan(state=(torch.ones(1),))(function)


def test_an_operation_off_the_allow_list_is_refused_at_build_and_named() -> None:
    @sy.func2plan()
    def ranks(x: torch.Tensor) -> torch.Tensor:
        return torch.argsort(x) + 1

    with pytest.raises(sy.OperationNotAllowed, match=r"torch\.argsort .*not on the workers' allow-list") as info:
        ranks.build(torch.ones(3))
    assert info.value.op == "torch.argsort"
    assert not ranks.is_built


class Sorter(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.argsort()


class NetWithSorter(sy.Plan):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.sort = Sorter()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sort(self.fc(x))


def test_an_operation_off_the_allow_list_inside_a_submodule_is_named_with_its_path() -> None:
    with pytest.raises(sy.OperationNotAllowed, match=r"plan 'NetWithSorter.sort': Tensor\.argsort") as info:
        NetWithSorter().build(torch.ones(2))
    assert info.value.op == "Tensor.argsort"


def test_a_captured_tensor_is_refused_and_state_is_suggested() -> None:
    weight = torch.ones(2)

    @sy.func2plan()
    def scaled(x: torch.Tensor) -> torch.Tensor:
        return x * weight

    with pytest.raises(sy.OperationNotAllowed, match="no tensor constants.*state="):
        scaled.build(torch.ones(2))


def test_control_flow_on_values_cannot_be_traced() -> None:
    @sy.func2plan()
    def branchy(x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x

    with pytest.raises(PlanBuildError, match="cannot be traced.*control flow"):
        branchy.build(torch.ones(2))


def test_build_checks_its_examples() -> None:
    plan = sy.func2plan()(double_abs)
    with pytest.raises(PlanBuildError, match=r"takes 1 input\(s\) \(x\); build\(\) got 2"):
        plan.build(torch.ones(2), torch.ones(2))
    with pytest.raises(PlanBuildError, match="fails on example inputs of shape"):
        Net().build(torch.ones(5))  # fc1 takes 2 features
    assert not plan.is_built


# -- sending ----------------------------------------------------------------------------------------


def test_sending_an_unbuilt_plan_is_a_runtime_error_that_says_how_to_build(bob: sy.VirtualWorker) -> None:
    plan = sy.func2plan()(double_abs)
    with pytest.raises(RuntimeError, match=r"not built.*build\(example, \.\.\.\).*args_shape") as info:
        plan.send(bob)
    assert isinstance(info.value, PlanNotBuilt)
    assert isinstance(info.value, sy.OperationNotAllowed) and isinstance(info.value, sy.FedsecureError)
    with pytest.raises(PlanNotBuilt):
        Net().send(bob)
    assert bob.object_count() == 0


def test_a_sent_plan_runs_remotely_in_one_message_with_the_local_result() -> None:
    federation = Counting()
    bob = sy.VirtualWorker(id="bob", federation=federation)
    plan = sy.func2plan(args_shape=[(2,)])(double_abs)
    pointer_plan = plan.send(bob)
    assert isinstance(pointer_plan, PointerPlan) and pointer_plan.location is bob
    assert repr(pointer_plan) == "<PointerPlan double_abs(x) on 'bob': 2 operations>"
    x = torch.tensor([-1.0, 2.0])
    x_ptr = x.send(bob)
    before = federation.requests
    result = pointer_plan(x_ptr)
    assert federation.requests == before + 1
    assert isinstance(result, sy.PointerTensor) and result.location is bob
    assert torch.equal(result.get(), plan(x))
    assert plan.location is None  # the plan itself stays here and can go elsewhere too


def test_a_pointer_plan_takes_pointers_on_its_worker(bob: sy.VirtualWorker, alice: sy.VirtualWorker) -> None:
    pointer_plan = sy.func2plan(args_shape=[(2,)])(double_abs).send(bob)
    with pytest.raises(sy.WorkerMismatch, match="'x' is a local tensor: send or move it there"):
        pointer_plan(torch.ones(2))
    with pytest.raises(sy.WorkerMismatch, match="'x' is a pointer to 'alice'"):
        pointer_plan(torch.ones(2).send(alice))


def test_a_pointer_plan_comes_back_with_get(bob: sy.VirtualWorker) -> None:
    plan = sy.func2plan(args_shape=[(2,)])(double_abs)
    pointer_plan = plan.send(bob)
    assert pointer_plan.get() is plan
    with pytest.raises(sy.OperationNotAllowed, match="brought back with get"):
        pointer_plan(torch.ones(2).send(bob))
    assert bob.object_count() == 0


def test_a_plan_subclass_is_sent_called_fetched_and_sent_elsewhere(
    bob: sy.VirtualWorker, alice: sy.VirtualWorker
) -> None:
    net = Net()
    assert not net.is_built
    net.build(torch.tensor([1.0, 2.0]))
    assert repr(net).startswith("<Net Net(x): built, 4 operations, here>\nNet(\n  (fc1): Linear")
    x = torch.tensor([-1.0, 2.0])
    expected = net(x).detach()
    assert net.send(bob) is net
    assert net.location is bob and "on 'bob'" in repr(net)
    result = net(x.send(bob))
    assert isinstance(result, sy.PointerTensor) and result.location is bob
    assert torch.allclose(result.get(), expected)
    assert net.get() is net and net.location is None
    net.send(alice)
    assert torch.allclose(net(x.send(alice)).get(), expected)


def test_the_pysyft_plan_api_that_is_not_offered_says_so() -> None:
    plan = sy.func2plan(args_shape=[(2,)])(double_abs)
    for name in ("code", "torchscript"):
        with pytest.raises(sy.OperationNotAllowed, match="not"):
            getattr(plan, name)
    with pytest.raises(sy.OperationNotAllowed, match="not translated"):
        plan.add_translation("torchscript")


# -- the worker's side ------------------------------------------------------------------------------


def _forge(mutate: Callable[[list[Any]], None]) -> dict[str, Any]:
    spec = copy.deepcopy(sy.func2plan(args_shape=[(2,)])(double_abs).graph_spec())
    mutate(next(n for n in spec["nodes"] if n[0] == "abs_1"))
    return spec


def calls(op: str, target: str) -> Callable[[list[Any]], None]:
    def mutate(node: list[Any]) -> None:
        node[1:3] = [op, target]

    return mutate


def dangling(node: list[Any]) -> None:
    node[3] = [{"node": "nowhere"}]


@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (calls("call_function", "os.system"), sy.OperationNotAllowed, "'os.system'.*not on the allow-list"),
        (calls("call_function", "torch.load"), sy.OperationNotAllowed, "'torch.load'.*not on the allow-list"),
        (calls("call_method", "__reduce__"), sy.OperationNotAllowed, "'__reduce__'.*not on the allow-list"),
        (dangling, sy.ProtocolError, "not an earlier node"),
    ],
    ids=["os.system", "torch.load", "method __reduce__", "dangling reference"],
)
def test_a_worker_refuses_a_forged_plan_and_serves_on(
    bob: sy.VirtualWorker, mutate: Callable[[list[Any]], None], error: type[Exception], match: str
) -> None:
    spec = _forge(mutate)
    assert spec["nodes"][2][0] == "abs_1"  # the node the forgery changed
    with pytest.raises(error, match=match):
        bob.request(m.PutModule(new_id(), spec, [], [], False))
    assert bob.object_count() == 0
    pointer_plan = sy.func2plan(args_shape=[(2,)])(double_abs).send(bob)  # the worker serves on
    assert torch.equal(pointer_plan(torch.tensor([-1.0, 2.0]).send(bob)).get(), torch.tensor([2.0, 4.0]))


def test_a_plan_on_a_workers_private_data_gives_a_labelled_result_that_stays_there(
    make_worker: Callable[..., sy.VirtualWorker],
) -> None:
    w = make_worker("w", data={"x": torch.tensor([-1.0, 2.0])})
    pointer_plan = sy.func2plan(args_shape=[(2,)])(double_abs).send(w)
    result = pointer_plan(w.search("x")[0])
    assert result.owners == ["w"]
    with pytest.raises(sy.PermissionDenied):
        result.get()
    net = Net().build(torch.ones(2))
    net.send(w)
    assert net(w.search("x")[0]).owners == ["w"]
