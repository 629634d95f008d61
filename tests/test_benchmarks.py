"""The benchmarks run (quickly) and write what they promise; their numbers are not checked here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pointer_overhead_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "pointer_overhead.py"), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=True,
    )
    assert "train step, SGD" in proc.stdout
    result = json.loads(out.read_text())
    cases = {row["case"]: row for row in result["rows"]}
    step = cases["train step, SGD"]
    assert step["same_loss"] is True  # remote training computes what local training does
    assert step["remote_us"] > 0 and step["local_us"] > 0 and step["round_trips"] <= step["messages"]
    assert result["profile"]


def test_transport_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "transport.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "transport.py"), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=True,
    )
    assert "raw TCP" in proc.stdout
    result = json.loads(out.read_text())
    assert all(row["same_values"] for row in result["transfers"])
    assert all(p["correct"] for p in result["pipeline"])
