"""The workload on fedsecure: `fedsecure.fl.fit`'s engine with ten data owners and an aggregator.

Each client's share becomes one data owner's private data (tags "x" and "y") on its own worker,
which trusts only the aggregator ("secure_worker", a strict aggregator). Every
round the engine sends the global model to each owner, the owner trains it in one message (its
own loop: SGD with momentum, the strategy's E and B, a shuffle seeded by the engine), the trained
model moves straight to the aggregator, and the model owner receives only the sample-weighted mean.
Central evaluation runs after every round through the strategy's ``evaluate_fn`` with the same
code as the plain loop and Flower (workload.evaluate), with 2 torch threads.

How the 2 cores are used (``--mode``):
- ``processes``: `fedsecure.experiment.simulation.Simulation`, the simulation mode of ``fedsecure run``:
  the owners live in 2 host processes (balanced by share size) with 1 torch thread each, served
  over gRPC on loopback; the aggregator is served from this process. The hosts load the data from
  a copy of the prepared subset and partition it themselves with the same call and seed, which
  gives the same shares (checked below);
- ``ray``: `fedsecure.experiment.ray_hosts.RaySimulation`, ``[workers] mode = "ray"``: the same
  owners in 2 Ray actors of 1 CPU (1 torch thread) each, on a local Ray that the run starts and
  stops, served over gRPC on loopback; the aggregator in this process (Flower's simulation engine
  also runs its clients in Ray actors);
- ``ray-1x2``: Ray mode on the same 2 CPUs as one actor of 2 CPUs that trains 2 owners at a time
  (``concurrency=2``), each in a thread of its own with 1 torch thread: one torch process instead
  of two;
- ``threads``: all owners are `VirtualWorker`s in this process and the engine trains 2 at a time
  (``parallelism=2``), torch with 1 thread per owner: the thread budget of Flower's run;
- ``serial``: in-process owners one after the other, torch with 2 threads: what the plain loop does.

``--mmap-threshold MB`` fixes glibc's mmap threshold in this process (``mallopt``), which also
fixes its trim threshold at 128 KB: freed heap tops go back at once, at a cost to this process's
evaluation (benchmarks/vs_flower/README.md, "Where fedsecure-ray's memory is"). fedsecure itself
never sets it.

A round is timed from the end of one central evaluation (round 1: that of the initial model) to
the end of the next, as on the other systems; the engine's own per-round timings go to the JSON too.

Run (normally from run.py):  python fedsecure_run.py --data DATA.npz --rounds 5 --out RESULT.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workload as wl  # noqa: E402

try:
    from fedsecure import fl
except ModuleNotFoundError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
    from fedsecure import fl
from fedsecure import Federation, Policy, VirtualWorker  # noqa: E402

AGGREGATOR = "secure_worker"


def build_workers(data: wl.Data) -> tuple[list[VirtualWorker], VirtualWorker]:
    federation = Federation()
    owner_policy = Policy(trusted_aggregators=frozenset({AGGREGATOR}), private_sends=False)
    owners = []
    for c in range(data.num_clients):
        x, y = data.client(c)
        owners.append(VirtualWorker(id=f"worker-{c:02d}", data={"x": x, "y": y}, policy=owner_policy,
                                    federation=federation))
    aggregator = VirtualWorker(id=AGGREGATOR, policy=Policy(strict=True), federation=federation)
    return owners, aggregator


def simulation_config(data: wl.Data, path: str) -> dict[str, Any]:
    """An experiment's dictionary whose hosts rebuild exactly the prepared shares.

    The hosts read the subset in its original order (x_train, y_train, x_test, y_test), which
    run.py writes beside the prepared file, and partition it with
    ``fedsecure.data.partition(..., "dirichlet", alpha=0.5, seed)``, as run.py did.
    """
    import numpy as np

    from fedsecure.data import partition

    sim_path = Path(path).with_suffix(".subset.npz")
    if not sim_path.exists():
        raise SystemExit(f"{sim_path} is missing: run.py writes it beside {path} when it prepares the data")
    with np.load(sim_path) as f:
        y = f["y_train"]
    parts = partition(y, data.num_clients, scheme="dirichlet", alpha=0.5, seed=data.seed)
    if [len(p) for p in parts] != data.sizes:
        raise SystemExit("the simulation's partition would differ from the prepared one")
    return {
        "experiment": {"seed": data.seed},
        "data": {"dataset": str(sim_path), "workers": data.num_clients, "partition": "dirichlet", "alpha": 0.5},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1, help="cores to use")
    parser.add_argument("--mode", choices=("processes", "ray", "ray-1x2", "threads", "serial"), default="processes")
    parser.add_argument("--out", required=True)
    parser.add_argument("--mmap-threshold", type=int, default=0,
                        help="MB: fix glibc's mmap threshold in this process (and so its trim threshold at 128 KB)")
    args = parser.parse_args()
    if args.mmap_threshold:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, args.mmap_threshold << 20)  # M_MMAP_THRESHOLD

    t0 = time.time()
    cores = args.processes
    parallel = args.mode in ("threads", "processes", "ray", "ray-1x2") and cores > 1
    train_threads = 1 if parallel else cores
    torch.set_num_threads(train_threads)
    data = wl.Data(args.data)
    x_test, y_test = data.test()
    model = wl.initial_model(data.image_size, data.seed)
    eval_model = wl.cnn(data.image_size)
    evaluations: list[dict[str, Any]] = []

    def central_evaluation(parameters: dict[str, torch.Tensor]) -> dict[str, float]:
        torch.set_num_threads(cores)  # nothing else runs now
        try:
            fl.load_parameters(eval_model, parameters)
            loss, acc = wl.evaluate(eval_model, x_test, y_test)
        finally:
            torch.set_num_threads(train_threads)
        evaluations.append({"time": time.time(), "loss": loss, "accuracy": acc})
        if len(evaluations) > 1:
            print(f"fedsecure round {len(evaluations) - 1}: test accuracy {acc:.4f}", flush=True)
        return {"test_loss": loss, "test_accuracy": acc}

    strategy = fl.FedAvg(
        training=fl.LocalTraining(epochs=wl.EPOCHS, batch_size=wl.BATCH_SIZE, optimizer="SGD", lr=wl.LR,
                                  optimizer_args={"momentum": wl.MOMENTUM}),
        fraction_fit=1.0,
        min_fit_workers=data.num_clients,
        evaluate_fn=central_evaluation,
    )
    if args.mode in ("processes", "ray", "ray-1x2"):
        from fedsecure.experiment.ray_hosts import RaySimulation
        from fedsecure.experiment.simulation import Simulation

        config = simulation_config(data, args.data)
        if args.mode == "processes":
            hosts: Simulation = Simulation(config, processes=cores, threads=1, sizes=data.sizes)
        elif args.mode == "ray":
            hosts = RaySimulation(config, actors=cores, num_cpus=1, sizes=data.sizes)
        else:  # one actor with every core, one owner per core at a time
            hosts = RaySimulation(config, actors=1, num_cpus=cores, concurrency=cores, sizes=data.sizes)
        with hosts as sim:
            central_evaluation(fl.parameters_of(model))  # the initial model, as Flower's round 0
            _, history = fl.fit(model, sim.workers, strategy, rounds=args.rounds, aggregator=sim.aggregator,
                                seed=data.seed, groups=sim.groups)
    else:
        owners, aggregator = build_workers(data)
        central_evaluation(fl.parameters_of(model))
        _, history = fl.fit(model, owners, strategy, rounds=args.rounds, aggregator=aggregator,
                            seed=data.seed, parallelism=2 if parallel else 1)

    rounds = []
    for r, row in enumerate(history, start=1):
        prev, cur = evaluations[r - 1], evaluations[r]
        rounds.append(wl.round_record(r, prev["time"], cur["time"], cur["loss"], cur["accuracy"],
                                      train_loss=row.get("train_loss"), engine_round_s=row.get("round_seconds"),
                                      engine_fit_s=row.get("fit_seconds")))
    Path(args.out).write_text(json.dumps({
        "system": "fedsecure",
        "mode": args.mode,
        "mmap_threshold_mb": args.mmap_threshold or None,
        "threads": cores,
        "train_threads": train_threads,
        "parallelism": 2 if parallel else 1,
        "processes": 1 + cores if args.mode == "processes" else 1,  # ray: and Ray's daemons
        "actors": {"ray": cores, "ray-1x2": 1}.get(args.mode),
        "started": t0,
        "setup_seconds": rounds[0]["start"] - t0 if rounds else None,
        "initial": {"test_loss": evaluations[0]["loss"], "test_accuracy": evaluations[0]["accuracy"]},
        "rounds": rounds,
    }, indent=1))


if __name__ == "__main__":
    main()
