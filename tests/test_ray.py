"""Simulation on Ray: the digits experiment with its owners in the actors of a real two-node Ray
cluster on this machine, a node lost in the middle of a run, and Ray missing altogether."""

from __future__ import annotations

import collections
import contextlib
import io
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedsecure import fl
from fedsecure.data import load_digits
from fedsecure.experiment import load, local_ray, ray_hosts, run_experiment
from fedsecure.experiment.models import build_model
from fedsecure.experiment.ray_hosts import RaySimulation
from processes import TREE, still_running

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

# Ray's raylet waits a fixed 30 s for its node to register, which a start beside other busy tests
# can miss (the cluster fixture starts once more when it does)
pytestmark = pytest.mark.alone

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits.toml"
ROUNDS = 3


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A head node and a second node of 1 CPU each: two actors of 1 CPU land on both. Started once
    more if Ray's own start-up times out (its raylet waits 30 s for the GCS, which a busy machine
    can exceed: it did once in a full run of the suite)."""
    for attempt in (1, 2):
        cluster = Cluster(initialize_head=False)
        try:
            cluster.add_node(num_cpus=1)
            cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
            break
        except Exception as exc:
            cluster.shutdown()
            if attempt == 2 or "timed out during startup" not in str(exc):
                raise
    yield cluster
    cluster.shutdown()


def _digits(tmp: Path, name: str, **settings: Any) -> Any:
    return load(DIGITS, {"experiment.rounds": ROUNDS, "experiment.output": str(tmp / name), **settings})


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The same experiment with every owner in this process (torch on one thread, as in an actor),
    one round longer than the run on Ray, for the resumed run to continue to."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        exp = _digits(tmp_path_factory.mktemp("local"), "local", **{"experiment.rounds": ROUNDS + 1})
        return run_experiment(exp, progress=False).rows
    finally:
        torch.set_num_threads(threads)


def _on_ray(cluster: Cluster) -> dict[str, Any]:
    return {"workers.mode": "ray", "workers.address": cluster.address, "workers.actors": 2, "workers.num_cpus": 1.0}


@pytest.fixture(scope="module")
def on_ray(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """The experiment with its owners in two actors of the cluster: its output, its history."""
    folder = tmp_path_factory.mktemp("ray")
    return folder / "ray", run_experiment(_digits(folder, "ray", **_on_ray(cluster)), progress=False).rows


def _same_numbers(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    """Equal to rounding: the same shares, shuffles (seeded by owner and round) and sum order."""
    assert [r["round"] for r in a] == [r["round"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert x["central_accuracy"] == pytest.approx(y["central_accuracy"], abs=1e-9)
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-6)


def test_actors_on_two_nodes_give_the_numbers_of_one_process(
    cluster: Cluster, on_ray: tuple[Path, list[dict[str, Any]]], one_process: list[dict[str, Any]], tmp_path: Path
) -> None:
    _same_numbers(on_ray[1], one_process[:ROUNDS])
    # the same placement as the run's: one actor on each node, as each actor reports its node itself
    # (Ray's state API would need its dashboard, which the plain `ray` package does not include)
    with RaySimulation(_digits(tmp_path, "nodes", **_on_ray(cluster)), actors=2, num_cpus=1,
                       address=cluster.address) as sim:
        assert sorted(sim.nodes) == sorted(n.node_id for n in [cluster.head_node, *cluster.worker_nodes])


def test_a_run_on_ray_resumes_from_its_checkpoint(
    cluster: Cluster, on_ray: tuple[Path, list[dict[str, Any]]], one_process: list[dict[str, Any]], tmp_path: Path
) -> None:
    shutil.copytree(on_ray[0], tmp_path / "ray")
    exp = _digits(tmp_path, "ray", **_on_ray(cluster), **{"experiment.rounds": ROUNDS + 1})
    history = run_experiment(exp, resume=True, progress=False)
    _same_numbers(history.rows, one_process)


def _refused(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return True
    return False


def _lose_a_node_after_round_1(cluster: Cluster, exp: Any, then: Callable[[], None] = lambda: None) -> Any:
    """Three rounds on two actors; after round 1, ``then()`` and the worker node goes (a new one
    joins, with room for Ray to restart the actor). The history, and the owners that were there."""
    data = exp.dataset()
    model = build_model("mlp", tuple(data.x_train.shape[1:]), data.num_classes, hidden=64)
    with RaySimulation(exp, actors=2, address=cluster.address, num_cpus=1.0,
                       ship_data=exp.config.workers.ship_data) as sim:
        assert sorted(sim.nodes) == sorted(n.node_id for n in [cluster.head_node, *cluster.worker_nodes])
        node = next(iter(cluster.worker_nodes))
        lost = sim.nodes.index(node.node_id)  # the actor on the node that goes
        old = sim.addresses[lost]

        def lose_the_node(row: dict[str, Any]) -> None:
            if row["round"] == 1:
                then()
                cluster.remove_node(node)
                cluster.add_node(num_cpus=1)  # room for Ray to restart the actor
                deadline = time.monotonic() + 30
                while not _refused(old) and time.monotonic() < deadline:
                    time.sleep(0.05)

        _, history = fl.fit(model, sim.workers, exp.strategy(), rounds=ROUNDS, aggregator=sim.aggregator,
                            groups=sim.groups, seed=exp.seed, on_round=lose_the_node)
        assert sim.addresses[lost] != old
    return history.rows, {w.id for w, host in zip(sim.workers, sim.hosts, strict=True) if host == lost}


ALL_TRAIN = {"data.workers": 6, "strategy.fraction_fit": 1.0, "strategy.min_fit_workers": 1,
             "strategy.fraction_evaluate": 0.0}


def _failed_then_back(rows: list[dict[str, Any]], owners_there: set[str]) -> None:
    assert rows[0]["workers"] == 6 and "failures" not in rows[0]
    failed = {f.split(" ", 1)[0] for f in rows[1]["failures"]}
    assert failed and failed <= owners_there, rows[1]["failures"]
    assert all("Ray actor" in f for f in rows[1]["failures"])
    assert rows[2]["workers"] == 6 and "failures" not in rows[2], rows[2].get("failures")


def test_the_owners_of_a_lost_node_fail_that_round_and_come_back(cluster: Cluster, tmp_path: Path) -> None:
    _failed_then_back(*_lose_a_node_after_round_1(cluster, _digits(tmp_path, "lost", **_on_ray(cluster), **ALL_TRAIN)))


def test_shipped_shares_outlive_the_data_file_and_the_node_that_held_them(cluster: Cluster, tmp_path: Path) -> None:
    """With ship_data the actors never read the data set: after round 1 its file is gone and so
    is one actor's node; Ray restarts that actor on the new node from the shares it was sent."""
    digits = load_digits(seed=0)
    npz = tmp_path / "digits.npz"
    np.savez(npz, x_train=digits.x_train.numpy(), y_train=digits.y_train.numpy(), x_test=digits.x_test.numpy(),
             y_test=digits.y_test.numpy())
    exp = _digits(tmp_path, "shipped", **_on_ray(cluster), **ALL_TRAIN,
                  **{"data.dataset": str(npz), "workers.ship_data": True})
    _failed_then_back(*_lose_a_node_after_round_1(cluster, exp, then=npz.unlink))
    assert not npz.exists()


