"""A round's sampled owners trained one after the other (the worker's loop) against all together
in one batched computation (`torch.func`: `vmap` of `grad` over the owners' stacked weights).

The question (issue: "try training a round's sampled clients together with torch.func, keep it only
where it measures faster with the same results"): does one batched pass over K owners' models beat
K passes of the worker's own loop, and does it compute the same models? The cross-device
workload of `benchmarks/memory.py` (10,000 owners of quantity-skewed Fashion-MNIST, 1 to 74
images each, 1% sampled; E=1, B=32, SGD 0.01 with momentum 0.9): most owners take one step,
some two or three. The batched pass pads each owner's batches to B rows (padding weighs nothing
in the loss) and its steps to the largest owner's (an owner past its last step keeps its weights
and its momentum), with the batch order each owner's seed gives the worker's loop.

Reported per model and device: seconds of K owners one after the other (`training.fit` on a copy
of the global model each), seconds of the batched pass (stacking the K copies included), their
ratio, and the largest difference between an owner's weights from the two (relative to the
weight's magnitude). Medians of ``--repeats``. Prints a table and writes JSON (default
benchmarks/results/batched_clients.json).

Run:
    python benchmarks/batched_clients.py                      # mlp and cnn_mcmahan on the CPU
    python benchmarks/batched_clients.py --devices cpu,cuda   # and on a GPU, where one is
    python benchmarks/batched_clients.py --quick              # seconds: digits, 8 owners
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "vs_flower"))
try:
    import fedsecure  # noqa: F401
except ModuleNotFoundError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(HERE.parent / "src"))

from memory import quantity_shares  # noqa: E402  the cross-device shares, one definition

from fedsecure.data import load_digits, load_fashion_mnist  # noqa: E402
from fedsecure.experiment.models import build_model  # noqa: E402
from fedsecure.worker import training  # noqa: E402

EPOCHS, BATCH, LR, MOMENTUM = 1, 32, 0.01, 0.9


def _settings() -> training.Settings:
    return training.parse({"epochs": EPOCHS, "batch_size": BATCH, "optimizer": "SGD", "lr": LR,
                           "optimizer_args": {"momentum": MOMENTUM}, "loss": "cross_entropy",
                           "proximal_mu": 0.0, "max_steps": None, "dp_sgd": None})


def one_after_another(model: nn.Module, owners: list[tuple[torch.Tensor, torch.Tensor, int]],
                      where: torch.device) -> list[list[torch.Tensor]]:
    """Each owner's trained weights from the worker's own loop, on a copy of the global model."""
    settings = _settings()
    trained = []
    for x, y, seed in owners:
        local = copy.deepcopy(model)
        training.fit(local, x, y, settings, seed)
        trained.append([p.detach() for p in local.parameters()])
    _sync(where)
    return trained


def _batches(owners: list[tuple[torch.Tensor, torch.Tensor, int]], where: torch.device) -> tuple[Any, ...]:
    """Every owner's batches as the worker's loop orders them, padded: rows [steps, K, B, ...],
    targets [steps, K, B], row weights [steps, K, B] (0 for padding), active [steps, K]."""
    steps = max(-(-x.shape[0] // BATCH) for x, _, _ in owners)
    x0, y0 = owners[0][0], owners[0][1]
    k = len(owners)
    xs = torch.zeros((steps, k, BATCH, *x0.shape[1:]), dtype=x0.dtype)
    ys = torch.zeros((steps, k, BATCH), dtype=y0.dtype)
    weights = torch.zeros((steps, k, BATCH))
    active = torch.zeros((steps, k), dtype=torch.bool)
    for i, (x, y, seed) in enumerate(owners):
        order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed & (2**63 - 1)))
        for s, begin in enumerate(range(0, x.shape[0], BATCH)):
            index = order[begin : begin + BATCH]
            xs[s, i, : len(index)], ys[s, i, : len(index)] = x[index], y[index]
            weights[s, i, : len(index)] = 1.0 / len(index)  # the mean over the batch's own rows
            active[s, i] = True
    return xs.to(where), ys.to(where), weights.to(where), active.to(where)


def together(model: nn.Module, owners: list[tuple[torch.Tensor, torch.Tensor, int]],
             where: torch.device) -> list[list[torch.Tensor]]:
    """Every owner's trained weights from one batched pass per step over all owners' models."""
    names = [n for n, _ in model.named_parameters()]
    xs, ys, row_weights, active = _batches(owners, where)
    k = len(owners)
    stacked = {n: p.detach().to(where).unsqueeze(0).expand(k, *p.shape).clone() for n, p in model.named_parameters()}
    momentum: dict[str, torch.Tensor] = {}

    def loss(params: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, params, (xb,))
        return (F.cross_entropy(out, yb, reduction="none") * wb).sum()

    gradients = vmap(grad(loss))
    for s in range(xs.shape[0]):
        g = gradients(stacked, xs[s], ys[s], row_weights[s])
        on = active[s]
        for n in names:
            shape = (k, *(1,) * (stacked[n].dim() - 1))
            keep = on.view(shape)
            buf = g[n] if s == 0 else torch.where(keep, momentum[n] * MOMENTUM + g[n], momentum[n])
            momentum[n] = buf
            stacked[n] = torch.where(keep, stacked[n] - LR * buf, stacked[n])
    _sync(where)
    return [[stacked[n][i] for n in names] for i in range(k)]


def _sync(where: torch.device) -> None:
    if where.type == "cuda":
        torch.cuda.synchronize(where)


def _largest_difference(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> float:
    worst = 0.0
    for mine, theirs in zip(a, b, strict=True):
        for p, q in zip(mine, theirs, strict=True):
            scale = float(q.abs().max().clamp(min=1e-12))
            worst = max(worst, float((p.float() - q.float()).abs().max()) / scale)
    return worst


def measure(name: str, where: torch.device, data: Any, shares: list[Any], sampled: list[int],
            repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build_model(name, tuple(data.x_train.shape[1:]), data.num_classes).to(where)
    owners = [(data.x_train[torch.from_numpy(shares[i])].to(where), data.y_train[torch.from_numpy(shares[i])].to(where),
               1_000_003 * i + 17) for i in sampled]
    serial, batched = [], []
    difference = _largest_difference(together(model, owners, where), one_after_another(model, owners, where))
    for _ in range(repeats):  # after that untimed first run of each, alternating: both see the same machine
        t0 = time.perf_counter()
        a = one_after_another(model, owners, where)
        serial.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        b = together(model, owners, where)
        batched.append(time.perf_counter() - t0)
        assert len(a) == len(b) == len(owners)
    steps = [-(-x.shape[0] // BATCH) for x, _, _ in owners]
    s, t = statistics.median(serial), statistics.median(batched)
    return {"model": name, "device": str(where), "owners": len(owners), "rows": sum(x.shape[0] for x, _, _ in owners),
            "steps_max": max(steps), "steps_total": sum(steps), "serial_s": s, "batched_s": t, "ratio": t / s,
            "largest_relative_difference": difference, "serial_runs": serial, "batched_runs": batched}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp,cnn_mcmahan")
    ap.add_argument("--devices", default="cpu", help="comma-separated: cpu, cuda, cuda:N (a missing GPU is skipped)")
    ap.add_argument("--owners", type=int, default=10_000)
    ap.add_argument("--sampled", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (a worker trains with 1)")
    ap.add_argument("--quick", action="store_true",
                    help="digits, 100 owners, 8 sampled (the largest among them), 2 repeats, the mlp")
    ap.add_argument("--out", default=str(HERE / "results" / "batched_clients.json"))
    args = ap.parse_args()
    if args.quick:
        args.models, args.owners, args.sampled, args.repeats = "mlp", 100, 8, 2
    torch.set_num_threads(args.threads)
    try:
        data = load_digits() if args.quick else load_fashion_mnist()
        dataset = "digits" if args.quick else "fashion-mnist"
    except Exception:  # noqa: BLE001  a machine without Debian's dataset-fashion-mnist
        data, dataset = load_digits(), "digits"
    shares = quantity_shares(len(data.y_train), args.owners, 0)
    sampled = torch.randperm(args.owners, generator=torch.Generator().manual_seed(1))[: args.sampled].tolist()
    if args.quick:  # and the largest owner, whose several steps the batched pass pads the others to
        sampled[-1] = max(range(args.owners), key=lambda i: len(shares[i]))
    sampled = sorted(set(sampled))
    rows, skipped = [], []
    for device in args.devices.split(","):
        where = torch.device(device)
        if where.type == "cuda" and not torch.cuda.is_available():
            skipped.append(device)
            continue
        for name in args.models.split(","):
            rows.append(measure(name, where, data, shares, sampled, args.repeats))
    print(f"{dataset}: {args.sampled} of {args.owners} owners, E={EPOCHS}, B={BATCH}, medians of {args.repeats}"
          + (f"; skipped (no GPU): {', '.join(skipped)}" if skipped else ""))
    print("| model | device | rows | steps (max) | one after another s | together s | together / one after another | largest difference |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['model']} | {r['device']} | {r['rows']} | {r['steps_total']} ({r['steps_max']}) | {r['serial_s']:.3f} "
              f"| {r['batched_s']:.3f} | {r['ratio']:.2f}x | {r['largest_relative_difference']:.1e} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"when": datetime.datetime.now(datetime.UTC).isoformat(), "machine": platform.platform(),
                               "torch": torch.__version__, "threads": args.threads, "dataset": dataset,
                               "owners": args.owners, "sampled": args.sampled, "skipped": skipped, "rows": rows},
                              indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
