"""PySyft 0.2 tutorial, Part 1 (the basics of private deep learning), retold for fedsecure.

The same calls, in the same order, as PySyft 0.2.9's Part 1: a tensor goes to a worker and comes
back, ops on pointers run where the data lives, and autograd works through pointers (the gradient
comes back with the value). Only the import differs: ``import fedsecure as sy``.

Run: python examples/pysyft/part01_basics.py
"""

import torch

import fedsecure as sy

losses: dict[str, list[float]] = {}  # no training in this part

hook = sy.TorchHook(torch)

# A worker stands for a machine we do not control; "bob" lives in this process.
bob = sy.VirtualWorker(hook, id="bob")

x = torch.tensor([1, 2, 3, 4, 5])
y = torch.tensor([1, 1, 1, 1, 1])

# Send both tensors to bob: we keep pointers, bob keeps the values.
x_ptr = x.send(bob)
y_ptr = y.send(bob)
print(x_ptr)
print(bob._objects)

# An op on pointers is an instruction to bob; the result stays on bob too.
z = x_ptr + x_ptr
print(z)
print(bob._objects)

# What a pointer knows about where its value is.
print(x_ptr.location)
print(x_ptr.id_at_location)
print(x_ptr.owner)
print(hook.local_worker)

# get() brings the value back and deletes bob's copy.
print(x_ptr.get())
print(y_ptr.get())
print(z.get())
print(bob._objects)

# The torch API works on pointers unchanged.
x = torch.tensor([1, 2, 3, 4, 5]).send(bob)
y = torch.tensor([1, 1, 1, 1, 1]).send(bob)
z = x + y
print(z.get())
z = torch.add(x, y)
print(z.get())

# Autograd through pointers: backward runs on bob; get() returns the value with its gradient.
x = torch.tensor([1, 2, 3, 4, 5.0], requires_grad=True).send(bob)
y = torch.tensor([1, 1, 1, 1, 1.0], requires_grad=True).send(bob)
z = (x + y).sum()
z.backward()
x = x.get()
print(x)
print(x.grad)
assert x.grad is not None and torch.equal(x.grad, torch.ones(5)), "the gradient must come back with get()"
