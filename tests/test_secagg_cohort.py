"""The cohort check of secure aggregation, attacked by a model owner that wants one owner's update.

Known-contribution isolation: the model owner decides what every *other* contributor masks (an
untrained copy of the model, a training with learning rate 0, a training of another model, or,
in the unsigned protocol, clients it makes up), so that the unmasked sum minus the known part is
the victim's update. Each worker attests that what it masks is its own `Fit` of exactly the
round's reference model, signs the attestation's digest with its keys, and aborts, before any
share leaves it, unless every other client signed the same digest. The model owner here drives
the workers itself, with the engine's own round code (`secure_mean`) or message by message.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import fedsecure as sy
from fedsecure import fl
from fedsecure.aggregate import (
    ConsistencyCheck,
    Phase,
    RoundSetup,
    SecAggClient,
    SecAggServer,
    SignedAdvertiseKeys,
    SignedKeyBroadcast,
    decode_message,
    generate_federation,
)
from fedsecure.aggregate.fixedpoint import FixedPointCodec
from fedsecure.aggregate.messages import NO_ATTESTATION
from fedsecure.aggregate.secagg import CohortMismatch
from fedsecure.data import federate, load_digits
from fedsecure.errors import (
    FedsecureError,
    SecAggInputError,
    SecAggProtocolError,
    SignatureRejected,
    TooFewSurvivors,
)
from fedsecure.fl.secure import SecureSettings, Trained, secure_mean
from fedsecure.fl.strategy import Failure
from fedsecure.transport.grpc import WorkerServer
from fedsecure.wire import codec
from fedsecure.wire import messages as m
from fedsecure.wire.ids import new_id
from fedsecure.worker import training
from fedsecure.worker.client import WorkerClient
from fedsecure.worker.core import WorkerCore
from fedsecure.worker.modules import describe, state_tensors
from fedsecure.worker.secure import SecAggIdentity, SecureSessions

TRAINING = fl.LocalTraining(epochs=1, batch_size=32, lr=0.05)
CONFIG = TRAINING.to_wire()
NAMES = ("alice", "bob", "carol")
OWNER_TOKEN = "owner-token-0123456789"
TRAINING_ONLY = sy.Policy(trusted_aggregators=frozenset(), private_sends=False, training_only=True, max_metric_numel=0)


@pytest.fixture(scope="module")
def digits() -> Any:
    return load_digits()


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


class Spy:
    """What the model owner receives from the workers' secure aggregation: each reply, by phase,
    and whether it was an answer or a refusal. ``before[(worker, phase)]`` runs first."""

    def __init__(self, workers: Sequence[sy.VirtualWorker]) -> None:
        self.log: list[tuple[str, str, str]] = []
        self.sessions: set[str] = set()
        self.before: dict[tuple[str, str], Callable[[], None]] = {}
        for w in workers:
            inner = w._transport

            def transport(data: bytes, w: sy.VirtualWorker = w, inner: Callable[[bytes], bytes] = inner) -> bytes:
                msg = m.decode_request(data)
                if not isinstance(msg, m.SecAgg):
                    return inner(data)
                self.sessions.add(msg.session)
                hook = self.before.pop((w.id, msg.phase), None)
                if hook is not None:
                    hook()
                raw = inner(data)
                error = m.decode_reply(raw).error
                self.log.append((w.id, msg.phase, "answered" if error is None else f"{error[0]}:{error[2]}"))
                return raw

            w._transport = transport  # type: ignore[method-assign]

    def answered(self, phase: str) -> list[str]:
        return [w for w, p, outcome in self.log if p == phase and outcome == "answered"]


class Owners:
    """Training-only data owners with signing identities from the federation's PKI (out of band),
    and a model owner that stores and trains models on them as it pleases."""

    def __init__(self, digits: Any, *, signed: bool = True, policies: dict[str, sy.Policy] | None = None) -> None:
        self.ids = {name: i + 1 for i, name in enumerate(NAMES)}
        pki = generate_federation(self.ids.values()) if signed else {}
        fed = sy.Federation()
        self.data = dict(zip(NAMES, federate(digits, len(NAMES), scheme="iid", seed=0), strict=True))
        self.workers = {
            name: sy.VirtualWorker(
                id=name, data={"x": x, "y": y}, policy=(policies or {}).get(name, TRAINING_ONLY), federation=fed,
                secagg_identity=SecAggIdentity(self.ids[name], pki[self.ids[name]]) if signed else None,
            )
            for name, (x, y) in self.data.items()
        }
        self.spy = Spy(list(self.workers.values()))
        self.model = mlp()
        self.parameters = {k: t.detach().clone() for k, t in state_tensors(self.model)}
        self.settings = SecureSettings(bound=4.0, bits=64, consistency_check=signed,
                                       client_ids=self.ids if signed else None)

    def put(self, name: str, model: nn.Module | None = None) -> int:
        model = model or self.model
        tensors = list(model.state_dict().values())
        module_id = new_id()
        self.workers[name].request(m.PutModule(module_id, describe(model), tensors,
                                               [new_id() for _ in tensors], False))
        return module_id

    def fit(self, name: str, module_id: int, config: dict[str, Any] = CONFIG, seed: int = 1) -> dict[str, Any]:
        reply: dict[str, Any] = self.workers[name].request(m.Fit(module_id, "x", "y", config, seed))
        return reply

    def honest(self, name: str, seed: int = 1) -> Trained:
        """The round as the engine plays it: the reference, and a copy of it trained by Fit."""
        reference, module_id = self.put(name), self.put(name)
        examples = self.fit(name, module_id, seed=seed)["examples"]
        return Trained(name, module_id, reference, examples)

    def run(self, names: Sequence[str], task: Callable[[WorkerClient], Any], phase: str
            ) -> tuple[list[Any], list[Failure]]:
        done, failed = [], []
        for name in names:
            try:
                done.append(task(self.workers[name]))
            except FedsecureError as exc:
                failed.append(Failure(worker=name, phase=phase, error=f"{type(exc).__name__}: {exc}"))
        return done, failed

    def aggregate(self, trained: Sequence[Trained]) -> tuple[dict[str, torch.Tensor], list[str], list[Failure]]:
        return secure_mean(trained, self.workers, self.parameters, self.settings, self.run)  # type: ignore[arg-type]

    def refused(self, trained: Sequence[Trained]) -> tuple[Failure, ...]:
        """The round aborts with nothing revealed: no masked input ever reached the model owner."""
        with pytest.raises(TooFewSurvivors, match="nothing is revealed") as caught:
            self.aggregate(trained)
        assert self.spy.answered("mask") == [] and self.spy.answered("unmask") == []
        return tuple(f for f in caught.value.failures if isinstance(f, Failure))

    def without(self, trained: Sequence[Trained], name: str, phase: str) -> Failure:
        """The round goes on over the others (all attested alike); ``name`` refused in ``phase``
        and is not in the sum. Its refusal."""
        _, survivors, failures = self.aggregate(trained)
        assert name not in survivors and len(survivors) == len(trained) - 1
        assert name not in self.spy.answered("mask")
        (refusal,) = failures
        assert refusal.worker == name and refusal.phase == f"secure aggregation ({phase})"
        assert refusal.error.startswith("PermissionDenied")
        return refusal


def cohort_refusals(failures: Sequence[Failure], phase: str) -> set[str]:
    return {f.worker for f in failures
            if f.phase == f"secure aggregation ({phase})" and f.error.startswith("PermissionDenied")}


def local_update(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
    """What an owner's Fit computes, replayed where the test can see it."""
    trained = copy.deepcopy(model)
    training.fit(trained, x, y, training.parse(CONFIG), seed)
    return torch.cat([(a.double() - b.double()).reshape(-1)
                      for (_, a), (_, b) in zip(state_tensors(trained), state_tensors(model), strict=True)])


