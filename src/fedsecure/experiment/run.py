"""Run an `Experiment`: build its data, model, strategy and workers (`fedsecure.experiment.workers`),
train with the engine, and write the history next to the checkpoints."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from typing import Any, TextIO

import torch

from fedsecure.data import partition_summary
from fedsecure.experiment.config import Experiment
from fedsecure.experiment.models import build_model
from fedsecure.experiment.workers import start_workers
from fedsecure.fl import ConfigurationError, Engine, History
from fedsecure.fl import checkpoint as ckpt
from fedsecure.fl.progress import Progress


def run_experiment(
    exp: Experiment,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    stream: TextIO | None = None,
) -> History:
    """Run ``exp``; its history and checkpoints go to ``exp.output``. An output directory that holds
    a run is continued with ``resume``, replaced with ``overwrite``, and otherwise refused."""
    if resume and overwrite:
        raise ConfigurationError("--resume continues the run in the output directory and --overwrite replaces it: "
                                 "choose one")
    _claim_output(exp, resume=resume, overwrite=overwrite)
    out = stream or sys.stderr
    remote = exp.config.workers.mode == "remote"
    data = exp.dataset()
    torch.manual_seed(exp.seed)
    model = build_model(exp.config.model.name, tuple(data.x_train.shape[1:]), data.num_classes,
                        **exp.config.model.options())
    parts = [] if remote else exp.partitions(data)  # remote owners hold their own data
    if not remote and progress:
        out.write(f"{exp.name}: {data.name}, {len(data.y_train)} training samples over {len(parts)} workers\n")
        out.write(partition_summary(data.y_train, parts, data.num_classes) + "\n")
    strategy = exp.strategy()
    exp.output.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        fed = start_workers(exp, data, parts, stack)
        engine = Engine(
            model, fed.workers, strategy, aggregator=fed.aggregator, test_data=(data.x_test, data.y_test),
            seed=exp.seed, parallelism=fed.parallelism, groups=fed.groups,
            progress=Progress(enabled=progress, stream=out), checkpoint=exp.output / "checkpoint",
            settings=exp.settings(), on_round=tensorboard(exp),
            secure_aggregation=exp.secure.mode, share_holders=fed.holders, secure=exp.secure.for_run(fed.secagg_ids),
            work_deadline=exp.config.workers.work_deadline,
        )
        if resume and not engine.resume() and progress:
            out.write(f"no checkpoint in {exp.output / 'checkpoint'}: starting at round 1\n")
        _, history = engine.run(exp.rounds)
    history.to_json(exp.output / "history.json")
    history.to_csv(exp.output / "history.csv")
    if progress:
        _summary(exp, history, out)
    return history


_RUN_FILES = ("history.json", "history.csv")


def _claim_output(exp: Experiment, *, resume: bool, overwrite: bool) -> None:
    """Refuse to write over a run already in ``exp.output`` (checked before anything is written)."""
    checkpoint = exp.output / "checkpoint"
    found = [p for p in (checkpoint / ckpt.STATE, *(exp.output / f for f in _RUN_FILES)) if p.exists()]
    if not found or resume:
        return
    if not overwrite:
        raise ConfigurationError(
            f"{exp.output} already holds a run ({', '.join(p.name for p in found)}): continue it with --resume, "
            "replace it with --overwrite, or choose another output (--output DIR or [experiment] output)"
        )
    for path in found:
        path.unlink()
    for stale in checkpoint.glob("*.safetensors"):
        stale.unlink()


def _summary(exp: Experiment, history: History, out: TextIO) -> None:
    last = history.last
    accuracy = last.get("central_accuracy")
    shown = f"accuracy {accuracy:.4f}" if accuracy is not None else f"loss {last.get('central_loss')}"
    total = sum(r["round_seconds"] for r in history)
    out.write(f"{exp.name}: {len(history)} rounds, {shown}, {total:.1f} s; history in {exp.output}\n")


def tensorboard(exp: Experiment) -> Callable[[dict[str, Any]], None] | None:
    """A callback writing each round's numbers to ``[experiment] tensorboard``, if set."""
    folder = exp.config.experiment.tensorboard
    if folder is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigurationError(
            f"{exp.source}: [experiment] tensorboard needs the tensorboard package: pip install tensorboard"
        ) from None
    writer = SummaryWriter(str(exp.path(folder)))

    def log(row: dict[str, Any]) -> None:
        for key, value in row.items():
            if isinstance(value, int | float) and key != "round":
                writer.add_scalar(key, value, row["round"])
        writer.flush()

    return log
