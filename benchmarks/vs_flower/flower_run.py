"""The workload on Flower: its simulation engine (Ray backend), Message API, FedAvg, central evaluation.

Flower lives in its own virtual environment, ``benchmarks/vs_flower/.venv-flower`` (git-ignored),
which ``--setup`` creates when it is absent or holds other versions: CPU torch first (pinned, so
that pip does not pull a CUDA build), then ``flwr[simulation]`` pinned to `FLWR_VERSION`, which
pins its Ray. Everything else runs with that environment's Python and imports ``workload.py`` by
path, so the model, local training and evaluation are the very code the plain loop runs.

Set-up of the run:
- ``run_simulation`` with 10 virtual SuperNodes, one per client (``partition-id`` = client index);
- Ray with ``num_cpus`` = the number of cores (2) and ``client_resources = {"num_cpus": 1}``, so
  Ray keeps a pool of 2 ClientApp actors and trains 2 clients at a time; each actor's torch uses
  1 thread. That is the same thread budget fedsecure's simulation uses (2 worker processes x 1
  torch thread): the cores are covered without oversubscribing them. ``--client-cpus 2
  --client-threads 2`` (run.py's ``flower-1x2``) makes it one actor of 2 CPUs, training one
  client at a time with 2 torch threads;
- Flower's message-based ``FedAvg`` with every node training every round (fraction_train=1,
  min_train_nodes=10), no federated evaluation (fraction_evaluate=0) and central evaluation with
  ``evaluate_fn`` on the test set before the first round and after each round, in the server
  process, whose torch uses 2 threads (nothing else runs then), as in the plain loop.

A round is timed from the end of one central evaluation to the end of the next. Each client call
also reports its actor's process id and resident memory, so the JSON shows how actors grow.

Run (normally from run.py):
    python flower_run.py --setup                       # make the virtual environment, once
    .venv-flower/bin/python flower_run.py --data DATA.npz --rounds 5 --out RESULT.json
    .venv-flower/bin/python flower_run.py --cross-device DIR --rounds 8 --out RESULT.json   # cross_device.py's
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import venv
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
VENV = HERE / ".venv-flower"
FLWR_VERSION = "1.42.0"  # the newest on PyPI when this was written; it pins ray==2.55.1
TORCH_VERSION = "2.13.0"  # the CPU build, as in fedsecure's environment
STAMP = VENV / ".installed"
PINS = f"torch=={TORCH_VERSION} flwr[simulation]=={FLWR_VERSION} numpy"


def venv_python() -> Path:
    return VENV / "bin" / "python"


def ready() -> bool:
    """Whether Flower's virtual environment exists with the pinned versions."""
    return STAMP.is_file() and STAMP.read_text().strip() == PINS and venv_python().is_file()


def setup(*, quiet: bool = True) -> Path:
    """Create (or repair) Flower's virtual environment; returns its Python. A no-op when current."""
    if ready():
        return venv_python()
    if not venv_python().is_file():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    pip = [str(venv_python()), "-m", "pip", "install", "--disable-pip-version-check"] + (["-q"] if quiet else [])
    # torch first and pinned: an unpinned torch (pulled in by some dependency) would be the CUDA build
    subprocess.run([*pip, f"torch=={TORCH_VERSION}"], check=True)
    subprocess.run([*pip, f"flwr[simulation]=={FLWR_VERSION}", "numpy"], check=True)
    STAMP.write_text(PINS + "\n")
    return venv_python()


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("flwr", "ray", "torch", "numpy")}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def simulate(server_app: Any, client_app: Any, nodes: int, args: argparse.Namespace) -> None:
    """Flower's simulation of ``nodes`` SuperNodes on a local Ray of ``--threads`` CPUs, with
    ClientApp actors of ``--client-cpus`` CPUs each."""
    from flwr.simulation import run_simulation

    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=nodes,
        backend_config={
            "client_resources": {"num_cpus": args.client_cpus, "num_gpus": 0.0},
            "init_args": {"num_cpus": args.threads, "num_gpus": 0, "include_dashboard": False},
        },
    )


