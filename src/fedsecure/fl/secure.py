"""Secure aggregation in the engine: the model owner learns the sum of the updates and nothing else.

With ``secure_aggregation="pairwise"`` no party is trusted with an update. After training, each
worker keeps its trained model; the model owner runs the server's side of Bonawitz et al.'s
protocol (`fedsecure.aggregate.SecAggServer`) and relays its four phases to the workers
(`SecAgg` messages, see `fedsecure.worker.secure`). A worker's reply in the masking phase is
its update, weighted by its own sample count, plus pairwise and self masks: uniform noise on its
own. Workers that drop out in any phase are recovered from the others' Shamir shares as long as
``threshold`` of them remain; below that the round fails and nothing is revealed.

``SecureSettings(consistency_check=True, client_ids=...)`` runs the protocol's active-adversary
variant (Bonawitz et al. 2017, section 4): workers that hold a signing identity from the
federation's PKI sign their keys and, in one more phase ("consistency"), the survivor set; they
reveal shares only when at least ``threshold`` survivors signed the same set. ``client_ids``
maps each worker to its id in that PKI (public). The workers' verification keys reach them from
their own operators, not from the model owner. Each worker also signs, with its keys, the digest
of its attestation that its update is its own `Fit` of the round's reference model, and aborts
unless every other worker signed the same one (the cohort check, `fedsecure.worker.secure`):
the model owner relays these with the keys and can neither choose nor change them. Training-only
owners (`Policy.training_only`, the default of served workers with data) take part only in this
variant, and only with the update of their own `Fit` of the round's global model, which is
what the engine sends them.

With ``secure_aggregation="shares"`` two or more share holders stand in for the aggregator
(`shared_mean`): each worker splits its update into additive shares, one per holder, and the
model owner learns the sum of the holders' sums. No holder learns anything unless all collude;
it is cheaper than the pairwise protocol (one message per worker, no key agreement) and needs
no threshold, but every holder must stay up for the round.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedsecure.aggregate import SecAggServer, decode_message
from fedsecure.aggregate.rules import mean_from_sums
from fedsecure.aggregate.shares import AdditiveShares
from fedsecure.errors import FedsecureError, ProtocolError, SecureAggregationError, TooFewSurvivors
from fedsecure.fl.parties import sendable
from fedsecure.fl.strategy import ConfigurationError, Failure, Parameters
from fedsecure.wire import messages as m
from fedsecure.wire.ids import new_id
from fedsecure.worker.client import WorkerClient
from fedsecure.worker.modules import state_tensors
from fedsecure.worker.remote_model import RemoteModel

Runner = Callable[[Sequence[str], Callable[[WorkerClient], Any], str], tuple[list[Any], list[Failure]]]


@dataclass(frozen=True, slots=True, kw_only=True)
class SecureSettings:
    """``bound``: the largest absolute value of one coordinate of an update (a model minus the
    global model) that the ring must hold; larger ones are clipped by the workers' encoding.
    ``threshold``: the survivors needed (default: a majority, at least 2). ``degree``: SecAgg+'s
    neighbours per worker (Bell et al. 2020), or None for every pair. ``bits``: 32 or 64.
    ``frac_bits``: for additive sharing ("shares"), the fractional bits of the fixed point in
    Z_(2^64): each worker's weighted update must stay below 2^(62 - frac_bits) in absolute value
    (checked by the worker) and their sum below 2^(63 - frac_bits); each entry of the sum is
    within n * 2^-(frac_bits + 1) of the exact sum of n updates.
    ``consistency_check``: for "pairwise", the active-adversary variant with signed keys and the
    consistency-check phase; the workers need signing identities (``secagg_identity``) and
    ``client_ids`` gives each worker's id in the federation's PKI."""

    bound: float = 1.0
    threshold: int | None = None
    degree: int | None = None
    bits: int = 32
    frac_bits: int = 24
    consistency_check: bool = False
    client_ids: Mapping[str, int] | None = None

    def __post_init__(self) -> None:
        if self.consistency_check and self.client_ids is None:
            raise ConfigurationError("consistency_check needs client_ids: each worker's id in the federation's PKI")
        if type(self.frac_bits) is not int or not 0 <= self.frac_bits <= 52:
            raise ConfigurationError(f"frac_bits must be an integer in [0, 52], got {self.frac_bits!r}")


@dataclass(frozen=True, slots=True)
class Trained:
    worker: str
    module_id: int
    reference_id: int
    examples: int
    epsilon: float | None = None  # the worker's local DP-SGD epsilon, when it ran DP-SGD


def _client_ids(trained: Sequence[Trained], settings: SecureSettings) -> dict[str, int]:
    """Each worker's client id in the protocol: its PKI id when the consistency check signs, else 1..n."""
    if not settings.consistency_check:
        return {t.worker: i + 1 for i, t in enumerate(trained)}
    assert settings.client_ids is not None
    unknown = [t.worker for t in trained if t.worker not in settings.client_ids]
    if unknown:
        raise ConfigurationError(f"client_ids gives no PKI id for workers {unknown}")
    return {t.worker: settings.client_ids[t.worker] for t in trained}


