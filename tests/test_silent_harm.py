"""Mistakes that used to do harm silently now stop with a message that says what to do, and lose
nothing: a second run into a finished run's output, non-finite data, a diverging run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fedsecure as sy
from fedsecure import fl
from fedsecure.data import load_csv, load_digits, load_npz
from fedsecure.errors import DatasetError

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits.toml"
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}


def fedsecure(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedsecure", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=ENV)


def test_a_second_run_into_the_same_output_is_refused_and_loses_nothing(tmp_path: Path) -> None:
    first = fedsecure("run", str(DIGITS), "--rounds", "1", "--output", "o", "--quiet", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    state = (tmp_path / "o" / "checkpoint" / "state.json").read_bytes()
    history = (tmp_path / "o" / "history.json").read_bytes()
    again = fedsecure("run", str(DIGITS), "--rounds", "2", "--output", "o", "--quiet", cwd=tmp_path)
    assert again.returncode == 2
    assert "--resume" in again.stderr and "--overwrite" in again.stderr and "o" in again.stderr
    assert (tmp_path / "o" / "checkpoint" / "state.json").read_bytes() == state
    assert (tmp_path / "o" / "history.json").read_bytes() == history
    both = fedsecure("run", str(DIGITS), "--output", "o", "--resume", "--overwrite", cwd=tmp_path)
    assert both.returncode == 2 and "choose one" in both.stderr
    replaced = fedsecure("run", str(DIGITS), "--rounds", "2", "--output", "o", "--quiet", "--overwrite",
                         cwd=tmp_path)
    assert replaced.returncode == 0, replaced.stderr
    assert [row["round"] for row in json.loads((tmp_path / "o" / "history.json").read_text())["rounds"]] == [1, 2]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_values_in_an_archive_are_refused_at_load(tmp_path: Path, bad: float) -> None:
    x = np.random.default_rng(0).random((40, 3)).astype(np.float32)
    x[17, 2] = bad
    path = tmp_path / "data.npz"
    np.savez(path, x=x, y=np.arange(40) % 2)
    with pytest.raises(DatasetError, match=r"data\.npz: array 'x' holds 1 value.*\(17, 2\)"):
        load_npz(path)


def test_non_finite_values_in_a_csv_are_refused_with_their_row_and_column(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("a,b,label\n1,2,0\n3,nan,1\n5,6,0\n")
    with pytest.raises(DatasetError, match=r"data\.csv holds 1 value.*row 3, column 2"):
        load_csv(path)


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    data = load_digits()
    federation = sy.Federation()
    owners = []
    for i, part in enumerate(torch.arange(len(data.y_train)).chunk(2)):
        owners.append(sy.VirtualWorker(id=f"owner{i}", federation=federation,
                                       data={"x": data.x_train[part], "y": data.y_train[part]}))
    aggregator = sy.VirtualWorker(id="secure_worker", federation=federation)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    engine = fl.Engine(model, owners, fl.FedAvg(training=fl.LocalTraining(lr=0.01)), aggregator=aggregator,
                       checkpoint=tmp_path / "checkpoint")
    engine.run(1)
    good = {k: v.clone() for k, v in engine.parameters.items()}
    engine.strategy = fl.FedAvg(training=fl.LocalTraining(lr=1e38))  # overflows to Inf, then NaN
    with pytest.raises(fl.RoundFailed, match=r"round 2: the aggregated model is not finite.*round 1's checkpoint"):
        engine.run(2)
    assert all(torch.equal(good[k], v) for k, v in engine.parameters.items())
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["round"] == 1
