"""Memory of fedsecure's simulations against a plain training loop, over rounds and at scale.

Each case runs as a child process (in a session of its own) while a thread here samples the PSS of
its whole process tree (``/proc/PID/smaps_rollup`` of the child, its descendants and its session's
processes: a page shared by several processes counts once in their sum). Per round, the tree's PSS
is the median of the samples taken during that round (robust to a sample caught mid-allocation);
the peak is the largest sample. With ``--repeats``, each number is the median over the repeats.

The cases (any subset with ``--cases``):

- default: the vs_flower workload (``benchmarks/vs_flower``: Fashion-MNIST subset, Dirichlet(0.5)
  over 10 owners, McMahan's CNN, E=1, B=32, SGD with momentum, central evaluation every round),
  run by the plain loop (``plain``, vs_flower/plain_loop.py, 1 torch thread; ``--plain plain``: 2), by fedsecure with the
  owners as VirtualWorkers in the one process (``local``: ``[workers] mode = "local"``, the default,
  2 training at a time) and with the owners in 2 simulation host processes (``processes``).
  Reported: peak tree PSS and its ratio to the plain loop (target for local: at most 1.5x), the
  per-round PSS and its growth per round (target: flat).
- ``--soak N``: N rounds of the same data with the small MLP (``[model] name = "mlp"``), through the
  experiment's own worker set-up (`fedsecure.experiment.workers.start_workers`) in local and
  processes mode; each process's peak PSS in the first and the last half of the rounds (target:
  the last within 5% of the first).
- ``--cross-device``: 10,000 simulated owners (VirtualWorkers in one process) with quantity-skewed
  Fashion-MNIST (each owner one row, plus a Dirichlet(0.5) share of the rest), 1% sampled per
  round, the MLP (``--cross-model``), E=1 B=32 (``--cross-epochs``, ``--cross-batch``); peak PSS
  (target: under 2 GB), the time to make the owners, and each round's split: local training (timed
  inside the workers), the rest of the fit phase (sending, moving, aggregating), central evaluation
  (history's fit_seconds, evaluate_seconds, round_seconds).

- ``--cases cross-device-run``: ``fedsecure run examples/fashion_mnist_cross_device.toml`` (the
  same owners and sampling, McMahan's CNN, E=5 B=10, ``--cross-rounds`` rounds, central evaluation
  at the last) in each of ``--run-modes`` (local, processes, ray): peak tree PSS, and each
  round's split from the run's own history (the engine's clock: the owners' ``Fit`` requests,
  the model's moves to and from them, the aggregator's close).

- ``--cases run``: ``fedsecure run`` as a user starts it, on ``examples/fashion_mnist.toml`` (60,000
  images, NIID-Bench's CNN; ``training.epochs = 1``, ``--rounds``) in each of ``--run-modes``
  (local, processes): the tree's peak PSS and its median over the run. The run keeps only the
  test set once the owners hold their shares.

Uses Fashion-MNIST from /usr/share/datasets/fashion-mnist when present, else scikit-learn's digits.
Prints a table and writes JSON (default benchmarks/results/memory.json).

Run:
    python benchmarks/memory.py --subset 12000 --rounds 5
    python benchmarks/memory.py --soak 200 --cases soak
    python benchmarks/memory.py --cross-device --cases cross-device
    python benchmarks/memory.py --quick            # seconds: digits, 2 rounds, every case small
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE / "vs_flower"))
try:
    import fedsecure  # noqa: F401
except ModuleNotFoundError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT / "src"))
import run as vf  # noqa: E402  (benchmarks/vs_flower/run.py: data preparation, process trees, PSS)

MB = 1024.0
SAMPLE_S = 0.2
CASES = ("compare", "soak", "cross-device", "cross-device-run", "run")


# ---- sampling a process tree ------------------------------------------------------------------------

class Sampler(threading.Thread):
    """PSS (MB) of every process of ``root``'s tree, every ``interval`` seconds, until stopped."""

    def __init__(self, root: int, interval: float = SAMPLE_S) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.samples: list[tuple[float, dict[int, float]]] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            pids = vf.tree_pids(self.root, vf._proc_table())
            pss = {pid: vf._pss_kb(pid) / MB for pid in pids}
            self.samples.append((time.time(), {p: v for p, v in pss.items() if v > 0}))
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def totals(self, start: float = 0.0, end: float = float("inf")) -> list[float]:
        return [sum(s.values()) for t, s in self.samples if start <= t <= end and s]

    def process_peaks(self, start: float, end: float) -> dict[int, float]:
        peaks: dict[int, float] = {}
        for t, s in self.samples:
            if start <= t <= end:
                for pid, v in s.items():
                    peaks[pid] = max(peaks.get(pid, 0.0), v)
        return peaks