# -- (a) an honest cohort ---------------------------------------------------------------------


def test_an_honest_cohort_gives_the_exact_weighted_mean(digits: Any) -> None:
    f = Owners(digits)
    trained = [f.honest(name, seed=7 + i) for i, name in enumerate(NAMES)]
    parameters, survivors, failures = f.aggregate(trained)
    assert survivors == sorted(NAMES) and failures == []
    weights = {name: len(f.data[name][0]) for name in NAMES}
    expected = sum(weights[n] * local_update(f.model, *f.data[n], seed=7 + i) for i, n in enumerate(NAMES))
    expected = expected / sum(weights.values())  # type: ignore[operator]
    got = torch.cat([(parameters[k].double() - f.parameters[k].double()).reshape(-1) for k in f.parameters])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert float(expected.detach().abs().max()) > 1e-3  # they did train
    # every phase, consistency check included, was answered by all three
    assert [p for _, p, _ in f.spy.log] == [p for p in ("advertise", "share", "mask", "consistency", "unmask")
                                            for _ in NAMES]


def test_the_engine_trains_training_only_owners_with_the_consistency_check(digits: Any) -> None:
    f = Owners(digits)
    strategy = fl.FedAvg(training=TRAINING, min_fit_workers=3)
    checked, history = fl.fit(mlp(), list(f.workers.values()), strategy, rounds=2, aggregator=None,
                              secure_aggregation="pairwise", secure=f.settings)
    assert [r["workers"] for r in history] == [3, 3]
    assert not any(r.get("failures") for r in history)
    # the same owners under the full policy (no attestation required) reach the same model
    full = Owners(digits, policies=dict.fromkeys(NAMES, sy.Policy(trusted_aggregators=frozenset(),
                                                                      private_sends=False)))
    plain, _ = fl.fit(mlp(), list(full.workers.values()), strategy, rounds=2, aggregator=None,
                      secure_aggregation="pairwise", secure=full.settings)
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(checked.state_dict()[name], value, atol=1e-6, rtol=1e-6)


