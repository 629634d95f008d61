"""What one Python process that trains with torch holds before it holds any data: the floor under
every worker process, host process or Ray actor, and under the model owner's process.

A fresh child process measures its own PSS and private memory (``/proc/self/smaps_rollup``) after
each stage, cumulatively: the bare interpreter; numpy; torch; fedsecure (with its transport and
experiment modules); Ray (when installed: what an actor imports); then one round of `fl.fit` with a
tiny model on two `VirtualWorker` owners and an aggregator, twice; last, what a worker avoids: a
torch.optim optimizer built and stepped and a forward pass on meta tensors, which import torch's
compiler stack (torch._dynamo, and sympy with it). A worker steps torch.optim's update rules in
its own code (`fedsecure.worker.update_rules`) and checks a model against the data on zeros
(`fedsecure.worker.dry_run`) for that reason. Each child runs ``--repeats`` times; the table gives
medians.

Prints a table and writes JSON (default benchmarks/results/process_floor.json).

Run:  python benchmarks/process_floor.py [--repeats N] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

STAGES = ("python", "numpy", "torch", "fedsecure", "ray", "first fit", "second fit", "torch.optim and meta")


def _memory() -> dict[str, float]:
    """This process's PSS and its private (anonymous) memory, MB."""
    found: dict[str, float] = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Pss", "Anonymous"):
                found[key.lower()] = int(rest.split()[0]) / 1024
    return found


def child() -> None:
    """The stages in this process, one JSON line each: the stage, its seconds, memory after it."""

    def report(stage: str, started: float, **extra: Any) -> None:
        print(json.dumps({"stage": stage, "seconds": time.perf_counter() - started, **_memory(), **extra}), flush=True)

    t = time.perf_counter()
    report("python", t)
    t = time.perf_counter()
    import numpy  # noqa: F401, PLC0415

    report("numpy", t)
    t = time.perf_counter()
    import torch  # noqa: PLC0415

    report("torch", t)
    t = time.perf_counter()
    import fedsecure as sy  # noqa: PLC0415
    import fedsecure.experiment.host  # noqa: F401, PLC0415
    from fedsecure import fl  # noqa: PLC0415

    report("fedsecure", t)
    t = time.perf_counter()
    try:
        import ray  # noqa: F401, PLC0415
        report("ray", t)
    except ImportError:
        report("ray", t, missing=True)
    torch.manual_seed(0)
    federation = sy.Federation()
    trust = sy.Policy(trusted_aggregators=frozenset({"agg"}), private_sends=False)
    owners = [sy.VirtualWorker(id=f"owner{i}", federation=federation, policy=trust,
                               data={"x": torch.randn(64, 8), "y": torch.randint(0, 3, (64,))}) for i in range(2)]
    aggregator = sy.VirtualWorker(id="agg", federation=federation, policy=sy.Policy(strict=True))
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    strategy = fl.FedAvg(training=fl.LocalTraining(epochs=1, batch_size=16, lr=0.1, optimizer_args={"momentum": 0.9}),
                         min_fit_workers=2)
    for stage in ("first fit", "second fit"):
        t = time.perf_counter()
        model, _ = fl.fit(model, owners, strategy, rounds=1, aggregator=aggregator, seed=0)
        report(stage, t, dynamo="torch._dynamo" in sys.modules, sympy="sympy" in sys.modules)
    t = time.perf_counter()
    params = list(model.parameters())
    for p in params:
        p.grad = torch.zeros_like(p)
    torch.optim.SGD(params, lr=0.1, momentum=0.9).step()
    model.to("meta")(torch.empty(4, 8, device="meta"))
    report("torch.optim and meta", t, dynamo="torch._dynamo" in sys.modules, sympy="sympy" in sys.modules)


def run(repeats: int) -> dict[str, dict[str, Any]]:
    runs: list[dict[str, dict[str, Any]]] = []
    for _ in range(repeats):
        done = subprocess.run([sys.executable, __file__, "--child"], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"the measuring process failed:\n{done.stderr[-3000:]}")
        out = done.stdout
        runs.append({row["stage"]: row for row in map(json.loads, out.splitlines())})
    rows = {}
    for stage in STAGES:
        present = [r[stage] for r in runs]
        rows[stage] = {key: statistics.median(p[key] for p in present) for key in ("pss", "anonymous", "seconds")}
        rows[stage].update({k: present[0][k] for k in ("dynamo", "sympy", "missing") if k in present[0]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1 repeat")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "process_floor.json"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child()
    rows = run(1 if args.quick else args.repeats)
    lines = ["| after | PSS MB | + MB | private (anonymous) MB | seconds | notes |", "| --- | ---: | ---: | ---: | ---: | --- |"]
    before = 0.0
    for stage, r in rows.items():
        notes = "not installed" if r.get("missing") else (
            f"torch._dynamo {'imported' if r['dynamo'] else 'not imported'}, sympy "
            f"{'imported' if r['sympy'] else 'not imported'}" if "dynamo" in r else "")
        lines.append(f"| {stage} | {r['pss']:.0f} | {r['pss'] - before:+.0f} | {r['anonymous']:.0f} | "
                     f"{r['seconds']:.2f} | {notes} |")
        before = r["pss"]
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "repeats": 1 if args.quick else args.repeats, "table": table}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
