"""fedsecure against Flower and against a plain loop: one FedAvg workload, same data, seeds and cores.

The workload: Fashion-MNIST, a seeded subset of ``--subset`` training images,
Dirichlet(0.5) label skew over 10 workers, McMahan et al.'s CNN (workload.py), E=1, B=32, SGD with
lr 0.01 and momentum 0.9, ``--rounds`` rounds with every worker in every round, central evaluation
on the 10,000 test images after each round.

1. The data is prepared once, here: the subset, the partition (fedsecure.data.partition, scheme
   "dirichlet", alpha 0.5) and the test set go into one ``.npz`` that every system reads.
2. Each system runs as its own subprocess, one after the other (``--repeats`` > 1 alternates the
   order), on the same cores:
   - plain: plain_loop.py, one process, torch with one thread per core;
   - flower: flower_run.py in its own virtual environment (made on first use), Flower's
     simulation engine with Ray, 2 client actors of 1 torch thread each;
   - flower-1x2 (only when asked for): the same with one client actor of 2 CPUs, which trains
     one client at a time with 2 torch threads (Flower's actors train one client each);
   - fedsecure: fedsecure_run.py, fedsecure.fl.fit with ten data owners in fedsecure's simulation
     mode: 2 host processes of 1 torch thread each, the aggregator in the main process;
   - fedsecure-ray (only when asked for, or with ``--ray``): the same owners in fedsecure's Ray mode,
     2 Ray actors of 1 CPU (1 torch thread) each on a local Ray, the aggregator in the main process;
   - fedsecure-ray-1x2 (only when asked for): fedsecure's Ray mode on the same 2 CPUs as one
     actor of 2 CPUs that trains 2 owners at a time (``concurrency = 2``), 1 torch thread each;
   - fedsecure-ray-fixed (only when asked for): fedsecure-ray with glibc's mmap threshold fixed
     at 32 MB in the main process (``fedsecure_run.py --mmap-threshold 32``), which also fixes its
     trim threshold at 128 KB: what the main process's freed memory costs (README);
   - fedsecure-threads (only when asked for): the owners as VirtualWorkers in one process, 2
     training at a time with 1 torch thread each;
   - fedsecure-serial (only when asked for): in one process, one owner at a time, 2 torch threads;
   - plain-1thread (only when asked for): the plain loop with 1 torch thread, on 1 core.
   Each writes a JSON of per-round wall time (end of one central evaluation to the end of the
   next) and test accuracy.
3. While a system runs, a thread samples its whole process tree every 50 ms: the subprocess, its
   descendants and every process of its session (Ray's daemons included). Memory is reported two
   ways: the sum of RSS, which counts a page shared by several processes (forked workers, shared
   libraries, Ray's object store in /dev/shm) once per process and so overstates, and the sum of
   PSS (/proc/PID/smaps_rollup; a shared page split among its sharers, sampled every 10th time),
   which adds up to what the tree really occupies. Peaks are maxima over samples, so a spike
   shorter than the interval can be missed. Each process's PSS in the sample of the tree's peak
   (``pss_at_peak``, each process named by the script or binary it runs) and when that was
   (``pss_peak_when``: start-up, or which round and, for fedsecure, whether in the fit phase or
   after it) are printed after each run and go to the JSON.

Prints a table (median and total seconds per round, accuracy per round, peak tree memory, the ratios
fedsecure/Flower, fedsecure/plain and Flower/plain) and writes JSON, by default to
benchmarks/results/vs_flower_<subset>.json.

Run:
    python benchmarks/vs_flower/run.py --subset 12000 --rounds 5
    python benchmarks/vs_flower/run.py --subset 60000 --systems plain,flower
    python benchmarks/vs_flower/run.py --quick --systems plain      # seconds; the CI smoke test
    python benchmarks/vs_flower/run.py --ray --subset 2000 --rounds 2   # fedsecure on Ray (and Flower)

``--quick``: 1 round on 600 training and 1,000 test images of Fashion-MNIST, or of scikit-learn's
8x8 digits where Fashion-MNIST is not installed (``--dataset digits`` forces them).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
try:
    import fedsecure.data as fdata
except ModuleNotFoundError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT / "src"))
    import fedsecure.data as fdata

SYSTEMS = ("plain", "flower", "flower-1x2", "fedsecure", "fedsecure-ray", "fedsecure-ray-1x2", "fedsecure-ray-fixed",
           "fedsecure-threads", "fedsecure-serial", "plain-1thread")
DEFAULT_SYSTEMS = ("plain", "flower", "fedsecure")
# --ray: both sides on Ray, on 2 CPUs as 2 actors of 1 CPU, and as 1 actor of 2 CPUs
RAY_SYSTEMS = ("fedsecure-ray", "flower", "fedsecure-ray-1x2", "flower-1x2")
NUM_CLIENTS = 10
ALPHA = 0.5
SEED = 0
SAMPLE_S = 0.05
PSS_EVERY = 10
PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 2**20


# ---- data -------------------------------------------------------------------------------------------

def prepare_data(path: Path, *, subset: int, dataset: str, quick: bool, seed: int = SEED) -> dict[str, Any]:
    """Write the one data file all systems read; returns what it holds, for the report."""
    if dataset == "auto":
        dataset = "fashion-mnist" if fdata.FASHION_MNIST_DIR.is_dir() else "digits"
        if dataset == "digits" and not quick:
            raise SystemExit(
                f"Fashion-MNIST is not installed ({fdata.FASHION_MNIST_DIR}); install Debian's "
                "dataset-fashion-mnist, or pass --quick (--dataset digits) for a smoke run"
            )
    ds = fdata.load_fashion_mnist() if dataset == "fashion-mnist" else fdata.load_digits(seed=seed)
    x_train, y_train = ds.x_train.numpy(), ds.y_train.numpy()
    x_test, y_test = ds.x_test.numpy(), ds.y_test.numpy()
    rng = np.random.default_rng(seed)
    subset = min(subset, len(y_train))
    chosen = np.arange(len(y_train)) if subset == len(y_train) else np.sort(rng.choice(len(y_train), subset, replace=False))
    if quick and len(y_test) > 1000:
        keep = np.sort(rng.choice(len(y_test), 1000, replace=False))
        x_test, y_test = x_test[keep], y_test[keep]
    parts = fdata.partition(y_train[chosen], NUM_CLIENTS, scheme="dirichlet", alpha=ALPHA, seed=seed)
    arrays: dict[str, np.ndarray] = {
        "num_clients": np.array(NUM_CLIENTS),
        "image_size": np.array(x_train.shape[-1]),
        "seed": np.array(seed),
        "client_sizes": np.array([len(p) for p in parts]),
        "x_test": np.ascontiguousarray(x_test),
        "y_test": np.ascontiguousarray(y_test),
    }
    for c, part in enumerate(parts):
        idx = chosen[part]  # indices into the data set's training set
        arrays[f"idx_{c}"] = idx
        arrays[f"x_{c}"] = np.ascontiguousarray(x_train[idx])
        arrays[f"y_{c}"] = np.ascontiguousarray(y_train[idx])
    np.savez(path, **arrays)  # uncompressed: a system reads one client's members without the rest
    # fedsecure's simulation partitions the data set itself: the subset in its original order, beside
    np.savez(path.with_suffix(".subset.npz"), x_train=np.ascontiguousarray(x_train[chosen]),
             y_train=np.ascontiguousarray(y_train[chosen]), x_test=arrays["x_test"], y_test=arrays["y_test"])
    counts = fdata.partition_counts(y_train[chosen], parts, ds.num_classes)
    return {
        "dataset": ds.name,
        "train_images": int(len(chosen)),
        "test_images": int(len(y_test)),
        "image_size": int(x_train.shape[-1]),
        "clients": NUM_CLIENTS,
        "partition": f"dirichlet(alpha={ALPHA}), seed {seed}",
        "client_sizes": [len(p) for p in parts],
        "class_counts": np.asarray(counts).tolist(),
        "bytes": path.stat().st_size,
    }


# ---- memory of a process tree ----------------------------------------------------------------------

def _proc_table() -> dict[int, tuple[int, int, int, int]]:
    """pid -> (ppid, session, rss pages, CPU ticks used) of every process we can read."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        fields = raw[raw.rfind(b")") + 2 :].split()
        # after the command: state ppid pgrp session tty_nr tpgid flags minflt cminflt majflt
        # cmajflt utime stime cutime cstime priority nice num_threads itrealvalue starttime vsize rss
        table[int(name)] = (int(fields[1]), int(fields[3]), int(fields[21]), int(fields[11]) + int(fields[12]))
    return table


