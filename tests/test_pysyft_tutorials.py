"""PySyft 0.2's tutorials, Parts 1-8 and 10, retold in examples/pysyft/ with the same calls in the
same order: each runs as a user runs it (its own process) and every training part learns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "examples" / "pysyft"
PARTS = {
    "part01_basics.py": [],
    "part02_federated_learning.py": ["local training", "federated training"],
    "part03_remote_execution.py": [],
    "part05_sandbox.py": [],
    "part06_mnist_cnn.py": ["federated training"],
    "part07_federated_dataset.py": ["federated training"],
    "part08_plans.py": [],
    "part10_secure_aggregation.py": ["federated training", "encrypted aggregation"],
}

# Runs the script as __main__ and prints what it recorded in ``losses``.
RUNNER = (
    "import json, runpy, sys; g = runpy.run_path(sys.argv[1], run_name='__main__'); "
    "print('LOSSES=' + json.dumps(g['losses']))"
)


def test_every_part_has_a_script() -> None:
    found = {p.name for p in SCRIPTS.glob("part*.py")}
    assert set(PARTS) <= found, f"missing: {sorted(set(PARTS) - found)}"


@pytest.mark.parametrize("name", sorted(PARTS))
def test_the_part_runs_and_learns(name: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "FEDSECURE_TUTORIAL_FULL"}
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, str(SCRIPTS / name)],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    line = next(x for x in reversed(done.stdout.splitlines()) if x.startswith("LOSSES="))
    losses = json.loads(line.removeprefix("LOSSES="))
    assert sorted(losses) == sorted(PARTS[name]), losses.keys()
    for section, values in losses.items():
        assert len(values) >= 2, f"{section}: too few losses recorded to tell ({values})"
        assert all(v == v for v in values), f"{section}: NaN loss ({values})"
        assert values[-1] < values[0], f"{section}: the loss did not fall ({values[0]} -> {values[-1]})"
