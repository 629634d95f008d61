"""The server's (aggregator's) side of secure aggregation: a sans-I/O state machine.

Bonawitz et al. 2017 (CCS, "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", figure 4), server side: collect keys, route encrypted shares, add the masked inputs
as they come (one running sum: memory does not grow with the number of clients), then remove
the masks from the shares the survivors reveal. The caller feeds every client message to
``receive`` and ends each phase (its deadline) with the matching ``end_*`` method; a client
whose message did not arrive by then has dropped. Whenever fewer than ``threshold`` clients
are left the round aborts with ``TooFewSurvivors`` before anything is revealed. See
``fedsecure.aggregate.secagg`` for the protocol.

With ``consistency_check=True`` the server runs the active-adversary variant of figure 4: it
takes signed key advertisements and broadcasts the signatures with the keys, and
``end_masked_input`` opens the consistency-check round (``ConsistencyCheck`` announcing U3)
instead of unmasking; ``end_consistency_check`` then sends the collected signatures, from the
clients U4 that signed, with the unmask request. As in the paper, the sum is still over all of
U3: a client of U3 that did not sign is asked for no shares, and its self-mask is recovered from
the others' shares, like a client that drops during unmasking. Each signed advertisement
carries the digest of the client's attestation (the cohort check, see ``secagg``); the server
relays it with the keys and the signature, and the clients compare them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import NoReturn

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedsecure.aggregate import shamir
from fedsecure.aggregate.fixedpoint import FixedPointCodec
from fedsecure.aggregate.identity import (
    advertised_keys_statement,
    round_digest,
    survivors_statement,
    verify,
    verify_keys,
)
from fedsecure.aggregate.masks import MaskStream, harary_neighbours
from fedsecure.aggregate.messages import (
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
from fedsecure.aggregate.secagg import AggregateResult, Phase, _pair_key, _self_key, _sign, check_setup
from fedsecure.errors import (
    SecAggInputError,
    SecAggProtocolError,
    ShareReconstructionError,
    SignatureRejected,
    TooFewSurvivors,
)

_verify_keys = verify_keys

_ACCEPTS: dict[type[Message], Phase] = {
    AdvertiseKeys: Phase.ADVERTISE_KEYS,
    EncryptedShares: Phase.SHARE_KEYS,
    MaskedInput: Phase.MASKED_INPUT,
    UnmaskShares: Phase.UNMASKING,
}
_ACCEPTS_CHECKED: dict[type[Message], Phase] = {
    SignedAdvertiseKeys: Phase.ADVERTISE_KEYS,
    EncryptedShares: Phase.SHARE_KEYS,
    MaskedInput: Phase.MASKED_INPUT,
    SurvivorSignature: Phase.CONSISTENCY_CHECK,
    UnmaskShares: Phase.UNMASKING,
}


class SecAggServer:
    """The aggregator's side of one round: ``receive`` client messages, ``end_*`` each phase."""

    def __init__(
        self,
        *,
        clients: Sequence[int],
        threshold: int,
        vector_size: int,
        bound: float,
        bits: int = 32,
        frac_bits: int | None = None,
        degree: int | None = None,
        consistency_check: bool = False,
        verify_keys: Mapping[int, Ed25519PublicKey | bytes] | None = None,
    ) -> None:
        """``consistency_check``: the active-adversary variant, for clients with signing identities.
        ``verify_keys`` (optional, with it): the PKI's keys, to turn away badly signed messages on
        arrival, so that one faulty client cannot make every honest client abort."""
        if verify_keys is not None and not consistency_check:
            raise SecAggInputError("verify_keys is for the consistency-check variant: set consistency_check=True")
        self.consistency_check = consistency_check
        self._pki = None if verify_keys is None else _verify_keys(verify_keys)
        self._accepts = _ACCEPTS_CHECKED if consistency_check else _ACCEPTS
        self._signatures: dict[int, bytes] = {}  # on the advertised keys, then on U3
        self.attestations: dict[int, bytes] = {}  # the signed advertisements' attestation digests
        codec = FixedPointCodec(summands=len(clients), bound=bound, bits=bits, frac_bits=frac_bits)
        if len(set(clients)) != len(clients) or not all(type(c) is int and 0 < c < 1 << 32 for c in clients):
            raise SecAggInputError("clients must be distinct int ids in [1, 2^32)")
        self.setup = RoundSetup(os.urandom(ROUND_ID_BYTES), tuple(sorted(clients)), threshold, vector_size,
                                codec.to_wire(), degree)
        self.codec = check_setup(self.setup)
        self._round = round_digest(self.setup)
        self.phase = Phase.ADVERTISE_KEYS
        self._eligible: set[int] = set(clients)
        self._got: dict[int, Message] = {}
        self.keys: dict[int, tuple[bytes, bytes]] = {}
        self._total = np.zeros(vector_size, self.codec.dtype)
        self._contributors: list[int] = []

    @property
    def round_id(self) -> bytes:
        return self.setup.round_id

    def receive(self, msg: Message | bytes) -> None:
        """Take one client message of the current phase; a bad one raises and changes nothing."""
        if isinstance(msg, bytes | bytearray | memoryview):
            msg = decode_message(msg)
        if msg.round_id != self.round_id:
            raise SecAggProtocolError(f"{type(msg).__name__} belongs to another round: replayed or late")
        if self._accepts.get(type(msg)) is not self.phase:
            if isinstance(msg, SignedAdvertiseKeys | AdvertiseKeys) and self.phase is Phase.ADVERTISE_KEYS:
                signed = isinstance(msg, SignedAdvertiseKeys)
                raise SecAggProtocolError(
                    f"client {getattr(msg, 'sender', '?')} {'signs' if signed else 'does not sign'} its keys, so it "
                    f"takes part only {'with' if signed else 'without'} the consistency check; this round runs "
                    f"{'without' if signed else 'with'} it (consistency_check={not signed} would match)"
                )
            raise SecAggProtocolError(f"{type(msg).__name__} is not accepted in phase {self.phase.value}")
        sender: int = msg.sender  # type: ignore[attr-defined]
        if sender in self._got:
            raise SecAggProtocolError(f"client {sender} sent a second {type(msg).__name__}: a replay")
        if sender not in self._eligible:
            raise SecAggProtocolError(f"client {sender} takes no part in phase {self.phase.value}")
        if isinstance(msg, AdvertiseKeys | SignedAdvertiseKeys):
            taken = {k for pair in self.keys.values() for k in pair}
            if msg.cipher_key == msg.mask_key or {msg.cipher_key, msg.mask_key} & taken:
                raise SecAggProtocolError(f"client {sender} advertised a public key already in use")
            if isinstance(msg, SignedAdvertiseKeys):
                statement = advertised_keys_statement(self._round, sender, msg.cipher_key, msg.mask_key,
                                                      msg.attestation)
                self._check_signature(sender, msg.signature, statement, "advertised keys")
                self._signatures[sender] = msg.signature
                self.attestations[sender] = msg.attestation
            self.keys[sender] = (msg.cipher_key, msg.mask_key)
        elif isinstance(msg, SurvivorSignature):
            self._check_signature(sender, msg.signature, survivors_statement(self.round_id, self.u3), "survivor set")
            self._signatures[sender] = msg.signature
        elif isinstance(msg, EncryptedShares):
            if {v for v, _ in msg.ciphertexts} != self.neighbours[sender]:
                raise SecAggProtocolError(f"client {sender} did not send exactly one ciphertext to each neighbour")
        elif isinstance(msg, MaskedInput):
            if len(msg.data) != self._total.nbytes:
                raise SecAggProtocolError(f"client {sender}'s masked input has {len(msg.data)} bytes, "
                                          f"expected {self._total.nbytes}")
            np.add(self._total, msg.vector(self.codec.dtype), out=self._total)
            self._contributors.append(sender)
            msg = MaskedInput(msg.round_id, sender, b"")  # the sum holds it now
        elif isinstance(msg, UnmaskShares):
            self._check_unmask_shares(msg)
        self._got[sender] = msg

    def end_advertise_keys(self) -> KeyBroadcast | SignedKeyBroadcast:
        """Close phase 0: everyone's public keys, to every client that advertised."""
        self._expect(Phase.ADVERTISE_KEYS)
        self.u1 = self._advance(Phase.SHARE_KEYS)
        self.neighbours = harary_neighbours(self.u1, degree=self.setup.degree, seed=self.round_id)
        if self.consistency_check:
            signed = SignedKeyBroadcast(self.round_id, tuple((i, *self.keys[i], self.attestations[i], self._signatures[i])
                                                             for i in self.u1))
            self._signatures = {}
            return signed
        return KeyBroadcast(self.round_id, tuple((i, *self.keys[i]) for i in self.u1))

    def end_share_keys(self) -> dict[int, ShareBundle]:
        """Close phase 1: for each client that shared, the ciphertexts addressed to it."""
        self._expect(Phase.SHARE_KEYS)
        shared = {u: m for u, m in self._got.items() if isinstance(m, EncryptedShares)}
        self.u2 = self._advance(Phase.MASKED_INPUT)
        inbox: dict[int, list[tuple[int, bytes]]] = {v: [] for v in self.u2}
        for u in self.u2:
            for v, ct in shared[u].ciphertexts:
                if v in inbox:
                    inbox[v].append((u, ct))
        return {v: ShareBundle(self.round_id, v, tuple(cts)) for v, cts in inbox.items()}

    def end_masked_input(self) -> UnmaskRequest | ConsistencyCheck:
        """Close phase 2: tell the clients that sent masked inputs who survived and who dropped;
        with the consistency check, only who survived (U3), for them to sign."""
        self._expect(Phase.MASKED_INPUT)
        self.u3 = self._advance(Phase.CONSISTENCY_CHECK if self.consistency_check else Phase.UNMASKING)
        self.dropped = tuple(sorted(set(self.u2) - set(self.u3)))
        self._check_holders(self.u3)
        if self.consistency_check:
            return ConsistencyCheck(self.round_id, self.u3)
        return UnmaskRequest(self.round_id, self.u3, self.dropped)

    def end_consistency_check(self) -> SignedUnmaskRequest:
        """Close the consistency check: to the clients that signed U3 (U4), the unmask request with
        their signatures. The survivors stay U3: the sum is over every masked input received."""
        self._expect(Phase.CONSISTENCY_CHECK)
        signatures, self._signatures = self._signatures, {}
        self.u4 = self._advance(Phase.UNMASKING)
        self._check_holders(self.u4)
        return SignedUnmaskRequest(self.round_id, self.u3, self.dropped, tuple((v, signatures[v]) for v in self.u4))

    def end_unmasking(self) -> AggregateResult:
        """Close phase 3: reconstruct the secrets, remove every mask and decode the sum."""
        self._expect(Phase.UNMASKING)
        answers = [m for m in self._got.values() if isinstance(m, UnmaskShares)]
        if len(answers) < self.setup.threshold:
            self._abort(f"only {len(answers)} clients revealed shares, fewer than the threshold {self.setup.threshold}")
        seeds: dict[int, list[shamir.Share]] = {u: [] for u in self.u3}
        keys: dict[int, list[shamir.Share]] = {v: [] for v in self.dropped}
        for m in answers:
            for owner, raw in m.self_mask_shares:
                seeds[owner].append(shamir.Share.from_bytes(raw))
            for owner, raw in m.key_shares:
                keys[owner].append(shamir.Share.from_bytes(raw))
        for owner, shares in [*seeds.items(), *keys.items()]:
            if len(shares) < self.setup.threshold:  # before any mask is removed
                self._abort(f"only {len(shares)} shares of client {owner}'s secrets arrived, "
                            f"fewer than the threshold {self.setup.threshold}")
        total = self._total
        masks: list[tuple[bytes, int]] = []  # every mask to remove: the secrets are all checked first
        for v, shares in keys.items():
            sk = X25519PrivateKey.from_private_bytes(self._recover(v, shares, "mask key"))
            if sk.public_key().public_bytes_raw() != self.keys[v][1]:
                raise SecAggProtocolError(f"the key shares of client {v} reconstruct a key it never advertised")
            masks += [(_pair_key(sk, self.keys[u][1], self.round_id), -_sign(u, v))
                      for u in sorted(self.neighbours[v] & set(self.u3))]
        for u, shares in seeds.items():
            masks.append((_self_key(self._recover(u, shares, "self-mask seed"), self.round_id), -1))
        MaskStream(size=total.size, dtype=self.codec.dtype).apply(total, masks)  # one sweep over the sum
        self.phase = Phase.DONE
        n = len(self.u3)
        return AggregateResult(self.codec.decode(total, summands=n), self.u3, self.dropped, self.codec.max_error(n))

    # -- helpers ---------------------------------------------------------------------------

    def _check_holders(self, answering: tuple[int, ...]) -> None:
        """Abort unless every secret can be recovered should all of ``answering`` answer."""
        t, alive = self.setup.threshold, set(answering)
        for v in self.u2:
            holders = len(alive & (self.neighbours[v] | {v}))
            if holders < t:
                self._abort(f"client {v}'s shares are held by only {holders} survivors, fewer than {t}")

    def _check_signature(self, sender: int, signature: bytes, statement: bytes, what: str) -> None:
        if self._pki is None:
            return
        key = self._pki.get(sender)
        if key is None or not verify(key, signature, statement):
            raise SignatureRejected(f"client {sender}'s signature on its {what} is not valid under the PKI's key")

    def _check_unmask_shares(self, msg: UnmaskShares) -> None:
        mine = self.neighbours[msg.sender] | {msg.sender}
        alive = set(self.u3)
        for owner, _ in msg.self_mask_shares:
            if owner not in alive or owner not in mine:
                raise SecAggProtocolError(f"client {msg.sender} revealed a self-mask share of client {owner}, "
                                          "which is not its neighbour among the survivors")
        for owner, _ in msg.key_shares:
            if owner not in self.dropped or owner not in mine:
                raise SecAggProtocolError(f"client {msg.sender} revealed a key share of client {owner}, "
                                          "which is not its neighbour among the dropped")
        for _, raw in msg.self_mask_shares + msg.key_shares:
            if shamir.Share.from_bytes(raw).x != msg.sender:
                raise SecAggProtocolError(f"client {msg.sender} revealed a share that is not its own")

    def _recover(self, owner: int, shares: list[shamir.Share], what: str) -> bytes:
        t = self.setup.threshold
        if len(shares) < t:
            self._abort(f"only {len(shares)} shares of client {owner}'s {what} arrived, fewer than {t}")
        try:  # exactly t: the same holders give the same (cached) Lagrange coefficients
            secret = shamir.reconstruct(sorted(shares, key=lambda s: s.x)[:t], threshold=t)
        except ShareReconstructionError as exc:
            raise ShareReconstructionError(f"client {owner}'s {what}: {exc}") from exc
        if len(secret) != 32:
            raise SecAggProtocolError(f"client {owner}'s {what} reconstructs to {len(secret)} bytes, not 32")
        return secret

    def _expect(self, phase: Phase) -> None:
        if self.phase is not phase:
            raise SecAggInputError(f"the round is in phase {self.phase.value}, not {phase.value}: "
                                   f"the phases are {', '.join(p.value for p in self._phases())}")

    def _phases(self) -> list[Phase]:
        return [p for p in Phase if p not in (Phase.DONE, Phase.ABORTED)
                and (self.consistency_check or p is not Phase.CONSISTENCY_CHECK)]

    def _advance(self, nxt: Phase) -> tuple[int, ...]:
        arrived = tuple(sorted(self._got))
        if len(arrived) < self.setup.threshold:
            self._abort(f"only {len(arrived)} clients completed phase {self.phase.value}, "
                        f"fewer than the threshold {self.setup.threshold}")
        self.phase, self._eligible, self._got = nxt, set(arrived), {}
        return arrived

    def _abort(self, why: str) -> NoReturn:
        self.phase = Phase.ABORTED
        self._total = np.zeros(0, self.codec.dtype)
        raise TooFewSurvivors(f"{why}: the round is aborted and nothing is revealed")