def tree_pids(root: int, table: dict[int, tuple[int, int, int, int]]) -> set[int]:
    """``root``, its descendants, and every process of its session (daemons that were re-parented)."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, *_) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, stack = set(), [root]
    while stack:
        pid = stack.pop()
        if pid in found or pid not in table:
            continue
        found.add(pid)
        stack.extend(children.get(pid, ()))
    found |= {pid for pid, (_, sid, *_) in table.items() if sid == root}
    return found


def _machine_busy_ticks() -> int:
    """CPU ticks all cores spent on anything but idle and iowait since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return sum(values) - values[3] - values[4]


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class TreeMonitor(threading.Thread):
    """Samples the memory of a process tree (see the module's docstring) until stopped."""

    def __init__(self, root: int, interval: float = SAMPLE_S) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        # time, tree RSS MB, tree PSS MB, processes, tree CPU s, machine busy CPU s
        self.samples: list[tuple[float, float, float | None, int, float, float]] = []
        self.top: dict[int, float] = {}  # pid -> its own peak RSS MB
        self.at_peak: dict[int, float] = {}  # pid -> its PSS MB in the sample of the tree's peak PSS
        self.peak_time: float | None = None  # when that sample was taken
        self.names: dict[int, str] = {}
        self.programs: dict[int, str] = {}  # what each process runs (`program`)
        self.cpu_ticks: dict[int, int] = {}  # pid -> CPU ticks it had used when last seen
        self.machine_start = _machine_busy_ticks()
        self.machine_end = self.machine_start
        self.loadavg: list[float] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        i = 0
        while not self._stop_event.is_set():
            table = _proc_table()
            pids = tree_pids(self.root, table)
            self.machine_end = _machine_busy_ticks()
            with open("/proc/loadavg") as f:
                self.loadavg.append(float(f.read().split()[0]))
            rss = 0.0
            for pid in pids:
                self.cpu_ticks[pid] = table[pid][3]
                mb = table[pid][2] * PAGE / MB
                rss += mb
                if mb > self.top.get(pid, 0.0):
                    self.top[pid] = mb
                # read again with each PSS sample: a process caught between fork and exec shows its
                # parent's command line, one still starting none, and Ray retitles its workers
                if pid not in self.names or i % PSS_EVERY == 0:
                    self._read_command(pid)
            pss = None
            if i % PSS_EVERY == 0:
                each = {pid: _pss_kb(pid) / 1024 for pid in pids}
                pss = sum(each.values())
                if pss > sum(self.at_peak.values()):
                    self.at_peak, self.peak_time = each, time.time()
            hz = os.sysconf("SC_CLK_TCK")
            self.samples.append((time.time(), rss, pss, len(pids), sum(self.cpu_ticks.values()) / hz,
                                 self.machine_end / hz))
            i += 1
            self._stop_event.wait(self.interval)

    def _read_command(self, pid: int) -> None:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # gone
            return
        if any(argv):
            self.names[pid], self.programs[pid] = " ".join(argv)[:100], program(argv)
        else:
            self.names.setdefault(pid, "?")

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def at(self, when: float) -> tuple[float, float, float | None, int, float, float] | None:
        """The last sample at or before ``when``."""
        before = [s for s in self.samples if s[0] <= when]
        return before[-1] if before else None

    def cpu_between(self, start: float, end: float) -> tuple[float, float] | None:
        """CPU seconds (this tree, everything else on the machine) between two times."""
        a, b = self.at(start), self.at(end)
        if a is None or b is None:
            return None
        tree = b[4] - a[4]
        return tree, max((b[5] - a[5]) - tree, 0.0)

    def summary(self) -> dict[str, Any]:
        rss = [s[1] for s in self.samples]
        pss = [s[2] for s in self.samples if s[2] is not None]
        biggest = sorted(self.top.items(), key=lambda kv: -kv[1])[:6]
        hz = os.sysconf("SC_CLK_TCK")
        tree_cpu = sum(self.cpu_ticks.values()) / hz
        machine_cpu = (self.machine_end - self.machine_start) / hz
        return {
            # CPU seconds the tree used, and those the rest of the machine used meanwhile: a
            # sign of how much other load the timings shared the cores with
            "tree_cpu_s": round(tree_cpu, 1),
            "others_cpu_s": round(max(machine_cpu - tree_cpu, 0.0), 1),
            "mean_loadavg_1min": round(statistics.mean(self.loadavg), 2) if self.loadavg else None,
            "samples": len(self.samples),
            "peak_rss_mb": max(rss, default=0.0),
            "peak_pss_mb": max(pss, default=0.0),
            "max_processes": max((s[3] for s in self.samples), default=0),
            "processes_seen": len(self.names),
            "largest_processes": [
                {"pid": pid, "peak_rss_mb": round(mb, 1), "cmd": self.names.get(pid, "?")} for pid, mb in biggest
            ],
            # where the tree's peak PSS was, process by process (driver, actors, Ray's own processes)
            "pss_at_peak": [
                {"pid": pid, "pss_mb": round(mb, 1), "program": self.programs.get(pid, "?"), "cmd": self.names.get(pid, "?")}
                for pid, mb in sorted(self.at_peak.items(), key=lambda kv: -kv[1])
            ],
        }


