"""Long-term signing identities for secure aggregation against an actively malicious server.

Bonawitz et al. 2017 (CCS, "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", section 4 and figure 4, the "active adversary" lines) give every client a long-term
signing key pair, the verification keys of all clients being known to every client from a PKI.
A client signs the public keys it advertises (so the server cannot substitute its own keys for
an honest client's: no man in the middle, no Sybil clients), and in the consistency-check round
it signs the set U3 of clients whose masked inputs the server says it received (so the server
cannot tell different clients different survivor sets). The signatures here are Ed25519; what
is signed is spelled out below, with the round id and a purpose tag, so that a signature made
for one round or one purpose is worth nothing in another.

Beyond the paper, the signature on the advertised keys also covers the round's parameters as
the client received them (``round_digest``) and the digest of the client's attestation of what
it will mask (``fedsecure.worker.attest``; 32 zero bytes for none). A client checks every other
signature over its *own* parameters, so a server that told clients different parameters (a
bound of almost zero for all but one, say, to make their contributions known) is caught before
any share leaves, and the cohort check (``secagg.SecAggClient.share_keys``) compares the signed
attestations.

The verification keys must come from the federation's PKI, out of band: never from the server
(or the model owner driving the rounds), or it could simply hand out keys of its own.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedsecure.aggregate.messages import ATTESTATION_BYTES, SIGNATURE_BYTES, RoundSetup
from fedsecure.errors import SecAggInputError
from fedsecure.wire import codec

VERIFY_KEY_BYTES = 32
_KEYS_TAG = b"fedsecure/secagg/v2/advertised-keys"  # v2: with the round's parameters and the attestation
_SURVIVORS_TAG = b"fedsecure/secagg/v1/survivor-set"
_SETUP_TAG = b"fedsecure/secagg/v1/round-setup"
_ID = struct.Struct(">I")


def round_digest(setup: RoundSetup) -> bytes:
    """SHA-256 of the round's public parameters (round id included), exactly as received."""
    fields = [setup.round_id, list(setup.clients), setup.threshold, setup.vector_size,
              [[k, setup.codec[k]] for k in sorted(setup.codec)], setup.degree]
    return hashlib.sha256(_SETUP_TAG + codec.encode(fields)).digest()


def advertised_keys_statement(
    setup_digest: bytes, client_id: int, cipher_key: bytes, mask_key: bytes, attestation: bytes
) -> bytes:
    """The bytes a client signs over its two advertised public keys (figure 4, round 0), the
    round's parameters (``setup_digest``: the ``round_digest`` of its setup) and the digest of
    its attestation (32 zero bytes for none)."""
    if len(setup_digest) != 32 or len(attestation) != ATTESTATION_BYTES:
        raise SecAggInputError(f"the round's digest and the attestation's are 32 bytes each, got "
                               f"{len(setup_digest)} and {len(attestation)}")
    return b"".join((_KEYS_TAG, setup_digest, _ID.pack(client_id), cipher_key, mask_key, attestation))


def survivors_statement(round_id: bytes, survivors: Iterable[int]) -> bytes:
    """The bytes a client signs over the survivor set U3 (figure 4, round 3): sorted ids, counted."""
    ids = sorted(survivors)
    return b"".join((_SURVIVORS_TAG, bytes([len(round_id)]), round_id, _ID.pack(len(ids)), *map(_ID.pack, ids)))


def verify_key(value: Ed25519PublicKey | bytes) -> Ed25519PublicKey:
    """An Ed25519 verification key, from the key itself or its 32 raw bytes."""
    if isinstance(value, Ed25519PublicKey):
        return value
    if isinstance(value, bytes) and len(value) == VERIFY_KEY_BYTES:
        try:
            return Ed25519PublicKey.from_public_bytes(value)
        except ValueError as exc:
            raise SecAggInputError(f"not an Ed25519 verification key: {exc}") from exc
    raise SecAggInputError(f"a verification key is an Ed25519PublicKey or its {VERIFY_KEY_BYTES} raw bytes")


def verify(key: Ed25519PublicKey, signature: bytes, statement: bytes) -> bool:
    """Whether ``signature`` is ``key``'s Ed25519 signature of ``statement``."""
    if len(signature) != SIGNATURE_BYTES:
        return False
    try:
        key.verify(signature, statement)
    except InvalidSignature:
        return False
    return True


def verify_keys(keys: Mapping[int, Ed25519PublicKey | bytes]) -> dict[int, Ed25519PublicKey]:
    """The PKI as client id -> Ed25519 verification key, each checked."""
    out = {}
    for cid, key in keys.items():
        if type(cid) is not int or not 0 < cid < 1 << 32:
            raise SecAggInputError(f"the PKI names client {cid!r}: client ids are ints in [1, 2^32)")
        out[cid] = verify_key(key)
    return out


@dataclass(frozen=True)
class SigningIdentity:
    """A client's long-term Ed25519 signing key and every client's verification key (the PKI).

    ``verify_keys`` must reach the client out of band, from whoever runs the federation's PKI,
    not from the server it protects the client against.
    """

    signing_key: Ed25519PrivateKey = field(repr=False)
    verify_keys: Mapping[int, Ed25519PublicKey | bytes]

    def __post_init__(self) -> None:
        if not isinstance(self.signing_key, Ed25519PrivateKey):
            raise SecAggInputError("signing_key must be an Ed25519PrivateKey")
        object.__setattr__(self, "verify_keys", verify_keys(self.verify_keys))

    def key_of(self, client_id: int) -> Ed25519PublicKey | None:
        key = self.verify_keys.get(client_id)
        return key if isinstance(key, Ed25519PublicKey) else None

    def sign(self, statement: bytes) -> bytes:
        return self.signing_key.sign(statement)

    def owns(self, client_id: int) -> bool:
        """Whether the PKI's key for ``client_id`` is this identity's own."""
        key = self.key_of(client_id)
        mine = self.signing_key.public_key().public_bytes_raw()
        return key is not None and key.public_bytes_raw() == mine


def generate_federation(client_ids: Iterable[int]) -> dict[int, SigningIdentity]:
    """Fresh identities for ``client_ids``, each knowing all verification keys: a PKI in one place,
    for tests, benchmarks and simulations (a deployment distributes the public half out of band)."""
    private = {cid: Ed25519PrivateKey.generate() for cid in client_ids}
    public = {cid: key.public_key() for cid, key in private.items()}
    return {cid: SigningIdentity(key, public) for cid, key in private.items()}
