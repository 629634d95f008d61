"""The active-adversary variant of secure aggregation (Bonawitz et al. 2017, section 4, figure 4):
signed key advertisements and the consistency-check round, honest runs and a lying server."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from torch import nn

import fedsecure as sy
from fedsecure import fl
from fedsecure.aggregate import (
    AggregateResult,
    ConsistencyCheck,
    KeyBroadcast,
    Phase,
    SecAggClient,
    SecAggServer,
    SignedAdvertiseKeys,
    SignedKeyBroadcast,
    SignedUnmaskRequest,
    SigningIdentity,
    SurvivorSignature,
    UnmaskRequest,
    decode_message,
    generate_federation,
)
from fedsecure.aggregate.identity import advertised_keys_statement, round_digest, survivors_statement
from fedsecure.aggregate.messages import NO_ATTESTATION
from fedsecure.data import federate, load_digits
from fedsecure.errors import (
    ConsistencyCheckFailed,
    SecAggInputError,
    SecAggProtocolError,
    SignatureRejected,
    TooFewSurvivors,
)
from fedsecure.fl.secure import SecureSettings
from fedsecure.wire import codec
from fedsecure.wire import messages as m
from fedsecure.worker.secure import SecAggIdentity, SecureSessions
from secagg_rounds import run_round

PHASES = [Phase.ADVERTISE_KEYS, Phase.SHARE_KEYS, Phase.MASKED_INPUT, Phase.CONSISTENCY_CHECK, Phase.UNMASKING]


def checked_round(
    inputs: Mapping[int, np.ndarray], *, threshold: int, drop: Mapping[int, Phase] | None = None,
    degree: int | None = None,
) -> AggregateResult:
    return run_round(inputs, threshold=threshold, drop=drop, degree=degree, checked=True)


def close(inputs: Mapping[int, np.ndarray], result: AggregateResult) -> bool:
    exact = sum(np.clip(inputs[u].astype(np.float64), -1, 1) for u in result.survivors)
    return bool(np.abs(result.total - exact).max() <= result.max_error)


def rows(n: int, size: int = 16, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {u: rng.uniform(-1, 1, size).astype(np.float32) for u in range(1, n + 1)}


# -- honest runs ---------------------------------------------------------------------------


@pytest.mark.parametrize("degree", [None, 4])
def test_an_honest_checked_round_gives_the_exact_sum(degree: int | None) -> None:
    inputs = rows(9 if degree else 5)
    result = checked_round(inputs, threshold=3, degree=degree)
    assert result.survivors == tuple(inputs) and result.dropped == ()
    assert close(inputs, result)


@pytest.mark.parametrize(
    "drop",
    [
        {4: Phase.CONSISTENCY_CHECK},
        {4: Phase.CONSISTENCY_CHECK, 5: Phase.UNMASKING},
        {2: Phase.MASKED_INPUT, 4: Phase.CONSISTENCY_CHECK},
        {1: Phase.SHARE_KEYS, 5: Phase.CONSISTENCY_CHECK},
    ],
    ids=["one does not sign", "one does not sign, one does not unmask", "one drops, one does not sign",
         "one drops early, one does not sign"],
)
def test_dropouts_during_the_consistency_round_still_give_the_sum(drop: dict[int, Phase]) -> None:
    inputs = rows(5, seed=len(drop))
    result = checked_round(inputs, threshold=3, drop=drop)
    # figure 4: the sum is over U3, every masked input received; a client that did not sign is
    # asked for no shares, its self-mask comes back from the others' shares
    sent_input = {u for u in inputs if drop.get(u) in (None, Phase.CONSISTENCY_CHECK, Phase.UNMASKING)}
    assert set(result.survivors) == sent_input
    assert close(inputs, result)


def test_too_few_signers_abort_at_the_server_before_anything_is_revealed() -> None:
    inputs = rows(5)
    with pytest.raises(TooFewSurvivors, match="nothing is revealed"):
        checked_round(inputs, threshold=3, drop={1: Phase.CONSISTENCY_CHECK, 2: Phase.CONSISTENCY_CHECK,
                                                 3: Phase.CONSISTENCY_CHECK})


def test_without_the_option_the_semi_honest_round_is_unchanged() -> None:
    ids = [1, 2, 3]
    server = SecAggServer(clients=ids, threshold=2, vector_size=4, bound=1.0)
    clients = {u: SecAggClient(client_id=u) for u in ids}
    for u in ids:
        server.receive(clients[u].advertise_keys(server.setup))
    broadcast = server.end_advertise_keys()
    assert type(broadcast) is KeyBroadcast
    for u in ids:
        server.receive(clients[u].share_keys(broadcast))
    bundles = server.end_share_keys()
    for u in ids:
        server.receive(clients[u].masked_input(bundles[u], np.full(4, 0.25)))
    request = server.end_masked_input()
    assert type(request) is UnmaskRequest
    with pytest.raises(SecAggProtocolError, match="no signing identity"):
        clients[1].sign_survivors(ConsistencyCheck(server.round_id, (1, 2, 3)))
    for u in ids:
        server.receive(clients[u].unmask(request))
    assert np.allclose(server.end_unmasking().total, 0.75, atol=1e-6)


def test_checked_and_unchecked_parties_do_not_mix() -> None:
    pki = generate_federation([1, 2, 3])
    plain = SecAggServer(clients=[1, 2, 3], threshold=2, vector_size=4, bound=1.0)
    with pytest.raises(SecAggProtocolError, match="signs its keys.*only with the consistency check"):
        plain.receive(SecAggClient(client_id=1, identity=pki[1]).advertise_keys(plain.setup))
    checked = SecAggServer(clients=[1, 2, 3], threshold=2, vector_size=4, bound=1.0, consistency_check=True)
    with pytest.raises(SecAggProtocolError, match="does not sign its keys.*only without the consistency check"):
        checked.receive(SecAggClient(client_id=1).advertise_keys(checked.setup))
    with pytest.raises(SecAggInputError, match="not this identity's"):
        SecAggClient(client_id=2, identity=pki[1])
    with pytest.raises(SecAggInputError, match="consistency_check=True"):
        SecAggServer(clients=[1, 2, 3], threshold=2, vector_size=4, bound=1.0,
                     verify_keys={u: pki[u].signing_key.public_key() for u in pki})


# -- a lying server --------------------------------------------------------------------------


class Round:
    """A checked round driven by hand, so that tests can play a malicious server."""

    def __init__(self, n: int = 5, threshold: int = 3) -> None:
        self.ids = list(range(1, n + 1))
        self.pki = generate_federation(self.ids)
        self.server = SecAggServer(clients=self.ids, threshold=threshold, vector_size=8, bound=1.0,
                                   consistency_check=True)
        self.clients = {u: SecAggClient(client_id=u, identity=self.pki[u]) for u in self.ids}
        self.adverts = {u: self.clients[u].advertise_keys(self.server.setup) for u in self.ids}
        for a in self.adverts.values():
            self.server.receive(a)
        self.broadcast = self.server.end_advertise_keys()
        assert isinstance(self.broadcast, SignedKeyBroadcast)

    @property
    def rid(self) -> bytes:
        return self.server.round_id

    def to_masked_input(self) -> None:
        for u in self.ids:
            self.server.receive(self.clients[u].share_keys(self.broadcast))
        bundles = self.server.end_share_keys()
        for u in self.ids:
            self.server.receive(self.clients[u].masked_input(bundles[u], np.zeros(8)))


def test_a_forged_or_missing_signature_on_advertised_keys_aborts_the_round() -> None:
    r = Round()
    forged = tuple((v, c, s, a, sig[:-1] + bytes([sig[-1] ^ 1]) if v == 2 else sig)
                   for v, c, s, a, sig in r.broadcast.keys)
    with pytest.raises(SignatureRejected, match="client 2's advertised keys do not carry its valid signature"):
        r.clients[1].share_keys(SignedKeyBroadcast(r.rid, forged))
    assert r.clients[1].phase is Phase.ABORTED
    unsigned = KeyBroadcast(r.rid, tuple((v, c, s) for v, c, s, _, _ in r.broadcast.keys))
    with pytest.raises(SignatureRejected, match="unsigned key broadcast"):
        r.clients[3].share_keys(unsigned.encode())
    # a signature is bound to its round: the same keys signed for another round do not pass
    other = round_digest(dataclasses.replace(r.server.setup, round_id=bytes(16)))
    stale = tuple((v, c, s, a, r.pki[v].sign(advertised_keys_statement(other, v, c, s, a)))
                  for v, c, s, a, _ in r.broadcast.keys)
    with pytest.raises(SignatureRejected):
        r.clients[4].share_keys(SignedKeyBroadcast(r.rid, stale))


def test_a_substituted_public_key_is_rejected() -> None:
    r = Round()
    mine = X25519PrivateKey.generate().public_key().public_bytes_raw()
    # the server's own mask key in place of client 2's, under client 2's signature
    swapped = tuple((v, c, mine if v == 2 else s, a, sig) for v, c, s, a, sig in r.broadcast.keys)
    with pytest.raises(SignatureRejected, match="client 2's advertised keys"):
        r.clients[1].share_keys(SignedKeyBroadcast(r.rid, swapped))
    # ... or signed by a key of the server's making: the PKI does not know it
    rogue = Ed25519PrivateKey.generate()
    resigned = tuple((v, c, mine, a, rogue.sign(advertised_keys_statement(round_digest(r.server.setup), v, c, mine, a))) if v == 2
                     else (v, c, s, a, sig) for v, c, s, a, sig in r.broadcast.keys)
    with pytest.raises(SignatureRejected, match="client 2's advertised keys"):
        r.clients[3].share_keys(SignedKeyBroadcast(r.rid, resigned))


def test_sybil_clients_unknown_to_the_pki_are_refused() -> None:
    pki = generate_federation([1, 2, 3])
    server = SecAggServer(clients=[1, 2, 3, 4, 5], threshold=3, vector_size=4, bound=1.0, consistency_check=True)
    with pytest.raises(SignatureRejected, match=r"knows no clients \[4, 5\]"):
        SecAggClient(client_id=1, identity=pki[1]).advertise_keys(server.setup)
    r = Round(3, 2)
    sybil = X25519PrivateKey.generate().public_key().public_bytes_raw(), X25519PrivateKey.generate().public_key().public_bytes_raw()
    rogue = Ed25519PrivateKey.generate()
    statement = advertised_keys_statement(round_digest(r.server.setup), 9, *sybil, NO_ATTESTATION)
    extra = (9, *sybil, NO_ATTESTATION, rogue.sign(statement))
    with pytest.raises(SignatureRejected, match="client 9, which the PKI does not know"):
        r.clients[1].share_keys(SignedKeyBroadcast(r.rid, (*r.broadcast.keys, extra)))


def test_an_equivocating_server_is_caught_and_nothing_is_revealed() -> None:
    r = Round(5, 3)
    r.to_masked_input()
    assert isinstance(r.server.end_masked_input(), ConsistencyCheck)
    # the server says client 1's input arrived to clients 1, 2, 3, and that it did not to 4, 5:
    # it hopes for self-mask shares of 1 from the first and key shares of 1 from the others
    told_full, told_short = (1, 2, 3, 4, 5), (2, 3, 4, 5)
    sigs = {u: r.clients[u].sign_survivors(ConsistencyCheck(r.rid, told_full)) for u in (1, 2, 3)}
    sigs |= {u: r.clients[u].sign_survivors(ConsistencyCheck(r.rid, told_short)) for u in (4, 5)}
    assert all(isinstance(s, SurvivorSignature) for s in sigs.values())
    everyone = tuple((u, s.signature) for u, s in sigs.items())
    # to 4: the signatures on its own set are too few; with the others', they do not verify over it
    with pytest.raises(ConsistencyCheckFailed, match="only 2 signatures on the survivor set, fewer than the threshold 3"):
        r.clients[4].unmask(SignedUnmaskRequest(r.rid, told_short, (1,), ((4, sigs[4].signature), (5, sigs[5].signature))))
    with pytest.raises(ConsistencyCheckFailed, match=r"signatures of clients \[2, 3\] are not valid"):
        r.clients[5].unmask(SignedUnmaskRequest(r.rid, told_short, (1,), everyone[1:]))
    # to 1: the signatures of 4 and 5 are over another set
    with pytest.raises(ConsistencyCheckFailed, match=r"signatures of clients \[4, 5\] are not valid"):
        r.clients[1].unmask(SignedUnmaskRequest(r.rid, told_full, (), everyone))
    # an aborted client stays aborted: a later, well-formed request gets nothing either
    for u in (4, 5, 1):
        assert r.clients[u].phase is Phase.ABORTED
    good = tuple((u, sigs[u].signature) for u in (1, 2, 3))
    with pytest.raises(SecAggProtocolError, match="in phase aborted"):
        r.clients[1].unmask(SignedUnmaskRequest(r.rid, told_full, (), good))
    # a request whose survivor set differs from the one the client signed is refused too
    with pytest.raises(ConsistencyCheckFailed, match="not the one this client signed"):
        r.clients[2].unmask(SignedUnmaskRequest(r.rid, told_short, (1,), good))


def test_fewer_than_t_signatures_or_none_reveal_nothing() -> None:
    r = Round(5, 3)
    r.to_masked_input()
    check = r.server.end_masked_input()
    assert isinstance(check, ConsistencyCheck)
    sigs = {u: r.clients[u].sign_survivors(check).signature for u in r.ids}
    with pytest.raises(ConsistencyCheckFailed, match="only 2 signatures"):
        r.clients[1].unmask(SignedUnmaskRequest(r.rid, check.survivors, (), ((1, sigs[1]), (2, sigs[2]))))
    with pytest.raises(ConsistencyCheckFailed, match="without the survivors' signatures"):
        r.clients[2].unmask(UnmaskRequest(r.rid, check.survivors, ()).encode())
    # the same signature under several names does not count several times
    with pytest.raises(ConsistencyCheckFailed, match=r"clients \[4, 5\] are not valid"):
        r.clients[3].unmask(SignedUnmaskRequest(r.rid, check.survivors, (), ((3, sigs[3]), (4, sigs[3]), (5, sigs[3]))))
    with pytest.raises(ConsistencyCheckFailed, match="outside the survivor set"):
        r.clients[4].unmask(SignedUnmaskRequest(r.rid, check.survivors, (), ((1, sigs[1]), (2, sigs[2]), (9, sigs[3]))))
    assert all(r.clients[u].phase is Phase.ABORTED for u in (1, 2, 3, 4))
    # the honest request, to the one client left, is answered
    for u in r.ids:
        r.server.receive(SurvivorSignature(r.rid, u, sigs[u]))
    request = r.server.end_consistency_check()
    assert {v for v, _ in request.signatures} == set(r.ids)
    shares = r.clients[5].unmask(request.encode())
    assert len(shares.self_mask_shares) == 5 and shares.key_shares == ()


def test_clients_refuse_to_sign_a_survivor_set_that_cannot_be_right() -> None:
    r = Round(5, 3)
    r.to_masked_input()
    bad = [((1, 2), "fewer than the threshold"), ((1, 3, 4), "not in the survivor set"),
           ((1, 2, 3, 9), "never advertised keys")]
    for u, (u3, message) in enumerate(bad, start=1):
        with pytest.raises((ConsistencyCheckFailed, TooFewSurvivors), match=message):
            r.clients[u].sign_survivors(ConsistencyCheck(r.rid, u3))
        assert r.clients[u].phase is Phase.ABORTED


def test_a_client_that_never_shared_keys_cannot_be_listed_as_a_survivor() -> None:
    r = Round(5, 3)
    for u in (1, 2, 3, 4):  # 5 advertised keys but never shared
        r.server.receive(r.clients[u].share_keys(r.broadcast))
    bundles = r.server.end_share_keys()
    for u in (1, 2, 3, 4):
        r.server.receive(r.clients[u].masked_input(bundles[u], np.zeros(8)))
    with pytest.raises(ConsistencyCheckFailed, match=r"clients \[5\] that never shared keys"):
        r.clients[1].sign_survivors(ConsistencyCheck(r.rid, (1, 2, 3, 4, 5)))


def test_a_server_with_the_pki_turns_bad_signatures_away_on_arrival() -> None:
    ids = [1, 2, 3, 4]
    pki = generate_federation(ids)
    keys = {u: pki[u].signing_key.public_key().public_bytes_raw() for u in ids}
    server = SecAggServer(clients=ids, threshold=3, vector_size=4, bound=1.0, consistency_check=True, verify_keys=keys)
    clients = {u: SecAggClient(client_id=u, identity=pki[u]) for u in ids}
    adverts = {u: clients[u].advertise_keys(server.setup) for u in ids}
    a = adverts[4]
    assert isinstance(a, SignedAdvertiseKeys)
    with pytest.raises(SignatureRejected, match="client 4's signature on its advertised keys"):
        server.receive(SignedAdvertiseKeys(a.round_id, 4, a.cipher_key, a.mask_key, a.attestation, bytes(64)))
    for u in ids:
        server.receive(adverts[u])  # the genuine one still gets in
    broadcast = server.end_advertise_keys()
    for u in ids:
        server.receive(clients[u].share_keys(broadcast))
    bundles = server.end_share_keys()
    for u in ids:
        server.receive(clients[u].masked_input(bundles[u], np.full(4, 0.5)))
    check = server.end_masked_input()
    assert isinstance(check, ConsistencyCheck)
    wrong = survivors_statement(server.round_id, (1, 2, 3))
    with pytest.raises(SignatureRejected, match="client 1's signature on its survivor set"):
        server.receive(SurvivorSignature(server.round_id, 1, pki[1].sign(wrong)))
    for u in ids:
        server.receive(clients[u].sign_survivors(check))
    request = server.end_consistency_check()
    for u in ids:
        server.receive(clients[u].unmask(request))
    assert np.allclose(server.end_unmasking().total, 2.0, atol=1e-6)


def test_signing_identities_check_their_keys() -> None:
    with pytest.raises(SecAggInputError, match="Ed25519PrivateKey"):
        SigningIdentity(X25519PrivateKey.generate(), {})  # type: ignore[arg-type]
    with pytest.raises(SecAggInputError, match="verification key"):
        SigningIdentity(Ed25519PrivateKey.generate(), {1: b"short"})
    with pytest.raises(SecAggInputError, match="client ids"):
        SigningIdentity(Ed25519PrivateKey.generate(), {0: Ed25519PrivateKey.generate().public_key()})


# -- hostile bytes ---------------------------------------------------------------------------

R = bytes(16)
SIG = bytes(64)
KEY = bytes(32)


@pytest.mark.parametrize(
    "value",
    [
        ["secagg/signed-advertise-keys", R, 1, KEY, KEY, KEY, SIG[:-1]],
        ["secagg/signed-advertise-keys", R, 1, KEY, KEY, KEY, SIG + b"\0"],
        ["secagg/signed-advertise-keys", R, 1, KEY, KEY],
        ["secagg/signed-advertise-keys", R, 0, KEY, KEY, KEY, SIG],
        ["secagg/signed-key-broadcast", R, [[1, KEY, KEY]]],
        ["secagg/signed-key-broadcast", R, [[1, KEY, KEY, KEY, SIG], [1, KEY, KEY, KEY, SIG]]],
        ["secagg/signed-key-broadcast", R, [[1, KEY, KEY[:31], KEY, SIG]]],
        ["secagg/signed-key-broadcast", R, [[1, KEY, KEY, KEY, "sig"]]],
        ["secagg/consistency-check", R, [1, 2, 2]],
        ["secagg/consistency-check", R, [1, -2]],
        ["secagg/consistency-check", R, "12"],
        ["secagg/consistency-check", R[:15], [1, 2]],
        ["secagg/survivor-signature", R, 1, SIG[:32]],
        ["secagg/survivor-signature", R, 1 << 32, SIG],
        ["secagg/survivor-signature", R, True, SIG],
        ["secagg/signed-unmask-request", R, [1, 2], [], [[1, SIG[:63]]]],
        ["secagg/signed-unmask-request", R, [1, 2], [], [[1, SIG], [1, SIG]]],
        ["secagg/signed-unmask-request", R, [1, 2], [], [[1, SIG, SIG]]],
        ["secagg/signed-unmask-request", R, [1, 2], []],
        ["secagg/signed-unmask-request", R, [1, 2], [], {"1": SIG}],
    ],
)
def test_hostile_bytes_of_the_new_messages_are_protocol_errors(value: list) -> None:

    with pytest.raises(SecAggProtocolError):
        decode_message(codec.encode(value))


@pytest.mark.parametrize("data", [b"\x93\xbbsecagg/consistency-check", b"\x96\xbdsecagg/survivor-signature\xc4"])
def test_truncated_new_messages_are_protocol_errors(data: bytes) -> None:
    with pytest.raises(SecAggProtocolError):
        decode_message(data)


def test_the_new_messages_round_trip_through_bytes() -> None:
    r = Round(3, 2)
    r.to_masked_input()
    check = r.server.end_masked_input()
    assert isinstance(check, ConsistencyCheck)
    signatures = [r.clients[u].sign_survivors(check) for u in r.ids]
    for s in signatures:
        r.server.receive(s.encode())
    request = r.server.end_consistency_check()
    for msg in [r.adverts[1], r.broadcast, check, *signatures, request]:
        back = decode_message(msg.encode())
        assert type(back) is type(msg) and back == msg


# -- through the engine --------------------------------------------------------------------


def _engine_setup(n: int = 4) -> tuple[object, list[sy.VirtualWorker], dict[str, int]]:

    digits = load_digits()
    pki = generate_federation(range(101, 101 + n))  # the federation's PKI, out of band
    fed = sy.Federation()
    policy = sy.Policy(trusted_aggregators=frozenset(), private_sends=False)
    workers = [sy.VirtualWorker(id=f"w{i}", data={"x": x, "y": y}, policy=policy, federation=fed,
                                secagg_identity=SecAggIdentity(101 + i, pki[101 + i]))
               for i, (x, y) in enumerate(federate(digits, n, scheme="dirichlet", alpha=1.0, seed=0))]
    return digits, workers, {w.id: 101 + i for i, w in enumerate(workers)}


def _mlp() -> nn.Module:

    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def test_fit_with_the_consistency_check_matches_the_plain_pairwise_round() -> None:


    training = fl.LocalTraining(epochs=1, batch_size=16, lr=0.05)
    _, workers, pki_ids = _engine_setup()
    checked, _ = fl.fit(_mlp(), workers, fl.FedAvg(training=training), rounds=2, aggregator=None,
                        secure_aggregation="pairwise",
                        secure=SecureSettings(bound=2.0, bits=64, consistency_check=True, client_ids=pki_ids))

    fed = sy.Federation()
    policy = sy.Policy(trusted_aggregators=frozenset(), private_sends=False)
    plain_workers = [sy.VirtualWorker(id=f"w{i}", data={"x": x, "y": y}, policy=policy, federation=fed)
                     for i, (x, y) in enumerate(federate(load_digits(), 4, scheme="dirichlet", alpha=1.0, seed=0))]
    plain, _ = fl.fit(_mlp(), plain_workers, fl.FedAvg(training=training), rounds=2, aggregator=None,
                      secure_aggregation="pairwise", secure=SecureSettings(bound=2.0, bits=64))
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(checked.state_dict()[name], value, atol=1e-5, rtol=1e-5)


def test_fit_recovers_a_worker_that_does_not_sign_and_workers_refuse_an_unchecked_round() -> None:

    training = fl.LocalTraining(epochs=1, batch_size=16, lr=0.05)
    _, workers, pki_ids = _engine_setup(5)
    silent = workers[2]
    inner = silent._transport

    def no_signature(data: bytes) -> bytes:
        msg = m.decode_request(data)
        if isinstance(msg, m.SecAgg) and msg.phase == "consistency":
            raise sy.WorkerUnavailable("w2 went away")
        return inner(data)

    silent._transport = no_signature  # type: ignore[method-assign]
    settings = SecureSettings(bound=2.0, bits=64, consistency_check=True, client_ids=pki_ids)
    _, history = fl.fit(_mlp(), workers, fl.FedAvg(training=training), rounds=1, aggregator=None,
                        secure_aggregation="pairwise", secure=settings)
    assert history.last["workers"] == 5  # its masked input is in the sum (figure 4: the sum is over U3)
    assert any("w2" in f and "consistency" in f for f in history.last["failures"])
    silent._transport = inner  # type: ignore[method-assign]
    # a model owner that skips the check gets nothing: the workers want signed keys
    with pytest.raises(fl.RoundFailed):
        fl.fit(_mlp(), workers, fl.FedAvg(training=training), rounds=1, aggregator=None,
               secure_aggregation="pairwise", secure=SecureSettings(bound=2.0, bits=64))


def test_a_worker_plays_only_its_own_pki_id() -> None:
    pki = generate_federation([7, 8])
    with pytest.raises(SecAggInputError, match="not this identity's"):
        SecAggIdentity(8, pki[7])
    sessions = SecureSessions(SecAggIdentity(7, pki[7]))
    server = SecAggServer(clients=[7, 8], threshold=2, vector_size=4, bound=1.0, consistency_check=True)
    with pytest.raises(sy.ProtocolError, match="client 7 in the federation's PKI, not 1"):
        sessions.step("owner", "s", "advertise", 1, server.setup.encode(), lambda: np.zeros(4))
    reply = decode_message(sessions.step("owner", "s", "advertise", 7, server.setup.encode(), lambda: np.zeros(4)))
    assert isinstance(reply, SignedAdvertiseKeys)