def measure(cmd: list[str], out: Path, label: str) -> tuple[dict[str, Any], Sampler]:
    """Run ``cmd`` (which writes ``out``), sampling its tree; (what it wrote, the samples)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    out.unlink(missing_ok=True)
    log = out.with_suffix(".log")
    print(f"[{label}] running ... (log: {log})", flush=True)
    with open(log, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        sampler = Sampler(proc.pid)
        sampler.start()
        rc = proc.wait()
        sampler.stop()
    if rc != 0 or not out.is_file():
        tail = "\n  ".join(log.read_text(errors="replace").splitlines()[-15:])
        raise SystemExit(f"[{label}] failed with exit status {rc}:\n  {tail}")
    return json.loads(out.read_text()), sampler


def growth(values: list[float]) -> float | None:
    """Least-squares slope (MB per round) of the per-round PSS after the first round (the warm-up)."""
    ys = values[1:]
    if len(ys) < 2:
        return None
    xs = range(len(ys))
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def per_round(sampler: Sampler, rounds: list[dict[str, Any]]) -> list[float | None]:
    """The median tree PSS during each round (None where no sample fell in it)."""
    out: list[float | None] = []
    for r in rounds:
        inside = sampler.totals(r["start"], r["end"])
        out.append(statistics.median(inside) if inside else None)
    return out


# ---- the children -------------------------------------------------------------------------------------

def experiment_tables(data_file: str, *, mode: str, model: str, owners: int, rounds: int) -> dict[str, Any]:
    """The vs_flower workload as an experiment file's tables (the hosts read the data file themselves)."""
    return {
        "experiment": {"rounds": rounds, "seed": vf.SEED},
        "data": {"dataset": data_file, "workers": owners, "partition": "dirichlet", "alpha": vf.ALPHA},
        "model": {"name": model},
        "training": {"epochs": 1, "batch_size": 32, "optimizer": "SGD", "lr": 0.01, "momentum": 0.9},
        "workers": {"mode": mode, "processes": 2, "parallelism": 2},
    }


def child_experiment(args: argparse.Namespace) -> None:
    """The experiment's own workers (`start_workers`) and engine, each round's end time recorded."""
    import torch

    from fedsecure.experiment.config import parse
    from fedsecure.experiment.models import build_model
    from fedsecure.experiment.workers import start_workers
    from fedsecure.fl import Engine

    exp = parse(json.loads(args.tables))
    torch.set_num_threads(1)
    data = exp.dataset()
    torch.manual_seed(exp.seed)
    model = build_model(exp.config.model.name, tuple(data.x_train.shape[1:]), data.num_classes)
    parts = exp.partitions(data)
    rounds: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        fed = start_workers(exp, data, parts, stack)
        engine = Engine(model, fed.workers, exp.strategy(), aggregator=fed.aggregator,
                        test_data=(data.x_test, data.y_test), seed=exp.seed, parallelism=fed.parallelism,
                        groups=fed.groups)
        start = time.time()
        for _ in range(exp.rounds):
            row = engine.run_round()
            rounds.append({"round": row["round"], "start": start, "end": (start := time.time()),
                           "fit_seconds": row["fit_seconds"], "round_seconds": row["round_seconds"]})
    Path(args.out).write_text(json.dumps({"rounds": rounds, "pid": os.getpid()}))


def quantity_shares(n: int, owners: int, seed: int) -> list[Any]:
    """The cross-device shares: each owner one row, plus a Dirichlet(0.5) share of the rest (the
    product's quantity skew with a floor, as ``examples/fashion_mnist_cross_device.toml`` asks for)."""
    from fedsecure.data import quantity_skew

    return quantity_skew(n, owners, alpha=0.5, seed=seed, min_size=1, floor=True)


