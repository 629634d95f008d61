"""Cross-device, side by side: fedsecure and Flower with 10,000 data owners, 1% of them a round.

The workload of ``examples/fashion_mnist_cross_device.toml``: Fashion-MNIST's 60,000 training
images over 10,000 owners with quantity skew (`fedsecure.data.quantity_skew` with ``floor=True``:
one image each first, the rest in Dirichlet(0.5) proportions; 1 to 74 images, 6 on average), 1%
of them sampled per round, McMahan et al.'s CNN trained E=5 B=10 (``--epochs``, ``--batch``) with
SGD (lr 0.01, momentum 0.9), central evaluation on the 10,000 test images every
``--evaluate-every`` rounds and after the last.
Every system's owners hold the same rows: fedsecure partitions the data set itself with that call
and the example's seed, and this script writes the same partition for Flower (``workload.CrossDevice``:
``.npy`` files each process maps from disk).

Systems (``--systems``):
- ``fedsecure``: ``fedsecure run examples/fashion_mnist_cross_device.toml``, the example as it is:
  the 10,000 owners in the model owner's process, one training at a time with torch's 2 threads;
- ``fedsecure-ray``: the same run with ``[workers] mode = "ray"``: the owners in 2 Ray actors of
  1 CPU (1 torch thread), two training at a time: the resources Flower gets;
- ``flower``: Flower's simulation (``flower_run.py --cross-device``), one virtual SuperNode per
  owner, 2 ClientApp actors of 1 CPU with 1 torch thread, its FedAvg sampling ``--fraction`` of the
  nodes; a ClientApp opens the mapped data once per actor and reads its owner's rows.

Reported per system: the fit phase of a round (from the end of the round before to the start of
its central evaluation: sending, training, aggregating; fedsecure's ``round_seconds -
evaluate_seconds``), the median over the rounds, and its ratio to Flower's; the tree's CPU seconds
and peak PSS over the whole run (run.py's sampler), the accuracy after the last round. Timings
are side by side in one run of this script; ``--repeats`` runs each system that many times in turn.

Run:  python benchmarks/vs_flower/cross_device.py [--rounds 6] [--systems fedsecure,flower] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
try:
    import fedsecure  # noqa: F401
except ModuleNotFoundError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT / "src"))
import run as vf  # noqa: E402  (the process-tree sampler)

from fedsecure.data import load_digits, load_fashion_mnist, quantity_skew  # noqa: E402

EXAMPLE = ROOT / "examples" / "fashion_mnist_cross_device.toml"
SYSTEMS = ("fedsecure", "fedsecure-ray", "flower")
SEED = 0  # the example's [experiment] seed: the partition's seed there


def prepare(path: Path, *, owners: int, digits: bool) -> dict[str, Any]:
    """Write the data directory Flower reads (`workload.CrossDevice`); what it holds."""
    data = load_digits(seed=SEED) if digits else load_fashion_mnist()
    parts = quantity_skew(len(data.y_train), owners, alpha=0.5, seed=SEED, min_size=1, floor=True)
    path.mkdir(parents=True, exist_ok=True)
    sizes = np.array([len(p) for p in parts])
    np.save(path / "meta.npy", np.array([owners, data.x_train.shape[-1], SEED]))
    np.save(path / "offsets.npy", np.concatenate([[0], np.cumsum(sizes)]))
    np.save(path / "rows.npy", np.concatenate(parts))
    for name in ("x_train", "y_train", "x_test", "y_test"):
        np.save(path / f"{name}.npy", np.ascontiguousarray(getattr(data, name).numpy()))
    return {"dataset": data.name, "owners": owners, "train_images": len(data.y_train),
            "test_images": len(data.y_test), "owner_sizes": {"min": int(sizes.min()), "median": float(np.median(sizes)),
                                                             "max": int(sizes.max())}}


def command(system: str, args: argparse.Namespace, data: Path, out: Path) -> list[str]:
    if system == "flower":
        import flower_run  # noqa: PLC0415

        return [str(flower_run.setup()), str(HERE / "flower_run.py"), "--cross-device", str(data), "--out", str(out),
                "--rounds", str(args.rounds), "--fraction", str(args.fraction), "--epochs", str(args.epochs),
                "--batch", str(args.batch),
                "--evaluate-every", str(args.evaluate_every), "--threads", "2"]
    sets = {"experiment.evaluate_every": args.evaluate_every, "strategy.fraction_fit": args.fraction,
            "strategy.min_fit_workers": 1, "training.epochs": args.epochs, "training.batch_size": args.batch}
    if system == "fedsecure-ray":
        sets["workers.mode"] = "'ray'"
    if args.quick:
        sets.update({"data.dataset": "'digits'", "data.workers": args.owners})
    return [sys.executable, "-m", "fedsecure", "run", str(EXAMPLE), "--rounds", str(args.rounds), "--quiet",
            "--output", str(out), *(x for k, v in sets.items() for x in ("--set", f"{k}={v}"))]


def run_system(system: str, args: argparse.Namespace, data: Path, work: Path) -> dict[str, Any]:
    out = work / system
    log = work / f"{system}.log"
    cmd = command(system, args, data, out if system != "flower" else work / "flower.json")
    print(f"[{system}] running ... (log: {log})", flush=True)
    ran = vf.run_monitored(cmd, log, flower=system == "flower")
    if ran.returncode != 0:
        tail = "\n  ".join(log.read_text(errors="replace").splitlines()[-15:])
        raise SystemExit(f"[{system}] failed with exit status {ran.returncode}:\n  {tail}")
    if system == "flower":
        result = json.loads((work / "flower.json").read_text())
        rounds = [{"round": r["round"], "fit_seconds": r["fit_seconds"], "accuracy": r["test_accuracy"]}
                  for r in result["rounds"]]
    else:
        rows = json.loads((out / "history.json").read_text())["rounds"]
        rounds = [{"round": r["round"], "fit_seconds": r["round_seconds"] - r["evaluate_seconds"],
                   "accuracy": r.get("central_accuracy")} for r in rows]
    memory = ran.monitor.summary()
    fits = [r["fit_seconds"] for r in rounds]
    summary = {"system": system, "rounds": rounds, "median_fit_s": statistics.median(fits),
               "accuracy": rounds[-1]["accuracy"], "process_seconds": ran.ended - ran.started, "tree_cpu_s": memory["tree_cpu_s"],
               "others_cpu_s": memory["others_cpu_s"], "peak_pss_mb": memory["peak_pss_mb"],
               "max_processes": memory["max_processes"], "stray_processes": ran.stray,
               "pss_at_peak": memory["pss_at_peak"]}
    print(f"[{system}] fit phase median {summary['median_fit_s']:.2f} s a round, peak PSS "
          f"{summary['peak_pss_mb']:.0f} MB ({vf.peak_split(memory['pss_at_peak'])}), accuracy "
          f"{summary['accuracy']}", flush=True)
    return summary


def report(runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> str:
    med = {s: statistics.median(r["median_fit_s"] for r in rs) for s, rs in runs.items()}
    flower = med.get("flower")
    lines = [f"cross-device: {args.owners} owners, {args.fraction:.0%} a round, E={args.epochs} B={args.batch}, "
             f"{args.rounds} rounds "
             f"(medians over the rounds, then over {args.repeats} run(s) each)",
             "| system | fit phase s/round | / Flower | tree CPU s | peak tree PSS MB | processes | accuracy |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for system, rs in runs.items():
        ratio = "-" if not flower else f"{med[system] / flower:.2f}x"
        lines.append(f"| {system} | {med[system]:.2f} | {ratio} | "
                     f"{statistics.median(r['tree_cpu_s'] for r in rs):.0f} | "
                     f"{statistics.median(r['peak_pss_mb'] for r in rs):.0f} | "
                     f"{max(r['max_processes'] for r in rs)} | {rs[-1]['accuracy']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {', '.join(SYSTEMS)}")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--owners", type=int, default=10_000)
    ap.add_argument("--fraction", type=float, default=0.01)
    ap.add_argument("--evaluate-every", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=5, help="local epochs E (the example's 5; McMahan et al.: 1, 5, 20)")
    ap.add_argument("--batch", type=int, default=10, help="local batch size B (the example's 10)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="digits, 300 owners, 2 rounds: seconds")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cross_device.json"))
    args = ap.parse_args()
    systems = args.systems.split(",")
    if unknown := set(systems) - set(SYSTEMS):
        raise SystemExit(f"unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    if args.quick:
        args.owners, args.fraction, args.rounds = 300, 0.02, 2
    elif args.owners != 10_000:
        raise SystemExit("--owners is the example's 10,000 (set only with --quick, on digits)")
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
    with tempfile.TemporaryDirectory(prefix="fedsecure-cross-device-") as tmp:
        work = Path(tmp)
        info = prepare(work / "data", owners=args.owners, digits=args.quick)
        print(f"data: {info}", flush=True)
        for rep in range(args.repeats):
            for system in systems:
                place = work / f"{system}-{rep}"
                place.mkdir()
                runs[system].append(run_system(system, args, work / "data", place))
    table = report(runs, args)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        **vf.stamp(),
        "workload": {**info, "fraction": args.fraction, "rounds": args.rounds, "evaluate_every": args.evaluate_every,
                     "epochs": args.epochs, "batch_size": args.batch},
        "runs": runs, "table": table,
    }, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