def received(msg: Any, context: Any, threads: int, open_data: Any, wl: Any) -> tuple[int, int, Any, Any]:
    """A ClientApp call's first steps, in both workloads: its torch threads, its client's number,
    the round, its data (``open_data(path)``, the path the server configured) and the model sent."""
    import torch

    torch.set_num_threads(threads)
    cid = int(context.node_config["partition-id"])
    config = msg.content["config"]
    local = open_data(str(config["data"]))
    model = wl.cnn(local.image_size)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return cid, int(config["server-round"]), local, model


def run(args: argparse.Namespace) -> None:
    t0 = time.time()
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

    sys.path.insert(0, str(HERE))
    import workload as wl

    torch.set_num_threads(args.threads)  # the server process: central evaluation
    data = wl.Data(args.data)
    n = data.num_clients
    data_path = str(Path(args.data).resolve())

    # ---- the ClientApp: runs in Ray actors, one client call at a time per actor ----------------
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        cid, server_round, local_data, model = received(msg, context, args.client_threads, wl.Data, wl)
        x, y = local_data.client(cid)
        started = time.time()
        loss = wl.train(model, x, y, shuffle_seed=wl.client_seed(local_data.seed, server_round, cid))
        metrics = MetricRecord({
            "num-examples": len(y),
            "train-loss": loss,
            "train-seconds": time.time() - started,
            "client": cid,
            "pid": os.getpid(),
            "rss-mb": rss_mb(),
        })
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
        return Message(content=content, reply_to=msg)

    # ---- the ServerApp: FedAvg with central evaluation --------------------------------------------
    x_test, y_test = data.test()
    eval_model = wl.cnn(data.image_size)
    evaluations: list[dict[str, Any]] = []
    client_calls: list[dict[str, Any]] = []

    def central_evaluation(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        eval_model.load_state_dict(arrays.to_torch_state_dict())
        loss, acc = wl.evaluate(eval_model, x_test, y_test)
        evaluations.append({"round": server_round, "time": time.time(), "loss": loss, "accuracy": acc})
        if server_round:
            print(f"flower round {server_round}: test accuracy {acc:.4f}", flush=True)
        return MetricRecord({"test-loss": loss, "test-accuracy": acc})

    def train_metrics(records: list[RecordDict], weighting_key: str) -> MetricRecord:
        """Keep each call's report; the round's metric is the sample-weighted training loss."""
        for record in records:
            m = record["metrics"]
            client_calls.append({k: float(m[k]) for k in ("client", "pid", "rss-mb", "train-seconds", "train-loss")})
        losses = [RecordDict({"metrics": MetricRecord({"train-loss": r["metrics"]["train-loss"],
                                                        weighting_key: r["metrics"][weighting_key]})})
                  for r in records]
        return aggregate_metricrecords(losses, weighting_key)

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=n,
            min_available_nodes=n,
            train_metrics_aggr_fn=train_metrics,
        )
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(wl.initial_model(data.image_size, data.seed).state_dict()),
            num_rounds=args.rounds,
            train_config=ConfigRecord({"data": data_path}),
            evaluate_fn=central_evaluation,
        )

    simulate(server_app, client_app, n, args)

    if len(evaluations) != args.rounds + 1:
        raise SystemExit(f"Flower finished {len(evaluations) - 1} of {args.rounds} rounds; see its log above")
    rounds = []
    calls_per_round = [client_calls[i * n : (i + 1) * n] for i in range(args.rounds)]
    for r in range(1, args.rounds + 1):
        prev, cur = evaluations[r - 1], evaluations[r]
        train_loss = sum(c["train-loss"] for c in calls_per_round[r - 1]) / max(len(calls_per_round[r - 1]), 1)
        rounds.append(wl.round_record(r, prev["time"], cur["time"], cur["loss"], cur["accuracy"], train_loss=train_loss))
    Path(args.out).write_text(json.dumps({
        "system": "flower",
        "versions": versions(),
        "threads": args.threads,
        "client_threads": args.client_threads,
        "client_cpus": args.client_cpus,
        "processes": "1 driver + Ray (gcs, raylet, ...) + one actor per CPU",
        "started": t0,
        "setup_seconds": rounds[0]["start"] - t0 if rounds else None,
        "initial": {"test_loss": evaluations[0]["loss"], "test_accuracy": evaluations[0]["accuracy"]},
        "rounds": rounds,
        "client_calls": client_calls,
    }, indent=1))


