"""Nothing of a round stays on an owner afterwards: the trained model's tensors are freed by the
request that moves the model to the aggregator, and the evaluated model's by the request that moves
its sums, so an owner that is not asked again for many rounds (one among thousands) holds only its
own data meanwhile."""

from __future__ import annotations

import ctypes
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import fedsecure as sy
from fedsecure import fl
from fedsecure.data import federate, load_digits
from processes import children, still_running


def test_owners_hold_only_their_data_between_rounds() -> None:
    federation = sy.Federation()
    trust = sy.Policy(trusted_aggregators=frozenset({"agg"}), private_sends=False)
    shares = federate(load_digits(seed=0), 4, seed=0)
    owners = [sy.VirtualWorker(id=f"o{i}", data={"x": x[:-20], "y": y[:-20], "x_test": x[-20:], "y_test": y[-20:]},
                               policy=trust, federation=federation) for i, (x, y) in enumerate(shares)]
    aggregator = sy.VirtualWorker(id="agg", policy=sy.Policy(strict=True), federation=federation)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    strategy = fl.FedAvg(training=fl.LocalTraining(epochs=1, batch_size=32, lr=0.1), fraction_fit=0.5,
                         min_fit_workers=2, fraction_evaluate=0.5)
    engine = fl.Engine(model, owners, strategy, aggregator=aggregator, seed=0)
    for _ in range(3):
        row = engine.run_round()
        assert row["workers"] == 2 and "federated_loss" in row
        assert [len(w.core.objects) for w in owners] == [4] * 4  # x, y, x_test, y_test: nothing else


@pytest.fixture()
def heap() -> Iterator[Any]:
    """`fedsecure.worker.heap` with no trim left pending by an earlier test's requests."""
    from fedsecure.worker import heap

    def cancel() -> None:
        with heap._pending:
            for timer in heap._later:
                timer.cancel()
            heap._later.clear()

    cancel()
    yield heap
    cancel()


def test_freed_memory_goes_back_to_the_system_at_most_once_a_second(heap, monkeypatch) -> None:

    calls: list[int] = []
    monkeypatch.setattr(heap, "_trim", lambda pad: calls.append(pad) or 1)
    monkeypatch.setattr(heap, "_last", [0.0])
    assert heap.trim_now_and_then() is True
    assert heap.trim_now_and_then() is False  # within the interval
    heap._last[0] -= heap.INTERVAL_S
    assert heap.trim_now_and_then() is True
    assert calls == [0, 0]


def _recorded(heap: Any, monkeypatch: pytest.MonkeyPatch, interval: float, quiet: float) -> list[float]:
    calls: list[float] = []
    monkeypatch.setattr(heap, "_trim", lambda pad: calls.append(time.monotonic()) or 1)
    monkeypatch.setattr(heap, "_last", [0.0])
    monkeypatch.setattr(heap, "INTERVAL_S", interval)
    monkeypatch.setattr(heap, "QUIET_S", quiet)
    return calls


def _until(calls: list[float], n: int) -> None:
    deadline = time.monotonic() + 10
    while len(calls) < n and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_trim_skipped_within_the_interval_is_made_once_requests_stop(heap, monkeypatch) -> None:
    """The last requests of a round come within a second of each other: what they freed goes
    back once they stop, not at the end of the second, nor at the next round's first request."""
    calls = _recorded(heap, monkeypatch, interval=30.0, quiet=0.05)
    assert heap.trim_now_and_then() is True
    assert heap.trim_now_and_then() is False
    last = time.monotonic()
    assert heap.trim_now_and_then() is False
    _until(calls, 2)
    time.sleep(0.2)  # the two skipped trims left one, not two
    assert len(calls) == 2 and 0.05 <= calls[1] - last < 25