def test_an_actor_that_cannot_read_the_data_set_says_how_to_send_it(cluster: Cluster, tmp_path: Path) -> None:
    exp = _digits(tmp_path, "unread", **_on_ray(cluster), **{"data.dataset": str(tmp_path / "only-here.npz")})
    with pytest.raises(fl.ConfigurationError, match=r"only-here\.npz.*on Ray node .*ship_data = true"):
        RaySimulation(exp, actors=2, address=cluster.address, num_cpus=1.0).start()
    with pytest.raises(fl.ConfigurationError, match='ship_data .* needs mode = "ray"'):
        _digits(tmp_path, "local", **{"workers.ship_data": True})


def test_fit_takes_a_backend_that_hosts_the_owners_for_the_run(
    cluster: Cluster, tmp_path: Path, one_process: list[dict[str, Any]]
) -> None:
    exp = _digits(tmp_path, "backend", **_on_ray(cluster))
    data = exp.dataset()
    torch.manual_seed(exp.seed)
    model = build_model("mlp", tuple(data.x_train.shape[1:]), data.num_classes, hidden=64)
    backend = RaySimulation(exp, actors=2, address=cluster.address, num_cpus=1.0)
    _, history = fl.fit(model, None, exp.strategy(), rounds=1, backend=backend, seed=exp.seed,
                        test_data=(data.x_test, data.y_test))
    _same_numbers(history.rows, one_process[:1])
    assert backend.addresses == []  # stopped after the run
    with pytest.raises(fl.ConfigurationError, match="not both"):
        fl.fit(model, backend.workers, exp.strategy(), rounds=1, backend=backend)
    with pytest.raises(fl.ConfigurationError, match="aggregator="):
        fl.fit(model, backend.workers, exp.strategy(), rounds=1)