def child_cross_device(args: argparse.Namespace) -> None:
    """Many owners in this process, a fraction sampled each round; where each round's time goes."""
    import torch

    import fedsecure as sy
    from fedsecure import fl
    from fedsecure.data import load_digits, load_fashion_mnist
    from fedsecure.experiment.models import build_model
    from fedsecure.worker import training

    torch.set_num_threads(1)
    trained_s = [0.0]
    inner = training.fit

    def timed_fit(*a: Any, **k: Any) -> Any:  # the local training itself, inside each worker
        t0 = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            trained_s[0] += time.perf_counter() - t0

    training.fit = timed_fit  # type: ignore[assignment]
    data = load_digits() if args.dataset == "digits" else load_fashion_mnist()
    made = time.perf_counter()
    shares = quantity_shares(len(data.y_train), args.owners, vf.SEED)
    federation = sy.Federation()
    policy = sy.Policy(trusted_aggregators=frozenset({"secure_worker"}), private_sends=False)
    owners = [sy.VirtualWorker(id=f"o{i:05d}", data={"x": data.x_train[torch.from_numpy(s)],
                                                      "y": data.y_train[torch.from_numpy(s)]},
                               policy=policy, federation=federation) for i, s in enumerate(shares)]
    aggregator = sy.VirtualWorker(id="secure_worker", policy=sy.Policy(strict=True), federation=federation)
    made = time.perf_counter() - made
    model = build_model(args.cross_model, tuple(data.x_train.shape[1:]), data.num_classes)
    strategy = fl.FedAvg(training=fl.LocalTraining(epochs=args.cross_epochs, batch_size=args.cross_batch, lr=0.01,
                                                   optimizer_args={"momentum": 0.9}),
                         fraction_fit=args.fraction, min_fit_workers=1)
    engine = fl.Engine(model, owners, strategy, aggregator=aggregator, test_data=(data.x_test, data.y_test), seed=0,
                       evaluate_every=args.evaluate_every)
    rounds: list[dict[str, Any]] = []
    start = time.time()
    for _ in range(args.rounds):
        trained_s[0] = 0.0
        row = engine.run_round()
        rounds.append({"round": row["round"], "start": start, "end": (start := time.time()), "workers": row["workers"],
                       "train_seconds": trained_s[0], "fit_seconds": row["fit_seconds"],
                       "evaluate_seconds": row["evaluate_seconds"], "round_seconds": row["round_seconds"],
                       "history": {k: row[k] for k in ("train_seconds", "transfer_seconds", "aggregate_seconds") if k in row}})
    left = sum(len(w.core.objects) for w in owners) - 2 * len(owners)  # beyond each owner's x and y
    Path(args.out).write_text(json.dumps({"rounds": rounds, "owners": len(owners), "model": args.cross_model,
                                          "epochs": args.cross_epochs, "batch_size": args.cross_batch,
                                          "make_owners_seconds": made,
                                          "objects_left_on_owners": left, "pid": os.getpid()}))


# ---- the cases ----------------------------------------------------------------------------------------

def _sim_data(prepared: Path) -> str:
    """The prepared subset in its original order, for the experiment's own partition (vs_flower's trick)."""
    import workload as wl
    from fedsecure_run import simulation_config

    return str(simulation_config(wl.Data(str(prepared)), str(prepared))["data"]["dataset"])


def compare(args: argparse.Namespace, prepared: Path, work: Path) -> dict[str, Any]:
    systems = {"plain": args.plain, "local": "fedsecure-threads", "processes": "fedsecure"}
    results: dict[str, Any] = {}
    for name in args.modes:
        runs = []
        for rep in range(args.repeats):
            out = work / f"{name}-{rep}.json"
            result, sampler = measure(vf.command(systems[name], prepared, args.rounds, out, 2), out, name)
            rounds = per_round(sampler, result["rounds"])
            runs.append({"peak_mb": max(sampler.totals()), "round_mb": rounds,
                         "growth_mb_per_round": growth([r for r in rounds if r is not None]),
                         "processes": max(len(s) for _, s in sampler.samples),
                         "median_round_s": statistics.median(r["seconds"] for r in result["rounds"])})
        results[name] = {k: _median([r[k] for r in runs]) for k in ("peak_mb", "growth_mb_per_round", "processes",
                                                                     "median_round_s")}
        results[name]["round_mb"] = [_median([r["round_mb"][i] for r in runs]) for i in range(args.rounds)]
        results[name]["runs"] = runs
    plain = results.get("plain", {}).get("peak_mb")
    for r in results.values():
        r["ratio_to_plain"] = r["peak_mb"] / plain if plain else None
    return results


