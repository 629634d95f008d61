"""Noninterference at length: random model-owner programs against pairs of worlds.

The long run of tests/test_noninterference.py: ``--examples`` random programs drawn from the
workers' allow-list (tests/noninterference.py), each run against two worlds whose private data
has the same shapes and dtypes and different values (zeros, negatives, large values, NaN and
inf, labels in and out of range, singular matrices), under ``Policy(max_metric_numel=0)``. A
divergence is a step at which the model owner sees something different in the two worlds;
each one is checked against a second run of the first world (a difference that a world shows
with itself is nondeterminism, not a divergence, and is counted apart).

Prints a table (programs, steps, ops exercised, divergences by class: the op at which the
transcripts differ and what differs; after a program's first divergence its divergent step is
dropped and the program run again, up to 8 times, so that channels behind the first one show
too; each program counts once per class) and, for each class, a minimal program: the first
program of that class with every step dropped that the divergence does not need, and the
second world moved towards the first, tensor by tensor and element by element, as far as the
divergence allows. Writes JSON (default benchmarks/results/noninterference.json).

Run:  python benchmarks/noninterference.py [--examples 5000] [--seed 0] [--max-steps 12] [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from hypothesis import HealthCheck, Phase, given, seed, settings

ROOT = Path(__file__).resolve().parents[1]
try:
    import fedsecure  # noqa: F401
except ModuleNotFoundError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT / "src"))


def _shared() -> Any:
    """tests/noninterference.py, the program generator and runner shared with the tests (loaded by
    path: this script has the same name)."""
    spec = importlib.util.spec_from_file_location("noninterference", ROOT / "tests" / "noninterference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["noninterference"] = module  # dataclasses look their module up while being made
    spec.loader.exec_module(module)
    return module


ni = _shared()


CHUNK = 100
MAX_PER_PROGRAM = 8  # divergences looked for in one program (each after dropping the one before)


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value


def explore(examples: int, seed_value: int, max_steps: int) -> dict[str, Any]:
    """Run ``examples`` scenarios; counts, and the first scenario of each divergence class."""
    counts: collections.Counter[str] = collections.Counter()
    calls: collections.Counter[str] = collections.Counter()  # op -> steps that ran it
    succeeded: collections.Counter[str] = collections.Counter()  # op -> steps where it succeeded
    on_private: collections.Counter[str] = collections.Counter()  # ... with a result labelled bob's
    classes: dict[tuple[str, str], dict[str, Any]] = {}

    def one(scenario: Any) -> None:
        counts["programs"] += 1
        counts["steps"] += len(scenario.program)
        trace: list[Any] = []
        try:
            found = ni.check(scenario.program, scenario.a, scenario.b, trace)
        except ni.Nondeterministic:
            counts["nondeterministic"] += 1
            return
        for step, entry in zip(scenario.program, trace[0].steps, strict=True):
            if isinstance(step, ni.CallStep):
                calls[step.op] += 1
                if entry[0] == "ok":
                    succeeded[step.op] += 1
                    if "'bob'" in repr(entry[1]):
                        on_private[step.op] += 1
        if found is None:
            return
        counts["divergent programs"] += 1
        # A first divergence hides what comes after it: drop the divergent step (what it made is
        # missing in both worlds alike from then on) and look again, a few times.
        program, keys = scenario.program, set()
        for _ in range(MAX_PER_PROGRAM):
            if found is None or found.key in keys:
                break
            keys.add(found.key)
            known = classes.get(found.key)
            if known is None:
                classes[found.key] = {"count": 1, "first": counts["programs"], "program": program,
                                      "a": scenario.a, "b": scenario.b}
            else:
                known["count"] += 1
            program = ni.drop_step(program, found.step)
            try:
                found = ni.check(program, scenario.a, scenario.b)
            except ni.Nondeterministic:
                counts["nondeterministic"] += 1
                break

    # Runs of CHUNK programs, each from its own seed: hypothesis varies the programs of one run by
    # mutating earlier ones, so many short runs cover more ground than one long one.
    for i, start in enumerate(range(0, examples, CHUNK)):
        run = seed(seed_value * 1_000_003 + i)(settings(
            max_examples=min(CHUNK, examples - start), deadline=None, database=None, phases=[Phase.generate],
            suppress_health_check=list(HealthCheck))(given(ni.scenarios(max_steps=max_steps))(one)))
        run()
    return {"counts": counts, "calls": calls, "succeeded": succeeded, "on_private": on_private, "classes": classes}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=5000, help="random programs to run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=12, help="top-level steps per program")
    parser.add_argument("--no-minimise", action="store_true", help="print each class's first program as found")
    parser.add_argument("--quick", action="store_true", help="200 programs (a smoke test)")
    parser.add_argument("--out", "--json", type=Path, default=ROOT / "benchmarks" / "results" / "noninterference.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.examples = 200

    start = time.perf_counter()
    seen = explore(args.examples, args.seed, args.max_steps)
    elapsed = time.perf_counter() - start
    counts, calls, classes = seen["counts"], seen["calls"], seen["classes"]

    print(f"noninterference: {counts['programs']} programs, {counts['steps']} steps, seed {args.seed}, "
          f"{elapsed:.1f} s")
    print(f"ops exercised: {len(calls)} of {len(ni.OPS)} allow-listed ops called, "
          f"{len(seen['succeeded'])} succeeded at least once, {len(seen['on_private'])} on private data")
    print(f"divergent programs: {counts['divergent programs']}, nondeterministic: {counts['nondeterministic']}")
    print()
    rows = sorted(classes.items(), key=lambda kv: (-kv[1]["count"], kv[0]))
    width = max([len(op) for (op, _), _ in rows] + [2])
    print(f"| {'op':<{width}} | {'what differs':<58} | programs | first |")
    print(f"| {'-' * width} | {'-' * 58} | -------: | ----: |")
    for (op, what), info in rows:
        print(f"| {op:<{width}} | {what:<58} | {info['count']:>8} | {info['first']:>5} |")

    out_classes = []
    for (op, what), info in rows:
        program, world_a, world_b = info["program"], info["a"], info["b"]
        if not args.no_minimise:
            program, world_b = ni.minimise(program, world_a, world_b, (op, what))
        found = ni.check(program, world_a, world_b)
        text = ni.report(program, world_a, world_b, found) if found else "(no longer diverges)"
        print(f"\n== {op}: {what} ({info['count']} programs)\n{text}")
        out_classes.append({
            "op": op, "what": what, "programs": info["count"], "first": info["first"],
            "program": ni.render(program),
            "world_a": {tag: t.tolist() for tag, t in world_a.items()},
            "world_b": {tag: t.tolist() for tag, t in world_b.items()},
            "a": _jsonable(found.a) if found else None, "b": _jsonable(found.b) if found else None,
        })

    result: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "platform": platform.platform(), "cpu_count": os.cpu_count()},
        "config": {"examples": args.examples, "seed": args.seed, "max_steps": args.max_steps},
        "seconds": round(elapsed, 1),
        "programs": counts["programs"],
        "steps": counts["steps"],
        "divergent_programs": counts["divergent programs"],
        "nondeterministic": counts["nondeterministic"],
        "ops_total": len(ni.OPS),
        "ops": {op: {"calls": calls[op], "succeeded": seen["succeeded"][op], "on_private": seen["on_private"][op]}
                for op in ni.OPS},
        "ops_never_called": [op for op in ni.OPS if not calls[op]],
        "divergences": out_classes,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