def test_an_actor_trains_several_owners_at_a_time_with_the_numbers_of_one_process(
    cluster: Cluster, tmp_path: Path, one_process: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """concurrency = 2: one actor's owners in two lanes of five, whose requests run at the same time,
    from an experiment file's [workers] as `fedsecure run` reads it."""
    exp = _digits(tmp_path, "lanes", **{**_on_ray(cluster), "workers.actors": 1, "workers.concurrency": 2})
    with RaySimulation(exp, actors=1, address=cluster.address, num_cpus=1.0, concurrency=2) as backend:
        assert sorted(collections.Counter(backend.groups.values()).values()) == [5, 5]
        assert backend.threads == 1  # num_cpus // concurrency, at least 1
        if "MALLOC_ARENA_MAX" not in os.environ:  # a heap per training thread and one more
            arenas = backend._actors[0].__ray_call__.remote(lambda actor: os.environ.get("MALLOC_ARENA_MAX"))
            assert ray.get(arenas, timeout=30) == "3"
    calls: list[tuple[str, float, float]] = []
    send = ray_hosts._OwnerTransport.__call__

    def timed(self: Any, data: bytes, **kwargs: Any) -> bytes:
        start = time.monotonic()
        try:
            return send(self, data, **kwargs)
        finally:
            calls.append((self.name, start, time.monotonic()))

    monkeypatch.setattr(ray_hosts._OwnerTransport, "__call__", timed)
    shown = io.StringIO()
    _same_numbers(run_experiment(exp, stream=shown).rows, one_process[:ROUNDS])
    assert "workers: 10 owners in 1 Ray actor of 1 CPU on 1 node, 2 training at a time in it with 1 torch thread" \
        in shown.getvalue()
    with load_ray_workers(_digits(tmp_path, "threads", **{**_on_ray(cluster), "workers.actors": 1,
                                                          "workers.threads": 2})) as fed:
        assert "with 2 torch threads" in fed.where  # [workers] threads, per actor
    # one actor serves all ten owners: two of them in requests at the same time means two lanes
    assert any(a != b and s < f and t < e for a, s, e in calls for b, t, f in calls)
    with pytest.raises(fl.ConfigurationError, match="concurrency .* needs mode = .processes. or .ray."):
        _digits(tmp_path, "local", **{"workers.concurrency": 2})
    with pytest.raises(fl.ConfigurationError, match="concurrency must be >= 1"):
        RaySimulation(exp, actors=1, address=cluster.address, concurrency=0)


@contextlib.contextmanager
def load_ray_workers(exp: Any) -> Iterator[Any]:
    """The experiment's workers as `fedsecure run` starts them, stopped on leaving."""
    from fedsecure.experiment.workers import start_workers

    data = exp.dataset()
    with contextlib.ExitStack() as stack:
        yield start_workers(exp, data, exp.partitions(data), stack)


LOCAL_RAY = TREE + """
import sys, threading
from fedsecure.experiment import load, run_experiment
seen, arenas, done = set(), set(), threading.Event()
def sample():
    while not done.wait(0.2):
        for pid in descendants():
            seen.add(line := command(pid))
            if line.startswith("ray::OwnerHost"):
                try:
                    env = open(f"/proc/{pid}/environ", "rb").read().split(b"\\0")
                except OSError:
                    continue
                arenas.update(e.decode() for e in env if e.startswith(b"MALLOC_ARENA_MAX="))
threading.Thread(target=sample, daemon=True).start()
exp = load(sys.argv[1], {"experiment.rounds": 1, "experiment.output": sys.argv[2], "workers.mode": "ray",
                         "workers.actors": 1, "workers.num_cpus": 1.0})
rows = run_experiment(exp, progress=False).rows
done.set()
print(rows[-1]["central_accuracy"])
python = ("monitor.py", "dashboard/dashboard.py", "dashboard/agent.py", "runtime_env/agent/main.py")
print(sorted(p for p in python if any(p in c for c in seen)) or "lean", "raylet" if any("raylet" in c for c in seen) else "",
      "actor" if any(c.startswith("ray::OwnerHost") for c in seen) else "", *sorted(arenas))
"""


def test_a_local_ray_starts_without_the_processes_a_one_machine_run_does_not_use(
    cluster: Cluster, tmp_path: Path, one_process: list[dict[str, Any]]
) -> None:
    """No address: the run starts its own Ray (in a process of its own here, as `fedsecure run`
    does), without the autoscaler's monitor, the log monitor, the dashboard process and the two
    agents, about 50 MB each, and stops it; its actors get their environment from the raylet's; also
    where RAY_ADDRESS names another cluster (it said "num_cpus must not be provided" before)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": cluster.address}
    done = subprocess.run([sys.executable, "-c", LOCAL_RAY, str(DIGITS), str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert "Token authentication is enabled" not in done.stderr  # Ray's notice of its default, for a Ray of the run's own
    accuracy, processes = done.stdout.split("\n")[-3:-1]
    assert float(accuracy) == pytest.approx(one_process[0]["central_accuracy"], abs=1e-9)
    arenas = "" if "MALLOC_ARENA_MAX" in os.environ else " MALLOC_ARENA_MAX=2"  # from the raylet's environment
    assert processes == "lean raylet actor" + arenas


RAYLET = ["/ray/raylet", "--node_id=ab12", "--metrics-agent-port=0",
          "--dashboard_agent_command=/venv/bin/python -u /ray/dashboard/agent.py --node-id=ab12",
          "--runtime_env_agent_command=/venv/bin/python -u /ray/_private/runtime_env/agent/main.py", "--head"]


def test_each_agent_of_a_local_ray_has_a_stand_in_that_reports_its_ports_unused_and_ends_with_the_raylet(
    tmp_path: Path,
) -> None:
    session = tmp_path / "session dir"  # a space: the stand-in quotes what it writes
    session.mkdir()
    names = {port: getattr(ray._raylet, port) for ports in local_ray.AGENTS.values() for port in ports}
    command = local_ray.without_agents([*RAYLET, f"--session_dir={session}"], names)
    assert command is not None and command[0] == "/ray/raylet" and command[-1] == f"--session_dir={session}"
    assert command[1:3] == RAYLET[1:3] and command[5] == "--head"  # the rest as it was
    # the raylet runs each agent's command as its child; here a parent that ends after a second does
    children = []
    for flag in ("--dashboard_agent_command=", "--runtime_env_agent_command="):
        (arg,) = [a for a in command if a.startswith(flag)]
        parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                                   "print(subprocess.Popen(sys.argv[1:]).pid, flush=True); time.sleep(1)",
                                   *shlex.split(arg[len(flag):])], stdout=subprocess.PIPE, text=True)
        children.append((parent, int(parent.stdout.readline())))  # type: ignore[union-attr]
    expected = {f"{name}_ab12" for name in names.values()}
    deadline = time.monotonic() + 30
    while {p.name for p in session.iterdir()} != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert {p.name for p in session.iterdir()} == expected  # the raylet's names, no half-written file
    assert all(p.read_text().strip() == "-1" for p in session.iterdir())
    for parent, child in children:
        assert parent.wait(timeout=30) == 0
        assert still_running([child]) == [], "the stand-in outlived the raylet"
    # a raylet's command without what the stand-ins need: left to Ray
    assert local_ray.without_agents(RAYLET, names) is None
    assert local_ray.without_agents([f"--session_dir={session}", *RAYLET[:4]], names) is None


STAND_INS_FAIL = TREE + """
import ray
from fedsecure.experiment import local_ray
real, calls = ray.init, []
def init(**options):  # the first start fails after its processes started, as a raylet that never registers would
    calls.append(real(**options))
    if len(calls) == 1:
        raise Exception("The current node timed out during startup.")
ray.init = init
local_ray.start_local_ray(ray, 1, {"FEDSECURE_PROBE": "1"})
@ray.remote
def probe():
    return os.environ.get("FEDSECURE_PROBE")
print(ray.get(probe.remote(), timeout=60))
seen = [command(p) for p in descendants()]
print(sum("gcs_server" in c for c in seen), sum("/raylet " in c for c in seen),
      sum(c.startswith("ray::DashboardAgent") or "dashboard/agent.py" in c and "/raylet " not in c for c in seen),
      sum("kill -0" in c and "/raylet " not in c for c in seen))
ray.shutdown()
"""


def test_a_local_ray_whose_stand_ins_fail_starts_again_with_its_agents(tmp_path: Path) -> None:
    """Another Ray's raylet could refuse the stand-ins: the run says so, stops what that start left
    running (its GCS and raylet) and starts Ray with its own agents, and still the environment."""
    done = subprocess.run([sys.executable, "-c", STAND_INS_FAIL], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={**os.environ, "RAY_ADDRESS": ""})
    assert done.returncode == 0, done.stderr
    assert "with stand-ins for its agents did not start (The current node timed out" in done.stderr
    probe, counts = done.stdout.split("\n")[-3:-1]
    assert probe == "1"
    assert counts == "1 1 1 0"  # one GCS, one raylet, the dashboard agent, no stand-in


BLOCK_RAY = """
import sys
class NoRay:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, NoRay())
from fedsecure.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_without_ray_the_ray_mode_says_how_to_install_it(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", BLOCK_RAY, "run", str(DIGITS), "--rounds", "1", "--output", "o", "--quiet",
         "--set", "workers.mode='ray'"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 2, done.stderr
    assert "pip install 'fedsecure[ray]'" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "o" / "history.json").exists()
