"""The baseline without a framework: FedAvg as a plain loop in one process.

Each round, for each client in turn: copy the global weights into the client's model, train it
(workload.train: E epochs of SGD with momentum, batch B, a seeded shuffle); then the global model
becomes the sample-weighted average; then central evaluation on the test set. torch uses
``--threads`` threads (default: the number of cores), the whole machine, as one process can.

A round is timed from the end of the previous round's evaluation (round 1: the end of the
evaluation of the initial model) to the end of its own evaluation, as on the other systems.

Run (normally from run.py):  python plain_loop.py --data DATA.npz --rounds 5 --out RESULT.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workload as wl  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    t0 = time.time()
    torch.set_num_threads(args.threads)
    data = wl.Data(args.data)
    clients = [data.client(c) for c in range(data.num_clients)]
    x_test, y_test = data.test()
    global_model = wl.initial_model(data.image_size, data.seed)
    local = wl.cnn(data.image_size)
    loss, acc = wl.evaluate(global_model, x_test, y_test)
    initial = {"test_loss": loss, "test_accuracy": acc}
    rounds = []
    start = time.time()
    for r in range(1, args.rounds + 1):
        global_state = {k: v.clone() for k, v in global_model.state_dict().items()}
        states, sizes, train_losses = [], [], []
        for c, (x, y) in enumerate(clients):
            local.load_state_dict(global_state)
            train_losses.append(wl.train(local, x, y, shuffle_seed=wl.client_seed(data.seed, r, c)))
            states.append({k: v.detach().clone() for k, v in local.state_dict().items()})
            sizes.append(len(y))
        global_model.load_state_dict(wl.weighted_average(states, sizes))
        loss, acc = wl.evaluate(global_model, x_test, y_test)
        end = time.time()
        rounds.append(wl.round_record(r, start, end, loss, acc, train_loss=sum(train_losses) / len(train_losses)))
        print(f"plain round {r}: {end - start:.2f} s, test accuracy {acc:.4f}", flush=True)
        start = end
    Path(args.out).write_text(json.dumps({
        "system": "plain",
        "threads": args.threads,
        "processes": 1,
        "started": t0,
        "setup_seconds": rounds[0]["start"] - t0 if rounds else time.time() - t0,
        "initial": initial,
        "rounds": rounds,
    }, indent=1))


if __name__ == "__main__":
    main()
