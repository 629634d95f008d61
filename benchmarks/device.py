"""The vs_flower workload with the owners training on the CPU and on a CUDA GPU.

Fashion-MNIST (``--subset`` training images, all 60,000 by default), Dirichlet(0.5) over 10 owners,
McMahan's CNN, E=1, B=32, SGD lr 0.01 momentum 0.9 (``benchmarks/vs_flower/workload.py``), the
owners as VirtualWorkers with ``device=`` each device in turn (their private data moved there once,
the model moved there for each Fit and back), one owner at a time, the strict aggregator and the
model owner on the CPU; central evaluation on the test set after each round, on the same device.
Each device runs in a child process of its own, one after the other.

``--layouts``: on the CPU only, the owners' convolutions in each memory layout, side by side:
"channels-last" (what a worker does: `fedsecure.worker.device.fast_format`) and "contiguous" (the
same run with `fast_format` replaced by one that keeps the contiguous layout, as workers trained
before), ``--repeats`` runs of each in alternating order, ``--parallelism`` owners at a time (each
with cores / parallelism torch threads).

``--by-rows``: one owner's fit on the CPU (`fedsecure.worker.training.fit`) with channels-last
batches and with contiguous ones, for 6 to 256 rows of Fashion-MNIST (McMahan's CNN) and of the 8x8
digits (its 8x8 variant), one torch thread, in this process, medians of 8 after a warm-up: whether
small passes (a cross-device owner's few images) lose anything by the layout.

Prints a table (seconds per round, of which local training; test accuracy) and writes JSON
(default benchmarks/results/device.json, layouts.json or by_rows.json). Without a GPU the cuda run is skipped,
saying so.

Run:  python benchmarks/device.py [--subset 60000] [--rounds 3] [--devices cpu,cuda]
      python benchmarks/device.py --layouts --subset 12000 --rounds 3 --repeats 3 --parallelism 2
      python benchmarks/device.py --by-rows
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


def child(data_path: str, device: str, rounds: int, out: str, layout: str = "channels-last",
          parallelism: int = 1) -> None:
    import torch

    import fedsecure as sy
    from fedsecure import fl
    from fedsecure.worker import device as dev
    from fedsecure.worker.device import resolve

    if layout == "contiguous":  # the worker's code before it chose a layout
        dev.fast_format = lambda module, device: torch.contiguous_format
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // parallelism))
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
    _, history = fl.fit(model, owners, strategy, rounds=rounds, aggregator=aggregator, seed=data.seed,
                        parallelism=parallelism)
    Path(out).write_text(json.dumps({
        "device": str(where), "layout": layout, "load_seconds": loaded, "accuracy": accuracy,
        "rounds": [{k: row[k] for k in ("round", "fit_seconds", "evaluate_seconds", "round_seconds")}
                   for row in history],
    }))


def by_rows(quick: bool) -> dict[str, Any]:
    """Per rows and data set: milliseconds of one fit with channels-last and with contiguous batches
    (with ``quick``, the digits only, medians of 2)."""
    import torch

    from fedsecure.data import load_digits, load_fashion_mnist
    from fedsecure.worker import device as dev
    from fedsecure.worker import training

    torch.set_num_threads(1)
    settings = training.parse({"epochs": wl.EPOCHS, "batch_size": wl.BATCH_SIZE, "optimizer": "SGD", "lr": wl.LR,
                               "optimizer_args": {"momentum": wl.MOMENTUM}, "loss": "cross_entropy",
                               "proximal_mu": 0.0, "max_steps": None, "dp_sgd": None})
    chosen = dev.fast_format
    formats = {"channels-last": chosen, "contiguous": lambda module, device: torch.contiguous_format}
    out: dict[str, Any] = {}
    sets = {"fashion-mnist": load_fashion_mnist} if vf.fdata.FASHION_MNIST_DIR.is_dir() and not quick else {}
    try:
        for name, load in {**sets, "digits": load_digits}.items():
            ds = load()
            x_all, y_all = ds.x_train.reshape(len(ds.y_train), 1, *ds.x_train.shape[-2:]).float(), ds.y_train
            model = wl.initial_model(x_all.shape[-1], vf.SEED)
            for rows in (6, 16, 32, 64, 128, 256):
                x, y = x_all[:rows].clone(memory_format=torch.contiguous_format), y_all[:rows]
                times: dict[str, list[float]] = {layout: [] for layout in formats}
                for rep in range(3 if quick else 9):
                    for layout, choose in formats.items():
                        dev.fast_format = choose  # type: ignore[assignment]
                        start = time.perf_counter()
                        training.fit(model, x, y, settings, rep)
                        if rep:  # the first is the warm-up
                            times[layout].append(time.perf_counter() - start)
                med = {k: statistics.median(v) * 1000 for k, v in times.items()}
                row = out[f"{name} {rows}"] = {"data": name, "rows": rows, "ms": med,
                                               "ratio": med["channels-last"] / med["contiguous"]}
                print(f"{name:13} {rows:4d} rows: contiguous {med['contiguous']:7.2f} ms, channels-last "
                      f"{med['channels-last']:7.2f} ms ({row['ratio']:.2f}x)", flush=True)
    finally:
        dev.fast_format = chosen
    return out


def _by_rows_table(results: dict[str, Any]) -> str:
    lines = ["| data | rows | contiguous batches (ms) | channels-last batches (ms) | ratio |",
             "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['data']} | {r['rows']} | {r['ms']['contiguous']:.2f} | {r['ms']['channels-last']:.2f} | "
              f"{r['ratio']:.2f}x |" for r in results.values()]
    return "\n".join(lines)


LAYOUTS = ("channels-last", "contiguous")
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_OUT = str(RESULTS / "device.json")


def _run(tmp: Path, data: Path, device: str, layout: str, rounds: int, parallelism: int, what: str) -> Any:
    out = tmp / f"{device}-{layout}.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    print(f"[{device}, {layout}] {what}, {rounds} rounds ...", flush=True)
    done = subprocess.run([sys.executable, __file__, "--rounds", str(rounds), "--parallelism", str(parallelism),
                           "--child", str(data), device, layout, str(out)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"[{device}, {layout}] failed:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def _device_table(results: dict[str, Any]) -> str:
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
    return "\n".join(lines)


def _layout_table(results: dict[str, Any]) -> str:
    """Each layout's median fit phase over all its runs' rounds, and the ratio channels-last / contiguous."""
    fit = {layout: [row["fit_seconds"] for r in results.values() if r["layout"] == layout for row in r["rounds"]]
           for layout in LAYOUTS}
    lines = ["| layout | fit s per round (median) | runs' fit medians | accuracy after each round |",
             "| --- | ---: | --- | --- |"]
    for layout in LAYOUTS:
        runs = [r for r in results.values() if r["layout"] == layout]
        each = " ".join(f"{statistics.median(x['fit_seconds'] for x in r['rounds']):.2f}" for r in runs)
        lines.append(f"| {layout} | {statistics.median(fit[layout]):.2f} | {each} | "
                     f"{' '.join(f'{a:.4f}' for a in runs[0]['accuracy'])} |")
    ratio = statistics.median(fit["channels-last"]) / statistics.median(fit["contiguous"])
    return "\n".join([*lines, "", f"channels-last / contiguous, fit phase: {ratio:.2f}x"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subset", type=int, default=60000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--devices", default="cpu,cuda")
    ap.add_argument("--quick", action="store_true", help="digits, 1 round: a smoke run")
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--layouts", action="store_true", help="the CPU in both memory layouts, side by side")
    ap.add_argument("--by-rows", action="store_true", help="one fit in each layout, by rows")
    ap.add_argument("--repeats", type=int, default=1, help="--layouts: runs of each layout, alternating")
    ap.add_argument("--parallelism", type=int, default=1, help="owners training at a time")
    ap.add_argument("--child", nargs=4, metavar=("DATA", "DEVICE", "LAYOUT", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], args.rounds, args.child[3], args.child[2], args.parallelism)
    import torch

    dataset = "digits" if args.quick or not vf.fdata.FASHION_MNIST_DIR.is_dir() else "fashion-mnist"
    rounds = 1 if args.quick else args.rounds
    results: dict[str, Any] = {}
    if args.by_rows:
        results = by_rows(args.quick)
        info: dict[str, Any] = {"epochs": wl.EPOCHS, "batch_size": wl.BATCH_SIZE, "threads": 1}
        return _write(args, args.out if args.out != DEFAULT_OUT else RESULTS / "by_rows.json",
                      info, results, _by_rows_table(results))
    if args.layouts:
        order = [LAYOUTS if r % 2 == 0 else LAYOUTS[::-1] for r in range(args.repeats)]
        runs = [("cpu", layout, r) for r, pair in enumerate(order) for layout in pair]
    else:
        runs = [(device, "channels-last", 0) for device in args.devices.split(",")]
    with tempfile.TemporaryDirectory(prefix="fedsecure-device-") as tmp:
        data = Path(tmp) / "data.npz"
        info = vf.prepare_data(data, subset=args.subset, dataset=dataset, quick=dataset == "digits")
        for device, layout, repeat in runs:
            key = f"{device} {layout} #{repeat + 1}" if args.layouts else device
            if device.startswith("cuda") and not torch.cuda.is_available():
                print(f"[{device}] skipped: torch {torch.__version__} sees no CUDA GPU on this machine", flush=True)
                results[key] = {"skipped": "no CUDA GPU"}
                continue
            results[key] = _run(Path(tmp), data, device, layout, rounds, args.parallelism, f"{info['train_images']} images")
    table = _layout_table(results) if args.layouts else _device_table(results)
    info = {**{k: v for k, v in info.items() if k != "class_counts"}, "rounds": rounds, "parallelism": args.parallelism}
    _write(args, args.out if args.out != DEFAULT_OUT or not args.layouts else RESULTS / "layouts.json",
           info, results, table)


def _write(args: argparse.Namespace, path: str | Path, workload: dict[str, Any], results: dict[str, Any],
           table: str) -> None:
    import torch

    print(table)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "workload": workload, "results": results, "table": table,
    }, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