def _leftovers(root: int) -> set[int]:
    table = _proc_table()
    return {pid for pid in tree_pids(root, table) if pid != root}


# ---- running one system -----------------------------------------------------------------------------

def command(system: str, data: Path, rounds: int, out: Path, threads: int) -> list[str]:
    if system.startswith("plain"):
        return [sys.executable, str(HERE / "plain_loop.py"), "--data", str(data), "--rounds", str(rounds),
                "--threads", "1" if system == "plain-1thread" else str(threads), "--out", str(out)]
    if system.startswith("flower"):
        import flower_run  # noqa: PLC0415 - this directory is on sys.path (the script's own)

        python = flower_run.setup()
        one_actor = ["--client-cpus", str(threads), "--client-threads", str(threads)] if system == "flower-1x2" else []
        return [str(python), str(HERE / "flower_run.py"), "--data", str(data), "--rounds", str(rounds),
                "--threads", str(threads), "--out", str(out), *one_actor]
    if system.startswith("fedsecure"):
        mode = {"fedsecure": "processes", "fedsecure-ray": "ray", "fedsecure-ray-1x2": "ray-1x2",
                "fedsecure-ray-fixed": "ray", "fedsecure-threads": "threads", "fedsecure-serial": "serial"}[system]
        fixed = ["--mmap-threshold", "32"] if system == "fedsecure-ray-fixed" else []
        return [sys.executable, str(HERE / "fedsecure_run.py"), "--data", str(data), "--rounds", str(rounds),
                "--processes", str(threads), "--mode", mode, "--out", str(out), *fixed]
    raise SystemExit(f"unknown system {system!r}; choose from {', '.join(SYSTEMS)}")


