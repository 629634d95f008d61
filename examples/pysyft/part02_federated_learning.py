"""PySyft 0.2 tutorial, Part 2 (an introduction to federated learning), retold for fedsecure.

The same calls, in the same order, as PySyft 0.2.9's Part 2: a toy linear model learns first
locally, then from two workers' data, with the model sent to each worker in turn and fetched back
after each step; ``Optims`` keeps one optimizer per worker. The optimizer is built before the model
is sent: ``model.send`` moves the same parameter objects, so it steps the remote weights.

Note on privacy: here the model owner sends the data itself (``data[0:2].send(bob)``), so the data
is the model owner's own and the trained model may come back. On data a worker holds as its own,
``model.get()`` is refused; see docs/pysyft.md for the supported way (aggregation).

Run: python examples/pysyft/part02_federated_learning.py
"""

import torch
from torch import nn, optim

import fedsecure as sy
from fedsecure.federated.floptimizer import Optims

losses: dict[str, list[float]] = {"local training": [], "federated training": []}

hook = sy.TorchHook(torch)

# A toy data set: the target is the first input.
data = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1.0]], requires_grad=True)
target = torch.tensor([[0], [0], [1], [1.0]], requires_grad=True)

# First, plain local training.
model = nn.Linear(2, 1)


def train() -> None:
    opt = optim.SGD(params=model.parameters(), lr=0.1)
    for _ in range(20):
        opt.zero_grad()
        pred = model(data)
        loss = ((pred - target) ** 2).sum()
        loss.backward()
        opt.step()
        print(loss.data)
        losses["local training"].append(float(loss.data))


train()

# Now the same data, split between two workers.
bob = sy.VirtualWorker(hook, id="bob")
alice = sy.VirtualWorker(hook, id="alice")

data_bob = data[0:2]
target_bob = target[0:2]
data_alice = data[2:]
target_alice = target[2:]

data_bob = data_bob.send(bob)
data_alice = data_alice.send(alice)
target_bob = target_bob.send(bob)
target_alice = target_alice.send(alice)

datasets = [(data_bob, target_bob), (data_alice, target_alice)]

model = nn.Linear(2, 1)
workers = ["bob", "alice"]
optims = Optims(workers, optim=optim.Adam(params=model.parameters(), lr=0.1))


def federated_train() -> None:
    for _ in range(10):
        total = 0.0
        for data, target in datasets:
            model.send(data.location)  # the model goes to where this data is
            opt = optims.get_optim(data.location.id)
            opt.zero_grad()
            pred = model(data)
            loss = ((pred - target) ** 2).sum()
            loss.backward()
            opt.step()
            model.get()  # and comes back, trained on this worker's data
            loss = loss.get()
            print(loss)
            total += loss.item()
        losses["federated training"].append(total)  # both workers' losses, per pass over the data


federated_train()
