"""TorchHook adds names and changes nothing torch already does."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import fedsecure as sy


def test_hook_only_adds_the_verbs() -> None:
    script = """
import torch
from torch import nn
before = {c: set(vars(c)) for c in (torch.Tensor, nn.Module)}
ids = {c: {k: id(v) for k, v in vars(c).items()} for c in (torch.Tensor, nn.Module)}
import fedsecure as sy
assert not hasattr(torch.Tensor, "send"), "importing fedsecure must not touch torch"
sy.TorchHook(torch)
sy.hook(torch)  # again: harmless
for c in (torch.Tensor, nn.Module):
    added = set(vars(c)) - before[c]
    tensor_verbs = {"fix_precision", "send_", "get_", "tag", "describe", "tags", "description"}
    expected = {"send", "get", "move", "copy"} | (tensor_verbs if c is torch.Tensor else set())
    assert added == expected, added
    changed = [k for k, v in ids[c].items() if id(vars(c)[k]) != v]
    assert not changed, changed
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_plain_torch_is_unchanged_after_the_hook() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x = torch.randn(5, 3)
    loss = model(x).pow(2).mean()
    loss.backward()
    assert model.weight.grad is not None and model.weight.grad.shape == (2, 3)
    assert not isinstance(x + 1, sy.PointerTensor)
    assert torch.equal(torch.tensor([1.0, 2.0]).copy(), torch.tensor([1.0, 2.0]))


def test_get_of_a_local_tensor_says_so() -> None:
    with pytest.raises(sy.OperationNotAllowed, match="already here"):
        torch.ones(2).get()


def test_verbs_need_a_worker() -> None:
    with pytest.raises(TypeError, match="needs a worker"):
        torch.ones(2).send("bob")
