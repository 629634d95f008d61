"""What moving a model between workers in one process costs, side by side.

1. Building a received model from its description and its decoded weights: as a worker does it
   (`modules.receive`: built on the meta device, each weight the decoded tensor itself), against
   building with zero-filled weights and copying the decoded ones in (`modules.build` and
   `load_state`, as before), and against the layer classes' own constructors (random initial
   weights, then the copy). The weights are decoded anew for every build, as on a worker. And
   receive's first step alone: the module on the meta device built from a description seen for
   the first time, against copied from the skeleton of a description seen before (`on_meta`).
2. The digest an owner computes of every model it trains (`attest.model_digest`, BLAKE3) against
   the same digest with SHA-256 (what it was before).
3. The tutorial's round trip ``model.send(bob); model.move(secure_worker); model.get()``: large
   tensors beside the message (what `VirtualWorker`s do) against inside it (``framed = False``
   on every party, as before), alternating, medians.
4. The aggregator folding a model into a round's sum (`aggregator.SealedSum`: each model added
   into float32 parts that go into the float64 sums every `FLUSH_EVERY` models) against adding
   each model into the float64 sums directly (what it did before); 64 models a run, each a fresh
   copy (cold in the cache, as a moved model is), per fold, with the largest difference between
   the two means relative to the largest mean weight, and the close of the sum (its mean).
Models: the MLP and McMahan et al.'s CNN (1.7M weights) of `fedsecure.experiment.models`.
Prints a table and writes JSON (default benchmarks/results/model_transfer.json).

Run:  python benchmarks/model_transfer.py [--repeats N] [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

try:
    import fedsecure as sy
except ModuleNotFoundError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import fedsecure as sy
from fedsecure.experiment.models import build_model
from fedsecure.wire import codec
from fedsecure.worker import aggregator, attest, modules

MODELS = {"mlp": (1, 28, 28), "cnn_mcmahan": (1, 28, 28)}


def _ms(f: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def _randomly_initialised(spec: dict[str, Any]) -> torch.nn.Module:
    """The module of ``spec`` built by the layers' own constructors (what `build` did before)."""
    children = [_randomly_initialised(child) for _, child in spec["children"]]
    cls = modules.LAYERS[spec["type"]][0]
    return cls(*children) if spec["type"] == "Sequential" else cls(**spec["args"])


def _sha256_digest(module: torch.nn.Module) -> bytes:
    """`attest.model_digest` with SHA-256 in place of BLAKE3: the same bytes hashed."""
    h = hashlib.sha256(b"fedsecure-model\0")
    h.update(json.dumps(modules.describe(module), sort_keys=True, separators=(",", ":")).encode())
    for name, t in modules.state_tensors(module):
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()))  # type: ignore[arg-type]
    return h.digest()


def builds(name: str, repeats: int) -> dict[str, float]:
    """Milliseconds to turn a received description and encoded weights into a model, three ways
    (each decodes the weights anew, as a worker does), alternating, medians."""
    model = build_model(name, MODELS[name], 10)
    spec = modules.describe(model)
    encoded = [codec.encode(t.detach()) for _, t in modules.state_tensors(model)]

    def decoded() -> list[torch.Tensor]:
        return [codec.decode(e) for e in encoded]

    ways: dict[str, Callable[[], Any]] = {
        "build_random_ms": lambda: modules.load_state(_randomly_initialised(spec), decoded()),
        "build_ms": lambda: modules.load_state(modules.build(spec), decoded()),
        "receive_ms": lambda: modules.receive(spec, decoded()),
        # receive's first step alone: a description seen for the first time, and one seen before
        "meta_build_ms": lambda: modules.build(spec, device=torch.device("meta")),
        "meta_copy_ms": lambda: modules._copied(modules.on_meta(spec)[0]),
    }
    times: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(repeats):
        for k, f in ways.items():
            times[k].append(_ms(f, 1))
    received, _ = modules.receive(spec, decoded())
    digests = {"digest_sha256_ms": lambda: _sha256_digest(received), "digest_blake3_ms": lambda: attest.model_digest(received)}
    for k in digests:
        times[k] = []
    for _ in range(repeats):
        for k, f in digests.items():
            times[k].append(_ms(f, 1))
    return {k: statistics.median(v) for k, v in times.items()}


