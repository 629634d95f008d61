"""PySyft 0.2 tutorial, Part 5 (welcome to the sandbox), retold for fedsecure.

The same calls, in the same order, as PySyft 0.2.9's Part 5: one call sets up a hook, six workers
holding parts of public data sets, and a grid over them; tensors are tagged and described, found
again by search on one worker, then across the grid. Only the import differs:
``import fedsecure as sy``.

The sandbox's data comes from scikit-learn without a download. PySyft's sandbox served the Boston
housing set, which scikit-learn removed in 1.2: the regression set here is diabetes ("#diabetes").

Run: python examples/pysyft/part05_sandbox.py
"""

# hook, bob and workers are put into this module's namespace by sy.create_sandbox(globals()).
# ruff: noqa: F821

import torch

import fedsecure as sy

losses: dict[str, list[float]] = {}  # no training in this part

# -- Part 1: the sandbox -------------------------------------------------------------------------

# One call fills this module's namespace: hook, the workers, their list and a grid.
sy.create_sandbox(globals())

print(workers)
print(hook)
print(bob)

# The sandbox's workers are ordinary workers: pointers work as in Part 1.
x = torch.tensor([1, 2, 3, 4, 5]).send(bob)
y = x + x
print(y.get())

# -- Part 2: finding tensors by their tags and descriptions --------------------------------------

x = torch.tensor([1, 2, 3, 4, 5]).tag("#fun", "#boston", "#housing").describe(
    "Example inputs, as for a model of house prices."
)
y = torch.tensor([1, 2, 3, 4, 5]).tag("#fun", "#boston", "#housing").describe(
    "Example targets, as for a model of house prices."
)
z = torch.tensor([1, 2, 3, 4, 5]).tag("#fun", "#mnist").describe("Example pixels, as for handwritten digits.")
print(x.tags, x.description)

# Tags and descriptions travel with the tensors.
x = x.send(bob)
y = y.send(bob)
z = z.send(bob)

# A search returns pointers to the objects matching every item: an item matches a tag exactly or
# occurs in the description. Here: x and y (they carry both tags), not z.
results = bob.search(["#boston", "#housing"])
print(results)
print(results[0].description)

# -- Part 3: the grid ----------------------------------------------------------------------------

grid = sy.PrivateGridNetwork(*workers)

# PySyft's sandbox searched "#boston" for Boston housing; scikit-learn no longer ships it, so the
# sandbox's regression set is diabetes, tagged "#diabetes". Each worker holds consecutive rows.
results = grid.search("#diabetes")
print(results)

diabetes_data = grid.search("#diabetes", "#data")
print(diabetes_data)

diabetes_target = grid.search("#diabetes", "#target")
print(diabetes_target)
