"""PySyft 0.2 tutorial, Part 3 (advanced remote execution tools), retold for fedsecure.

The same calls, in the same order, as PySyft 0.2.9's Part 3: pointers to pointers, ops on them,
getting them back one level at a time, what deleting a pointer frees, ``move`` between workers and
``remote_get``. ``worker._objects`` shows what each worker holds.

Run: python examples/pysyft/part03_remote_execution.py
"""

import torch

import fedsecure as sy

losses: dict[str, list[float]] = {}  # no training in this part

hook = sy.TorchHook(torch)
bob = sy.VirtualWorker(hook, id="bob")
alice = sy.VirtualWorker(hook, id="alice")

# A pointer to a pointer: the value is on bob, alice holds a pointer to it, we hold a pointer to alice's.
x = torch.tensor([1, 2, 3, 4, 5])
x = x.send(bob).send(alice)
print(bob._objects)
print(alice._objects)

# An op along the chain: the result is on bob, and alice holds a pointer to it.
y = x + x
print(y)
print(bob._objects)
print(alice._objects)

jon = sy.VirtualWorker(hook, id="jon")

bob.clear_objects()
alice.clear_objects()
x = torch.tensor([1, 2, 3, 4, 5]).send(bob).send(alice)
print(bob._objects)
print(alice._objects)

# get() unwinds one level at a time.
x = x.get()
print(x)
print(bob._objects)
print(alice._objects)
x = x.get()
print(x)
print(bob._objects)

# Deleting the last pointer frees what it pointed to, along the whole chain.
bob.clear_objects()
alice.clear_objects()
x = torch.tensor([1, 2, 3, 4, 5]).send(bob).send(alice)
print(bob._objects)
print(alice._objects)
del x
print(bob._objects)
print(alice._objects)

# Moving a value from one worker to another: it goes straight there, not through us.
x = torch.tensor([1, 2, 3, 4, 5]).send(bob)
print(bob._objects)
print(alice._objects)
x.move(alice)
print(bob._objects)
print(alice._objects)

# remote_get(): alice takes the value from bob.
x = torch.tensor([1, 2, 3, 4, 5]).send(bob).send(alice)
print(bob._objects)
print(alice._objects)
x.remote_get()
print(bob._objects)
print(alice._objects)
x.move(bob)
print(x)
print(bob._objects)
print(alice._objects)