def test_requests_that_do_not_stop_trim_once_an_interval(heap, monkeypatch) -> None:
    calls = _recorded(heap, monkeypatch, interval=0.2, quiet=0.5)
    start = time.monotonic()
    last = start
    while time.monotonic() - start < 1.2:  # a request every few ms: never quiet for 0.5 s
        last = time.monotonic()
        heap.trim_now_and_then()
        time.sleep(0.005)
    time.sleep(1.0)
    gaps = [b - a for a, b in zip(calls, calls[1:], strict=False)]
    assert 4 <= len(calls) <= 9 and min(gaps) >= 0.19, calls
    assert calls[-1] >= last, calls  # what the last request freed goes back: its own trim, or one after it


def test_a_host_starts_with_a_heap_per_training_thread_and_one_more(monkeypatch) -> None:
    """Unless the environment says otherwise; a simulation host whose threads train two owners at a
    time starts with it (`mode = "processes"` here, a Ray actor in test_ray.py)."""
    from fedsecure.experiment.simulation import Simulation
    from fedsecure.worker import heap

    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert heap.arena_limit(1) == {"MALLOC_ARENA_MAX": "2"} and heap.arena_limit(4) == {"MALLOC_ARENA_MAX": "5"}
    config = {"data": {"dataset": "digits", "workers": 4}}
    with Simulation(config, processes=1, concurrency=2) as sim:
        environ = Path(f"/proc/{sim._hosts[0].pid}/environ").read_bytes().split(b"\0")
    assert b"MALLOC_ARENA_MAX=3" in environ
    monkeypatch.setenv("MALLOC_ARENA_MAX", "8")
    assert heap.arena_limit(2) == {}  # the host inherits the 8


def test_a_worker_gives_freed_memory_back_after_a_request(bob, monkeypatch) -> None:
    from fedsecure.worker import heap

    if heap._malloc_trim() is None:
        pytest.skip("glibc's malloc_trim is not available here")
    long_ago = time.monotonic() - 10 * heap.INTERVAL_S
    monkeypatch.setattr(heap, "_last", [long_ago])
    bob.flush()
    assert heap._last[0] > long_ago, "the request was followed by a trim"


def test_the_engine_gives_a_rounds_memory_back_after_the_fit_and_after_the_evaluation(monkeypatch) -> None:
    """Within a second of a worker's own trim (the aggregation's request), so the rate-limited trim
    would skip it: the released models and the evaluation's activations stayed in the heap and the
    next phase came on top."""
    from fedsecure.worker import heap

    federation = sy.Federation()
    trust = sy.Policy(trusted_aggregators=frozenset({"agg"}), private_sends=False)
    shares = federate(load_digits(seed=0), 2, seed=0)
    owners = [sy.VirtualWorker(id=f"o{i}", data={"x": x, "y": y}, policy=trust, federation=federation)
              for i, (x, y) in enumerate(shares)]
    aggregator = sy.VirtualWorker(id="agg", policy=sy.Policy(strict=True), federation=federation)
    digits = load_digits(seed=0)
    engine = fl.Engine(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), owners, fl.FedAvg(min_fit_workers=2),
                       aggregator=aggregator, test_data=(digits.x_test, digits.y_test), seed=0)
    phases: list[str] = []
    monkeypatch.setattr(heap, "_trim", lambda pad: phases.append(engine.progress.phase) or 1)
    monkeypatch.setattr(heap, "INTERVAL_S", 3600.0)  # the workers' own trims: none during the test
    monkeypatch.setattr(heap, "_last", [time.monotonic()])
    # nor the trim a skipped one leaves for a pause in the requests (on a busy machine a pause of
    # QUIET_S came within the fit phase)
    monkeypatch.setattr(heap, "_wait", lambda seconds: None)
    engine.run_round()
    assert phases == ["fit", "evaluate"], phases  # after the fit phase, after the evaluation