def round_trip(name: str, repeats: int) -> dict[str, Any]:
    model = build_model(name, MODELS[name], 10)
    before = [t.detach().clone() for t in model.state_dict().values()]
    fed = sy.Federation()
    bob, sw = sy.VirtualWorker(id="bob", federation=fed), sy.VirtualWorker(id="sw", federation=fed)

    def once() -> None:
        model.send(bob)
        model.move(sw)
        model.get()

    times: dict[str, list[float]] = {"beside": [], "inside": []}
    for _ in range(repeats):
        for way in times:
            for w in (bob, sw):
                w.framed = w.core.framed = way == "beside"
            times[way].append(_ms(once, 1))
    same = all(torch.equal(a, b) for a, b in zip(before, model.state_dict().values(), strict=True))
    return {**{way: statistics.median(v[len(v) // 5:]) for way, v in times.items()}, "same_values": same}


def folds(name: str, repeats: int) -> dict[str, Any]:
    """Milliseconds per fold of 64 fresh models, float32 parts against float64 sums directly."""
    model = build_model(name, MODELS[name], 10)
    spec = modules.describe(model)
    assert spec is not None
    tensors = [t.detach() for _, t in modules.state_tensors(model)]
    count = 64

    def by_parts(models: list[list[torch.Tensor]]) -> tuple[float, float, list[torch.Tensor]]:
        sealed = aggregator.SealedSum.start(spec, True, tensors)
        t = time.perf_counter()
        for i, m in enumerate(models):
            sealed.add(m, i + 1)
        sealed.flush()
        folded = time.perf_counter()
        mean = sealed.mean()
        return 1000 * (folded - t) / count, 1000 * (time.perf_counter() - folded), mean

    def direct(models: list[list[torch.Tensor]]) -> tuple[float, list[torch.Tensor]]:
        sums = [torch.zeros(x.shape, dtype=torch.float64) for x in tensors]
        t = time.perf_counter()
        for i, m in enumerate(models):
            for acc, x in zip(sums, m, strict=True):
                acc.add_(x, alpha=i + 1)
        elapsed = 1000 * (time.perf_counter() - t) / count
        total = count * (count + 1) // 2
        return elapsed, [acc.div_(total).to(x.dtype) for acc, x in zip(sums, tensors, strict=True)]

    times: dict[str, list[float]] = {"fold_parts_ms": [], "fold_float64_ms": [], "close_ms": []}
    worst = 0.0
    for r in range(repeats):
        models = [[x + 0.01 * (i + r) for x in tensors] for i in range(count)]
        a_ms, close_ms, a = by_parts(models)
        b_ms, b = direct(models)
        times["fold_parts_ms"].append(a_ms)
        times["close_ms"].append(close_ms)
        times["fold_float64_ms"].append(b_ms)
        worst = max(worst, max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(a, b, strict=True)))
    return {**{k: statistics.median(v) for k, v in times.items()}, "fold_relative_difference": worst}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="5 repeats: seconds")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "model_transfer.json"))
    args = ap.parse_args()
    if args.quick:
        args.repeats = 5
    torch.set_num_threads(1)
    sy.TorchHook(torch)
    rows = {}
    for name in MODELS:
        spec = modules.describe(build_model(name, MODELS[name], 10))
        assert spec is not None
        rows[name] = {**builds(name, args.repeats),
                      **{(k if k == "same_values" else f"round_trip_{k}_ms"): v
                         for k, v in round_trip(name, args.repeats).items()},
                      **folds(name, max(3, args.repeats // 5))}
    print("| model | build: random weights, copy ms | zeros, copy ms | on meta, adopt ms | meta: built ms "
          "| copied ms | digest SHA-256 ms | BLAKE3 ms | send+move+get, tensors inside ms | beside ms | ratio |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in rows.items():
        print(f"| {name} | {r['build_random_ms']:.2f} | {r['build_ms']:.2f} | {r['receive_ms']:.2f} | "
              f"{r['meta_build_ms']:.3f} | {r['meta_copy_ms']:.3f} | "
              f"{r['digest_sha256_ms']:.2f} | {r['digest_blake3_ms']:.2f} | {r['round_trip_inside_ms']:.2f} | "
              f"{r['round_trip_beside_ms']:.2f} | {r['round_trip_beside_ms'] / r['round_trip_inside_ms']:.2f}x |")
    print()
    print("| model | fold into float64 sums ms | into float32 parts ms | ratio | largest difference of the means "
          "| close ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in rows.items():
        print(f"| {name} | {r['fold_float64_ms']:.2f} | {r['fold_parts_ms']:.2f} | "
              f"{r['fold_parts_ms'] / r['fold_float64_ms']:.2f}x | {r['fold_relative_difference']:.1e} | "
              f"{r['close_ms']:.2f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "torch": torch.__version__, "repeats": args.repeats}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
