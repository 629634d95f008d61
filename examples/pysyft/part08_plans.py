"""PySyft 0.2 tutorial, Part 8 (an introduction to plans), retold for fedsecure.

The same calls, in the same order, as PySyft 0.2.9's Part 8. A plan is a sequence of tensor
operations that is sent to a worker once and then runs there with one message per call, instead
of one message per operation. In fedsecure a plan is traced with torch.fx when it is built, and
every operation is checked against the workers' allow-list then; it travels as the same graph of
allow-listed operations that custom models travel as (docs/models.md), and the worker interprets
that graph, never running code it was sent.

Three kinds of plans appear: a function made a plan with ``@sy.func2plan()``, built on an example
and sent (``plan.send(worker)`` returns a pointer to the plan there); a network written as a
``sy.Plan`` subclass, which is sent like a model (the net itself runs on the worker, and comes
back with ``net.get()`` before it visits the other worker); and functions built at once from
``args_shape``, one of them with state tensors read through ``state.read()``.

Note on privacy: the tensors handed to the workers with ``data=(x11, x12)`` come from this
process, so they are the model owner's own and results computed from them may come back with
``.get()``. On data a worker holds as its own, the same plans run, but their results stay there.

Part 8 trains nothing, so ``losses`` is empty.

Run: python examples/pysyft/part08_plans.py
"""

import torch
import torch.nn.functional as F
from torch import nn

import fedsecure as sy

losses: dict[str, list[float]] = {}

hook = sy.TorchHook(torch)
# PySyft needed the local worker to store objects while it recorded a plan; fedsecure traces
# plans without storing anything, and accepts the setting so the tutorial reads the same.
hook.local_worker.is_client_worker = False
server = hook.local_worker

# Two devices, each holding two small tensors found by their tags.
x11 = torch.tensor([-1, 2.0]).tag("input_data")
x12 = torch.tensor([1, -2.0]).tag("input_data2")
x21 = torch.tensor([-1, 2.0]).tag("input_data")
x22 = torch.tensor([1, -2.0]).tag("input_data2")

device_1 = sy.VirtualWorker(hook, id="device_1", data=(x11, x12))
device_2 = sy.VirtualWorker(hook, id="device_2", data=(x21, x22))
devices = device_1, device_2


# -- A function as a plan ----------------------------------------------------------------------------


@sy.func2plan()
def plan_double_abs(x):
    x = x + x
    x = torch.abs(x)
    return x


print(plan_double_abs)

pointer_to_data = device_1.search("input_data")[0]
print(pointer_to_data)

# The plan has not been traced yet, so it cannot be sent.
print("built:", plan_double_abs.is_built)
try:
    plan_double_abs.send(device_1)
except RuntimeError as error:
    print("refused as expected:", error)

# Building traces the function on an example and checks every operation it uses.
plan_double_abs.build(torch.tensor([1.0, -2.0]))
print("built:", plan_double_abs.is_built)

pointer_plan = plan_double_abs.send(device_1)
print(pointer_plan)

# One message runs the whole plan on device_1; the result stays there until asked for.
pointer_to_result = pointer_plan(pointer_to_data)
print(pointer_to_result)
print(pointer_to_result.get())


# -- A network as a plan -----------------------------------------------------------------------------


class Net(sy.Plan):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(2, 3)
        self.fc2 = nn.Linear(3, 2)

    def forward(self, x):
        x = F.relu(self.fc1(x))
        x = self.fc2(x)
        return F.log_softmax(x, dim=0)


net = Net()
print(net)

net.build(torch.tensor([1.0, 2.0]))

net.send(device_1)
pointer_to_data = device_1.search("input_data")[0]
pointer_to_result = net(pointer_to_data)
print(pointer_to_result)
print(pointer_to_result.get())


# -- Switching between workers -----------------------------------------------------------------------
# The net is one object: it comes back from device_1 before it is sent to device_2.

net.get()
net.send(device_2)

pointer_to_data = device_2.search("input_data")[0]
pointer_to_result = net(pointer_to_data)
print(pointer_to_result)
print(pointer_to_result.get())


# -- Plans built at once -----------------------------------------------------------------------------
# With args_shape the plan is built when it is defined; a -1 size stands for any size (1 here).


@sy.func2plan(args_shape=[(-1, 1)])
def plan_double_abs(x):  # the tutorial defines it again, now built at once
    x = x + x
    x = torch.abs(x)
    return x


print("built:", plan_double_abs.is_built)


# State tensors travel with the plan; the function reads them with state.read().
@sy.func2plan(args_shape=[(1, 2)], state=(torch.tensor([1]),))
def plan_abs(x, state):
    (bias,) = state.read()
    x = x.abs()
    return x + bias


pointer_plan = plan_abs.send(device_1)
x_ptr = torch.tensor([[1.0, -1.0]]).tag("input_data2").send(device_1)
p = pointer_plan(x_ptr)
print(p.get())
