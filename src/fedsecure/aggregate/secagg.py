"""Secure aggregation by pairwise masking with dropout recovery: the client's state machine.

After Bonawitz et al. 2017 (CCS, "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", the semi-honest protocol of figure 4), with the sparse neighbour graph of SecAgg+
(Bell et al. 2020, CCS, "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead")
when a degree is set. Client u with update x_u sends

    y_u = encode(x_u) + PRG(b_u) + sum over neighbours v of sign(u, v) * PRG(s_uv)   (mod 2^bits)

where s_uv is the X25519 secret of u's and v's mask keys (so the pairwise masks cancel in the
sum), b_u a fresh self-mask seed, and sign(u, v) = +1 if u < v else -1. Before that, u splits b_u
and its mask secret key t-of-(its neighbours and itself) with Shamir and sends each neighbour its
shares, encrypted with AES-GCM under a key agreed from the clients' other X25519 pair, through
the server. To unmask, the surviving clients reveal shares of b_u for every client u that sent
y_u and of the mask key of every neighbour that dropped before; never both for one client.

Against an actively malicious server (Bonawitz et al. 2017, section 4 and figure 4, the lines
marked for the active adversary) a client given a ``SigningIdentity`` (a long-term Ed25519 key
and the PKI's verification keys of all clients) signs its advertised keys and checks everyone
else's, and takes part in one more round between masked input and unmasking, the consistency
check: it signs the survivor set U3 the server announces, and reveals shares only once it sees
at least ``threshold`` valid signatures of clients of U3 over that same U3. Such a client runs
only this variant; the server must be built with ``consistency_check=True``.

The cohort check (beyond the paper; it needs the signed variant). The server chooses what the
other clients submit: if it knew every input but one, the sum would tell it that one. So a
signed client also signs, with its keys, the digest of an attestation of what it will mask (its
worker's own training of the round's model under the round's configuration,
``fedsecure.worker.attest``; 32 zero bytes, ``NO_ATTESTATION``, when it has none) and the
round's parameters, and on the key broadcast it aborts (``CohortMismatch``) unless every other
client signed the very same attestation: all attest the same training, or none attests
anything. This comes before any share leaves the client. What the attestation is worth is the
worker's business: the client only compares digests.

The server learns the sum of the inputs of at least ``threshold`` clients, and nothing else (in
the semi-honest model). The server's side is ``secagg_server.SecAggServer``. Neither side does I/O: the caller carries the messages
(``fedsecure.aggregate.messages``, msgpack bytes) and decides when a phase's deadline is over.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from enum import Enum
from typing import TypeVar

import numpy as np
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedsecure.aggregate import shamir
from fedsecure.aggregate.fixedpoint import FixedPointCodec
from fedsecure.aggregate.identity import (
    SigningIdentity,
    advertised_keys_statement,
    round_digest,
    survivors_statement,
    verify,
)
from fedsecure.aggregate.masks import MaskStream, agree, derive, harary_neighbours
from fedsecure.aggregate.messages import (
    ATTESTATION_BYTES,
    NO_ATTESTATION,
    ROUND_ID_BYTES,
    AdvertiseKeys,
    ConsistencyCheck,
    EncryptedShares,
    KeyBroadcast,
    MaskedInput,
    Message,
    RoundSetup,
    ShareBundle,
    SignedAdvertiseKeys,
    SignedKeyBroadcast,
    SignedUnmaskRequest,
    SurvivorSignature,
    UnmaskRequest,
    UnmaskShares,
    decode_message,
)
from fedsecure.errors import (
    ConsistencyCheckFailed,
    SecAggInputError,
    SecAggProtocolError,
    ShareRevealRefused,
    SignatureRejected,
    TooFewSurvivors,
)

MAX_VECTOR = 1 << 33
_PAIR = struct.Struct(">II")
M = TypeVar("M", bound=Message)


class CohortMismatch(ConsistencyCheckFailed):
    """The signed key advertisements do not all carry this client's attestation: the other inputs
    were not made the way this one was (another model, another configuration, or no attested
    training at all), so the server may know them; the client aborts before sharing anything."""


class Phase(Enum):
    ADVERTISE_KEYS = "advertise-keys"
    SHARE_KEYS = "share-keys"
    MASKED_INPUT = "masked-input"
    CONSISTENCY_CHECK = "consistency-check"
    UNMASKING = "unmasking"
    DONE = "done"
    ABORTED = "aborted"


@dataclass(frozen=True, slots=True)
class AggregateResult:
    """The unmasked sum of the survivors' (clipped) inputs, within ``max_error`` of the exact sum."""

    total: np.ndarray
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    max_error: float