def test_a_run_keeps_its_long_lived_objects_out_of_the_collectors_sight_until_it_ends(tmp_path, monkeypatch) -> None:
    import gc

    from fedsecure.experiment.config import parse
    from fedsecure.experiment.run import run_experiment
    from fedsecure.fl.engine import Engine

    seen: list[int] = []
    inner = Engine.run_round
    monkeypatch.setattr(Engine, "run_round", lambda self: seen.append(gc.get_freeze_count()) or inner(self))
    exp = parse({"experiment": {"rounds": 2, "output": str(tmp_path / "run")}, "data": {"workers": 2}}, "t.toml")
    assert gc.get_freeze_count() == 0
    run_experiment(exp, progress=False)
    assert len(seen) == 2 and min(seen) > 1000  # the workers, their data, the model, the modules
    assert gc.get_freeze_count() == 0  # all given back
    gc.freeze()  # a process that froze objects of its own: left as it is
    try:
        frozen = gc.get_freeze_count()
        seen.clear()
        run_experiment(parse({"experiment": {"rounds": 1, "output": str(tmp_path / "again")},
                              "data": {"workers": 2}}, "t.toml"), progress=False)
        # nothing of this run joined them (a frozen object that dies leaves the count)
        assert len(seen) == 1 and seen[0] <= frozen and gc.get_freeze_count() <= frozen
    finally:
        gc.unfreeze()


@pytest.mark.parametrize("mode", ["local", "processes"])
def test_a_run_keeps_only_the_test_set_once_the_owners_hold_their_shares(tmp_path, monkeypatch, mode) -> None:
    """The owners hold copies of their shares (or load them in their own processes): the model owner's
    training set would be dead weight for the whole run (188 MB of Fashion-MNIST's 60,000 images)."""
    import weakref

    from fedsecure.experiment.config import Experiment, parse
    from fedsecure.experiment.run import run_experiment
    from fedsecure.experiment.simulation import Simulation
    from fedsecure.fl.engine import Engine

    read, alive = Experiment.dataset, []
    training_sets: list[weakref.ref[torch.Tensor]] = []

    def dataset(self: Experiment) -> Any:
        data = read(self)
        training_sets.append(weakref.ref(data.x_train))
        return data

    inner, start = Engine.run_round, Simulation.start
    monkeypatch.setattr(Experiment, "dataset", dataset)
    monkeypatch.setattr(Engine, "run_round", lambda self: alive.append(training_sets[0]() is not None) or inner(self))
    # host processes read the data set themselves: the model owner's copy is gone before they start
    monkeypatch.setattr(Simulation, "start", lambda self: alive.append(training_sets[0]() is not None) or start(self))
    exp = parse({"experiment": {"rounds": 1, "output": str(tmp_path / "run")}, "data": {"workers": 2},
                 "workers": {"mode": mode, **({"processes": 1} if mode == "processes" else {})}}, "t.toml")
    history = run_experiment(exp, progress=False)
    assert alive == [False] * (2 if mode == "processes" else 1) and "central_accuracy" in history.last


def test_simulation_hosts_are_forked_by_one_zygote_and_stop_with_it() -> None:
    """The hosts share the zygote's imports (copy-on-write); stopping the simulation stops them all."""
    from fedsecure.experiment.simulation import Simulation

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with Simulation({"data": {"dataset": "digits", "workers": 4}}, processes=2) as sim:
        (zygote,) = sim._hosts
        hosts = children(zygote.pid)
        assert len(hosts) == 2
        fl.fit(model, sim.workers, fl.FedAvg(training=fl.LocalTraining(epochs=1, batch_size=32, lr=0.1)), rounds=1,
               aggregator=sim.aggregator, groups=sim.groups)
    assert zygote.returncode == 0  # every host stopped cleanly on the zygote's SIGTERM
    assert not [pid for pid in hosts if Path(f"/proc/{pid}").exists()]


TGKILL = {"x86_64": 234, "aarch64": 131}  # the syscall's number


