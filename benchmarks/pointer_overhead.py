"""What a pointer costs: the tutorial's training step on a VirtualWorker versus plain torch.

Measured in one process, side by side (alternating blocks; medians over blocks):
1. the tutorial's local step (nn.Linear(2, 1), x (2, 2), y (2, 1), ``loss.get()`` each step)
   on a VirtualWorker versus plain torch, with SGD, SGD momentum=0.9 and Adam. The ratio
   of medians is the number to watch: target at most 3x (PySyft 0.2: 50-100x);
2. one remote op (``a + b``), a send + get round trip and an empty message, versus local;
3. a cProfile of the remote SGD step: top functions by own time, and that time grouped.
Prints a table and writes JSON (default benchmarks/results/pointer_overhead.json).

Run:  python benchmarks/pointer_overhead.py [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import gc
import json
import os
import platform
import pstats
import re
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

try:
    import fedsecure as sy
except ModuleNotFoundError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import fedsecure as sy

TARGET_RATIO = 3.0
OPTIMIZERS: dict[str, Callable[[Iterable[torch.Tensor]], torch.optim.Optimizer]] = {
    "SGD": lambda p: torch.optim.SGD(p, lr=0.1),
    "SGD momentum=0.9": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "Adam": lambda p: torch.optim.Adam(p, lr=0.1),
    # the same optimizers built on the worker; the plain-torch side keeps torch.optim's
    "SGD, fedsecure.optim": lambda p: _on_worker(p, sy.optim.SGD, torch.optim.SGD, lr=0.1),
    "SGD momentum=0.9, fedsecure.optim": lambda p: _on_worker(
        p, sy.optim.SGD, torch.optim.SGD, lr=0.1, momentum=0.9
    ),
    "Adam, fedsecure.optim": lambda p: _on_worker(p, sy.optim.Adam, torch.optim.Adam, lr=0.1),
}
Step = Callable[[], torch.Tensor]


def _on_worker(params: Iterable[torch.Tensor], remote_cls: Any, local_cls: Any, **kw: Any) -> torch.optim.Optimizer:
    """fedsecure's optimizer for remote parameters; torch's own class for the baseline."""
    params = list(params)
    cls = remote_cls if isinstance(params[0], sy.PointerTensor) else local_cls
    return cls(params, **kw)  # type: ignore[no-any-return]


def training_step(make_opt: Callable[..., torch.optim.Optimizer], worker: sy.VirtualWorker | None) -> Step:
    """The tutorial's step (bob's half of its data); remote when ``worker`` is given."""
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    x = torch.tensor([[0, 0], [0, 1.0]])
    y = torch.tensor([[0], [0.0]])
    if worker is not None:
        model, x, y = model.send(worker), x.send(worker, private=True), y.send(worker, private=True)
    opt = make_opt(model.parameters())

    def step() -> torch.Tensor:
        opt.zero_grad()
        pred = model(x)
        loss = ((pred - y) ** 2).sum()
        loss.backward()
        opt.step()
        return loss.get() if worker is not None else loss.detach()

    return step


def interleave(cases: dict[str, Callable[[], Any]], blocks: int, reps: int, warmup: int) -> dict[str, float]:
    """Median (and, as ``name:best``, minimum) over blocks of the per-call time in us.

    The cases alternate block by block (ABBA...), so drifts in machine speed hit both.
    """
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    gc.collect()
    per_call: dict[str, list[float]] = {name: [] for name in cases}
    order = list(cases)
    for block in range(blocks):
        for name in order if block % 2 == 0 else reversed(order):
            fn = cases[name]
            t0 = time.perf_counter_ns()
            for _ in range(reps):
                fn()
            per_call[name].append((time.perf_counter_ns() - t0) / reps / 1e3)
    return {
        **{name: statistics.median(times) for name, times in per_call.items()},
        **{f"{name}:best": min(times) for name, times in per_call.items()},
    }


def count_messages(worker: sy.VirtualWorker, fn: Callable[[], Any]) -> Counter[str]:
    """The requests one call of ``fn`` sends to ``worker``, by op (or request type).

    In-place ops that do not wait for a reply (they ride with the next request) are
    counted as ``op (no wait)``; every other request is one round trip.
    """
    counts: Counter[str] = Counter()
    request, defer = worker.request, worker.defer

    def counting(msg: Any) -> Any:
        counts[getattr(msg, "op", type(msg).__name__)] += 1
        return request(msg)

    def counting_deferred(msg: Any) -> None:
        counts[f"{getattr(msg, 'op', type(msg).__name__)} (no wait)"] += 1
        defer(msg)

    # shadow the methods for this call only
    worker.request = counting  # type: ignore[method-assign]
    worker.defer = counting_deferred  # type: ignore[method-assign]
    try:
        fn()
    finally:
        del worker.request, worker.defer
    return counts


def row(case: str, med: dict[str, float], messages: Counter[str], same_loss: bool | None = None) -> dict[str, Any]:
    has_local = "local" in med
    return {
        "case": case, "remote_us": med["remote"], "local_us": med.get("local"),
        "ratio": med["remote"] / med["local"] if has_local else None,
        "best_block_ratio": med["remote:best"] / med["local:best"] if has_local else None,
        "messages": sum(messages.values()),
        "round_trips": sum(n for op, n in messages.items() if not op.endswith("(no wait)")),
        "messages_by_op": dict(messages.most_common()),
        "same_loss": same_loss,
    }


def bench_training(worker: sy.VirtualWorker, blocks: int, reps: int, warmup: int) -> list[dict[str, Any]]:
    rows = []
    for name, make_opt in OPTIMIZERS.items():
        remote, local = training_step(make_opt, worker), training_step(make_opt, None)
        med = interleave({"remote": remote, "local": local}, blocks, reps, warmup)
        # Both have taken the same steps from the same seed, so their losses must agree.
        same = torch.allclose(remote().detach(), local(), rtol=1e-4, atol=1e-6)
        rows.append(row(f"train step, {name}", med, count_messages(worker, remote), same))
    return rows


def bench_ops(worker: sy.VirtualWorker, blocks: int, reps: int, warmup: int) -> list[dict[str, Any]]:
    a, b = torch.randn(4), torch.randn(4)
    pa, pb = a.send(worker), b.send(worker)
    cases: list[tuple[str, Callable[[], Any], Callable[[], Any] | None]] = [
        ("a + b (4 floats)", lambda: pa + pb, lambda: a + b),
        ("send + get (4 floats) vs clone", lambda: a.send(worker).get(), a.clone),
        ("empty message (worker.flush())", worker.flush, None),
    ]
    rows = []
    for name, remote, local in cases:
        med = interleave({"remote": remote, **({"local": local} if local else {})}, blocks, reps, warmup)
        rows.append(row(name, med, count_messages(worker, remote)))
    return rows


# -- profile -------------------------------------------------------------------------------

GROUP_RULES = [(re.compile(pattern), group) for pattern, group in [
    (r"_make_wrapper_subclass|pointer/tensor\.py:\d+\((__new__|_from_meta|__init__)\)", "wrapper creation"),
    (r"weakref\.py|\(release\)|worker/client\.py:\d+\(flush\)", "finalizers"),
    (r"wire/messages\.py:\d+\((<lambda>|_is_id|_is_str)\)", "message validation"),
    (r"unpackb|wire/messages\.py:\d+\(decode_|wire/codec\.py:\d+\((decode|_ext_hook|tensor_from_wire|parse_dtype)\)",
     "message decode"),
    (r"msgpack|wire/messages\.py:\d+\(encode_|wire/codec\.py", "message encode"),
    (r"random\.py|urandom|secrets\.py|\(new_id\)", "object ids"),
    (r"fedsecure/worker/(core|store|ops|execute|predict|guards|objects|labels|allowlist|modules)\.py", "worker execution"),
    (r"fedsecure/(pointer|worker/client|worker/virtual)", "torch_function dispatch + client"),
    (r"^~:.*torch", "torch C++ (ops, autograd engine, arg parsing)"),
    (r"torch/", "torch python (optimizer, autograd, nn.Module)"),
]]
OTHER = "other (benchmark loop, python)"
# Helpers (builtins, comprehensions, dataclasses' fields() and generated __init__) whose own time
# belongs to their callers.
HELPER = re.compile(r"^~:|\((<genexpr>|<listcomp>|<dictcomp>|<lambda>)\)$|dataclasses\.py|^<string>")


def is_helper(name: str) -> bool:
    return bool(HELPER.search(name)) and not re.search(r"torch|pack|urandom", name)


def label(key: tuple[str, int, str]) -> str:
    path, line, func = key
    if path == "~":
        return f"~:{func}"
    short = re.sub(r"^.*/(src|site-packages)/", "", path)
    return f"{short if short != path else os.path.basename(path)}:{line}({func})"


def group_of(key: tuple[str, int, str], stats: dict[Any, Any], depth: int = 0) -> str:
    """The group of a function; helpers take the group of their main caller."""
    name = label(key)
    if not is_helper(name):
        return next((g for pattern, g in GROUP_RULES if pattern.search(name)), OTHER)
    callers = stats[key][4]
    if depth > 4 or not callers:
        return OTHER
    return group_of(max(callers, key=lambda c: callers[c][2]), stats, depth + 1)


def profile_step(step: Step, steps: int) -> tuple[float, pstats.Stats]:
    prof = cProfile.Profile()
    prof.runcall(lambda: [step() for _ in range(steps)])
    st = pstats.Stats(prof)
    return st.total_tt / steps * 1e6, st  # type: ignore[attr-defined]


def profile_training(worker: sy.VirtualWorker, steps: int) -> dict[str, Any]:
    remote, local = training_step(OPTIMIZERS["SGD"], worker), training_step(OPTIMIZERS["SGD"], None)
    for _ in range(min(steps, 200)):
        remote(), local()
    local_us, _ = profile_step(local, steps)
    remote_us, st = profile_step(remote, steps)
    raw: dict[Any, Any] = st.stats  # type: ignore[attr-defined]
    groups: defaultdict[str, float] = defaultdict(float)
    for key, (_, _, tt, _, callers) in raw.items():
        if is_helper(label(key)) and callers:
            for caller, (_, _, ctt, _) in callers.items():  # split own time over the callers
                groups[group_of(caller, raw)] += ctt / steps * 1e6
        else:
            groups[group_of(key, raw)] += tt / steps * 1e6
    top = sorted(raw.items(), key=lambda kv: kv[1][2], reverse=True)[:15]
    return {
        "steps": steps, "remote_us_per_step": remote_us, "local_us_per_step": local_us,
        "top": [{"function": label(k), "group": group_of(k, raw), "calls_per_step": v[1] / steps,
                 "tottime_us_per_step": v[2] / steps * 1e6, "cumtime_us_per_step": v[3] / steps * 1e6}
                for k, v in top],
        "groups_us_per_step": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
    }


# -- report --------------------------------------------------------------------------------

def fmt(value: Any, spec: str = ".1f", suffix: str = "") -> str:
    if value is None:
        return "-"
    return ("yes" if value else "NO") if isinstance(value, bool) else format(value, spec) + suffix


def report(result: dict[str, Any]) -> None:
    m = result["machine"]
    print(f"pointer overhead  {result['date']}  python {m['python']}  torch {m['torch']}  "
          f"{m['cpu_count']} cpus  ({result['config']['blocks']} blocks x {result['config']['reps']} steps)")
    print(f"\n{'case':42} {'remote us':>10} {'local us':>9} {'ratio':>7} {'best':>6} {'msgs':>5} {'trips':>5}  same loss")
    for r in result["rows"]:
        print(f"{r['case']:42} {r['remote_us']:10.1f} {fmt(r['local_us']):>9} {fmt(r['ratio'], suffix='x'):>7} "
              f"{fmt(r['best_block_ratio'], suffix='x'):>6} {r['messages']:5d} {r['round_trips']:5d}  {fmt(r['same_loss'])}")
    print("(median per call over the blocks; ratio = ratio of medians, best = ratio of the fastest blocks)")
    print(f"target: remote step at most {TARGET_RATIO:.0f}x plain torch (PySyft 0.2: 50-100x): "
          f"{'met' if result['target_met'] else 'NOT met'}")
    for r in result["rows"]:
        if r["case"].startswith("train"):
            print(f"  {r['case']}: " + ", ".join(f"{k} x{n}" for k, n in r["messages_by_op"].items()))
    p = result["profile"]
    total = sum(p["groups_us_per_step"].values())
    print(f"\nprofile of the remote SGD step ({p['steps']} steps under cProfile: "
          f"{p['remote_us_per_step']:.0f} us/step, plain torch {p['local_us_per_step']:.0f} us/step;\n"
          "cProfile inflates Python-heavy code: read the shares, not the absolute times)")
    print(f"{'tottime us/step':>15} {'calls/step':>10}  function [group]")
    for t in p["top"]:
        print(f"{t['tottime_us_per_step']:15.1f} {t['calls_per_step']:10.1f}  {t['function']} [{t['group']}]")
    print(f"\n{'us/step':>8} {'share':>6}  group")
    for g, us in p["groups_us_per_step"].items():
        print(f"{us:8.1f} {us / total:6.1%}  {g}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions (a smoke test, seconds)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "pointer_overhead.json")
    args = parser.parse_args(argv)
    blocks, reps, warmup, prof_steps = (4, 20, 10, 50) if args.quick else (30, 200, 200, 2000)

    hook = sy.TorchHook(torch)
    bob = sy.VirtualWorker(hook, id="bob")
    result: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {
            "python": platform.python_version(), "torch": torch.__version__, "fedsecure": sy.__version__,
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        },
        "config": {"quick": args.quick, "blocks": blocks, "reps": reps, "op_reps": reps * 5, "warmup": warmup},
        "target_ratio": TARGET_RATIO,
        "rows": bench_training(bob, blocks, reps, warmup) + bench_ops(bob, blocks, reps * 5, warmup),
        "profile": profile_training(bob, prof_steps),
    }
    result["target_met"] = all(r["ratio"] <= TARGET_RATIO for r in result["rows"] if r["case"].startswith("train"))
    report(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