# -- (b) a contribution that is no training at all ----------------------------------------------


def test_an_untrained_copy_beside_the_victim_aborts_the_round(digits: Any) -> None:
    f = Owners(digits)
    # alice "contributes" the global model itself: her update is zero, known to the model owner
    copy_of_global = Trained("alice", f.put("alice"), f.put("alice"), 1)
    failures = f.refused([copy_of_global, f.honest("bob"), f.honest("carol")])
    # alice's copy touched no private data, so her worker signs "no attestation"; on the key
    # broadcast bob and carol see it (and she sees theirs) and all abort before sharing anything
    assert cohort_refusals(failures, "share") == set(NAMES)
    assert f.spy.answered("share") == []
    assert all("signed an attestation other than" in x.error for x in failures)


def test_masking_the_reference_itself_as_the_trained_model_is_refused(digits: Any) -> None:
    f = Owners(digits)
    bob = f.honest("bob")
    # bob's trained model as its own reference: an update of zero
    with pytest.raises(sy.PermissionDenied, match="own Fit of the round's reference model") as caught:
        f.workers["bob"].request(m.SecAgg("s", "advertise", 2, SecAggServer(
            clients=[1, 2, 3], threshold=2, vector_size=3, bound=1.0, consistency_check=True).setup.encode(),
            bob.module_id, bob.module_id, True, {}))
    assert caught.value.rule == "cohort"


# -- (c) another configuration ---------------------------------------------------------------


def test_an_owner_trained_with_learning_rate_zero_aborts_the_round_before_unmasking(digits: Any) -> None:
    f = Owners(digits)
    reference, frozen = f.put("alice"), f.put("alice")
    f.fit("alice", frozen, dict(CONFIG, lr=0.0))  # her own data, but an update of zero
    bob = f.honest("bob")
    failures = f.refused([Trained("alice", frozen, reference, 100), bob, f.honest("carol")])
    assert cohort_refusals(failures, "share") == set(NAMES)  # alice sees the others differ, too
    assert f.spy.answered("share") == []  # no encrypted share left any worker
    # and a session that aborted cannot be resumed
    (session,) = {msg for msg in f.spy.sessions}
    with pytest.raises(sy.ProtocolError, match="no secure aggregation session"):
        f.workers["bob"].request(m.SecAgg(session, "mask", 2, b"", bob.module_id, bob.reference_id, True, {}))


def test_an_owner_trained_for_more_epochs_aborts_the_round(digits: Any) -> None:
    f = Owners(digits)
    # more epochs for alice than for the others: another configuration, so another cohort
    reference, longer = f.put("alice"), f.put("alice")
    f.fit("alice", longer, dict(CONFIG, epochs=3))
    failures = f.refused([Trained("alice", longer, reference, 100), f.honest("bob"), f.honest("carol")])
    assert cohort_refusals(failures, "share") == set(NAMES)


# -- (d) another reference model ----------------------------------------------------------------


