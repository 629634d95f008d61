"""What secure aggregation costs: fedsecure's SecAgg / SecAgg+ versus plain averaging and Flower's SecAgg+.

For n clients with updates of d float32 entries (uniform in [-1, 1], bound 1, 32-bit ring), one
round of fedsecure's protocol (``fedsecure.aggregate``), every message encoded to bytes and
decoded, all parties in this process one after the other:
- client s: one client's own work over the round (its four phases, encoding its messages),
  median over the clients; server s: the aggregator's work (decoding, routing, summing,
  unmasking, decoding the fixed-point sum);
- round s: clients in parallel, each on its own machine: a (median) client plus the server
  (the slowest client here mostly measures the noise of a shared machine; it is in the JSON
  as client_max_s, and the sum of all the clients' times plus the server as sequential_s);
- bytes sent per client and its expansion over the plain float32 update (4d bytes);
- the ratio of server s and round s to plain averaging (a numpy weighted mean in float64 of
  the same n updates, as the aggregator of trusted mode computes it).
Modes: "secagg" (every client masks with every other, Bonawitz et al. 2017) and "secagg+" (a
random Harary graph of even degree k ~ 2 log2 n, Bell et al. 2020), threshold k/2 + 1 resp.
n/2 + 1. Side by side, Flower's own SecAgg+ workflow and mod (flwr, in a virtual environment
of its own made on first use at .venv-flower) with num_shares = k + 1 and the same threshold,
through an in-process grid (benchmarks/flower_secaggplus.py), and Flower's plain FedAvg round.
Medians over repetitions. Prints a table and writes JSON (default
benchmarks/results/secure_aggregation.json).

Run:  python benchmarks/secure_aggregation.py [--quick] [--no-flower] [--full] [--out PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

try:
    from fedsecure.aggregate import SecAggClient, SecAggServer, generate_federation
except ModuleNotFoundError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from fedsecure.aggregate import SecAggClient, SecAggServer, generate_federation

ROOT = Path(__file__).resolve().parents[1]
FLOWER_VENV = ROOT / ".venv-flower"
FLOWER_REQUIREMENT = "flwr==1.41.0"
TARGET_VS_FLOWER = 10.0  # at least this many times faster than Flower's SecAgg+
TARGET_VS_PLAIN = 5.0  # SecAgg of 100 x 1e6 at most this many times plain averaging
# cells that take minutes (or, for Flower, several GB) per repetition run only with --full
HEAVY = {("secagg", 500, 100_000), ("secagg", 500, 1_000_000), ("flower", 500, 1_000_000)}


def update(u: int, d: int) -> np.ndarray:
    return np.random.default_rng(u).uniform(-1, 1, d).astype(np.float32)


def degree_for(n: int) -> int:
    return min(n - 1 - (n - 1) % 2, 2 * math.ceil(math.log2(n)))


def secure_round(n: int, d: int, degree: int | None, *, checked: bool = False) -> dict[str, Any]:
    """One round; ``checked``: with signing identities and the consistency check
    (benchmarks/secagg_consistency.py). Client times are kept per phase too."""
    ids = list(range(1, n + 1))
    holders = n if degree is None else degree + 1
    threshold = holders // 2 + 1
    pki = generate_federation(ids) if checked else {}
    t_server = 0.0
    t_client: dict[int, dict[str, float]] = {u: defaultdict(float) for u in ids}
    sent = dict.fromkeys(ids, 0)

    def srv(fn: Any, *args: Any) -> Any:
        nonlocal t_server
        t = time.perf_counter()
        out = fn(*args)
        t_server += time.perf_counter() - t
        return out

    def cli(u: int, phase: str, fn: Any, *args: Any) -> bytes:
        t = time.perf_counter()
        data: bytes = fn(*args).encode()
        t_client[u][phase] += time.perf_counter() - t
        sent[u] += len(data)
        return data

    server = srv(lambda: SecAggServer(clients=ids, threshold=threshold, vector_size=d, bound=1.0, degree=degree,
                                      consistency_check=checked))
    clients = {u: SecAggClient(client_id=u, identity=pki.get(u)) for u in ids}
    setup = srv(server.setup.encode)
    for u in ids:
        srv(server.receive, cli(u, "advertise", clients[u].advertise_keys, setup))
    broadcast = srv(lambda: server.end_advertise_keys().encode())
    for u in ids:
        srv(server.receive, cli(u, "share", clients[u].share_keys, broadcast))
    bundles = srv(lambda: {v: b.encode() for v, b in server.end_share_keys().items()})
    plain_s = 0.0
    acc = np.zeros(d)
    for u in ids:
        x = update(u, d)  # untimed: local training's output
        t = time.perf_counter()
        acc += x  # the plain weighted mean (weights 1), on the same inputs
        plain_s += time.perf_counter() - t
        srv(server.receive, cli(u, "mask", clients[u].masked_input, bundles[u], x))
    t = time.perf_counter()
    acc /= n
    plain_s += time.perf_counter() - t
    request = srv(lambda: server.end_masked_input().encode())
    if checked:
        for u in ids:
            srv(server.receive, cli(u, "consistency", clients[u].sign_survivors, request))
        request = srv(lambda: server.end_consistency_check().encode())
    for u in ids:
        srv(server.receive, cli(u, "unmask", clients[u].unmask, request))
    result = srv(server.end_unmasking)
    err = float(np.abs(result.total / n - acc).max())
    times = [sum(p.values()) for p in t_client.values()]
    return {
        "phases": {p: statistics.median(t_client[u][p] for u in ids) for p in t_client[1]},
        "threshold": threshold, "client_s": statistics.median(times), "client_max_s": max(times),
        "server_s": t_server, "round_s": statistics.median(times) + t_server, "sequential_s": sum(times) + t_server,
        "bytes_sent": statistics.mean(sent.values()), "expansion": statistics.mean(sent.values()) / (4 * d),
        "plain_s": plain_s, "max_abs_err": err, "err_bound": result.max_error / n, "correct": err <= result.max_error / n + 1e-9,
    }


def flower_python() -> tuple[Path | None, str]:
    """The interpreter of Flower's venv, made on first use; None and why when it cannot be had."""
    py = FLOWER_VENV / "bin" / "python"
    ok = py.exists() and subprocess.run([str(py), "-c", "import flwr"], capture_output=True).returncode == 0
    if not ok:
        print(f"installing {FLOWER_REQUIREMENT} into {FLOWER_VENV} (once) ...", flush=True)
        try:
            subprocess.run([sys.executable, "-m", "venv", str(FLOWER_VENV)], check=True, capture_output=True)
            subprocess.run([str(py), "-m", "pip", "install", "-q", FLOWER_REQUIREMENT],
                           check=True, capture_output=True, timeout=900)
        except (subprocess.SubprocessError, OSError) as exc:
            return None, f"Flower could not be installed ({type(exc).__name__}): its columns are empty"
    return py, ""


