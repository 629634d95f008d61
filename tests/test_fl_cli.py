"""`fedsecure run` as a user runs it: a real process, real files, killed and resumed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits.toml"


# One torch thread per run: on a busy machine several threads per process oversubscribe the cores.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def fedsecure(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedsecure", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=ENV)


def test_the_digits_example_runs_and_writes_its_history(tmp_path: Path) -> None:
    done = fedsecure("run", str(DIGITS), "--rounds", "3", "--output", "out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "round 3/3" in done.stderr and "label skew" in done.stderr
    assert "workers: 10 owners in this process, 1 training at a time" in done.stderr
    assert "digits: 3 rounds, accuracy" in done.stderr
    rows = json.loads((tmp_path / "out" / "history.json").read_text())["rounds"]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert (tmp_path / "out" / "history.csv").read_text().startswith("round,")
    assert (tmp_path / "out" / "checkpoint" / "state.json").exists()


def _state_round(folder: Path) -> int:
    try:
        return json.loads((folder / "checkpoint" / "state.json").read_text())["round"]
    except (OSError, ValueError, KeyError):
        return 0


def test_a_killed_run_resumes_where_it_stopped(tmp_path: Path) -> None:
    args = ["run", str(DIGITS), "--rounds", "25", "--set", "training.epochs=2", "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "fedsecure", *args, "--output", "killed"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.monotonic() + 240
    while _state_round(tmp_path / "killed") < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stopped_at = _state_round(tmp_path / "killed")
    assert 3 <= stopped_at < 25, "the run ended before it could be killed"
    resumed = fedsecure(*args, "--output", "killed", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    whole = fedsecure(*args, "--output", "whole", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    a = json.loads((tmp_path / "killed" / "history.json").read_text())["rounds"]
    b = json.loads((tmp_path / "whole" / "history.json").read_text())["rounds"]
    assert [r["round"] for r in a] == list(range(1, 26))
    # the resumed run lost nothing and repeated nothing: its numbers are the uninterrupted run's
    assert [r["central_accuracy"] for r in a] == [r["central_accuracy"] for r in b]


def test_resuming_with_other_settings_is_refused(tmp_path: Path) -> None:
    assert fedsecure("run", str(DIGITS), "--rounds", "1", "--output", "o", "--quiet", cwd=tmp_path).returncode == 0
    again = fedsecure("run", str(DIGITS), "--rounds", "2", "--output", "o", "--resume", "--set", "training.lr=0.5",
                      cwd=tmp_path)
    assert again.returncode == 2 and "other settings (training)" in again.stderr


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("training.lrr=0.1", "unknown key 'lrr' in [training]"),
        ("training.epochs='two'", "wrong type"),
        ("strategy.name='fedsgd'", "unknown strategy 'fedsgd'"),
        ("data.dataset='mnist'", "is not 'digits'"),
        ("model.name='resnet'", "unknown model 'resnet'"),
        ("model.dropout=1.5", "[model] dropout is the probability of dropping a unit, in [0, 1); got 1.5"),
        ("experiment.evaluate_every=0", "evaluate_every must be >= 1"),
        ("workers.threads=2", "threads sets a simulation host's torch threads: it needs mode = \"processes\""),
        ("workers.concurrency=2", "concurrency sets how many owners a simulation host trains at a time"),
        ("data.floor=true", "scheme 'dirichlet' takes alpha, max_tries, min_size, not floor"),
        ("data.min_size=0", "min_size must be a positive integer, not 0"),
    ],
)
def test_bad_experiment_files_get_a_clear_error(tmp_path: Path, setting: str, message: str) -> None:
    done = fedsecure("run", str(DIGITS), "--rounds", "1", "--set", setting, "--output", "o", cwd=tmp_path)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr


def test_plot_draws_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    assert fedsecure("run", str(DIGITS), "--rounds", "2", "--output", "o", "--quiet", cwd=tmp_path).returncode == 0
    done = fedsecure("plot", "o/history.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "o" / "history.png").read_bytes()[:4] == b"\x89PNG"


def test_tensorboard_logs_every_round(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    done = fedsecure("run", str(DIGITS), "--rounds", "2", "--output", "o", "--quiet",
                     "--set", f"experiment.tensorboard='{tmp_path / 'tb'}'", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [s.step for s in events.Scalars("central_accuracy")] == [1, 2]


@pytest.mark.parametrize(("secure", "processes", "concurrency", "dropout"),
                         [("trusted", 2, 1, 0.0), ("shares", 2, 1, 0.0), ("trusted", 1, 2, 0.0), ("trusted", 1, 2, 0.5)])
def test_worker_processes_give_the_numbers_of_one_process(tmp_path: Path, secure: str, processes: int,
                                                          concurrency: int, dropout: float) -> None:
    """Also with one host that trains two owners at a time, each in a thread of its own, and with a
    dropout layer, whose masks two owners training at once in one process draw at the same time."""
    args = ["run", str(DIGITS), "--rounds", "3", "--quiet", "--set", f"aggregation.secure='{secure}'",
            "--set", f"model.dropout={dropout}"]
    local = fedsecure(*args, "--output", "local", cwd=tmp_path)
    hosted = fedsecure(*[a for a in args if a != "--quiet"], "--output", "proc", "--set", "workers.mode='processes'",
                       "--set", f"workers.processes={processes}", "--set", f"workers.concurrency={concurrency}",
                       cwd=tmp_path)
    assert local.returncode == 0 and hosted.returncode == 0, hosted.stderr
    assert "Warning" not in hosted.stderr, hosted.stderr  # the hosts start quietly
    hosts = "1 host process" if processes == 1 else f"{processes} host processes"
    assert (f"workers: 10 owners in {hosts}, {concurrency} training at a time in {'it' if processes == 1 else 'each'} "
            "with 1 torch thread") in hosted.stderr, hosted.stderr
    a = json.loads((tmp_path / "local" / "history.json").read_text())["rounds"]
    b = json.loads((tmp_path / "proc" / "history.json").read_text())["rounds"]
    for x, y in zip(a, b, strict=True):
        assert x["central_accuracy"] == pytest.approx(y["central_accuracy"], abs=1e-9)
        assert ("train_loss" in x) == (secure == "trusted")  # a secure round releases no per-worker loss
        assert x.get("train_loss", 0.0) == pytest.approx(y.get("train_loss", 0.0), rel=1e-6)


def test_the_private_example_runs_with_secure_aggregation_and_dp(tmp_path: Path) -> None:
    done = fedsecure("run", str(ROOT / "examples" / "digits_private.toml"), "--rounds", "2", "--output", "o",
                     cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "o" / "history.json").read_text())["rounds"]
    assert rows[0]["dp_epsilon"] < rows[1]["dp_epsilon"]


@pytest.mark.parametrize("secure", ["trusted", "shares"])
def test_the_same_experiment_runs_against_worker_servers(tmp_path: Path, secure: str) -> None:
    """Only [workers] changes: two data owners and a strict aggregator as TLS servers (with
    "shares", two strict share holders that each see only additive shares)."""
    import numpy as np

    import fedsecure as sy
    from fedsecure.data import federate, load_digits
    from fedsecure.transport.certs import write_federation

    holders = ["secure_worker", "holder_2"] if secure == "shares" else ["secure_worker"]
    certs = tmp_path / "certs"
    write_federation(certs, ["owner", "w0", "w1", *holders])
    for i, (x, y) in enumerate(federate(load_digits(), 2, scheme="iid", seed=0)):
        np.savez(tmp_path / f"w{i}.npz", x=x.numpy(), y=y.numpy())  # each owner's own file
    servers = [sy.WorkerProcess(h, clients={"owner": ""}, tls_dir=str(certs), accept_peers=["w0", "w1"],
                                aggregator=True).start() for h in holders]
    try:
        addresses = {s.id: s.address for s in servers}
        for i in range(2):
            servers.append(sy.WorkerProcess(f"w{i}", clients={"owner": ""}, tls_dir=str(certs),
                                            data=str(tmp_path / f"w{i}.npz"), peers=addresses,
                                            trust=holders).start())
        text = DIGITS.read_text()
        text = text[: text.index("[workers]")] + (
            f'[workers]\nmode = "remote"\ntls_dir = "{certs}"\naggregator = "secure_worker"\n'
            f'aggregator_address = "{addresses["secure_worker"]}"\n'
            + (f'share_holders = {holders!r}\nshare_holder_addresses = {{ holder_2 = "{addresses["holder_2"]}" }}\n'
               if secure == "shares" else "")
            + "".join(f'[[workers.remote]]\nid = "{s.id}"\naddress = "{s.address}"\n' for s in servers[len(holders):])
        )
        config = tmp_path / "remote.toml"
        config.write_text(text)
        done = fedsecure("run", str(config), "--rounds", "3", "--output", "o", "--quiet",
                         "--set", "strategy.fraction_evaluate=0", "--set", f"aggregation.secure='{secure}'",
                         cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        rows = json.loads((tmp_path / "o" / "history.json").read_text())["rounds"]
        assert [r["workers"] for r in rows] == [2, 2, 2] and rows[-1]["central_accuracy"] > 0.5
    finally:
        for s in servers:
            s.stop()


def test_the_consistency_check_runs_against_worker_servers(tmp_path: Path) -> None:
    """`fedsecure certs --secagg` gives each owner a signing key; owners served with it take part
    only in the checked protocol, which the experiment turns on with consistency_check."""
    import numpy as np

    import fedsecure as sy
    from fedsecure.data import federate, load_digits

    certs = tmp_path / "certs"
    made = fedsecure("certs", str(certs), "--party", "owner", "--party", "w0", "--party", "w1", "--party", "w2",
                     "--secagg", "w0", "--secagg", "w1", "--secagg", "w2", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert (certs / "w0.secagg.key").stat().st_mode & 0o077 == 0  # the signing key is its owner's alone
    for i, (x, y) in enumerate(federate(load_digits(), 3, scheme="iid", seed=0)):
        np.savez(tmp_path / f"w{i}.npz", x=x.numpy(), y=y.numpy())
    servers = []
    try:
        for i in range(3):
            servers.append(sy.WorkerProcess(f"w{i}", clients={"owner": ""}, tls_dir=str(certs),
                                            data=str(tmp_path / f"w{i}.npz"),
                                            secagg=(str(certs / f"w{i}.secagg.key"), str(certs / "secagg.json"))
                                            ).start())
        text = (ROOT / "examples" / "digits_private.toml").read_text()
        text = text[: text.index("[workers]")] + (
            f'[workers]\nmode = "remote"\ntls_dir = "{certs}"\nsecagg_pki = "{certs / "secagg.json"}"\n'
            f'aggregator_address = "unused:1"\n'
            + "".join(f'[[workers.remote]]\nid = "{s.id}"\naddress = "{s.address}"\n' for s in servers)
        )
        config = tmp_path / "remote.toml"
        config.write_text(text)
        common = ("run", str(config), "--rounds", "2", "--quiet", "--set", "strategy.min_fit_workers=3",
                  "--set", "strategy.fraction_evaluate=0", "--set", "aggregation.threshold=2")
        done = fedsecure(*common, "--output", "checked", "--set", "aggregation.consistency_check=true", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        rows = json.loads((tmp_path / "checked" / "history.json").read_text())["rounds"]
        assert [r["workers"] for r in rows] == [3, 3]
        # the same owners refuse the protocol without the check
        unchecked = fedsecure(*common, "--output", "plain", "--set", "experiment.seed=1", cwd=tmp_path)
        assert unchecked.returncode != 0 and "consistency" in unchecked.stderr + unchecked.stdout
    finally:
        for s in servers:
            s.stop()


def test_evaluating_every_few_rounds_and_always_after_the_last(tmp_path: Path) -> None:
    done = fedsecure("run", str(DIGITS), "--rounds", "5", "--output", "o", "--quiet",
                     "--set", "experiment.evaluate_every=2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "o" / "history.json").read_text())["rounds"]
    assert [r["round"] for r in rows if "central_accuracy" in r] == [2, 4, 5]
    assert all("train_loss" in r for r in rows)  # every round trained
    assert rows[-1]["central_accuracy"] > 0.5


CROSS_DEVICE = ("--set", "data.workers=300", "--set", "data.partition='quantity'", "--set", "data.floor=true",
                "--set", "strategy.fraction_fit=0.02", "--set", "strategy.min_fit_workers=1")


def test_a_cross_device_run_of_many_small_owners(tmp_path: Path) -> None:
    """300 owners of 2 to 30-odd digits (quantity skew with a floor), 6 of them a round: the table
    shows the first owners and the file has every one; each owner trains and evaluates."""
    done = fedsecure("run", str(DIGITS), "--rounds", "2", *CROSS_DEVICE, "--set", "data.min_size=2",
                     "--set", "strategy.fraction_evaluate=0.05", "--output", "out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "... 280 more workers" in done.stderr and "failed" not in done.stderr
    assert f"every worker's row: {tmp_path / 'out' / 'partition.csv'}" in done.stderr
    sizes = [line.split(",")[1] for line in (tmp_path / "out" / "partition.csv").read_text().splitlines()]
    assert sizes[0] == "samples" and len(sizes) == 301 and min(map(int, sizes[1:])) >= 2
    assert max(map(int, sizes[1:])) > 10 * min(map(int, sizes[1:]))  # skewed
    rows = json.loads((tmp_path / "out" / "history.json").read_text())["rounds"]
    assert [(r["workers"], len(r["finished"])) for r in rows] == [(6, 6), (6, 6)]
    assert all(r["finished"] == r["chosen"] for r in rows)


def test_owners_of_one_sample_with_a_held_out_part_are_refused(tmp_path: Path) -> None:
    done = fedsecure("run", str(DIGITS), "--rounds", "1", *CROSS_DEVICE, "--set", "data.min_size=1",
                     "--output", "out", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "[data] test_fraction = 0.2 holds out a row of every owner, but" in done.stderr
    assert "set [data] min_size = 2, or test_fraction = 0" in done.stderr
    assert not (tmp_path / "out" / "history.json").exists()
    done = fedsecure("run", str(DIGITS), "--rounds", "1", *CROSS_DEVICE, "--set", "data.min_size=1",
                     "--set", "data.test_fraction=0.0", "--set", "strategy.fraction_evaluate=0.0", "--output", "out",
                     cwd=tmp_path)
    assert done.returncode == 0, done.stderr