def test_an_owner_trained_from_another_model_aborts_the_round(digits: Any) -> None:
    f = Owners(digits)
    other = mlp(seed=1)  # e.g. a model the owner has already pulled far from the round's
    reference, trained = f.put("alice", other), f.put("alice", other)
    f.fit("alice", trained)
    failures = f.refused([Trained("alice", trained, reference, 100), f.honest("bob"), f.honest("carol")])
    assert cohort_refusals(failures, "share") == set(NAMES)


def test_a_reference_that_is_not_the_one_trained_from_is_refused_by_the_owner(digits: Any) -> None:
    f = Owners(digits)
    trained = f.put("alice", mlp(seed=1))
    f.fit("alice", trained)
    # masked against the round's model, the update would be (other model - round's model) + training
    refusal = f.without([Trained("alice", trained, f.put("alice"), 100), f.honest("bob"), f.honest("carol")],
                        "alice", "advertise")
    assert "own Fit of the round's reference model" in refusal.error


# -- (e) the unsigned protocol ----------------------------------------------------------------


def test_the_unsigned_protocol_is_refused_for_a_training_only_owner(digits: Any) -> None:
    f = Owners(digits, signed=False)
    bob = f.honest("bob")
    setup = SecAggServer(clients=[1, 2], threshold=2, vector_size=3, bound=1.0).setup.encode()
    with pytest.raises(sy.PermissionDenied, match="--secagg-key/--secagg-pki") as caught:
        f.workers["bob"].request(m.SecAgg("s", "advertise", 2, setup, bob.module_id, bob.reference_id, True, {}))
    assert caught.value.rule == "cohort"
    assert "consistency_check=True" in str(caught.value)
    # through the engine: the round fails, naming the fix
    with pytest.raises(fl.RoundFailed, match="secagg-key"):
        fl.fit(mlp(), list(f.workers.values()), fl.FedAvg(training=TRAINING), rounds=1, aggregator=None,
               secure_aggregation="pairwise", secure=f.settings, retries=0)
    assert f.spy.answered("advertise") == []


# -- (f) a trained model changed after its Fit -------------------------------------------------


def test_a_second_fit_on_the_trained_model_voids_its_attestation(digits: Any) -> None:
    f = Owners(digits)
    alice = f.honest("alice")
    # a Fit with learning rate 0 is allowed and leaves the weights as they are, but what is attested
    # now is training from the trained model, not from the round's reference
    f.fit("alice", alice.module_id, dict(CONFIG, lr=0.0))
    f.without([alice, f.honest("bob"), f.honest("carol")], "alice", "advertise")


def test_a_model_retrained_between_phases_is_not_masked(digits: Any) -> None:
    f = Owners(digits)
    alice = f.honest("alice")
    # after alice advertised her keys (and her attestation), the model owner retrains her model
    f.spy.before[("alice", "share")] = lambda: f.fit("alice", alice.module_id, dict(CONFIG, lr=0.0))
    refusal = f.without([alice, f.honest("bob"), f.honest("carol")], "alice", "share")
    assert "no longer the one advertised" in refusal.error


def test_a_pointer_op_after_fit_voids_the_attestation(digits: Any) -> None:
    # alice's owner allows the full pointer API (training_only False): the model owner may change
    # her trained model, but then it is no longer her attested training, and the others abort
    full = sy.Policy(trusted_aggregators=frozenset(), private_sends=False)
    f = Owners(digits, policies={"alice": full})
    model = copy.deepcopy(f.model)
    model.send(f.workers["alice"])
    remote = model._fedsecure_remote
    f.fit("alice", remote.module_id)
    with torch.no_grad():
        next(model.parameters()).mul_(0.0)  # a pointer op on alice's trained weights
    failures = f.refused([Trained("alice", remote.module_id, f.put("alice"), 100), f.honest("bob"),
                          f.honest("carol")])
    assert cohort_refusals(failures, "share") == set(NAMES)
    # a training-only owner's trained model refuses the pointer op itself
    bob_model = copy.deepcopy(f.model)
    bob_model.send(f.workers["bob"])
    f.fit("bob", bob_model._fedsecure_remote.module_id)
    with pytest.raises(sy.PermissionDenied, match="only training"):
        with torch.no_grad():
            next(bob_model.parameters()).mul_(0.0)  # pipelined: refused by the time of the next request
        f.workers["bob"].request(m.Count())


# -- what remains outside the cohort check (see docs/secure_aggregation.md) ----------------------


