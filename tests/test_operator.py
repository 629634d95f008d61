"""What an operator sees while a run goes: live history and status files, a progress line with an
ETA that names failed workers, a log file with levels, warnings counted instead of repeated, one
line on Ctrl-C, and one rule for relative paths."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fedsecure as sy
from fedsecure import fl
from fedsecure.data import federate, load_digits
from fedsecure.experiment import config
from fedsecure.experiment.run import collected_warnings
from fedsecure.fl.progress import Progress, duration

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits.toml"
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
FAST = ("--set", "training.epochs=1", "--set", "strategy.fraction_evaluate=0.0")


def fedsecure(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedsecure", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=ENV)


def start(*args: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "fedsecure", *args], cwd=cwd, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(predicate, what: str, timeout: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def read_json(path: Path) -> dict:  # type: ignore[type-arg]
    return json.loads(path.read_text()) if path.exists() else {}


def test_history_and_status_are_written_while_the_run_goes(tmp_path: Path) -> None:
    run = start("run", str(DIGITS), "--rounds", "400", "--output", "o", "--quiet", *FAST, cwd=tmp_path)
    try:
        out = tmp_path / "o"
        wait_for(lambda: len(read_json(out / "history.json").get("rounds", [])) >= 2, "two rounds in history.json")
        status = read_json(out / "status.json")
        assert status["state"] == "running" and status["rounds"] == 400 and status["pid"] == run.pid
        assert status["completed"] >= 2 and status["eta_seconds"] > 0 and status["name"] == "digits"
        run.send_signal(signal.SIGINT)
        _, err = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == 130
    rows = read_json(out / "history.json")["rounds"]
    row = rows[-1]
    assert len(row["chosen"]) == 5 and row["finished"] == row["chosen"] and row["workers"] == 5
    parts = row["train_seconds"] + row["transfer_seconds"] + row["aggregate_seconds"]
    assert parts == pytest.approx(row["fit_seconds"]) and row["train_seconds"] > row["aggregate_seconds"] > 0
    assert read_json(out / "status.json")["state"] == "interrupted"


def test_ctrl_c_ends_with_one_line_that_says_how_to_resume(tmp_path: Path) -> None:
    run = start("run", str(DIGITS), "--rounds", "400", "--output", "o", *FAST, cwd=tmp_path)
    try:
        wait_for(lambda: read_json(tmp_path / "o" / "status.json").get("completed", 0) >= 2, "two rounds")
        run.send_signal(signal.SIGINT)
        _, err = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == 130
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    last = err.strip().splitlines()[-1].strip()
    saved = json.loads((tmp_path / "o" / "checkpoint" / "state.json").read_text())["round"]
    assert last == (f"fedsecure run: interrupted; round {saved}'s checkpoint is in {tmp_path / 'o' / 'checkpoint'}: "
                    f"continue with fedsecure run {DIGITS} --resume")
    resumed = fedsecure("run", str(DIGITS), "--rounds", str(saved + 1), "--output", "o", "--resume", *FAST,
                        cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming after round {saved} of {saved + 1}" in resumed.stderr
    assert read_json(tmp_path / "o" / "status.json")["state"] == "finished"


def test_the_log_file_has_the_rounds_with_times_and_levels(tmp_path: Path) -> None:
    done = fedsecure("run", str(DIGITS), "--rounds", "2", "--output", "o", "--log-file", "run.log", *FAST,
                     cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = (tmp_path / "run.log").read_text().splitlines()
    rounds = [line for line in lines if "fedsecure.progress: round " in line]
    assert len(rounds) == 2 and all(" INFO " in line for line in rounds)
    assert rounds[0][:4].isdigit() and "ETA" in rounds[0] and "ETA" not in rounds[1]
    assert "INFO" not in done.stderr  # the display showed those lines; the terminal log adds none
    quiet = fedsecure("run", str(DIGITS), "--rounds", "1", "--output", "q", "--log-file", "warn.log",
                      "--log-level", "warning", *FAST, cwd=tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    assert (tmp_path / "warn.log").read_text() == ""
    bad = fedsecure("run", str(DIGITS), "--output", "b", "--log-file", str(tmp_path / "no" / "such" / "x.log"),
                    cwd=tmp_path)
    assert bad.returncode == 2 and "cannot write the log file" in bad.stderr
    assert not (tmp_path / "b").exists()


def test_a_failed_worker_is_named_with_its_reason_on_the_display_and_in_the_log(caplog) -> None:  # type: ignore[no-untyped-def]
    fed = sy.Federation()
    policy = sy.Policy(trusted_aggregators=frozenset({"agg"}), private_sends=False)
    workers = [sy.VirtualWorker(id=f"w{i}", data={"x": x, "y": y}, policy=policy, federation=fed)
               for i, (x, y) in enumerate(federate(load_digits(), 3, seed=0))]
    broken = sy.VirtualWorker(id="broken", federation=fed)  # holds no data
    agg = sy.VirtualWorker(id="agg", policy=sy.Policy(strict=True), federation=fed)
    shown = io.StringIO()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with caplog.at_level(logging.INFO, logger="fedsecure.progress"):
        fl.fit(model, [*workers, broken], fl.FedAvg(training=fl.LocalTraining(epochs=1)), rounds=2, aggregator=agg,
               progress=Progress(stream=shown))
    text = shown.getvalue()
    assert "round 1: worker broken failed in fit: " in text and "no data tagged" in text
    assert "round 2/2 " in text and "1 failed: broken" in text
    failed = [r for r in caplog.records if "worker broken failed" in r.getMessage()]
    assert len(failed) == 2 and all(r.levelno == logging.WARNING for r in failed)


def test_warnings_are_counted_and_reported_once_each() -> None:
    shown = io.StringIO()
    with collected_warnings(Progress(stream=shown)):
        for _ in range(50):
            warnings.warn("the accountant skipped an order", UserWarning, stacklevel=1)
        warnings.warn("something else", RuntimeWarning, stacklevel=1)
    lines = shown.getvalue().splitlines()
    assert lines == ["warning (50 times): UserWarning: the accountant skipped an order",
                     "warning (1 time): RuntimeWarning: something else"]


def test_the_eta_is_the_median_round_time_for_each_round_left() -> None:
    progress = Progress(enabled=False)
    progress.start(10, 0)
    for k, seconds in enumerate([9.0, 1.0, 1.2, 0.8], start=1):
        progress.end_round({"round": k, "round_seconds": seconds})
    assert progress.eta() == pytest.approx(6 * 1.1)
    assert [duration(s) for s in (4.4, 65, 7322)] == ["4s", "1m05s", "2h02m"]


def test_a_secure_round_records_its_survivors_and_dropouts(tmp_path: Path) -> None:
    done = fedsecure("run", str(DIGITS), "--rounds", "1", "--output", "o", "--quiet", *FAST,
                     "--set", "aggregation.secure=pairwise", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    row = read_json(tmp_path / "o" / "history.json")["rounds"][0]
    assert row["secure_survivors"] == 5 and row["secure_dropouts"] == [] and len(row["finished"]) == 5


def _experiment_dir(root: Path) -> Path:
    """An experiment file in a directory of its own, naming its data set and output relatively."""
    folder = root / "project"
    folder.mkdir()
    digits = load_digits()
    np.savez(folder / "mine.npz", x_train=digits.x_train.numpy(), y_train=digits.y_train.numpy(),
             x_test=digits.x_test.numpy(), y_test=digits.y_test.numpy())
    text = DIGITS.read_text().replace('dataset = "digits"', 'dataset = "mine.npz"')
    text = text.replace('[experiment]\n', '[experiment]\noutput = "results"\n')
    (folder / "exp.toml").write_text(text)
    return folder


def test_paths_in_a_file_start_at_the_file_and_paths_on_the_command_line_at_the_working_directory(
        tmp_path: Path) -> None:
    folder = _experiment_dir(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = fedsecure("run", str(folder / "exp.toml"), "--rounds", "1", "--quiet", *FAST, cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    assert (folder / "results" / "history.json").exists() and not (elsewhere / "results").exists()
    flagged = fedsecure("run", str(folder / "exp.toml"), "--rounds", "1", "--quiet", "--output", "mine", *FAST,
                        cwd=elsewhere)
    assert flagged.returncode == 0, flagged.stderr
    assert (elsewhere / "mine" / "history.json").exists() and not (folder / "mine").exists()
    np.savez(elsewhere / "other.npz", **dict(np.load(folder / "mine.npz")))
    os.chdir(elsewhere)
    try:
        exp = config.load(folder / "exp.toml", {"data.dataset": "other.npz", "experiment.tensorboard": "tb"})
        assert exp.config.data.dataset == str(elsewhere / "other.npz") and exp.dataset().name == "other.npz"
        assert exp.path(exp.config.experiment.tensorboard or "") == elsewhere / "tb"
        assert config.load(folder / "exp.toml").path("mine.npz") == folder / "mine.npz"
        assert config.load(DIGITS).output == elsewhere / "runs" / "digits"  # no output in the file: the default
    finally:
        os.chdir(ROOT)


def test_run_with_dashboard_serves_the_run_while_it_goes(tmp_path: Path) -> None:
    run = start("run", str(DIGITS), "--rounds", "400", "--output", "o", "--quiet", "--dashboard", "0", *FAST,
                cwd=tmp_path)
    try:
        assert run.stderr is not None
        first = run.stderr.readline()
        assert first.startswith("fedsecure run: the dashboard is at http://127.0.0.1:"), first
        url = first.split(" is at ", 1)[1].split()[0]
        wait_for(lambda: read_json(tmp_path / "o" / "status.json").get("completed", 0) >= 2, "two rounds")
        with urllib.request.urlopen(url + "api/run?id=.", timeout=30) as reply:
            shown = json.loads(reply.read())
        assert shown["status"]["state"] == "running" and len(shown["rounds"]) >= 2
        saved = read_json(tmp_path / "o" / "history.json")["rounds"]
        assert shown["rounds"][:2] == saved[:2]
        run.send_signal(signal.SIGINT)
        run.communicate(timeout=120)
    finally:
        run.kill()
    with pytest.raises(OSError):  # the dashboard ended with the run
        urllib.request.urlopen(url + "api/runs", timeout=5)


def test_the_fashion_mnist_first_look_learns(tmp_path: Path) -> None:
    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists():
        if os.environ.get("FEDSECURE_REQUIRE_DATASETS") == "1":
            pytest.fail("Fashion-MNIST is required here: apt-get install dataset-fashion-mnist")
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    done = fedsecure("run", str(ROOT / "examples" / "fashion_mnist_first_look.toml"), "--rounds", "3", "--quiet",
                     "--output", "o", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = read_json(tmp_path / "o" / "history.json")["rounds"]
    assert len(rows) == 3 and rows[-1]["central_accuracy"] > 0.4  # chance is 0.1; the full 15 rounds reach ~0.78


def test_the_cross_device_example_samples_a_hundred_of_ten_thousand_owners(tmp_path: Path) -> None:
    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists():
        if os.environ.get("FEDSECURE_REQUIRE_DATASETS") == "1":
            pytest.fail("Fashion-MNIST is required here: apt-get install dataset-fashion-mnist")
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    done = fedsecure("run", str(ROOT / "examples" / "fashion_mnist_cross_device.toml"), "--rounds", "2",
                     "--output", "o", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "... 9980 more workers" in done.stderr and "samples per worker: min 1, median 3, mean 6.0" in done.stderr
    assert len((tmp_path / "o" / "partition.csv").read_text().splitlines()) == 10_001
    rows = read_json(tmp_path / "o" / "history.json")["rounds"]
    assert [len(r["finished"]) for r in rows] == [100, 100] and len(set(rows[0]["chosen"]) & set(rows[1]["chosen"])) < 10
    assert "central_accuracy" in rows[-1] and "central_accuracy" not in rows[0]  # every 10th round, and the last