def run_flower(py: Path, cells: list[tuple[int, int, int, int, int]]) -> dict[str, Any]:
    spec = json.dumps({"cells": cells})
    proc = subprocess.run([str(py), str(ROOT / "benchmarks" / "flower_secaggplus.py"), spec],
                          capture_output=True, text=True)
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else f"exit {proc.returncode}"}
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: (statistics.median(r[k] for r in runs) if not isinstance(runs[0][k], bool)
                else all(r[k] for r in runs)) for k in runs[0]}


def report(result: dict[str, Any]) -> None:
    m = result["machine"]
    print(f"secure aggregation  {result['date']}  python {m['python']}  {m['cpu_count']} cpus  "
          f"flower {result.get('flower_version') or '-'}  (medians of {result['config']['reps']} rounds)")
    head = (f"{'mode':8} {'n':>4} {'d':>8} {'k':>3} {'client s':>9} {'server s':>9} {'round s':>8} "
            f"{'plain s':>8} {'srv/plain':>9} {'rnd/plain':>9} {'KB sent':>9} {'expans':>7} "
            f"{'flwr s':>8} {'flwr/us':>8} {'flwr avg s':>10}  ok")
    print("\n" + head)
    for r in result["rows"]:
        f = r.get("flower") or {}
        speedup = f.get("secaggplus_round_s", 0) / r["sequential_s"] if f else None
        print(f"{r['mode']:8} {r['n']:4d} {r['d']:8.0e} {r['degree'] or '-':>3} {r['client_s']:9.4f} "
              f"{r['server_s']:9.4f} {r['round_s']:8.4f} {r['plain_s']:8.4f} {r['server_s'] / r['plain_s']:8.1f}x "
              f"{r['round_s'] / r['plain_s']:8.1f}x {r['bytes_sent'] / 1e3:9.1f} {r['expansion']:6.3f}x "
              f"{f.get('secaggplus_round_s', float('nan')):8.3f} {speedup if speedup else float('nan'):7.1f}x "
              f"{f.get('fedavg_round_s', float('nan')):10.3f}  {'yes' if r['correct'] else 'NO'}")
    print("client s: one client's own work (median); round s: client s + server s (clients in parallel);\n"
          "plain s: numpy weighted mean of the same updates; flwr s: Flower's SecAgg+ round (num_shares = k + 1,\n"
          "all parties in one process, one after the other), flwr/us: that over our sequential round (all\n"
          "clients + server); flwr avg s: Flower's plain FedAvg round the same way.")
    for note in result["notes"]:
        print("note:", note)
    for name, verdict in result["targets"].items():
        print(f"target {name}: {verdict}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small n and d, one round (a smoke test)")
    parser.add_argument("--no-flower", action="store_true", help="skip Flower's SecAgg+ (no venv, no install)")
    parser.add_argument("--full", action="store_true", help=f"also the heavy cells {sorted(HEAVY)}")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "secure_aggregation.json")
    args = parser.parse_args(argv)
    ns, ds = ([5, 10], [1_000, 10_000]) if args.quick else ([10, 100, 500], [100_000, 1_000_000])
    reps = args.reps or (1 if args.quick else 3)
    notes: list[str] = []
    rows = []
    for n in ns:
        for d in ds:
            for mode, degree in (("secagg", None), ("secagg+", degree_for(n))):
                if (mode, n, d) in HEAVY and not args.full:
                    notes.append(f"{mode} n={n} d={d:.0e} skipped (minutes per round; --full runs it)")
                    continue
                cell_reps = 1 if n * d >= 100_000_000 else reps
                runs = [secure_round(n, d, degree) for _ in range(cell_reps)]
                row = {"mode": mode, "n": n, "d": d, "degree": degree, "reps": cell_reps, **median_of(runs)}
                rows.append(row)
                print(f"  {mode} n={n} d={d:.0e}: round {row['round_s']:.3f} s, server {row['server_s']:.3f} s, "
                      f"plain {row['plain_s']:.3f} s", flush=True)
    flower_version = None
    if args.no_flower:
        notes.append("Flower skipped (--no-flower)")
    else:
        py, why = flower_python()
        if py is None:
            notes.append(why)
        else:
            plus = [r for r in rows if r["mode"] == "secagg+"]
            for r in plus:
                if ("flower", r["n"], r["d"]) in HEAVY and not args.full:
                    notes.append(f"Flower n={r['n']} d={r['d']:.0e} skipped (several GB; --full runs it)")
            cells = [(r["n"], r["d"], r["degree"] + 1, r["threshold"], r["reps"]) for r in plus
                     if args.full or ("flower", r["n"], r["d"]) not in HEAVY]
            got = run_flower(py, cells)
            if "error" in got:
                notes.append(f"Flower's run failed: {got['error']}")
            else:
                flower_version = got["flwr"]
                by_cell = {(c["n"], c["d"]): c for c in got["cells"]}
                for r in plus:  # Flower's SecAgg+ beside ours, on the same neighbours
                    r["flower"] = by_cell.get((r["n"], r["d"]))
    result: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "numpy": np.__version__, "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()},
        "config": {"quick": args.quick, "reps": reps, "bound": 1.0, "bits": 32, "full": args.full},
        "flower_version": flower_version, "rows": rows, "notes": notes,
    }
    result["targets"] = targets(rows)
    report(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return result


def targets(rows: list[dict[str, Any]]) -> dict[str, str]:
    out = {}
    vs = [(r, r["flower"]["secaggplus_round_s"] / r["sequential_s"]) for r in rows
          if r["mode"] == "secagg+" and r.get("flower")]
    if vs:
        worst = min(s for _, s in vs)
        out[f"{TARGET_VS_FLOWER:.0f}x faster than Flower's SecAgg+ (sequential rounds, same n, d, k)"] = (
            f"{'met' if worst >= TARGET_VS_FLOWER else 'NOT met'} (slowest cell {worst:.1f}x)")
    big = [r for r in rows if r["mode"] == "secagg" and r["n"] == 100 and r["d"] == 1_000_000]
    if big:
        r = big[0]
        out[f"SecAgg of 100 x 1e6 at most {TARGET_VS_PLAIN:.0f}x plain averaging"] = (
            f"server {r['server_s'] / r['plain_s']:.1f}x, round with clients in parallel "
            f"{r['round_s'] / r['plain_s']:.1f}x: {'met' if r['round_s'] <= TARGET_VS_PLAIN * r['plain_s'] else 'NOT met'}")
    return out


if __name__ == "__main__":
    main()