def soak(args: argparse.Namespace, work: Path, data_file: str) -> dict[str, Any]:
    results: dict[str, Any] = {}
    half = args.soak // 2
    for mode in args.soak_modes:
        out = work / f"soak-{mode}.json"
        tables = experiment_tables(data_file, mode=mode, model="mlp", owners=vf.NUM_CLIENTS, rounds=args.soak)
        result, sampler = measure([sys.executable, __file__, "--child", "experiment", "--tables", json.dumps(tables),
                                   "--out", str(out)], out, f"soak {mode}")
        rounds = result["rounds"]
        first = sampler.process_peaks(rounds[0]["start"], rounds[half - 1]["end"])
        last = sampler.process_peaks(rounds[half]["start"], rounds[-1]["end"])
        per_process = {str(pid): {"main": pid == result["pid"], "first_mb": first[pid], "last_mb": last.get(pid),
                                  "ratio": last.get(pid, 0) / first[pid]} for pid in first}
        results[mode] = {"rounds": len(rounds), "per_process": per_process,
                         "worst_ratio": max(p["ratio"] for p in per_process.values()),
                         "median_round_s": statistics.median(r["end"] - r["start"] for r in rounds)}
    return results


def cross_device(args: argparse.Namespace, work: Path, dataset: str) -> dict[str, Any]:
    out = work / "cross-device.json"
    cmd = [sys.executable, __file__, "--child", "cross-device", "--owners", str(args.owners), "--fraction",
           str(args.fraction), "--rounds", str(args.cross_rounds), "--dataset", dataset, "--cross-model",
           args.cross_model, "--cross-epochs", str(args.cross_epochs), "--cross-batch", str(args.cross_batch),
           "--evaluate-every", str(args.evaluate_every), "--out", str(out)]
    result, sampler = measure(cmd, out, "cross-device")
    rounds = result["rounds"]
    for r in rounds:
        r["fit_other_seconds"] = r["fit_seconds"] - r["train_seconds"]
    result["peak_mb"] = max(sampler.totals())
    result["after_setup_mb"] = statistics.median(sampler.totals(rounds[0]["start"] - 1.0, rounds[0]["start"]) or [0.0])
    result["round_mb"] = per_round(sampler, rounds)
    return result


def run_cli(args: argparse.Namespace, work: Path, dataset: str) -> dict[str, Any]:
    """`fedsecure run` of the example experiment, in each of ``--run-modes``."""
    example = ROOT / "examples" / ("digits.toml" if dataset == "digits" else "fashion_mnist.toml")
    results: dict[str, Any] = {}
    for mode in args.run_modes:
        output = work / f"run-{mode}"
        output.mkdir()
        cmd = [sys.executable, "-m", "fedsecure", "run", str(example), "--rounds", str(args.rounds), "--quiet",
               "--set", "training.epochs=1", "--set", f"workers.mode='{mode}'", "--output", str(output)]
        started = time.time()
        result, sampler = measure(cmd, output / "history.json", f"run {mode}")
        totals = sampler.totals()
        results[mode] = {"example": example.name, "rounds": len(result["rounds"]), "peak_mb": max(totals),
                         "median_mb": statistics.median(totals), "seconds": time.time() - started,
                         "processes": max(len(s) for _, s in sampler.samples)}
    return results


