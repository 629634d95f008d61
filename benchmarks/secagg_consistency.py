"""What the consistency check costs: fedsecure's SecAgg with and without the active-adversary variant.

For n clients with updates of d float32 entries, one round of ``fedsecure.aggregate`` as in
benchmarks/secure_aggregation.py (every message encoded to bytes and decoded, all parties in
this process one after the other), once semi-honest and once with signing identities and the
consistency check (Bonawitz et al. 2017, section 4): signed key advertisements verified by every
client (n verifications each), one more round in which every client signs the survivor set, and
the verification of the forwarded signatures before unmasking (up to n each). Per variant:
client s (median over the clients of one client's work in the round), server s, round s (a
client plus the server), bytes sent per client; and, with the check, the client's time in each
phase. Medians over repetitions. Prints a table.

Writes JSON (default benchmarks/results/secagg_consistency.json).

Run:  python benchmarks/secagg_consistency.py [--n 100] [--d 100000] [--reps 3] [--degree K] [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
from pathlib import Path
from typing import Any

from secure_aggregation import secure_round  # the same round, timed the same way


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--d", type=int, default=100_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--degree", type=int, default=None, help="SecAgg+ neighbours (default: every pair)")
    parser.add_argument("--quick", action="store_true", help="n=5, d=1000, one repetition (a smoke test)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "secagg_consistency.json")
    a = parser.parse_args(argv)
    if a.quick:
        a.n, a.d, a.reps = 5, 1000, 1
    out: dict[str, Any] = {}
    for checked in (False, True):
        runs = [secure_round(a.n, a.d, a.degree, checked=checked) for _ in range(a.reps)]
        med = {k: statistics.median(r[k] for r in runs) for k in ("client_s", "server_s", "round_s", "bytes_sent")}
        med["phases"] = {p: statistics.median(r["phases"][p] for r in runs) for p in runs[0]["phases"]}
        out["checked" if checked else "plain"] = med
    print(f"n={a.n} d={a.d} degree={a.degree} reps={a.reps} (medians)")
    print(f"{'variant':<10}{'client s':>11}{'server s':>11}{'round s':>11}{'bytes/client':>15}")
    for name, r in out.items():
        print(f"{name:<10}{r['client_s']:>11.4f}{r['server_s']:>11.4f}{r['round_s']:>11.4f}{r['bytes_sent']:>15.0f}")
    p, c = out["plain"], out["checked"]
    print(f"{'added':<10}{c['client_s'] - p['client_s']:>+11.4f}{c['server_s'] - p['server_s']:>+11.4f}"
          f"{c['round_s'] - p['round_s']:>+11.4f}{c['bytes_sent'] - p['bytes_sent']:>+15.0f}")
    for name, r in out.items():
        print(f"client phases, {name}: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in r["phases"].items()))
    result = {"date": datetime.date.today().isoformat(), "machine": platform.platform(), "n": a.n, "d": a.d,
              "degree": a.degree, "reps": a.reps, **out}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