@pytest.mark.skipif(platform.machine() not in TGKILL or sys.platform != "linux", reason="tgkill on Linux")
def test_a_host_stops_when_its_sigterm_comes_to_a_thread_other_than_its_main_one() -> None:
    """The kernel gives a process's signal to any thread that does not block it; Python runs the
    handler only once the main thread wakes. Sent to one of gRPC's threads, as the kernel may, the
    zygote's SIGTERM still stops the host."""
    from fedsecure.experiment.simulation import Simulation

    libc = ctypes.CDLL(None, use_errno=True)
    with Simulation({"data": {"dataset": "digits", "workers": 2}}, processes=1) as sim:
        (zygote,) = sim._hosts
        (host,) = children(zygote.pid)
        threads = [int(t.name) for t in Path(f"/proc/{host}/task").iterdir() if int(t.name) != host]
        assert threads, "the host serves from threads of gRPC's"
        assert libc.syscall(TGKILL[platform.machine()], host, threads[-1], signal.SIGTERM) == 0
        assert still_running([host]) == []
        assert zygote.wait(10) == 0  # the host stopped cleanly


def test_a_killed_run_leaves_no_host_behind() -> None:
    """SIGKILL to the run (nothing of it can stop its hosts): its zygote sees it gone and stops
    them; SIGKILL to a zygote: its hosts see it gone and stop."""
    started = subprocess.Popen([sys.executable, "-c", KILLED_RUN], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert started.stdout is not None
    zygote = int(started.stdout.readline())
    hosts = children(zygote)
    assert len(hosts) == 2
    started.kill()
    started.wait()
    assert still_running([zygote, *hosts]) == []

    from fedsecure.experiment.simulation import Simulation

    with Simulation({"data": {"dataset": "digits", "workers": 4}}, processes=2) as sim:
        (proc,) = sim._hosts
        hosts = children(proc.pid)
        proc.kill()
        assert still_running(hosts) == []


def test_a_host_whose_server_does_not_stop_ends_after_its_grace_and_a_bound(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The host's body, here in the test's process, with a server whose stop never ends: told to
    stop, the host gives it GRACE_S and STOP_S, says so and returns (its process then exits)."""
    from fedsecure.experiment import host

    stuck = threading.Event()

    class Stuck:
        address = "127.0.0.1:1"

        def stop(self, grace: float) -> None:
            stuck.wait()

    monkeypatch.setattr(host, "serve", lambda spec: Stuck())
    monkeypatch.setattr(host, "GRACE_S", 0.2)
    monkeypatch.setattr(host, "STOP_S", 0.3)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    stop = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
    try:
        stop.start()
        started = time.monotonic()
        host.host({}, 3)
        took = time.monotonic() - started
    finally:
        stop.cancel()
        for s, handler in handlers.items():
            signal.signal(s, handler)
        stuck.set()
    assert 0.3 + 0.5 <= took < 10, took  # the signal's 0.3 s, then the grace and the bound
    out, err = capsys.readouterr()
    assert "simulation host 3 listening on 127.0.0.1:1" in out
    assert "simulation host 3: its server did not stop within 0.5 s" in err


KILLED_RUN = """
import time
from fedsecure.experiment.simulation import Simulation
sim = Simulation({"data": {"dataset": "digits", "workers": 4}}, processes=2).start()
(zygote,) = sim._hosts
print(zygote.pid, flush=True)  # its hosts have started: start() waits for their addresses
time.sleep(600)
"""


def test_a_host_that_fails_as_it_starts_is_reported_at_once(tmp_path: Path) -> None:
    """Not after the start-up timeout: the zygote says which host stopped, with its exit status."""
    from fedsecure.experiment.simulation import Simulation

    missing = tmp_path / "nowhere.npz"
    sim = Simulation({"data": {"dataset": str(missing), "workers": 4}}, processes=2, startup_timeout=300)
    with pytest.raises(fl.ConfigurationError, match="simulation host [01] stopped with exit status 1 as it started"):
        sim.start()
    assert sim._hosts == []  # stopped: nothing left behind