def cross_device_run(args: argparse.Namespace, work: Path, dataset: str) -> dict[str, Any]:
    """`fedsecure run` of the cross-device example, in each of ``--run-modes`` (on digits: ``--owners``
    of them, with ``--quick`` 300)."""
    example = ROOT / "examples" / "fashion_mnist_cross_device.toml"
    digits = ["--set", "data.dataset='digits'", "--set", f"data.workers={args.owners}"] if dataset == "digits" else []
    results: dict[str, Any] = {}
    for mode in args.run_modes:
        output = work / f"cross-device-run-{mode}"
        output.mkdir()
        cmd = [sys.executable, "-m", "fedsecure", "run", str(example), "--rounds", str(args.cross_rounds), "--quiet",
               "--set", f"workers.mode='{mode}'", "--set", f"experiment.evaluate_every={args.cross_rounds}",
               *digits, "--output", str(output)]
        started = time.time()
        result, sampler = measure(cmd, output / "history.json", f"cross-device run {mode}")
        fits = [r for r in result["rounds"] if "central_accuracy" not in r]  # the rounds without evaluation
        split = {k: statistics.median(r[k] for r in fits) for k in ("fit_seconds", "train_seconds",
                                                                     "transfer_seconds", "aggregate_seconds")}
        results[mode] = {"rounds": len(result["rounds"]), "peak_mb": max(sampler.totals()),
                         "processes": max(len(s) for _, s in sampler.samples), "seconds": time.time() - started,
                         "median_round_s": statistics.median(r["round_seconds"] for r in fits), **split,
                         "evaluate_seconds": result["rounds"][-1].get("evaluate_seconds"),
                         "central_accuracy": result["rounds"][-1].get("central_accuracy")}
    return results


def _median(values: list[Any]) -> Any:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


# ---- report -------------------------------------------------------------------------------------------

def _f(v: Any, fmt: str = ".0f") -> str:
    return "-" if v is None else format(v, fmt)