class Monitored(NamedTuple):
    """A command run to its end while its process tree was sampled."""

    returncode: int
    started: float
    ended: float
    monitor: TreeMonitor
    stray: int  # processes of its tree still there when it ended (stopped since)


def run_monitored(cmd: list[str], log: Path, *, flower: bool) -> Monitored:
    """Run ``cmd`` (output to ``log``) in a session of its own, sampling its tree until it ends;
    fedsecure's source on its path, or (``flower``) Flower's environment alone."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    if flower:
        env.pop("PYTHONPATH")  # its own environment; workload.py is imported by path
    with open(log, "w") as logf:
        started = time.time()
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        monitor = TreeMonitor(proc.pid)
        monitor.start()
        rc = proc.wait()
        ended = time.time()
        # the tree after the main process ended: anything left is a daemon it failed to stop
        stray = _leftovers(proc.pid)
        monitor.stop()
    for pid in stray:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    return Monitored(rc, started, ended, monitor, len(stray))


def stamp() -> dict[str, Any]:
    """When and where a benchmark ran, for the head of its JSON."""
    return {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}}


def run_system(system: str, data: Path, rounds: int, workdir: Path, threads: int, log: Path) -> dict[str, Any]:
    out = workdir / f"{system}.json"
    out.unlink(missing_ok=True)
    cmd = command(system, data, rounds, out, threads)
    print(f"[{system}] {' '.join(cmd[1:2])} ... (log: {log})", flush=True)
    ran = run_monitored(cmd, log, flower=system.startswith("flower"))
    monitor = ran.monitor
    result: dict[str, Any] = {"system": system, "returncode": ran.returncode, "process_seconds": ran.ended - ran.started,
                              "memory": monitor.summary(), "stray_processes": ran.stray, "log": str(log)}
    if out.is_file():
        result.update(json.loads(out.read_text()))
    if ran.returncode != 0 or not out.is_file() or not result.get("rounds"):
        tail = log.read_text(errors="replace").splitlines()[-15:]
        result["available"] = False
        result.setdefault("reason", f"exit status {ran.returncode}; last lines of its log:\n  " + "\n  ".join(tail))
        print(f"[{system}] did not complete: {result['reason']}", flush=True)
        return result
    result["available"] = True
    secs = [r["seconds"] for r in result["rounds"]]
    result["median_round_s"] = statistics.median(secs)
    result["total_rounds_s"] = sum(secs)
    result["memory"]["pss_peak_when"] = peak_when(monitor.peak_time, result)
    result["memory"]["rss_mb_after_round"] = [(s[1] if (s := monitor.at(r["end"])) else None) for r in result["rounds"]]
    cpu = monitor.cpu_between(result["rounds"][0]["start"], result["rounds"][-1]["end"])
    if cpu is not None:  # CPU time depends far less than wall time on what else the machine runs
        result["cpu_s_per_round"] = cpu[0] / len(secs)
        result["others_cpu_s_per_round"] = cpu[1] / len(secs)
    print(f"[{system}] median round {result['median_round_s']:.2f} s, peak tree RSS "
          f"{result['memory']['peak_rss_mb']:.0f} MB, PSS {result['memory']['peak_pss_mb']:.0f} MB", flush=True)
    if result["memory"].get("pss_at_peak"):
        print(f"[{system}] PSS at the peak ({result['memory']['pss_peak_when']}): "
              f"{peak_split(result['memory']['pss_at_peak'])}", flush=True)
    return result


def program(argv: list[str]) -> str:
    """What a process runs, from its command line: the script of a Python process, else its binary."""
    words = [w for w in argv if w]
    if not words:
        return "?"
    if Path(words[0]).name.startswith("python"):
        if words[1:2] == ["-c"]:
            return "python -c"
        script = next((w for w in words[1:] if not w.startswith("-")), None)
        if script:
            return Path(script).name
    return Path(words[0]).name


def peak_split(at_peak: list[dict[str, Any]]) -> str:
    """The tree's PSS at its peak, process by process (largest first, in MB)."""
    return ", ".join(f"{p.get('program', '?')} {p['pss_mb']:.0f}" for p in at_peak)


