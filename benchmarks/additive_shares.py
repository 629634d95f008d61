"""What additive secret sharing among workers costs, against a trusted aggregator's mean.

For n data owners, each holding an update of d float32 entries (uniform in [-1, 1]) as private
data on its own worker (`VirtualWorker`, every message encoded and decoded as over a network):

- shares: each owner splits its update into 2 additive shares in Z_(2^64) (16 fractional bits)
  and delivers one to each of 2 strict share holders itself (one `Share` request; "owner s"
  is that request, the delivery included; "encode s" and "split s" are the owner's arithmetic
  on one update alone, without messages); each holder sums what it holds (`AggregateShares`)
  and releases the sum ("holder s", per holder, median); the model owner adds the two sums and
  decodes ("decode s"); "round s" = a median owner + the slower holder + decode, as if each
  party ran on its own machine.
- trusted: each owner moves its update to one strict aggregator (`Move`, "owner s"); the
  aggregator takes the mean (`Aggregate`) and releases it ("holder s").
- bytes per owner: what it sends, and the expansion over its float32 update (4d bytes).
- ratio: round s of shares over round s of trusted, same inputs, same run.

Medians over repetitions. Prints a table and writes JSON (default
benchmarks/results/additive_shares.json).

Run:  python benchmarks/additive_shares.py [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

try:
    import fedsecure as sy
except ModuleNotFoundError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import fedsecure as sy

from fedsecure.aggregate.shares import AdditiveShares, FixedPrecision
from fedsecure.wire import messages as m
from fedsecure.wire.ids import new_id

ROOT = Path(__file__).resolve().parents[1]
FRAC_BITS = 16


def federation(n: int, d: int) -> tuple[sy.Federation, list[sy.VirtualWorker], list[sy.VirtualWorker], list[Any]]:
    fed = sy.Federation()
    holders = [sy.VirtualWorker(id=f"h{i}", federation=fed, policy=sy.Policy(strict=True)) for i in (1, 2)]
    generator = torch.Generator().manual_seed(n * 7919 + d)
    owners, ids = [], []
    for u in range(n):
        update = torch.rand(d, generator=generator) * 2 - 1
        owner = sy.VirtualWorker(id=f"o{u}", federation=fed, data={"u": update})
        owners.append(owner)
        ids.append(owner.search("u")[0])  # the pointer: dropping it would free the data
    return fed, owners, holders, ids


def shares_round(n: int, d: int) -> dict[str, Any]:
    fed, owners, holders, ids = federation(n, d)
    expected = sum(fed.cores[o.id].objects[p.id_at_location].obj.double() for o, p in zip(owners, ids, strict=True))
    share_ids: list[list[int]] = []
    owner_s: list[float] = []
    sent = [0] * n
    for u, (owner, obj) in enumerate(zip(owners, ids, strict=True)):
        new = [new_id(), new_id()]
        before = {k: v for k, v in fed.link_bytes.items() if k[0] == owner.id}
        start = time.perf_counter()
        owner.request(m.Share(obj.id_at_location, 0, False, {}, [h.id for h in holders], new,
                              FRAC_BITS))
        owner_s.append(time.perf_counter() - start)
        sent[u] = sum(v - before.get(k, 0) for k, v in fed.link_bytes.items() if k[0] == owner.id)
        share_ids.append(new)
    # The owner's own arithmetic, without the messages: encoding one update, then splitting it.
    update = fed.cores[owners[0].id].objects[ids[0].id_at_location].obj
    start = time.perf_counter()
    fixed = FixedPrecision.encode(update, frac_bits=FRAC_BITS)
    encode_s = time.perf_counter() - start
    start = time.perf_counter()
    fixed.share(2)
    split_s = time.perf_counter() - start
    holder_s, parts = [], []
    for k, holder in enumerate(holders):
        result = new_id()
        start = time.perf_counter()
        holder.request(m.AggregateShares([s[k] for s in share_ids], result))
        parts.append(holder.request(m.Get(result))["tensor"])
        holder_s.append(time.perf_counter() - start)
    start = time.perf_counter()
    total = AdditiveShares.from_tensors(parts, frac_bits=FRAC_BITS).float_precision()
    decode_s = time.perf_counter() - start
    error = float((total - expected).abs().max())
    return {"owner_s": statistics.median(owner_s), "encode_s": encode_s, "split_s": split_s,
            "holder_s": max(holder_s), "decode_s": decode_s,
            "round_s": statistics.median(owner_s) + max(holder_s) + decode_s,
            "bytes_per_owner": statistics.median(sent), "expansion": statistics.median(sent) / (4 * d),
            "max_error": error, "correct": error <= n * 2.0 ** -(FRAC_BITS + 1) + 1e-9}


def trusted_round(n: int, d: int) -> dict[str, Any]:
    fed, owners, holders, ids = federation(n, d)
    aggregator = holders[0]
    moved, owner_s = [], []
    for owner, obj in zip(owners, ids, strict=True):
        new = new_id()
        start = time.perf_counter()
        owner.request(m.Move(obj.id_at_location, aggregator.id, new))
        owner_s.append(time.perf_counter() - start)
        moved.append(new)
    result = new_id()
    start = time.perf_counter()
    aggregator.request(m.Aggregate(moved, False, result))
    aggregator.request(m.Get(result))
    holder_s = time.perf_counter() - start
    return {"owner_s": statistics.median(owner_s), "holder_s": holder_s,
            "round_s": statistics.median(owner_s) + holder_s}


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: (statistics.median(r[k] for r in runs) if isinstance(runs[0][k], float | int)
                and not isinstance(runs[0][k], bool) else all(r[k] for r in runs)) for k in runs[0]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small n and d, one repetition (a smoke test)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "additive_shares.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cells = [(4, 10_000)] if args.quick else [(10, 100_000), (10, 1_000_000), (100, 100_000), (100, 1_000_000)]
    repeats = 1 if args.quick else args.repeats
    rows = []
    for n, d in cells:
        shares = median_of([shares_round(n, d) for _ in range(repeats)])
        trusted = median_of([trusted_round(n, d) for _ in range(repeats)])
        rows.append({"n": n, "d": d, "shares": shares, "trusted": trusted,
                     "ratio": shares["round_s"] / trusted["round_s"]})
    print("| n | d | owner s | (encode s | split s) | holder s | decode s | round s | trusted round s | shares/trusted "
          "| bytes/owner | expansion | correct |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        s, t = r["shares"], r["trusted"]
        print(f"| {r['n']} | {r['d']:.0e} | {s['owner_s']:.4f} | {s['encode_s']:.4f} | {s['split_s']:.4f} | "
              f"{s['holder_s']:.4f} | {s['decode_s']:.4f} | "
              f"{s['round_s']:.4f} | {t['round_s']:.4f} | {r['ratio']:.2f}x | {s['bytes_per_owner']:,.0f} | "
              f"{s['expansion']:.2f}x | {s['correct']} |")
    result = {"date": datetime.date.today().isoformat(), "machine": platform.platform(),
              "torch_threads": torch.get_num_threads(), "repeats": repeats, "frac_bits": FRAC_BITS, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
