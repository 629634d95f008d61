"""``fedsecure run CONFIG`` trains as an experiment file says; ``fedsecure plot HISTORY`` draws it."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shlex
import sys
import time
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsecure.dashboard import DEFAULT_PORT, serve_in_background
from fedsecure.errors import FedsecureError
from fedsecure.experiment import config
from fedsecure.experiment.config import Experiment
from fedsecure.experiment.run import STATUS, run_experiment
from fedsecure.fl import checkpoint as ckpt
from fedsecure.fl.history import History

if TYPE_CHECKING:
    from fedsecure.dashboard.server import Dashboard

log = logging.getLogger("fedsecure.run")
LEVELS = ("debug", "info", "warning", "error")


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
    exp = None
    try:
        configure_logging(args.log_level, args.log_file, display=not args.quiet)
        exp = config.load(args.config, overrides)
        with contextlib.ExitStack() as stack:
            if args.dashboard is not None:
                stack.enter_context(_dashboard(exp, args.dashboard))
            run_experiment(exp, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
            if args.dashboard is not None and sys.stdin.isatty():
                print("fedsecure run: the run ended; the dashboard stays up until Ctrl-C", file=sys.stderr, flush=True)
                while True:  # until Ctrl-C, whose KeyboardInterrupt comes when this thread wakes
                    time.sleep(0.5)
    except FedsecureError as exc:
        log.error("%s", exc)
        print(f"fedsecure run: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if exp is not None and _finished(exp):
            return 0  # Ctrl-C stopped the dashboard after the run
        print("\r" + interrupted(exp, args.config).ljust(100), file=sys.stderr)
        return 130
    return 0


def _dashboard(exp: Experiment, port: int) -> Dashboard:
    """The dashboard over this run's output directory, served while the run goes."""
    exp.output.mkdir(parents=True, exist_ok=True)
    board = serve_in_background(exp.output, port=port)
    print(f"fedsecure run: the dashboard is at {board.url} while the run goes "
          f"(afterwards: fedsecure dashboard {shlex.quote(str(exp.output))})", file=sys.stderr, flush=True)
    return board


def _finished(exp: Experiment) -> bool:
    try:
        return bool(json.loads((exp.output / STATUS).read_text()).get("state") in ("finished", "stopped"))
    except (OSError, ValueError):
        return False


def interrupted(exp: Experiment | None, source: str) -> str:
    """One line for Ctrl-C: where the last checkpoint is and how to continue from it."""
    if exp is None:
        return "fedsecure run: interrupted"
    folder = exp.output / "checkpoint"
    try:
        saved = ckpt.load(folder)
    except ckpt.CheckpointError:
        saved = None
    if saved is None:
        return "fedsecure run: interrupted before the first round ended; there is no checkpoint to continue from"
    return (f"fedsecure run: interrupted; round {saved.round}'s checkpoint is in {folder}: "
            f"continue with fedsecure run {shlex.quote(source)} --resume")


class _NotDisplayed(logging.Filter):
    """On the terminal, the progress display and this command already show these records."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name not in ("fedsecure.progress", "fedsecure.run")


def configure_logging(level: str, log_file: str | None, *, display: bool) -> None:
    """``fedsecure``'s log records: errors and warnings on standard error (events the progress
    display shows are not repeated there), and every record at ``level`` in ``log_file``."""
    logger = logging.getLogger("fedsecure")
    logger.setLevel(logging.DEBUG)
    for old in list(logger.handlers):
        logger.removeHandler(old)
    terminal = logging.StreamHandler(sys.stderr)
    terminal.setLevel(max(logging.getLevelName(level.upper()), logging.WARNING))
    terminal.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    if display:
        terminal.addFilter(_NotDisplayed())
    logger.addHandler(terminal)
    if log_file:
        try:
            to_file = logging.FileHandler(log_file, encoding="utf-8")
        except OSError as exc:
            raise FedsecureError(f"cannot write the log file {log_file}: {exc.strerror}") from None
        to_file.setLevel(level.upper())
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
        logger.addHandler(to_file)
    logger.propagate = False


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
    p.add_argument("--dashboard", nargs="?", type=int, const=DEFAULT_PORT, metavar="PORT",
                   help=f"serve the live dashboard on 127.0.0.1:PORT while the run goes, and after it on a terminal "
                        f"until Ctrl-C (default port {DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument("--quiet", action="store_true", help="no progress display (warnings and errors still show)")
    p.add_argument("--log-level", default="info", choices=LEVELS,
                   help="the least important records written to --log-file (default: info); on the terminal, "
                        "warnings and errors always show")
    p.add_argument("--log-file", metavar="FILE", help="append the run's log records, with times, to FILE")
    p.set_defaults(run=run)
    q = commands.add_parser("plot", help="draw a history.json's loss and accuracy per round as a PNG")
    q.add_argument("history", help="a history.json written by fedsecure run")
    q.add_argument("-o", "--output", help="the PNG to write (default: next to the history)")
    q.set_defaults(run=plot)