def peak_when(at: float | None, result: dict[str, Any]) -> str | None:
    """Where in the run the tree's peak PSS was: before the rounds, or in round N, in its fit phase or
    in what follows it (aggregation and central evaluation) where the system reports its fit phase."""
    if at is None:
        return None
    if at < result["rounds"][0]["start"]:
        return f"start-up, {at - result['started']:.1f} s in" if "started" in result else "start-up"
    for r in result["rounds"]:
        if at <= r["end"]:
            into = at - r["start"]
            fit = r.get("engine_fit_s")
            part = "" if fit is None else (" (fit)" if into <= fit else " (after the fit: aggregation, evaluation)")
            return f"round {r['round']}, {into:.1f} of {r['seconds']:.1f} s{part}"
    return "after the last round"


# ---- report -------------------------------------------------------------------------------------------

def actor_growth(calls: list[dict[str, float]]) -> dict[str, Any] | None:
    """From Flower's per-call reports: each actor's RSS after its first and its last client call."""
    by_pid: dict[int, list[float]] = {}
    for call in calls:
        by_pid.setdefault(int(call["pid"]), []).append(call["rss-mb"])
    per_call = [(v[-1] - v[0]) / (len(v) - 1) for v in by_pid.values() if len(v) > 1]
    if not per_call:
        return None
    return {
        "actors": len(by_pid),
        "calls_per_actor": [len(v) for v in by_pid.values()],
        "rss_mb_first_call": [round(v[0], 1) for v in by_pid.values()],
        "rss_mb_last_call": [round(v[-1], 1) for v in by_pid.values()],
        "mb_per_call": statistics.mean(per_call),
    }


def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str) -> float | None:
    if not a or not b or not a.get("available") or not b.get("available"):
        return None
    den = b["memory"][key] if key.startswith("peak") else b[key]
    num = a["memory"][key] if key.startswith("peak") else a[key]
    return num / den if den else None


