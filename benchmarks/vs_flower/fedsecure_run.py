"""The workload on fedsecure: `fedsecure.fl.fit`'s engine with ten data owners and an aggregator.

Each client's share becomes one data owner's private data (tags "x" and "y") on its own
`VirtualWorker`, which trusts only the aggregator ("secure_worker", a strict aggregator). Every
round the engine sends the global model to each owner, the owner trains it in one message (its
own loop: SGD with momentum, the strategy's E and B, a shuffle seeded by the engine), the trained
model moves straight to the aggregator, and the model owner receives only the sample-weighted mean.
Central evaluation runs after every round through the strategy's ``evaluate_fn`` with the same
code as the plain loop and Flower (workload.evaluate), with 2 torch threads.

How the 2 cores are used (``--mode``):
- ``threads`` (default): the engine trains 2 owners at a time (``parallelism=2``) in this process,
  torch with 1 thread per owner: the thread budget of Flower's run (2 actors x 1 torch thread);
- ``serial``: one owner after the other, torch with 2 threads: what the plain loop does.

The set-up the issue describes for fedsecure (``fedsecure run config.toml``, whose simulation mode
hosts the owners in 2 worker processes with 1 torch thread each) is not in this tree yet: when it
lands, add it here as a third mode; run.py needs nothing else (it only reads the JSON below).

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1, help="cores to use")
    parser.add_argument("--mode", choices=("threads", "serial"), default="threads")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    t0 = time.time()
    cores = args.processes
    parallel = args.mode == "threads" and cores > 1
    train_threads = 1 if parallel else cores
    torch.set_num_threads(train_threads)
    data = wl.Data(args.data)
    owners, aggregator = build_workers(data)
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
    central_evaluation(fl.parameters_of(model))  # the initial model, as Flower's round 0
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
        "threads": cores,
        "train_threads": train_threads,
        "parallelism": 2 if parallel else 1,
        "processes": 1,
        "started": t0,
        "setup_seconds": rounds[0]["start"] - t0 if rounds else None,
        "initial": {"test_loss": evaluations[0]["loss"], "test_accuracy": evaluations[0]["accuracy"]},
        "rounds": rounds,
    }, indent=1))


if __name__ == "__main__":
    main()