def run_cross_device(args: argparse.Namespace) -> None:
    """cross_device.py's workload on Flower: ``--cross-device DIR`` (`workload.CrossDevice`) with one
    virtual SuperNode per owner, ``--fraction`` of them sampled per round by Flower's FedAvg, each
    training E=``--epochs`` B=``--batch`` on its rows; central evaluation every ``--evaluate-every``
    rounds and after the last. A round's fit phase is timed from the end of the round before it
    (its evaluation, if any) to the start of its own central evaluation."""
    t0 = time.time()
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    sys.path.insert(0, str(HERE))
    import workload as wl

    torch.set_num_threads(args.threads)
    data = wl.CrossDevice(args.cross_device)
    n = data.owners
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        # the data mapped once per actor process (`workload.cross_device`)
        cid, server_round, local, model = received(msg, context, args.client_threads, wl.cross_device, wl)
        x, y = local.owner(cid)
        loss = wl.train(model, x, y, epochs=args.epochs, batch_size=args.batch,
                        shuffle_seed=wl.client_seed(local.seed, server_round, cid))
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                              "metrics": MetricRecord({"num-examples": len(y), "train-loss": loss})})
        return Message(content=content, reply_to=msg)

    x_test, y_test = data.test()
    eval_model = wl.cnn(data.image_size)
    marks: list[tuple[int, float, float]] = []  # (round, fit phase ended, its evaluation ended)
    accuracy: dict[int, float] = {}

    def central_evaluation(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        started = time.time()
        result = None
        if server_round == 0 or server_round % args.evaluate_every == 0 or server_round == args.rounds:
            eval_model.load_state_dict(arrays.to_torch_state_dict())
            loss, acc = wl.evaluate(eval_model, x_test, y_test)
            accuracy[server_round] = acc
            print(f"flower round {server_round}: test accuracy {acc:.4f}", flush=True)
            result = MetricRecord({"test-loss": loss, "test-accuracy": acc})
        marks.append((server_round, started, time.time()))
        return result

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(fraction_train=args.fraction, fraction_evaluate=0.0, min_train_nodes=1,
                          min_available_nodes=n)
        strategy.start(grid=grid, initial_arrays=ArrayRecord(wl.initial_model(data.image_size, data.seed).state_dict()),
                       num_rounds=args.rounds, train_config=ConfigRecord({"data": str(Path(args.cross_device).resolve())}),
                       evaluate_fn=central_evaluation)

    simulate(server_app, client_app, n, args)
    if len(marks) != args.rounds + 1:
        raise SystemExit(f"Flower finished {len(marks) - 1} of {args.rounds} rounds; see its log above")
    rounds = [{"round": r, "start": marks[r - 1][2], "end": marks[r][2], "seconds": marks[r][2] - marks[r - 1][2],
               "fit_seconds": marks[r][1] - marks[r - 1][2], "evaluate_seconds": marks[r][2] - marks[r][1],
               "test_accuracy": accuracy.get(r)} for r in range(1, args.rounds + 1)]
    Path(args.out).write_text(json.dumps({
        "system": "flower", "versions": versions(), "owners": n, "fraction": args.fraction, "epochs": args.epochs,
        "batch_size": args.batch, "started": t0, "setup_seconds": rounds[0]["start"] - t0, "rounds": rounds,
    }, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", action="store_true", help="create the virtual environment and exit")
    parser.add_argument("--data")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="Ray's CPUs; server torch threads")
    parser.add_argument("--client-threads", type=int, default=1, help="torch threads per client actor")
    parser.add_argument("--client-cpus", type=int, default=1, help="Ray CPUs per client actor")
    parser.add_argument("--out")
    parser.add_argument("--cross-device", help="cross_device.py's data directory: run that workload instead")
    parser.add_argument("--fraction", type=float, default=0.01, help="--cross-device: owners sampled per round")
    parser.add_argument("--epochs", type=int, default=5, help="--cross-device: local epochs")
    parser.add_argument("--batch", type=int, default=10, help="--cross-device: local batch size")
    parser.add_argument("--evaluate-every", type=int, default=10, help="--cross-device: rounds between evaluations")
    args = parser.parse_args()
    if args.setup:
        print(setup())
        return
    if args.cross_device and args.out:
        run_cross_device(args)
        return
    if not args.data or not args.out:
        parser.error("--data and --out are required (or --cross-device DIR and --out, or --setup)")
    run(args)


if __name__ == "__main__":
    main()
