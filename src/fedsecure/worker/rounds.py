"""A round's local work in one message (`fedsecure.fl`): `Fit` trains a stored model on the data
found by its tags, `Evaluate` sums its loss and accuracy there.

Both check everything on metadata first (`fedsecure.worker.dry_run`), so that a failure of the
real pass can only come from the values; each attests its result as this worker's
own work (`fedsecure.worker.attest`), which is what lets a training-only owner's data count in an
aggregate. DP-SGD rounds are charged to the model owner's ledger before they run, and refused
past the data owner's budget.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedsecure.errors import FedsecureError, ObjectNotFound, PermissionDenied, ProtocolError, RemoteError
from fedsecure.wire import messages as m
from fedsecure.worker import device as dev
from fedsecure.worker import dp_sgd, training, update_rules
from fedsecure.worker import execute as ex
from fedsecure.worker import labels as lb
from fedsecure.worker.attest import Attestation, config_digest, model_digest
from fedsecure.worker.dry_run import dry_run
from fedsecure.worker.guards import refuse_if_strict
from fedsecure.worker.modules import state_tensors
from fedsecure.worker.store import CLIENT, Entry, Sender, WorkerState, meta, tag, version


def fit(state: WorkerState, msg: m.Fit, sender: Sender) -> Any:
    settings = training.parse(msg.config)
    entry, module = state.module(msg.module_id)
    own = [t for _, t in state_tensors(module)]
    x, y = _tagged(state, msg.x_tag), _tagged(state, msg.y_tag)
    # Everything the module holds afterwards derives from the data and from its old state.
    labels = lb.labels_of(x) | lb.labels_of(y) | lb.union(own)
    refuse_if_strict(state, labels, "training")
    optimizer = training.check(module, x, y, settings)
    dry_run(module, x, y, settings.batch_size, lambda out, t: training.loss_of(settings.loss, out, t),
            settings.loss)
    reference = model_digest(module)
    ledger = _account_dp_sgd(state, settings, module, int(x.shape[0]))
    try:
        examples, loss, steps = _fit_where(state, module, x, y, settings, msg.seed, optimizer)
    except Exception as exc:
        # The metadata fit (the dry run above): this failure comes from the values.
        _failed_on_values(state, "training", exc, labels, own)
        examples, loss, steps = int(x.shape[0]), float("nan"), training.planned_steps(int(x.shape[0]), settings)
    finally:
        for t in own:
            lb.add_labels(t, labels)
    entry.samples = examples
    # Training on data the model owner sent itself is no owner's contribution: it could compute it.
    own_data = state.own_label in lb.labels_of(x)
    entry.attestation = Attestation("fit", reference, config_digest(msg.config)) if own_data else None
    entry.attested_version = version(module)
    # The mean training loss is a 0-dimensional metric: released unless an owner allows none.
    # Under DP-SGD it is withheld: it is computed without noise, so epsilon would not cover it.
    withhold = bool(labels) and min(label.max_metric_numel for label in labels) < 1
    reply = {"examples": examples, "loss": None if withhold or ledger is not None else loss, "steps": steps}
    if settings.dp_sgd is not None and ledger is not None:
        reply["epsilon"] = ledger.epsilon(settings.dp_sgd.delta)
    return reply


def evaluate(state: WorkerState, msg: m.Evaluate, sender: Sender) -> Any:
    _, module = state.module(msg.module_id)
    own = [t for _, t in state_tensors(module)]
    x, y = _tagged(state, msg.x_tag), _tagged(state, msg.y_tag)
    labels = lb.labels_of(x) | lb.labels_of(y) | lb.union(own)
    refuse_if_strict(state, labels, "evaluation")
    config = msg.config
    if not isinstance(config, dict) or set(config) != {"loss", "batch_size"}:
        raise ProtocolError("evaluation configuration must be {loss, batch_size}")
    training.check_evaluation(x, y, config["loss"], config["batch_size"])
    dry_run(module, x, y, config["batch_size"], lambda out, t: training.loss_of(config["loss"], out, t),
            config["loss"])
    attestation = Attestation("evaluate", model_digest(module), config_digest(config))
    state.admit(3 * torch.float64.itemsize, what="the evaluation's sums")
    try:
        if state.device.type == "cpu":
            sums = training.evaluate(module, x, y, config["loss"], config["batch_size"])
        else:
            x, y = _on(state, x), _on(state, y)
            sums = training.evaluate(dev.twin(module, state.device), x, y, config["loss"], config["batch_size"])
    except Exception as exc:
        _failed_on_values(state, "evaluation", exc, labels, own)
        sums = torch.full((3,), float("nan"), dtype=torch.float64)
        ex.mark_failed([sums], "evaluation")
    lb.add_labels(sums, labels)
    state.objects[msg.result_id] = Entry(sums, samples=int(x.shape[0]), attestation=attestation,
                                         attested_version=sums._version)
    return meta(msg.result_id, sums)


def _fit_where(state: WorkerState, module: nn.Module, x: torch.Tensor, y: torch.Tensor,
               settings: training.Settings, seed: int, optimizer: update_rules.Stepper) -> tuple[int, float, int]:
    """`training.fit` on the worker's device: in place on the CPU; elsewhere on a twin of the model
    there (`fedsecure.worker.device`), whose result is copied back into the stored model."""
    if state.device.type == "cpu":
        return training.fit(module, x, y, settings, seed, optimizer)
    work = dev.twin(module, state.device)
    done = training.fit(work, _on(state, x), _on(state, y), settings, seed)
    dev.copy_back(work, module)
    return done


def _on(state: WorkerState, t: torch.Tensor) -> torch.Tensor:
    """``t`` on the worker's device: its private data is there already; data the model owner sent is
    copied for this round."""
    return t if t.device == state.device else dev.to_device(t, state.device)


def _tagged(state: WorkerState, name: str) -> torch.Tensor:
    wanted, caller = tag(name), CLIENT.get()
    for entry in state.objects.values():
        if entry.owner in (None, caller) and wanted in entry.tags and isinstance(entry.obj, torch.Tensor):
            return entry.obj
    raise ObjectNotFound(f"worker {state.id!r} holds no data tagged {name!r}")


def _failed_on_values(
    state: WorkerState, what: str, exc: Exception, labels: lb.Labels, written: list[torch.Tensor]
) -> None:
    """A fixed function whose metadata checked out failed anyway: on the values. Reported (its text
    withheld) where the owners allow metrics, since a metric could tell as much; otherwise the work
    goes on as if it had succeeded, with what it wrote undefined (NaN), so the model owner's view
    does not depend on the values."""
    if not labels:
        if isinstance(exc, FedsecureError):
            raise exc
        raise RemoteError(f"{what} failed on {state.id!r}: {type(exc).__name__}: {exc}", op=what,
                          worker=state.id) from None
    if not ex.hides_failures(labels):
        raise RemoteError(f"{what} failed on {state.id!r} ({type(exc).__name__}; details withheld: the "
                          f"data derive from private data of {lb.owners(labels)})", op=what, worker=state.id) from None
    with torch.no_grad():
        for t in written:
            if t.is_floating_point():
                t.fill_(float("nan"))
    ex.mark_failed(written, what)


# -- the DP-SGD ledger ----------------------------------------------------------------------


def _account_dp_sgd(
    state: WorkerState, settings: training.Settings, module: nn.Module, examples: int
) -> dp_sgd.Ledger | None:
    """Charge this model owner's ledger for the DP-SGD steps about to run (before they run: a
    round that fails halfway is charged in full, which errs on the safe side). A policy's
    ``dp_sgd_budget`` refuses the round if the steps of all model owners would exceed it."""
    budget = state.policy.dp_sgd_budget
    if settings.dp_sgd is None:
        if budget is not None:
            raise PermissionDenied(
                f"{state.id!r} trains only with DP-SGD (its owner set a privacy budget of epsilon "
                f"{budget[0]:g} at delta {budget[1]:g}): set LocalTraining(dp_sgd=DPSGD(...))",
                rule="dp-sgd-budget",
            )
        return None
    dp_sgd.check_module(module)  # refuse now, before anything is charged (and without Opacus)
    schedule = training.dp_plan(examples, settings)
    with state.dp_lock:
        return _charge(state, settings.dp_sgd, schedule, budget)


def _charge(
    state: WorkerState, dp: dp_sgd.DPSGDSettings, schedule: dp_sgd.Plan, budget: tuple[float, float] | None
) -> dp_sgd.Ledger:
    if budget is not None:
        after = dp_sgd.Ledger.combined(state.dp_ledgers.values())
        after.add(schedule.sampling_rate, dp.noise_multiplier, schedule.steps)
        spent = after.epsilon(budget[1])
        if spent > budget[0]:
            raise PermissionDenied(
                f"{state.id!r} refuses to train: {schedule.steps} more DP-SGD steps would bring the epsilon "
                f"spent on its data to {spent:.3g} at delta {budget[1]:g}, over its owner's budget of "
                f"{budget[0]:g}",
                rule="dp-sgd-budget",
            )
    ledger = state.dp_ledgers.setdefault(CLIENT.get(), dp_sgd.Ledger())
    ledger.add(schedule.sampling_rate, dp.noise_multiplier, schedule.steps)
    return ledger