def secure_mean(
    trained: Sequence[Trained],
    workers: dict[str, WorkerClient],
    parameters: Parameters,
    settings: SecureSettings,
    run: Runner,
    *,
    weighted: bool = True,
    privacy: dict[str, Any] | None = None,
) -> tuple[Parameters, list[str], list[Failure]]:
    """The (sample-weighted) mean of the trained models, learnt only as a sum; the survivors.
    ``privacy``: each worker clips its update and adds its share of the noise before masking."""
    floating = [k for k, t in parameters.items() if t.is_floating_point()]
    size = sum(parameters[k].numel() for k in floating) + (1 if weighted else 0)
    n = len(trained)
    threshold = settings.threshold or max(2, n // 2 + 1)
    top = max(t.examples for t in trained) if weighted else 1
    ids = _client_ids(trained, settings)
    by_name = {t.worker: t for t in trained}
    server = SecAggServer(clients=list(ids.values()), threshold=threshold, vector_size=size,
                          bound=settings.bound * top, bits=settings.bits, degree=settings.degree,
                          consistency_check=settings.consistency_check)
    session = secrets.token_hex(8)
    failures: list[Failure] = []

    def phase(name: str, names: Sequence[str], payload: Callable[[str], bytes]) -> list[str]:
        def call(worker: WorkerClient) -> str:
            t = by_name[worker.id]
            reply = worker.request(m.SecAgg(session, name, ids[worker.id], payload(worker.id),
                                            t.module_id, t.reference_id, weighted, dict(privacy or {})))
            message = decode_message(reply)
            if getattr(message, "sender", None) != ids[worker.id]:  # the authenticated worker speaks for itself
                raise ProtocolError(f"{worker.id!r} answered for client {getattr(message, 'sender', None)}")
            server.receive(message)
            return worker.id

        done, failed = run(names, call, f"secure aggregation ({name})")
        failures.extend(failed)
        return sorted(done)

    try:
        setup = server.setup.encode()
        answered = phase("advertise", list(ids), lambda _: setup)
        broadcast = server.end_advertise_keys().encode()
        answered = phase("share", answered, lambda _: broadcast)
        bundles = {u: b.encode() for u, b in server.end_share_keys().items()}
        answered = phase("mask", [w for w in answered if ids[w] in bundles], lambda w: bundles[ids[w]])
        request = server.end_masked_input().encode()
        if settings.consistency_check:
            answered = phase("consistency", answered, lambda _: request)
            request = server.end_consistency_check().encode()
        phase("unmask", answered, lambda _: request)
        result = server.end_unmasking()  # TooFewSurvivors: the round fails, nothing is revealed
    except SecureAggregationError as exc:
        exc.failures = tuple(failures)
        raise
    survivors = sorted(w for w, i in ids.items() if i in result.survivors)
    return _apply_sum(parameters, torch.from_numpy(result.total).double(), weighted, len(survivors)), survivors, failures


def _apply_sum(parameters: Parameters, total: torch.Tensor, weighted: bool, count: int) -> Parameters:
    """The global model plus the mean update, from the sum of the (weighted) updates, whose last
    entry is the sum of the weights when ``weighted``."""
    mean = mean_from_sums(total[:-1], float(total[-1])) if weighted else mean_from_sums(total, count)
    out = dict(parameters)
    at = 0
    for k, t in parameters.items():
        if t.is_floating_point():
            out[k] = (t.double() + mean[at : at + t.numel()].view(t.shape)).to(t.dtype)
            at += t.numel()
    return out


def shared_mean(
    trained: Sequence[Trained],
    workers: dict[str, WorkerClient],
    holders: Sequence[WorkerClient],
    parameters: Parameters,
    settings: SecureSettings,
    run: Runner,
    *,
    weighted: bool = True,
    privacy: dict[str, Any] | None = None,
) -> tuple[Parameters, list[str], list[Failure]]:
    """The (sample-weighted) mean of the trained models by additive secret sharing: each worker
    splits its update into one share per holder and sends them itself (`Share`); each holder sums
    the shares it holds with its fixed function (`AggregateShares`) and releases only that sum;
    the model owner adds the holders' sums. A holder alone sees uniform noise; all holders
    together would see the updates (they must not collude). A worker that fails before its
    shares are all delivered is left out of the round; a holder that fails fails the round."""
    from fedsecure.pointer.shared import share_remote

    by_name = {t.worker: t for t in trained}
    ids: dict[str, list[int]] = {}

    def share(worker: WorkerClient) -> str:
        t = by_name[worker.id]
        ids[worker.id], _ = share_remote(worker, t.module_id, holders, frac_bits=settings.frac_bits,
                                         reference_id=t.reference_id, weighted=weighted, privacy=privacy)
        return worker.id

    done, failures = run(list(by_name), share, "secret sharing")
    survivors = sorted(done)
    if len(survivors) < 2:
        for holder, i in ((h, ids[w][k]) for w in survivors for k, h in enumerate(holders)):
            holder.release(i)
        exc = TooFewSurvivors(f"secret sharing: {len(survivors)} of {len(trained)} workers delivered their shares, "
                              "a sum needs at least 2")
        exc.failures = tuple(failures)
        raise exc
    parts = []
    for k, holder in enumerate(holders):
        result = new_id()
        try:
            holder.request(m.AggregateShares([ids[w][k] for w in survivors], result))
            value = holder.request(m.Get(result))["tensor"]
        except FedsecureError as exc:
            for j, other in enumerate(holders):  # what is left of the round is of no use
                for w in survivors:
                    other.release(ids[w][j])
            raise SecureAggregationError(f"share holder {holder.id!r} failed, so the round's sum is lost: {exc}") from exc
        parts.append(value)
    total = AdditiveShares.from_tensors(parts, frac_bits=settings.frac_bits).float_precision().reshape(-1)
    return _apply_sum(parameters, total, weighted, len(survivors)), survivors, failures


def secure_average(
    models: Sequence[nn.Module], *, reference: nn.Module, settings: SecureSettings | None = None
) -> Parameters:
    """The plain mean of sent models (each on its own worker, as in PySyft's tutorial), learnt
    by pairwise secure aggregation: no worker and not the caller sees another's model.
    ``reference`` is the model they all started from, which the caller holds."""
    from fedsecure.pointer.module import remote_of

    parameters = {k: t.detach().clone() for k, t in state_tensors(reference)}
    spec, tensors = sendable(reference), list(parameters.values())
    workers: dict[str, WorkerClient] = {}
    trained: list[Trained] = []
    references: list[RemoteModel] = []
    try:
        for model in models:
            remote = remote_of(model)
            if remote is None or remote.module_id is None:
                raise ProtocolError("secure_average takes models sent to workers (model.send(worker))")
            worker = remote.worker
            if worker.id in workers:
                raise ProtocolError(f"two of these models are on {worker.id!r}: one model per worker")
            reference_there = RemoteModel.put(worker, spec, tensors)
            references.append(reference_there)
            workers[worker.id] = worker
            trained.append(Trained(worker.id, remote.module_id, reference_there.module(), 1))

        def run(names: Sequence[str], task: Callable[[WorkerClient], Any], phase: str) -> tuple[list[Any], list[Failure]]:
            done, failed = [], []
            for name in names:
                try:
                    done.append(task(workers[name]))
                except FedsecureError as exc:
                    failed.append(Failure(worker=name, phase=phase, error=f"{type(exc).__name__}: {exc}"))
            return done, failed

        average, _, _ = secure_mean(trained, workers, parameters, settings or SecureSettings(bound=10.0, bits=64),
                                    run, weighted=False)
    finally:
        for reference_there in references:
            reference_there.release()
    return average


__all__ = ["SecureSettings", "Trained", "secure_average", "secure_mean", "shared_mean"]