def test_a_per_worker_clip_norm_cannot_silence_the_others(digits: Any) -> None:
    f = Owners(digits)
    trained = [f.honest(name) for name in NAMES]
    for name in ("alice", "carol"):  # their updates clipped to nothing: the sum is bob's
        worker = f.workers[name]
        inner = worker.request

        def clipped(msg: Any, inner: Callable[..., Any] = inner, **kw: Any) -> Any:
            if isinstance(msg, m.SecAgg):
                msg = dataclasses.replace(msg, privacy={"clip_norm": 1e-30})
            return inner(msg, **kw)

        worker.request = clipped  # type: ignore[method-assign]
    f.refused(trained)


def test_training_on_data_the_model_owner_sent_is_no_contribution(digits: Any) -> None:
    f = Owners(digits)
    alice = f.workers["alice"]
    kept = [torch.zeros(8, 8, 8).send(alice, tags=["known-x"]),  # pointers kept: the data stays
            torch.zeros(8, dtype=torch.long).send(alice, tags=["known-y"])]
    reference, known = f.put("alice"), f.put("alice")
    alice.request(m.Fit(known, "known-x", "known-y", CONFIG, 1))  # an update the model owner can compute
    f.refused([Trained("alice", known, reference, 8), f.honest("bob"), f.honest("carol")])
    del kept


# -- the client's state machine ---------------------------------------------------------------


def signed_round(attestations: dict[int, bytes | None]) -> tuple[SecAggServer, dict[int, SecAggClient], Any]:
    ids = sorted(attestations)
    pki = generate_federation(ids)
    server = SecAggServer(clients=ids, threshold=2, vector_size=4, bound=1.0, consistency_check=True)
    clients = {u: SecAggClient(client_id=u, identity=pki[u], attestation=attestations[u]) for u in ids}
    for u in ids:
        server.receive(clients[u].advertise_keys(server.setup.encode()).encode())
    return server, clients, server.end_advertise_keys()


def test_clients_attesting_the_same_training_complete_the_round() -> None:
    digest = bytes(range(32))
    server, clients, broadcast = signed_round({1: digest, 2: digest, 3: digest})
    assert isinstance(broadcast, SignedKeyBroadcast)
    assert [a for _, _, _, a, _ in broadcast.keys] == [digest] * 3 and server.attestations == dict.fromkeys((1, 2, 3), digest)
    for c in clients.values():
        server.receive(c.share_keys(broadcast.encode()))
    bundles = server.end_share_keys()
    for u, c in clients.items():
        server.receive(c.masked_input(bundles[u].encode(), np.full(4, 0.25)))
    check = server.end_masked_input()
    assert isinstance(check, ConsistencyCheck)
    for c in clients.values():
        server.receive(c.sign_survivors(check.encode()))
    request = server.end_consistency_check()
    for c in clients.values():
        server.receive(c.unmask(request.encode()))
    assert np.allclose(server.end_unmasking().total, 0.75, atol=1e-6)


@pytest.mark.parametrize("other", [bytes(32), b"\x01" * 32, None], ids=["zeros", "another", "none"])
def test_one_other_attestation_makes_every_client_abort_before_sharing(other: bytes | None) -> None:
    digest = b"\x07" * 32
    _, clients, broadcast = signed_round({1: digest, 2: digest, 3: other})
    for u in (1, 2, 3):
        with pytest.raises(CohortMismatch, match="aborts and shares nothing"):
            clients[u].share_keys(broadcast.encode())
        assert clients[u].phase is Phase.ABORTED
    # "none" is 32 zero bytes: a client that passes None signs exactly that
    _, _, plain = signed_round({1: None, 2: bytes(32)})
    assert [a for _, _, _, a, _ in plain.keys] == [NO_ATTESTATION] * 2


def test_a_server_cannot_rewrite_or_swap_attestations() -> None:
    mine, theirs = b"\x07" * 32, b"\x08" * 32
    _, clients, broadcast = signed_round({1: mine, 2: mine, 3: theirs})
    # client 3's entry with client 1's attestation, so that all look alike: its signature fails
    forged = tuple((v, c, s, mine, sig) for v, c, s, _, sig in broadcast.keys)
    with pytest.raises(SignatureRejected, match="client 3's advertised keys"):
        clients[1].share_keys(SignedKeyBroadcast(broadcast.round_id, forged))