def check_setup(setup: RoundSetup) -> FixedPointCodec:
    """The round's codec, once the parameters are found workable and secure for honest clients."""
    n = len(setup.clients)
    holders = n if setup.degree is None or setup.degree >= n - 1 else setup.degree + 1
    if len(setup.round_id) != ROUND_ID_BYTES:
        raise SecAggInputError(f"the round id must be {ROUND_ID_BYTES} random bytes")
    if setup.degree is not None and (setup.degree < 2 or setup.degree % 2):
        raise SecAggInputError(f"the neighbour degree must be an even number >= 2, got {setup.degree}")
    if not 2 <= setup.threshold <= holders or 2 * setup.threshold <= holders:
        raise SecAggInputError(
            f"threshold {setup.threshold} must be more than half of the {holders} holders of each "
            f"client's shares (and at least 2): use {holders // 2 + 1}..{holders}"
        )
    if not 0 < setup.vector_size <= MAX_VECTOR:
        raise SecAggInputError(f"vector_size must be in [1, {MAX_VECTOR}], got {setup.vector_size}")
    codec = FixedPointCodec.from_wire(setup.codec)
    if codec.summands < n:
        raise SecAggInputError(f"the fixed-point codec allows {codec.summands} summands but {n} clients are invited")
    return codec


def _sign(u: int, v: int) -> int:
    return 1 if u < v else -1


def _share_key(private: X25519PrivateKey, public: bytes, round_id: bytes) -> AESGCM:
    return AESGCM(derive(agree(private, public), round_id=round_id, purpose=b"share-encryption", size=32))


def _pair_key(private: X25519PrivateKey, public: bytes, round_id: bytes) -> bytes:
    return derive(agree(private, public), round_id=round_id, purpose=b"pairwise-mask")


def _self_key(seed: bytes, round_id: bytes) -> bytes:
    return derive(seed, round_id=round_id, purpose=b"self-mask")


def _nonce(sender: int, recipient: int) -> bytes:
    return bytes(4) + _PAIR.pack(sender, recipient)  # one message per direction per round key