def report(results: dict[str, list[dict[str, Any]]], rounds: int) -> tuple[str, dict[str, Any]]:
    """The table, and per system the medians over repeats."""
    merged: dict[str, dict[str, Any]] = {}
    for system, runs in results.items():
        if not runs:  # not run yet
            continue
        ok = [r for r in runs if r.get("available")]
        if not ok:
            merged[system] = {"available": False, "reason": runs[-1].get("reason", "")}
            continue
        secs = [r_["seconds"] for run in ok for r_ in run["rounds"]]
        merged[system] = {
            "available": True,
            "median_round_s": statistics.median(secs),
            "total_rounds_s": statistics.median([run["total_rounds_s"] for run in ok]),
            "process_s": statistics.median([run["process_seconds"] for run in ok]),
            "memory": {
                "peak_rss_mb": statistics.median([run["memory"]["peak_rss_mb"] for run in ok]),
                "peak_pss_mb": statistics.median([run["memory"]["peak_pss_mb"] for run in ok]),
                "max_processes": max(run["memory"]["max_processes"] for run in ok),
                "tree_cpu_s": statistics.median([run["memory"]["tree_cpu_s"] for run in ok]),
                "others_cpu_s": statistics.median([run["memory"]["others_cpu_s"] for run in ok]),
                "rss_mb_after_round": ok[-1]["memory"].get("rss_mb_after_round"),
            },
            "cpu_s_per_round": statistics.median([run.get("cpu_s_per_round", math.nan) for run in ok]),
            "others_cpu_s_per_round": statistics.median([run.get("others_cpu_s_per_round", math.nan) for run in ok]),
            "accuracy": [r_["test_accuracy"] for r_ in ok[-1]["rounds"]],
            "round_s": [r_["seconds"] for r_ in ok[-1]["rounds"]],
        }
        if system == "flower" and ok[-1].get("client_calls"):
            merged[system]["actor_growth"] = actor_growth(ok[-1]["client_calls"])

    lines = []
    w = 30
    head = f"{'':{w}}" + "".join(f"{s:>19}" for s in merged)
    lines.append(head)
    lines.append("-" * len(head))

    def row(label: str, fn: Any) -> None:
        cells = []
        for m in merged.values():
            try:
                cells.append(f"{fn(m):>19}" if m["available"] else f"{'n/a':>19}")
            except (KeyError, TypeError, IndexError):
                cells.append(f"{'-':>19}")
        lines.append(f"{label:{w}}" + "".join(cells))

    row("median s per round", lambda m: f"{m['median_round_s']:.2f}")
    row(f"total s, {rounds} rounds", lambda m: f"{m['total_rounds_s']:.1f}")
    row("process s (with start-up)", lambda m: f"{m['process_s']:.1f}")
    row("peak tree RSS, MB", lambda m: f"{m['memory']['peak_rss_mb']:.0f}")
    row("peak tree PSS, MB", lambda m: f"{m['memory']['peak_pss_mb']:.0f}")
    row("processes in tree (max)", lambda m: f"{m['memory']['max_processes']}")
    row("CPU s per round: tree/others", lambda m: f"{m['cpu_s_per_round']:.1f} / {m['others_cpu_s_per_round']:.1f}")
    for r in range(rounds):
        row(f"round {r + 1}: s / accuracy", lambda m, r=r: f"{m['round_s'][r]:.1f} / {m['accuracy'][r]:.4f}")
    row("tree RSS after last round", lambda m: f"{m['memory']['rss_mb_after_round'][-1]:.0f}")
    lines.append("")
    ratios = {}
    pairs = [(f, other) for f in merged if f.startswith("fedsecure") for other in ("flower", "flower-1x2", "plain", "plain-1thread")]
    for a, b in [*pairs, ("flower", "plain")]:
        for key, what in (("median_round_s", "time per round"), ("cpu_s_per_round", "CPU s per round"),
                          ("peak_pss_mb", "peak PSS"), ("peak_rss_mb", "peak RSS")):
            value = ratio(merged.get(a), merged.get(b), key)
            ratios[f"{a}/{b} {what}"] = value
            if value is not None:
                lines.append(f"{a}/{b}, {what}: {value:.2f}x")
    plain = merged.get("plain")
    for system, m in merged.items():
        if system != "plain" and m.get("available") and plain and plain.get("available"):
            diff = max(abs(x - y) for x, y in zip(m["accuracy"], plain["accuracy"], strict=False))
            lines.append(f"{system}: largest accuracy difference from plain over the rounds: {diff:.4f}")
        if m.get("actor_growth"):
            g = m["actor_growth"]
            lines.append(
                f"flower: {g['actors']} client actors, RSS per actor {g['rss_mb_first_call']} MB after its first "
                f"call, {g['rss_mb_last_call']} MB after its last: {g['mb_per_call']:+.1f} MB per client call"
            )
        if not m.get("available"):
            lines.append(f"{system}: not measured: {m.get('reason', '').splitlines()[0] if m.get('reason') else ''}")
    return "\n".join(lines), {"systems": merged, "ratios": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subset", type=int, default=12000, help="training images (12000 or 60000)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                        help=f"comma-separated, from {', '.join(SYSTEMS)}")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each system, in alternating order")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="cores every system uses")
    parser.add_argument("--dataset", choices=("auto", "fashion-mnist", "digits"), default="auto")
    parser.add_argument("--quick", action="store_true", help="1 round on a tiny subset: a smoke run")
    parser.add_argument("--ray", action="store_true",
                        help=f"systems {','.join(RAY_SYSTEMS)} (or fedsecure-ray added to --systems); Flower "
                             "only if its environment exists")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--keep", type=Path, help="a folder to keep the data file, the logs and each JSON in")
    args = parser.parse_args()
    if args.quick:
        args.subset, args.rounds = 600, 1
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    for s in systems:
        if s not in SYSTEMS:
            parser.error(f"unknown system {s!r}; choose from {', '.join(SYSTEMS)}")
    if args.ray:  # fedsecure on Ray, against Flower (also on Ray) or the systems named
        named = args.systems != ",".join(DEFAULT_SYSTEMS)
        systems = list(dict.fromkeys([*systems, "fedsecure-ray"])) if named else list(RAY_SYSTEMS)
        sys.path.insert(0, str(HERE))
        import flower_run  # noqa: PLC0415 - this directory is on sys.path (the script's own)

        if any(s.startswith("flower") for s in systems) and not flower_run.ready():
            systems = [s for s in systems if not s.startswith("flower")]
            print(f"flower: skipped, its environment {flower_run.VENV} is not set up (make it with "
                  "`python benchmarks/vs_flower/flower_run.py --setup`, which downloads Flower and torch)", flush=True)
    out = args.out or ROOT / "benchmarks" / "results" / f"vs_flower_{'quick' if args.quick else args.subset}.json"
    sys.path.insert(0, str(HERE))

    with tempfile.TemporaryDirectory(prefix="vs_flower_") as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        data_path = workdir / "data.npz"
        t = time.perf_counter()
        data_info = prepare_data(data_path, subset=args.subset, dataset=args.dataset, quick=args.quick)
        print(f"data: {data_info['dataset']}, {data_info['train_images']} training images over "
              f"{NUM_CLIENTS} clients {data_info['client_sizes']}, {data_info['test_images']} test images "
              f"({time.perf_counter() - t:.1f} s)", flush=True)
        results: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
        for rep in range(args.repeats):
            order = systems if rep % 2 == 0 else systems[::-1]
            for system in order:
                log = workdir / f"{system}_{rep}.log"
                results[system].append(run_system(system, data_path, args.rounds, workdir, args.threads, log))
                write(out, args, data_info, results, final=False)  # what is measured so far, in case of a stop
    write(out, args, data_info, results, final=True)


def write(out: Path, args: argparse.Namespace, data_info: dict[str, Any], results: dict[str, list[dict[str, Any]]],
          *, final: bool) -> None:
    table, summary = report(results, args.rounds)
    title = (f"FedAvg, {data_info['dataset']}, {data_info['train_images']} training images, {NUM_CLIENTS} clients "
             f"Dirichlet({ALPHA}), McMahan CNN, E=1 B=32 SGD lr 0.01 m 0.9, {args.rounds} rounds, "
             f"{args.threads} cores")
    versions = next((r.get("versions") for r in results.get("flower", []) if r.get("versions")), None)
    if final:
        print()
        print(title)
        print(table)
        if versions:
            print(f"Flower side: {', '.join(f'{k} {v}' for k, v in versions.items())}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "vs_flower",
        **(head := stamp()),
        "machine": {**head["machine"], "threads_used": args.threads},
        "workload": {"title": title, "rounds": args.rounds, "quick": args.quick, **data_info},
        "sampling": {"interval_s": SAMPLE_S, "pss_every": PSS_EVERY},
        "summary": summary,
        "runs": results,
        "table": table,
        "complete": final,
    }, indent=1, default=str))
    if final:
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
