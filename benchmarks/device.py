"""The vs_flower workload with the owners training on the CPU and on a CUDA GPU.

Fashion-MNIST (``--subset`` training images, all 60,000 by default), Dirichlet(0.5) over 10 owners,
McMahan's CNN, E=1, B=32, SGD lr 0.01 momentum 0.9 (``benchmarks/vs_flower/workload.py``), the
owners as VirtualWorkers with ``device=`` each device in turn (their private data moved there once,
the model moved there for each Fit and back), one owner at a time, the strict aggregator and the
model owner on the CPU; central evaluation on the test set after each round, on the same device.
Each device runs in a child process of its own, one after the other.

Prints a table (seconds per round, of which local training; test accuracy) and writes JSON
(default benchmarks/results/device.json). Without a GPU the cuda run is skipped, saying so.

Run:  python benchmarks/device.py [--subset 60000] [--rounds 3] [--devices cpu,cuda]
      python benchmarks/device.py --quick        # seconds: digits, 1 round
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
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
import run as vf  # noqa: E402  (benchmarks/vs_flower/run.py: the prepared data file)
import workload as wl  # noqa: E402


def child(data_path: str, device: str, rounds: int, out: str) -> None:
    import torch

    import fedsecure as sy
    from fedsecure import fl
    from fedsecure.worker.device import resolve

    torch.set_num_threads(os.cpu_count() or 1)
    where = resolve(device)
    data = wl.Data(data_path)
    federation = sy.Federation()
    policy = sy.Policy(trusted_aggregators=frozenset({"secure_worker"}), private_sends=False)
    loaded = time.perf_counter()
    owners = []
    for c in range(data.num_clients):
        x, y = data.client(c)
        owners.append(sy.VirtualWorker(id=f"worker-{c:02d}", data={"x": x, "y": y}, policy=policy,
                                       federation=federation, device=device))
    loaded = time.perf_counter() - loaded
    aggregator = sy.VirtualWorker(id="secure_worker", policy=sy.Policy(strict=True), federation=federation)
    x_test, y_test = (t.to(where) for t in data.test())
    model, evaluator = wl.initial_model(data.image_size, data.seed), wl.cnn(data.image_size).to(where)
    accuracy: list[float] = []

    def central(parameters: dict[str, torch.Tensor]) -> dict[str, float]:
        fl.load_parameters(evaluator, {k: v.to(where) for k, v in parameters.items()})
        loss, acc = wl.evaluate(evaluator, x_test, y_test)
        accuracy.append(acc)
        return {"test_loss": loss, "test_accuracy": acc}

    strategy = fl.FedAvg(training=fl.LocalTraining(epochs=wl.EPOCHS, batch_size=wl.BATCH_SIZE, lr=wl.LR,
                                                   optimizer_args={"momentum": wl.MOMENTUM}),
                         min_fit_workers=data.num_clients, evaluate_fn=central)
    _, history = fl.fit(model, owners, strategy, rounds=rounds, aggregator=aggregator, seed=data.seed)
    Path(out).write_text(json.dumps({
        "device": str(where), "load_seconds": loaded, "accuracy": accuracy,
        "rounds": [{k: row[k] for k in ("round", "fit_seconds", "evaluate_seconds", "round_seconds")}
                   for row in history],
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subset", type=int, default=60000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--devices", default="cpu,cuda")
    ap.add_argument("--quick", action="store_true", help="digits, 1 round: a smoke run")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "device.json"))
    ap.add_argument("--child", nargs=3, metavar=("DATA", "DEVICE", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], args.rounds, args.child[2])
    import torch

    dataset = "digits" if args.quick or not vf.fdata.FASHION_MNIST_DIR.is_dir() else "fashion-mnist"
    rounds = 1 if args.quick else args.rounds
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fedsecure-device-") as tmp:
        data = Path(tmp) / "data.npz"
        info = vf.prepare_data(data, subset=args.subset, dataset=dataset, quick=dataset == "digits")
        for device in args.devices.split(","):
            if device.startswith("cuda") and not torch.cuda.is_available():
                print(f"[{device}] skipped: torch {torch.__version__} sees no CUDA GPU on this machine", flush=True)
                results[device] = {"skipped": "no CUDA GPU"}
                continue
            out = Path(tmp) / f"{device}.json"
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
            print(f"[{device}] {info['train_images']} images, {rounds} rounds ...", flush=True)
            done = subprocess.run([sys.executable, __file__, "--rounds", str(rounds), "--child", str(data), device,
                                   str(out)], env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"[{device}] failed:\n{done.stderr[-3000:]}")
            results[device] = json.loads(out.read_text())
    lines = ["| device | load s | s per round (median) | of which fit s | accuracy after each round |",
             "| --- | ---: | ---: | ---: | --- |"]
    for device, r in results.items():
        if "skipped" in r:
            lines.append(f"| {device} | skipped: {r['skipped']} | | | |")
            continue
        rows = r["rounds"]
        lines.append(f"| {r['device']} | {r['load_seconds']:.2f} | {statistics.median(x['round_seconds'] for x in rows):.2f} | "
                     f"{statistics.median(x['fit_seconds'] for x in rows):.2f} | "
                     f"{' '.join(f'{a:.4f}' for a in r['accuracy'])} |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "workload": {**{k: v for k, v in info.items() if k != "class_counts"}, "rounds": rounds},
        "results": results, "table": table,
    }, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