def report(res: dict[str, Any]) -> str:
    lines: list[str] = []
    if "compare" in res:
        lines += ["", "| case | processes | peak tree PSS MB | / plain | PSS per round MB | growth MB/round | s/round |",
                  "| --- | ---: | ---: | ---: | --- | ---: | ---: |"]
        for name, r in res["compare"].items():
            lines.append(f"| {name} | {_f(r['processes'])} | {_f(r['peak_mb'])} | {_f(r['ratio_to_plain'], '.2f')}x | "
                         f"{' '.join(_f(v) for v in r['round_mb'])} | {_f(r['growth_mb_per_round'], '.1f')} | "
                         f"{_f(r['median_round_s'], '.1f')} |")
    if "soak" in res:
        lines += ["", "| soak | rounds | process | peak PSS MB, first half | last half | last/first |",
                  "| --- | ---: | --- | ---: | ---: | ---: |"]
        for mode, r in res["soak"].items():
            for i, p in enumerate(sorted(r["per_process"].values(), key=lambda p: not p["main"])):
                lines.append(f"| {mode} | {r['rounds']} | {'main' if p['main'] else f'host {i}'} | {_f(p['first_mb'])} | "
                             f"{_f(p['last_mb'])} | {_f(p['ratio'], '.3f')} |")
    if "cross_device" in res:
        c = res["cross_device"]
        lines += ["", f"cross-device, {c['model']}, E={c['epochs']} B={c['batch_size']}: {c['owners']} owners made in "
                  f"{c['make_owners_seconds']:.1f} s; PSS after set-up "
                  f"{c['after_setup_mb']:.0f} MB, peak {c['peak_mb']:.0f} MB (target < 2048); objects left on owners: "
                  f"{c['objects_left_on_owners']}",
                  "| round | owners | training s | rest of fit s | training / fit | evaluation s | round s | PSS MB |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r, mb in zip(c["rounds"], c["round_mb"], strict=True):
            lines.append(f"| {r['round']} | {r['workers']} | {r['train_seconds']:.2f} | {r['fit_other_seconds']:.2f} | "
                         f"{r['train_seconds'] / r['fit_seconds']:.0%} | {r['evaluate_seconds']:.2f} | "
                         f"{r['round_seconds']:.2f} | {_f(mb)} |")
    if "cross_device_run" in res:
        lines += ["", "| cross-device example | processes | peak tree PSS MB | s/round | training s | moving s | "
                  "aggregating s | training / fit | evaluation s |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for mode, r in res["cross_device_run"].items():
            lines.append(f"| {mode} | {r['processes']} | {_f(r['peak_mb'])} | {r['median_round_s']:.2f} | "
                         f"{r['train_seconds']:.2f} | {r['transfer_seconds']:.2f} | {r['aggregate_seconds']:.2f} | "
                         f"{r['train_seconds'] / r['fit_seconds']:.0%} | {_f(r['evaluate_seconds'], '.2f')} |")
        lines.append("(medians over the rounds without evaluation; training: the owners' Fit requests, digest "
                     "and dry run included; moving: the model to each owner and on to the aggregator)")
    if "run" in res:
        lines += ["", "| fedsecure run | mode | rounds | processes | peak tree PSS MB | median MB | s |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for mode, r in res["run"].items():
            lines.append(f"| {r['example']} | {mode} | {r['rounds']} | {r['processes']} | {_f(r['peak_mb'])} | "
                         f"{_f(r['median_mb'])} | {_f(r['seconds'], '.0f')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=None, help=f"comma-separated, of {', '.join(CASES)} (default: compare, plus "
                    "soak with --soak and cross-device with --cross-device)")
    ap.add_argument("--subset", type=int, default=12000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--modes", default="plain,local,processes")
    ap.add_argument("--plain", choices=("plain", "plain-1thread"), default="plain-1thread",
                    help="the plain loop with 2 torch threads, or 1 (default: on a busy machine 2 OpenMP threads "
                    "spin for minutes per round; its memory differs by a few percent)")
    ap.add_argument("--soak", type=int, default=0, help="rounds of the soak run (MLP)")
    ap.add_argument("--soak-modes", default="local,processes")
    ap.add_argument("--cross-device", action="store_true")
    ap.add_argument("--owners", type=int, default=10_000)
    ap.add_argument("--fraction", type=float, default=0.01)
    ap.add_argument("--cross-rounds", type=int, default=5)
    ap.add_argument("--cross-model", default="mlp", help="the cross-device model: mlp, cnn_mcmahan or cnn_niid")
    ap.add_argument("--cross-epochs", type=int, default=1, help="cross-device: local epochs (McMahan et al.: 1, 5, 20)")
    ap.add_argument("--cross-batch", type=int, default=32, help="cross-device: local batch size (McMahan et al.: 10, 50)")
    ap.add_argument("--evaluate-every", type=int, default=1, help="cross-device: rounds between central evaluations")
    ap.add_argument("--run-modes", default="local,processes", help="--cases run and cross-device-run: the [workers] "
                    "modes (local, processes, ray)")
    ap.add_argument("--dataset", choices=("auto", "fashion-mnist", "digits"), default="auto")
    ap.add_argument("--quick", action="store_true", help="digits, 2 rounds, small soak and cross-device: seconds")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory.json"))
    ap.add_argument("--child", choices=("experiment", "cross-device"), help=argparse.SUPPRESS)
    ap.add_argument("--tables", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "experiment":
        return child_experiment(args)
    if args.child == "cross-device":
        return child_cross_device(args)
    if args.quick:
        args.dataset, args.rounds, args.subset = "digits", 2, 1797
        args.soak, args.cross_device, args.owners, args.fraction, args.cross_rounds = 4, True, 300, 0.05, 2
    cases = args.cases.split(",") if args.cases else ["compare"] + (["soak"] if args.soak else []) + (
        ["cross-device"] if args.cross_device else [])
    if unknown := set(cases) - set(CASES):
        raise SystemExit(f"unknown cases {sorted(unknown)}; choose from {', '.join(CASES)}")
    if "soak" in cases and args.soak < 2:
        raise SystemExit("the soak case needs --soak N with N >= 2 rounds")
    args.modes, args.soak_modes, args.run_modes = args.modes.split(","), args.soak_modes.split(","), args.run_modes.split(",")
    dataset = args.dataset
    if dataset == "auto":
        dataset = "fashion-mnist" if vf.fdata.FASHION_MNIST_DIR.is_dir() else "digits"
    res: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fedsecure-memory-") as tmp:
        work = Path(tmp)
        prepared = work / "data.npz"
        info = vf.prepare_data(prepared, subset=args.subset, dataset=dataset, quick=dataset == "digits")
        print(f"data: {info['dataset']}, {info['train_images']} training images over {info['clients']} owners", flush=True)
        if "compare" in cases:
            res["compare"] = compare(args, prepared, work)
        if "soak" in cases:
            res["soak"] = soak(args, work, _sim_data(prepared))
        if "cross-device" in cases:
            res["cross_device"] = cross_device(args, work, dataset)
        if "cross-device-run" in cases:
            res["cross_device_run"] = cross_device_run(args, work, dataset)
        if "run" in cases:
            res["run"] = run_cli(args, work, dataset)
    table = report(res)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        **vf.stamp(),
        "workload": {**{k: v for k, v in info.items() if k != "class_counts"}, "rounds": args.rounds,
                     "repeats": args.repeats, "soak_rounds": args.soak},
        **res, "table": table,
    }, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