def test_a_server_that_tells_clients_different_parameters_is_caught() -> None:
    """The round's parameters are signed with the keys: the server cannot give the others a bound of
    (almost) zero, on the same fixed-point scale, so that their clipped inputs are known."""
    pki = generate_federation([1, 2, 3])
    server = SecAggServer(clients=[1, 2, 3], threshold=2, vector_size=4, bound=1.0, consistency_check=True)
    setup = server.setup
    codec_wire = dict(setup.codec, bound=1e-9)
    FixedPointCodec.from_wire(codec_wire)  # a codec an honest client accepts
    tiny = dataclasses.replace(setup, codec=codec_wire)
    clients = {u: SecAggClient(client_id=u, identity=pki[u]) for u in (1, 2, 3)}
    server.receive(clients[1].advertise_keys(setup))
    for u in (2, 3):
        advert = clients[u].advertise_keys(tiny)
        assert isinstance(advert, SignedAdvertiseKeys)
        server.receive(advert)  # this server has no PKI to check against
    broadcast = server.end_advertise_keys()
    with pytest.raises(SignatureRejected, match="different parameters"):
        clients[1].share_keys(broadcast)
    # with the PKI, the server itself turns such an advertisement away on arrival
    keys = {u: pki[u].signing_key.public_key() for u in pki}
    checked = SecAggServer(clients=[1, 2, 3], threshold=2, vector_size=4, bound=1.0, consistency_check=True,
                           verify_keys=keys)
    other = SecAggClient(client_id=2, identity=pki[2])
    with pytest.raises(SignatureRejected, match="client 2's signature on its advertised keys"):
        checked.receive(other.advertise_keys(dataclasses.replace(checked.setup, threshold=3)))


def test_an_attestation_needs_a_signing_identity_and_32_bytes() -> None:
    with pytest.raises(SecAggInputError, match="invent every other client"):
        SecAggClient(client_id=1, attestation=b"\x01" * 32)
    pki = generate_federation([1])
    with pytest.raises(SecAggInputError, match="32 bytes"):
        SecAggClient(client_id=1, identity=pki[1], attestation=b"\x01" * 31)


R, K, S = bytes(16), bytes(32), bytes(64)


@pytest.mark.parametrize(
    "value",
    [
        ["secagg/signed-advertise-keys", R, 1, K, K, K[:31], S],
        ["secagg/signed-advertise-keys", R, 1, K, K, K + b"\0", S],
        ["secagg/signed-advertise-keys", R, 1, K, K, "attested", S],
        ["secagg/signed-advertise-keys", R, 1, K, K, None, S],
        ["secagg/signed-advertise-keys", R, 1, K, K, S],  # the old layout, without an attestation
        ["secagg/signed-key-broadcast", R, [[1, K, K, S]]],
        ["secagg/signed-key-broadcast", R, [[1, K, K, K[:31], S]]],
        ["secagg/signed-key-broadcast", R, [[1, K, K, [K], S]]],
        ["secagg/signed-key-broadcast", R, [[1, K, K, K, S, K]]],
    ],
)
def test_malformed_attestation_fields_are_protocol_errors(value: list[Any]) -> None:
    with pytest.raises(SecAggProtocolError):
        decode_message(codec.encode(value))


def test_signed_messages_with_attestations_round_trip() -> None:
    digest = b"\x05" * 32
    _, _, broadcast = signed_round({1: digest, 2: digest})
    assert decode_message(broadcast.encode()) == broadcast
    setup = RoundSetup(bytes(range(16)), (1, 2), 2, 4, FixedPointCodec(summands=2, bound=1.0).to_wire(), None)
    advert = SecAggClient(client_id=1, identity=generate_federation([1, 2])[1], attestation=digest).advertise_keys(setup)
    assert isinstance(advert, SignedAdvertiseKeys) and advert.attestation == digest
    assert decode_message(advert.encode()) == advert


# -- a worker's sessions ----------------------------------------------------------------------


