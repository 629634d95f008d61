"""The tutorial, run as a user would: the example script, and the original code itself."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tutorial_part4.py"

# PySyft 0.2's "Part 4" notebook, cell by cell, with only its import line changed.
ORIGINAL = '''
import torch
import fedsecure as sy
import copy
hook = sy.TorchHook(torch)
from torch import nn, optim
torch.manual_seed(SEED)

bob = sy.VirtualWorker(hook, id="bob")
alice = sy.VirtualWorker(hook, id="alice")
secure_worker = sy.VirtualWorker(hook, id="secure_worker")

data = torch.tensor([[0,0],[0,1],[1,0],[1,1.]], requires_grad=True)
target = torch.tensor([[0],[0],[1],[1.]], requires_grad=True)

bobs_data = data[0:2].send(bob)
bobs_target = target[0:2].send(bob)

alices_data = data[2:].send(alice)
alices_target = target[2:].send(alice)

model = nn.Linear(2,1)

bobs_model = model.copy().send(bob)
alices_model = model.copy().send(alice)

bobs_opt = optim.SGD(params=bobs_model.parameters(),lr=0.1)
alices_opt = optim.SGD(params=alices_model.parameters(),lr=0.1)

for i in range(10):
    bobs_opt.zero_grad()
    bobs_pred = bobs_model(bobs_data)
    bobs_loss = ((bobs_pred - bobs_target)**2).sum()
    bobs_loss.backward()
    bobs_opt.step()
    bobs_loss = bobs_loss.get().data

    alices_opt.zero_grad()
    alices_pred = alices_model(alices_data)
    alices_loss = ((alices_pred - alices_target)**2).sum()
    alices_loss.backward()
    alices_opt.step()
    alices_loss = alices_loss.get().data
    print("Bob:" + str(bobs_loss) + " Alice:" + str(alices_loss))

alices_model.move(secure_worker)
bobs_model.move(secure_worker)

with torch.no_grad():
    model.weight.set_(((alices_model.weight.data + bobs_model.weight.data) / 2).get())
    model.bias.set_(((alices_model.bias.data + bobs_model.bias.data) / 2).get())

iterations = 10
worker_iters = 5

for a_iter in range(iterations):
    bobs_model = model.copy().send(bob)
    alices_model = model.copy().send(alice)

    bobs_opt = optim.SGD(params=bobs_model.parameters(),lr=0.1)
    alices_opt = optim.SGD(params=alices_model.parameters(),lr=0.1)

    for wi in range(worker_iters):
        bobs_opt.zero_grad()
        bobs_pred = bobs_model(bobs_data)
        bobs_loss = ((bobs_pred - bobs_target)**2).sum()
        bobs_loss.backward()
        bobs_opt.step()
        bobs_loss = bobs_loss.get().data

        alices_opt.zero_grad()
        alices_pred = alices_model(alices_data)
        alices_loss = ((alices_pred - alices_target)**2).sum()
        alices_loss.backward()
        alices_opt.step()
        alices_loss = alices_loss.get().data

    alices_model.move(secure_worker)
    bobs_model.move(secure_worker)
    with torch.no_grad():
        model.weight.set_(((alices_model.weight.data + bobs_model.weight.data) / 2).get())
        model.bias.set_(((alices_model.bias.data + bobs_model.bias.data) / 2).get())

    print("Bob:" + str(bobs_loss) + " Alice:" + str(alices_loss))

preds = model(data)
loss = ((preds - target) ** 2).sum()
print(preds)
print(target)
print(loss.data)
FINAL_LOSS = loss.item()
'''


def test_the_original_tutorial_code_runs_unchanged() -> None:
    namespace: dict[str, object] = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(ORIGINAL.replace("SEED", "0"), namespace)  # our own source text, not input
    assert "Bob:tensor(" in out.getvalue()
    assert namespace["FINAL_LOSS"] < 0.05  # the tutorial printed 0.0063


def test_the_example_script_converges_and_refuses_a_single_owners_model() -> None:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=300, check=True
    )
    assert "round 20" in proc.stdout
    assert "alices_model.get() was refused (private-data)" in proc.stdout
    final = float(re.search(r"final loss:\s+([0-9.]+)", proc.stdout).group(1))  # type: ignore[union-attr]
    assert final < 0.05


@pytest.mark.parametrize("seed", [1, 2, 3, 7, 11])
@pytest.mark.parametrize("strict", [False, True])
def test_the_example_converges_from_any_seed(seed: int, strict: bool) -> None:
    sys.path.insert(0, str(EXAMPLE.parent))
    try:
        import tutorial_part4
    finally:
        sys.path.pop(0)
    argv = ["--seed", str(seed)] + (["--strict"] if strict else [])
    with contextlib.redirect_stdout(io.StringIO()):
        assert tutorial_part4.main(argv) < 0.05


@pytest.mark.parametrize("strict", [False, True])
def test_the_example_runs_across_four_processes(strict: bool) -> None:
    cmd = [sys.executable, str(EXAMPLE), "--remote"] + (["--strict"] if strict else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)
    assert "secure_worker at 127.0.0.1:" in proc.stdout
    rule = "strict-aggregator" if strict else "private-data"
    assert f"alices_model.get() was refused ({rule})" in proc.stdout
    final = float(re.search(r"final loss:\s+([0-9.]+)", proc.stdout).group(1))  # type: ignore[union-attr]
    assert final < 0.05


@pytest.mark.parametrize("mode", ["pairwise", "shares"])
def test_the_example_needs_no_trusted_worker(mode: str) -> None:
    """--secure-aggregation: only the average is learnt, and it is the trusted worker's average."""
    sys.path.insert(0, str(EXAMPLE.parent))
    try:
        import tutorial_part4
    finally:
        sys.path.pop(0)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        trusted = tutorial_part4.main(["--rounds", "5"])
        secure = tutorial_part4.main(["--rounds", "5", "--secure-aggregation", mode])
    assert secure == pytest.approx(trusted, abs=1e-4)
    assert out.getvalue().count("alices_model.get() was refused (private-data)") == 2
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        tutorial_part4.main(["--remote", "--secure-aggregation", "shares"])
