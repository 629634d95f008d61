"""Many simulated workers in one run: time per round and peak memory.

The issue's target: 1,000 simulated workers of a small CNN in one run under 4 GB of memory.
Fashion-MNIST (or scikit-learn's digits with --quick) is split IID over N workers, each a
`VirtualWorker` holding its share as private data; every round all of them (or a fraction C)
train NIID-Bench's small CNN for one local epoch, and the strict aggregator releases the mean.
Peak memory is the process' maximum resident set (the whole run happens in this process).
Prints a table and writes JSON (default benchmarks/results/fl_scale.json).

Run:  python benchmarks/fl_scale.py [--workers 1000] [--rounds 2] [--fraction 1.0] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

try:
    import fedsecure as sy
except ModuleNotFoundError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import fedsecure as sy
from fedsecure import fl
from fedsecure.data import federate, load_digits, load_fashion_mnist
from fedsecure.experiment.models import build_model

TARGET_GB = 4.0


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--fraction", type=float, default=1.0)
    ap.add_argument("--quick", action="store_true", help="digits, 100 workers, 1 round: a smoke run")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "fl_scale.json"))
    args = ap.parse_args()
    if args.quick:
        args.workers, args.rounds = 100, 1
    torch.set_num_threads(2)
    started = time.perf_counter()
    data = load_digits() if args.quick else load_fashion_mnist()
    name = data.name
    model = build_model("mlp" if args.quick else "cnn_niid", tuple(data.x_train.shape[1:]), data.num_classes)
    fed = sy.Federation()
    policy = sy.Policy(trusted_aggregators=frozenset({"secure_worker"}), private_sends=False)
    workers = [
        sy.VirtualWorker(id=f"w{i:04d}", data={"x": x, "y": y}, policy=policy, federation=fed)
        for i, (x, y) in enumerate(federate(data, args.workers, scheme="iid", seed=0))
    ]
    test = (data.x_test, data.y_test)  # the model owner keeps the test set; the owners hold their shares
    del data
    aggregator = sy.VirtualWorker(id="secure_worker", policy=sy.Policy(strict=True), federation=fed)
    setup = time.perf_counter() - started
    memory_after_setup = peak_gb()
    strategy = fl.FedAvg(training=fl.LocalTraining(epochs=1, batch_size=32, lr=0.01, optimizer_args={"momentum": 0.9}),
                         fraction_fit=args.fraction)
    _, history = fl.fit(model, workers, strategy, rounds=args.rounds, aggregator=aggregator,
                        test_data=test)
    rows = [{"round": r["round"], "workers": r["workers"], "seconds": r["round_seconds"],
             "accuracy": r["central_accuracy"]} for r in history]
    peak = peak_gb()
    result = {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": platform.platform(), "torch": torch.__version__,
        "data": name, "workers": args.workers, "fraction": args.fraction,
        "setup_seconds": setup, "peak_gb_after_setup": memory_after_setup, "peak_gb": peak,
        "target_gb": TARGET_GB, "rounds": rows,
        "objects_left": [w.object_count() for w in workers[:5]] + [aggregator.object_count()],
    }
    print(f"{args.workers} workers ({result['data']}), set-up {setup:.1f} s, peak memory {peak:.2f} GB "
          f"(target < {TARGET_GB:g} GB; {memory_after_setup:.2f} GB after set-up)")
    print("| round | workers | seconds | accuracy |\n| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['round']} | {r['workers']} | {r['seconds']:.1f} | {r['accuracy']:.4f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
