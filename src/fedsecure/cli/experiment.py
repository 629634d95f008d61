"""``fedsecure run CONFIG`` trains as an experiment file says; ``fedsecure plot HISTORY`` draws it."""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path
from typing import Any

from fedsecure.errors import FedsecureError
from fedsecure.experiment import config
from fedsecure.experiment.run import run_experiment
from fedsecure.fl.history import History


def _override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or "." not in key:
        raise SystemExit(f"--set takes SECTION.KEY=VALUE (for example training.lr=0.05), got {item!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word: a string
    return key, value


def run(args: argparse.Namespace) -> int:
    overrides = dict(_override(item) for item in args.set)
    if args.rounds is not None:
        overrides["experiment.rounds"] = args.rounds
    if args.output is not None:
        overrides["experiment.output"] = args.output
    try:
        exp = config.load(args.config, overrides)
        run_experiment(exp, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    except FedsecureError as exc:
        print(f"fedsecure run: {exc}", file=sys.stderr)
        return 2
    return 0


def plot(args: argparse.Namespace) -> int:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("fedsecure plot needs matplotlib: pip install 'fedsecure[plot]' (or pip install matplotlib)",
              file=sys.stderr)
        return 2
    try:
        history = History.from_json(args.history)
    except ValueError as exc:
        print(f"fedsecure plot: {exc}", file=sys.stderr)
        return 2
    losses = [k for k in ("train_loss", "central_loss", "federated_loss") if history.series(k)]
    accuracies = [k for k in ("central_accuracy", "federated_accuracy") if history.series(k)]
    if not losses and not accuracies:
        print(f"fedsecure plot: {args.history} has no loss or accuracy to draw", file=sys.stderr)
        return 2
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, names, label in ((axes[0], losses, "loss"), (axes[1], accuracies, "accuracy")):
        for name in names:
            rounds, values = zip(*history.series(name), strict=True)
            ax.plot(rounds, values, marker=".", label=name.replace("_", " "))
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if names:
            ax.legend()
    fig.suptitle(Path(args.history).parent.name or "history")
    fig.tight_layout()
    out = args.output or str(Path(args.history).with_suffix(".png"))
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")
    return 0


def add_commands(commands: Any) -> None:
    p = commands.add_parser("run", help="run a federated training experiment from a TOML file")
    p.add_argument("config", help="the experiment file, e.g. examples/digits.toml")
    p.add_argument("--rounds", type=int, help="override [experiment] rounds")
    p.add_argument("--output", help="override [experiment] output (history, checkpoints)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the output directory's checkpoint (the last complete round)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a run already in the output directory (its checkpoints and history)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any setting, e.g. --set training.lr=0.05 (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.set_defaults(run=run)
    q = commands.add_parser("plot", help="draw a history.json's loss and accuracy per round as a PNG")
    q.add_argument("history", help="a history.json written by fedsecure run")
    q.add_argument("-o", "--output", help="the PNG to write (default: next to the history)")
    q.set_defaults(run=plot)
