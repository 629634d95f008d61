"""What local DP-SGD costs on digits: accuracy, each worker's epsilon, and training time.

Scikit-learn's digits over 10 workers (IID), the MLP 64-32-10, FedAvg over all ten, one local
epoch a round of SGD (batch 16, lr 0.1, momentum 0.9), for plain SGD and DP-SGD at several noise
multipliers z (max_grad_norm 1, delta 1e-5). Per setting and round: the central test accuracy,
``local_epsilon`` (the largest worker's running epsilon) and the round's training time
(``fit_seconds``, all workers in this process one after the other). The DP noise comes from each
worker's own randomness, so two runs of one setting differ. Prints a table and writes JSON
(default benchmarks/results/dp_sgd_digits.json).

Run:  python benchmarks/dp_sgd_digits.py [--rounds 10] [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

try:
    from fedsecure.experiment.config import parse as Experiment
except ModuleNotFoundError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from fedsecure.experiment.config import parse as Experiment
from fedsecure.experiment.run import run_experiment

ROOT = Path(__file__).resolve().parents[1]
SHOWN = (1, 3, 5, 10)


def run(z: float | None, rounds: int, output: Path) -> list[dict[str, Any]]:
    training: dict[str, Any] = {"epochs": 1, "batch_size": 16, "optimizer": "SGD", "lr": 0.1, "momentum": 0.9}
    if z is not None:
        training |= {"dp_sgd_noise_multiplier": z, "dp_sgd_max_grad_norm": 1.0, "dp_sgd_delta": 1e-5}
    config = {
        "experiment": {"rounds": rounds, "seed": 0, "output": str(output)},
        "data": {"dataset": "digits", "workers": 10, "partition": "iid"},
        "model": {"name": "mlp", "hidden": 32},
        "strategy": {"name": "fedavg", "fraction_fit": 1.0, "min_fit_workers": 10, "fraction_evaluate": 0.0},
        "training": training,
    }
    history = run_experiment(Experiment(config), progress=False)
    return [{"round": r["round"], "accuracy": r["central_accuracy"], "epsilon": r.get("local_epsilon"),
             "fit_seconds": r["fit_seconds"]} for r in history]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="2 rounds, plain SGD and z = 1 (a smoke test)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "dp_sgd_digits.json")
    args = parser.parse_args(argv)
    rounds = 2 if args.quick else args.rounds
    settings: list[float | None] = [None, 1.0] if args.quick else [None, 0.7, 1.0, 2.0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, z in enumerate(settings):
            per_round = run(z, rounds, Path(tmp) / str(i))
            rows.append({"noise_multiplier": z, "rounds": per_round,
                         "median_fit_seconds": statistics.median(r["fit_seconds"] for r in per_round)})
    shown = [r for r in SHOWN if r <= rounds] or [rounds]
    print(f"| local training | accuracy after round {' / '.join(map(str, shown))} | epsilon | fit s per round |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        at = {r["round"]: r for r in row["rounds"]}
        name = "plain SGD" if row["noise_multiplier"] is None else f"DP-SGD, z = {row['noise_multiplier']}"
        accuracy = " / ".join(f"{at[r]['accuracy']:.3f}" for r in shown)
        epsilon = " / ".join("none" if at[r]["epsilon"] is None else f"{at[r]['epsilon']:.2f}" for r in shown)
        print(f"| {name} | {accuracy} | {epsilon} | {row['median_fit_seconds']:.3f} |")
    result = {"date": datetime.date.today().isoformat(), "machine": platform.platform(), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