class SecAggClient:
    """One client's side of a round: one method per phase, each taking the server's message."""

    def __init__(
        self, *, client_id: int, identity: SigningIdentity | None = None, attestation: bytes | None = None
    ) -> None:
        """``attestation``: the 32-byte digest of what this client's input will be (signed
        clients only), which every other client of the round must sign too; None: none."""
        if type(client_id) is not int or not 0 < client_id < 1 << 32:
            raise SecAggInputError(f"client_id must be an int in [1, 2^32), got {client_id!r}")
        if identity is not None and not identity.owns(client_id):
            raise SecAggInputError(f"the PKI's verification key for client {client_id} is not this identity's")
        if attestation is not None:
            if identity is None:
                raise SecAggInputError("an attestation is compared through the clients' signatures: without a "
                                       "signing identity the server could invent every other client")
            if not isinstance(attestation, bytes) or len(attestation) != ATTESTATION_BYTES:
                raise SecAggInputError(f"an attestation digest is {ATTESTATION_BYTES} bytes")
        self.id = client_id
        self.identity = identity
        self.attestation = NO_ATTESTATION if attestation is None else attestation
        self.phase = Phase.ADVERTISE_KEYS
        self._cipher_sk = X25519PrivateKey.generate()
        self._mask_sk: X25519PrivateKey | None = X25519PrivateKey.generate()
        self._held: dict[int, tuple[shamir.Share, shamir.Share]] = {}  # owner -> (self-mask, key)
        self._revealed: dict[int, str] = {}

    setup: RoundSetup
    codec: FixedPointCodec
    keys: dict[int, tuple[bytes, bytes]]
    neighbours: frozenset[int]

    def _accept(self, msg: Message | bytes | bytearray | memoryview, kind: type[M], phase: Phase) -> M:
        if isinstance(msg, bytes | bytearray | memoryview):
            msg = decode_message(msg)
        if self.phase is not Phase.ADVERTISE_KEYS and msg.round_id != self.setup.round_id:
            raise SecAggProtocolError(f"{type(msg).__name__} belongs to another round: replayed or late")
        if not isinstance(msg, kind) or self.phase is not phase:
            raise SecAggProtocolError(
                f"client {self.id} got {type(msg).__name__} in phase {self.phase.value}, expected {kind.__name__}"
            )
        return msg

    def advertise_keys(self, message: RoundSetup | bytes) -> AdvertiseKeys | SignedAdvertiseKeys:
        """Phase 0: check the round's parameters and answer with two fresh public keys."""
        setup = self._accept(message, RoundSetup, Phase.ADVERTISE_KEYS)
        try:
            self.codec = check_setup(setup)
        except SecAggInputError as exc:
            raise SecAggProtocolError(f"client {self.id} refuses the round: {exc}") from exc
        if self.id not in setup.clients:
            raise SecAggProtocolError(f"client {self.id} is not among the round's clients")
        if self.identity is not None:
            unknown = [v for v in setup.clients if self.identity.key_of(v) is None]
            if unknown:
                raise SignatureRejected(f"client {self.id} refuses the round: the PKI knows no clients {unknown[:10]}")
        self.setup = setup
        self._round = round_digest(setup)  # what the signatures on the advertised keys cover
        self.phase = Phase.SHARE_KEYS
        assert self._mask_sk is not None
        cipher, mask = self._cipher_sk.public_key().public_bytes_raw(), self._mask_sk.public_key().public_bytes_raw()
        if self.identity is None:
            return AdvertiseKeys(setup.round_id, self.id, cipher, mask)
        signature = self.identity.sign(advertised_keys_statement(self._round, self.id, cipher, mask, self.attestation))
        return SignedAdvertiseKeys(setup.round_id, self.id, cipher, mask, self.attestation, signature)

    def share_keys(self, message: KeyBroadcast | SignedKeyBroadcast | bytes) -> EncryptedShares:
        """Phase 1: share the self-mask seed and the mask key among the neighbours, encrypted.

        With an identity, every advertised key pair must carry its owner's valid signature, over
        this client's round parameters and the same attestation as this client's (the cohort check)."""
        if self.identity is None:
            broadcast = self._accept(message, KeyBroadcast, Phase.SHARE_KEYS)
            self.keys = {i: (c, s) for i, c, s in broadcast.keys}
        else:
            msg = decode_message(message) if isinstance(message, bytes | bytearray | memoryview) else message
            if isinstance(msg, KeyBroadcast) and self.phase is Phase.SHARE_KEYS:
                self.phase = Phase.ABORTED
                raise SignatureRejected(f"client {self.id} got an unsigned key broadcast: it takes only signed keys")
            signed = self._accept(msg, SignedKeyBroadcast, Phase.SHARE_KEYS)
            self._check_key_signatures(signed)
            self._check_cohort(signed)
            self.keys = {i: (c, s) for i, c, s, _, _ in signed.keys}
        rid = self.setup.round_id
        mine = self.keys.get(self.id)
        assert self._mask_sk is not None
        if mine != (self._cipher_sk.public_key().public_bytes_raw(), self._mask_sk.public_key().public_bytes_raw()):
            raise SecAggProtocolError(f"the key broadcast misstates client {self.id}'s own keys")
        if not set(self.keys) <= set(self.setup.clients):
            raise SecAggProtocolError("the key broadcast names clients that were not invited")
        if len({k for pair in self.keys.values() for k in pair}) != 2 * len(self.keys):
            raise SecAggProtocolError("the key broadcast repeats a public key")
        self.neighbours = harary_neighbours(list(self.keys), degree=self.setup.degree, seed=rid, only=self.id)[self.id]
        holders = sorted(self.neighbours | {self.id})
        if len(holders) < self.setup.threshold:
            raise TooFewSurvivors(f"client {self.id} has {len(holders)} share holders, fewer than "
                                  f"the threshold {self.setup.threshold}: the round cannot go on")
        self._seed = os.urandom(32)
        seed_shares = shamir.split(self._seed, threshold=self.setup.threshold, xs=holders)
        key_shares = shamir.split(self._mask_sk.private_bytes_raw(), threshold=self.setup.threshold, xs=holders)
        out = []
        self._aead: dict[int, AESGCM] = {}  # the neighbours' share-encryption keys, for phase 2 too
        for b, s in zip(seed_shares, key_shares, strict=True):
            if b.x == self.id:
                self._held[self.id] = (b, s)
                continue
            aead = self._aead[b.x] = _share_key(self._cipher_sk, self.keys[b.x][0], rid)
            out.append((b.x, aead.encrypt(_nonce(self.id, b.x), b.to_bytes() + s.to_bytes(),
                                          rid + _PAIR.pack(self.id, b.x))))
        self.phase = Phase.MASKED_INPUT
        return EncryptedShares(rid, self.id, tuple(out))

    def masked_input(self, message: ShareBundle | bytes, update: np.ndarray | torch.Tensor) -> MaskedInput:
        """Phase 2: keep the neighbours' shares, and send the update masked (flat, ``vector_size`` long)."""
        bundle = self._accept(message, ShareBundle, Phase.MASKED_INPUT)
        rid, t = self.setup.round_id, self.setup.threshold
        if bundle.recipient != self.id:
            raise SecAggProtocolError(f"client {self.id} got the share bundle of client {bundle.recipient}")
        for v, ct in bundle.ciphertexts:
            if v not in self.neighbours:
                raise SecAggProtocolError(f"client {self.id} got shares from client {v}, not a neighbour")
            try:
                plain = self._aead[v].decrypt(_nonce(v, self.id), ct, rid + _PAIR.pack(v, self.id))
            except InvalidTag:
                raise SecAggProtocolError(
                    f"the shares from client {v} failed authentication: altered, or not meant for client {self.id}"
                ) from None
            b, s = (shamir.Share.from_bytes(plain[i : i + shamir.SHARE_BYTES]) for i in (0, shamir.SHARE_BYTES))
            if b.x != self.id or s.x != self.id or len(plain) != 2 * shamir.SHARE_BYTES:
                raise SecAggProtocolError(f"the shares from client {v} are not for client {self.id}")
            self._held[v] = (b, s)
        if len(self._held) < t:
            raise TooFewSurvivors(f"client {self.id} holds shares of {len(self._held)} clients, fewer than "
                                  f"the threshold {t}: it sends no input")
        y = self.codec.encode(update)
        if y.size != self.setup.vector_size:
            raise SecAggInputError(f"the update has {y.size} entries, the round expects {self.setup.vector_size}")
        assert self._mask_sk is not None
        masks = [(_self_key(self._seed, rid), 1)]
        masks += [(_pair_key(self._mask_sk, self.keys[v][1], rid), _sign(self.id, v)) for v in self._held if v != self.id]
        MaskStream(size=y.size, dtype=self.codec.dtype).apply(y, masks)  # every mask in one sweep over y
        self._mask_sk = None  # from here on only the shares held by others can recover these
        del self._seed, self._aead
        self.phase = Phase.UNMASKING if self.identity is None else Phase.CONSISTENCY_CHECK
        return MaskedInput(rid, self.id, memoryview(y.view(np.uint8)))  # type: ignore[arg-type]

    def sign_survivors(self, message: ConsistencyCheck | bytes) -> SurvivorSignature:
        """The consistency check (active adversary only): check the survivor set U3 the server
        announces and sign it, with the round id, under the client's long-term key."""
        if self.identity is None:
            raise SecAggProtocolError(f"client {self.id} has no signing identity: the consistency check "
                                      "needs one (SecAggClient(..., identity=...))")
        check = self._accept(message, ConsistencyCheck, Phase.CONSISTENCY_CHECK)
        u3, t = set(check.survivors), self.setup.threshold
        try:
            if len(u3) < t:
                raise TooFewSurvivors(f"only {len(u3)} clients survived, fewer than the threshold {t}: "
                                      f"client {self.id} signs nothing and reveals nothing")
            if self.id not in u3:
                raise ConsistencyCheckFailed(f"client {self.id} sent its masked input but is not in the survivor set")
            if not u3 <= set(self.keys):  # U3 within U1: only clients that advertised keys
                raise ConsistencyCheckFailed(f"the survivor set names clients {sorted(u3 - set(self.keys))[:10]} "
                                             "that never advertised keys")
            unshared = sorted(v for v in self.neighbours & u3 if v not in self._held)
            if unshared:  # U3 within U2, as far as this client can see: its neighbours
                raise ConsistencyCheckFailed(f"the survivor set names clients {unshared[:10]} that never "
                                             f"shared keys with client {self.id}")
        except (SecAggProtocolError, TooFewSurvivors):
            self.phase = Phase.ABORTED
            raise
        self._u3 = tuple(sorted(u3))
        self.phase = Phase.UNMASKING
        rid = self.setup.round_id
        return SurvivorSignature(rid, self.id, self.identity.sign(survivors_statement(rid, self._u3)))

    def unmask(self, message: UnmaskRequest | SignedUnmaskRequest | bytes) -> UnmaskShares:
        """Phase 3: reveal self-mask shares of survivors and key shares of the dropped, never both.

        With an identity the request must be a ``SignedUnmaskRequest`` whose survivor set is the
        one this client signed, with valid signatures of at least ``threshold`` clients of that
        set over it; otherwise the client aborts and reveals nothing."""
        msg = decode_message(message) if isinstance(message, bytes | bytearray | memoryview) else message
        if self.identity is not None:
            if isinstance(msg, UnmaskRequest) and self.phase is Phase.UNMASKING:
                self.phase = Phase.ABORTED
                raise ConsistencyCheckFailed(f"client {self.id} got an unmask request without the survivors' "
                                             "signatures: it aborts and reveals nothing")
            msg = self._check_consistency(self._accept(msg, SignedUnmaskRequest, Phase.UNMASKING))
        if isinstance(msg, UnmaskRequest):
            self._refuse_both(msg)
        request = self._accept(msg, UnmaskRequest, Phase.UNMASKING)
        survivors, dropped = set(request.survivors), set(request.dropped)
        if len(survivors) < self.setup.threshold:
            raise TooFewSurvivors(f"only {len(survivors)} clients survived, fewer than the threshold "
                                  f"{self.setup.threshold}: client {self.id} reveals nothing")
        if self.id not in survivors:
            raise SecAggProtocolError(f"client {self.id} sent its masked input but is not listed as a survivor")
        for v in self.neighbours:
            if v in survivors and v not in self._held:
                raise SecAggProtocolError(f"client {v} is listed as a survivor but never shared its keys")
        missing = [v for v in self._held if v not in survivors | dropped]
        if missing:
            raise SecAggProtocolError(f"the unmask request does not say whether clients {missing} survived")
        seeds = tuple((v, b.to_bytes()) for v, (b, _) in self._held.items() if v in survivors)
        keys = tuple((v, s.to_bytes()) for v, (_, s) in self._held.items() if v in dropped)
        self._revealed = {v: "self-mask" for v, _ in seeds} | {v: "key" for v, _ in keys}
        self.phase = Phase.DONE
        return UnmaskShares(self.setup.round_id, self.id, seeds, keys)

    def _check_key_signatures(self, broadcast: SignedKeyBroadcast) -> None:
        assert self.identity is not None
        for v, cipher, mask, attestation, signature in broadcast.keys:
            key = self.identity.key_of(v)
            if key is None:
                self.phase = Phase.ABORTED
                raise SignatureRejected(f"the key broadcast names client {v}, which the PKI does not know")
            if not verify(key, signature, advertised_keys_statement(self._round, v, cipher, mask, attestation)):
                self.phase = Phase.ABORTED
                raise SignatureRejected(f"client {v}'s advertised keys do not carry its valid signature over "
                                        f"this round's parameters: substituted or altered, or the server told "
                                        f"clients different parameters; client {self.id} aborts")

    def _check_cohort(self, broadcast: SignedKeyBroadcast) -> None:
        """Every advertisement (each signed, checked above) carries this client's attestation."""
        others = sorted(v for v, _, _, attestation, _ in broadcast.keys if attestation != self.attestation)
        if others:
            self.phase = Phase.ABORTED
            mine = "has none" if self.attestation == NO_ATTESTATION else "attests its own training"
            raise CohortMismatch(
                f"clients {others[:10]} signed an attestation other than client {self.id}'s (which {mine}): "
                "their inputs are not the same training of the same model under the same configuration, so "
                f"the server may know them and learn this input from the sum; client {self.id} aborts and "
                "shares nothing"
            )

    def _signed_by(self, client: int, signature: bytes, statement: bytes) -> bool:
        assert self.identity is not None
        key = self.identity.key_of(client)
        return key is not None and verify(key, signature, statement)

    def _check_consistency(self, request: SignedUnmaskRequest) -> UnmaskRequest:
        """Figure 4, round 4 (active): U4 within U3, |U4| >= t, every signature valid over U3."""
        assert self.identity is not None
        t, u3 = self.setup.threshold, self._u3
        statement = survivors_statement(self.setup.round_id, u3)
        signers = {v for v, _ in request.signatures}
        problem = None
        if tuple(sorted(request.survivors)) != u3:
            problem = "the unmask request's survivor set is not the one this client signed"
        elif not signers <= set(u3):
            problem = f"signatures of clients {sorted(signers - set(u3))[:10]} outside the survivor set"
        else:
            bad = [v for v, sig in request.signatures if not self._signed_by(v, sig, statement)]
            if bad:
                problem = (f"the signatures of clients {bad[:10]} are not valid over the survivor set this "
                           "client signed: the server told different clients different sets, or forged them")
            elif len(signers) < t:
                problem = f"only {len(signers)} signatures on the survivor set, fewer than the threshold {t}"
        if problem is not None:
            self.phase = Phase.ABORTED
            raise ConsistencyCheckFailed(f"client {self.id}: {problem}; it aborts and reveals nothing")
        return UnmaskRequest(request.round_id, request.survivors, request.dropped)

    def _refuse_both(self, request: UnmaskRequest) -> None:
        both = set(request.survivors) & set(request.dropped)
        if self.id in request.dropped:
            both.add(self.id)  # its masked input went out: its key must stay secret
        for v in request.dropped:
            if self._revealed.get(v) == "self-mask":
                both.add(v)
        for v in request.survivors:
            if self._revealed.get(v) == "key":
                both.add(v)
        if both:
            raise ShareRevealRefused(
                f"client {self.id} will not reveal both the self-mask share and the key share of "
                f"clients {sorted(both)}: together they would unmask an individual input"
            )