def test_sessions_refuse_what_cannot_be_checked() -> None:
    pki = generate_federation([1, 2])
    setup = SecAggServer(clients=[1, 2], threshold=2, vector_size=4, bound=1.0, consistency_check=True).setup.encode()
    signed = SecureSessions(SecAggIdentity(1, pki[1]))
    with pytest.raises(sy.PermissionDenied, match="own Fit of the round's reference model") as caught:
        signed.step("owner", "s", "advertise", 1, setup, lambda: np.zeros(4), attestation=None, required=True)
    assert caught.value.rule == "cohort"
    unsigned = SecureSessions()
    with pytest.raises(sy.PermissionDenied, match="invent them all") as caught:
        unsigned.step("owner", "s", "advertise", 1, setup, lambda: np.zeros(4), attestation=b"\x01" * 32,
                      required=True)
    assert caught.value.rule == "cohort"
    # not required: the unsigned protocol runs as before, the signed one signs the attestation
    reply = decode_message(signed.step("owner", "t", "advertise", 1, setup, lambda: np.zeros(4),
                                       attestation=b"\x01" * 32))
    assert isinstance(reply, SignedAdvertiseKeys) and reply.attestation == b"\x01" * 32
    with pytest.raises(sy.PermissionDenied, match="no longer the one advertised"):
        signed.step("owner", "t", "share", 1, b"", lambda: np.zeros(4), attestation=b"\x02" * 32)
    with pytest.raises(sy.ProtocolError, match="no secure aggregation session"):  # the session ended
        signed.step("owner", "t", "share", 1, b"", lambda: np.zeros(4), attestation=b"\x01" * 32)
    with pytest.raises(sy.ProtocolError, match="32 bytes"):
        signed.step("owner", "u", "advertise", 1, setup, lambda: np.zeros(4), attestation=b"\x01")


# -- served workers ----------------------------------------------------------------------------


@contextlib.contextmanager
def served(digits: Any) -> Iterator[tuple[list[WorkerClient], dict[str, int]]]:
    """Training-only owners served over gRPC, each with its signing key from the federation's PKI."""
    ids = {name: i + 1 for i, name in enumerate(NAMES)}
    pki = generate_federation(ids.values())
    parts = federate(digits, len(NAMES), scheme="iid", seed=0)
    with contextlib.ExitStack() as stack:
        clients = []
        for name, (x, y) in zip(NAMES, parts, strict=True):
            core = WorkerCore(name, policy=TRAINING_ONLY, secagg_identity=SecAggIdentity(ids[name], pki[ids[name]]))
            core.load(x, ("x",))
            core.load(y, ("y",))
            server = stack.enter_context(WorkerServer(core, callers={OWNER_TOKEN: ("client", "owner")}))
            clients.append(sy.connect(name, server.address, credentials=OWNER_TOKEN))
        yield clients, ids


def test_served_owners_train_with_the_check_and_refuse_a_known_contribution(digits: Any) -> None:
    with served(digits) as (workers, ids):
        settings = SecureSettings(bound=4.0, bits=64, consistency_check=True, client_ids=ids)
        _, history = fl.fit(mlp(), workers, fl.FedAvg(training=TRAINING, min_fit_workers=3), rounds=1,
                            aggregator=None, secure_aggregation="pairwise", secure=settings)
        assert history.last["workers"] == 3 and not history.last.get("failures")
        # the model owner trains alice with learning rate 0 and bob and carol honestly
        model, by_name = mlp(), {w.id: w for w in workers}
        tensors = list(model.state_dict().values())
        trained = []
        for w in workers:
            reference, module_id = new_id(), new_id()
            for i in (reference, module_id):
                w.request(m.PutModule(i, describe(model), tensors, [new_id() for _ in tensors], False))
            w.request(m.Fit(module_id, "x", "y", dict(CONFIG, lr=0.0 if w.id == "alice" else 0.05), 1))
            trained.append(Trained(w.id, module_id, reference, 100))

        def run(names: Sequence[str], task: Callable[[WorkerClient], Any], phase: str
                ) -> tuple[list[Any], list[Failure]]:
            done, failed = [], []
            for name in names:
                try:
                    done.append(task(by_name[name]))
                except FedsecureError as exc:
                    failed.append(Failure(worker=name, phase=phase, error=f"{type(exc).__name__}: {exc}"))
            return done, failed

        parameters = {k: t.detach().clone() for k, t in state_tensors(model)}
        with pytest.raises(TooFewSurvivors) as caught:
            secure_mean(trained, by_name, parameters, settings, run)
        failures = [f for f in caught.value.failures if isinstance(f, Failure)]
        assert cohort_refusals(failures, "share") == set(NAMES)
