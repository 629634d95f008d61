"""Run an `Experiment`: build its data, model, strategy and workers (`fedsecure.experiment.workers`),
train with the engine, and write the history next to the checkpoints."""

from __future__ import annotations

import collections
import contextlib
import gc
import logging
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TextIO

import torch

from fedsecure.data import partition_csv, partition_summary
from fedsecure.experiment.config import Experiment
from fedsecure.experiment.models import build_model
from fedsecure.experiment.workers import counted, makes_shares_here, start_workers
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
    strategy = exp.strategy()
    exp.output.mkdir(parents=True, exist_ok=True)
    if not remote:
        (exp.output / PARTITION).write_text(partition_csv(data.y_train, parts, data.num_classes))
        if progress:
            out.write(f"{exp.name}: {data.name}, {len(data.y_train)} training samples over {len(parts)} workers\n")
            out.write(partition_summary(data.y_train, parts, data.num_classes, rows=SUMMARY_ROWS) + "\n")
            if len(parts) > SUMMARY_ROWS:
                out.write(f"every worker's row: {exp.output / PARTITION}\n")
    display = Progress(enabled=progress, stream=out, status_file=exp.output / STATUS, name=exp.name,
                       info=_status_info(exp))
    # The run keeps only the test set (`benchmarks/memory.py --cases run`): the training set goes
    # once the owners hold copies of their shares, or before host processes and actors start, which
    # read the data set themselves.
    test_data = (data.x_test, data.y_test)
    shares_from = data if makes_shares_here(exp) else None
    del data
    with contextlib.ExitStack() as stack:
        stack.enter_context(collected_warnings(display))
        fed = start_workers(exp, shares_from, parts, stack)
        del shares_from, parts
        if fed.where:
            display.note(f"workers: {fed.where}")
        engine = Engine(
            model, fed.workers, strategy, aggregator=fed.aggregator, test_data=test_data,
            seed=exp.seed, parallelism=fed.parallelism, groups=fed.groups, progress=display,
            checkpoint=exp.output / "checkpoint", settings=exp.settings(),
            secure_aggregation=exp.secure.mode, share_holders=fed.holders, secure=exp.secure.for_run(fed.secagg_ids),
            work_deadline=exp.config.workers.work_deadline, evaluate_every=exp.config.experiment.evaluate_every,
        )
        if resume and not engine.resume():
            display.note(f"no checkpoint in {exp.output / 'checkpoint'}: starting at round 1")
        engine.on_round = _each_round(exp, engine, tensorboard(exp))
        with _frozen():
            _, history = engine.run(exp.rounds)
    _save_history(exp, history)
    if progress:
        _summary(exp, history, out)
    return history


@contextlib.contextmanager
def _frozen() -> Iterator[None]:
    """What is alive when the rounds start (the workers, their data, the model) lives as long as
    the run: out of the garbage collector's sight until it ends (`gc.freeze`), so that with
    thousands of workers in this process a full collection does not scan every one of their
    objects again. Left alone where the process froze objects of its own."""
    if gc.get_freeze_count():
        yield
        return
    gc.collect()  # nothing already unreachable stays frozen
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


STATUS = "status.json"  # the run's state while it goes and after (`fedsecure.fl.progress`)
PARTITION = "partition.csv"  # what each simulated owner holds, one row per owner (`fedsecure.data.partition_csv`)
SUMMARY_ROWS = 20  # owners shown in the partition table printed at the start; the file has them all


def _status_info(exp: Experiment) -> dict[str, Any]:
    privacy = exp.config.privacy
    budget = None if privacy is None else {"epsilon_limit": privacy.budget_epsilon, "delta": privacy.delta}
    return {"privacy": budget, "checkpoint": str(exp.output / "checkpoint"), "secure": exp.secure.mode}


def _save_history(exp: Experiment, history: History) -> None:
    history.to_json(exp.output / "history.json")
    history.to_csv(exp.output / "history.csv")


def _each_round(exp: Experiment, engine: Engine, then: Callable[[dict[str, Any]], None] | None
                ) -> Callable[[dict[str, Any]], None]:
    """After every round: the history so far written next to the checkpoint (what the dashboard
    reads), then ``then`` (tensorboard)."""
    def saved(row: dict[str, Any]) -> None:
        _save_history(exp, engine.history)
        if then is not None:
            then(row)
    return saved


@contextlib.contextmanager
def collected_warnings(display: Progress) -> Iterator[None]:
    """Library warnings during the run (the DP accountant's, torch's) counted, not printed at every
    step; each distinct one is reported once at the end with how often it came."""
    counts: collections.Counter[tuple[str, str]] = collections.Counter()

    def collect(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
        counts[(category.__name__, str(message))] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = collect
        try:
            yield
        finally:
            for (category, message), n in counts.most_common():
                display.note(f"warning ({n} time{'s' if n > 1 else ''}): {category}: {message}", logging.WARNING)


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
    out.write(f"{exp.name}: {counted(len(history), 'round')}, {shown}, {total:.1f} s; history in {exp.output}\n")


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
