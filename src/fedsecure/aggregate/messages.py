"""The messages of secure aggregation: small frozen values that encode to msgpack bytes.

Each message is one of the phases of Bonawitz et al. 2017 (CCS, "Practical Secure Aggregation
for Privacy-Preserving Machine Learning", figure 4): the server's message that opens a phase,
and each client's answer. Every message names its round (``round_id``), so a message of an
earlier round is recognised as a replay. Each field's annotation says what it must be
(`fedsecure.wire.fields`); ``decode_message`` checks every field and builds only these types (through ``fedsecure.wire.codec``, never pickle); anything malformed raises
``SecAggProtocolError``. Sender ids in client messages must be checked against the transport's
authenticated peer by whoever carries them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Annotated, Any, ClassVar, TypeVar

import numpy as np

from fedsecure.errors import ProtocolError, SecAggProtocolError
from fedsecure.wire import codec
from fedsecure.wire import fields as wf

ROUND_ID_BYTES = 16
SIGNATURE_BYTES = 64  # Ed25519
ATTESTATION_BYTES = 32
NO_ATTESTATION = bytes(ATTESTATION_BYTES)  # a signed advertisement's attestation when the client has none
MAX_ID = (1 << 32) - 1
Pair = tuple[int, bytes]


def _id(v: Any, name: str) -> int:
    if type(v) is not int or not 0 < v <= MAX_ID:
        raise SecAggProtocolError(f"{name} must be a client id in [1, {MAX_ID}], got {v!r:.40}")
    return v


def _count(v: Any, name: str) -> int:
    if type(v) is not int or v < 0:
        raise SecAggProtocolError(f"{name} must be a non-negative int, got {v!r:.40}")
    return v


def _bytes(size: int | None) -> Callable[[Any, str], bytes]:
    def check(v: Any, name: str) -> bytes:
        if not isinstance(v, bytes) or (size is not None and len(v) != size):
            raise SecAggProtocolError(f"{name} must be {size or 'some'} bytes, got {type(v).__name__} {v!r:.40}")
        return v

    return check


def _ids(v: Any, name: str) -> tuple[int, ...]:
    if not isinstance(v, list | tuple):
        raise SecAggProtocolError(f"{name} must be a list of client ids")
    out = tuple(_id(x, name) for x in v)
    if len(set(out)) != len(out):
        raise SecAggProtocolError(f"{name} lists a client twice")
    return out


def _pairs(v: Any, name: str) -> tuple[Pair, ...]:
    if not isinstance(v, list | tuple) or not all(isinstance(p, list | tuple) and len(p) == 2 for p in v):
        raise SecAggProtocolError(f"{name} must be a list of [client id, bytes] pairs")
    out = tuple((_id(i, name), _bytes(None)(b, name)) for i, b in v)
    if len({i for i, _ in out}) != len(out):
        raise SecAggProtocolError(f"{name} names a client twice")
    return out


def _keys(v: Any, name: str) -> tuple[tuple[int, bytes, bytes], ...]:
    if not isinstance(v, list | tuple) or not all(isinstance(p, list | tuple) and len(p) == 3 for p in v):
        raise SecAggProtocolError(f"{name} must be a list of [client id, key, key] triples")
    key = _bytes(32)
    out = tuple((_id(i, name), key(a, name), key(b, name)) for i, a, b in v)
    if len({i for i, _, _ in out}) != len(out):
        raise SecAggProtocolError(f"{name} names a client twice")
    return out


def _signed_keys(v: Any, name: str) -> tuple[tuple[int, bytes, bytes, bytes, bytes], ...]:
    if not isinstance(v, list | tuple) or not all(isinstance(p, list | tuple) and len(p) == 5 for p in v):
        raise SecAggProtocolError(f"{name} must be a list of [client id, key, key, attestation, signature] entries")
    key, attestation, sig = _bytes(32), _bytes(ATTESTATION_BYTES), _bytes(SIGNATURE_BYTES)
    out = tuple((_id(i, name), key(a, name), key(b, name), attestation(t, name), sig(s, name)) for i, a, b, t, s in v)
    if len({entry[0] for entry in out}) != len(out):
        raise SecAggProtocolError(f"{name} names a client twice")
    return out


def _signatures(v: Any, name: str) -> tuple[Pair, ...]:
    out = _pairs(v, name)
    sig = _bytes(SIGNATURE_BYTES)
    for _, s in out:
        sig(s, name)
    return out


def _optional_count(v: Any, name: str) -> int | None:
    return None if v is None else _count(v, name)


# What each field must be, said in its annotation (`fedsecure.wire.fields`).
RoundId = Annotated[bytes, _bytes(ROUND_ID_BYTES)]
ClientId = Annotated[int, _id]
ClientIds = Annotated[tuple[int, ...], _ids]
Count = Annotated[int, _count]
OptionalCount = Annotated[int | None, _optional_count]
Key = Annotated[bytes, _bytes(32)]  # an X25519 public key
AttestationDigest = Annotated[bytes, _bytes(ATTESTATION_BYTES)]
Signature = Annotated[bytes, _bytes(SIGNATURE_BYTES)]
Data = Annotated[bytes | memoryview, _bytes(None)]
Pairs = Annotated[tuple[Pair, ...], _pairs]
Keys = Annotated[tuple[tuple[int, bytes, bytes], ...], _keys]
SignedKeys = Annotated[tuple[tuple[int, bytes, bytes, bytes, bytes], ...], _signed_keys]
Signatures = Annotated[tuple[Pair, ...], _signatures]
Settings = Annotated[dict[str, Any], wf.anything]


class Message:
    """Base of the messages below: ``encode()`` to bytes, ``decode_message`` back."""

    KIND: ClassVar[str]
    CHECKS: ClassVar[tuple[wf.Check, ...]]  # each field's, from its annotation
    WHERE: ClassVar[tuple[str, ...]]  # each field's name in errors ("AdvertiseKeys.sender")
    round_id: bytes

    def encode(self) -> bytes:
        values = (getattr(self, f.name) for f in fields(self))  # type: ignore[arg-type]
        return codec.encode([self.KIND, *(_plain(v) for v in values)])


MESSAGES: dict[str, type[Message]] = {}
M = TypeVar("M", bound=type[Message])


def _message(cls: M) -> M:
    """Register a message class under its ``KIND``, with the checks of its fields."""
    cls.CHECKS, cls.WHERE = wf.checks(cls)
    MESSAGES[cls.KIND] = cls
    return cls


def _plain(value: Any) -> Any:
    """Tuples as msgpack lists (the codec would make each one an extension value)."""
    return [_plain(v) for v in value] if isinstance(value, tuple) else value


@_message
@dataclass(frozen=True, slots=True)
class RoundSetup(Message):
    """Server to the invited clients: the round's public parameters (fixed-point: ``codec``)."""

    KIND = "secagg/setup"
    round_id: RoundId
    clients: ClientIds
    threshold: Count
    vector_size: Count
    codec: Settings
    degree: OptionalCount


@_message
@dataclass(frozen=True, slots=True)
class AdvertiseKeys(Message):
    """Client to server: its two X25519 public keys (share encryption, masks)."""

    KIND = "secagg/advertise-keys"
    round_id: RoundId
    sender: ClientId
    cipher_key: Key
    mask_key: Key


@_message
@dataclass(frozen=True, slots=True)
class KeyBroadcast(Message):
    """Server to the clients that advertised: everyone's public keys, as (id, cipher, mask)."""

    KIND = "secagg/key-broadcast"
    round_id: RoundId
    keys: Keys


@_message
@dataclass(frozen=True, slots=True)
class EncryptedShares(Message):
    """Client to server: for each neighbour, its shares encrypted to it, as (recipient, ciphertext)."""

    KIND = "secagg/encrypted-shares"
    round_id: RoundId
    sender: ClientId
    ciphertexts: Pairs


@_message
@dataclass(frozen=True, slots=True)
class ShareBundle(Message):
    """Server to one client: the ciphertexts addressed to it, as (sender, ciphertext)."""

    KIND = "secagg/share-bundle"
    round_id: RoundId
    recipient: ClientId
    ciphertexts: Pairs


@_message
@dataclass(frozen=True, slots=True)
class MaskedInput(Message):
    """Client to server: its masked, fixed-point update (raw little-endian ring elements)."""

    KIND = "secagg/masked-input"
    round_id: RoundId
    sender: ClientId
    data: Data

    def vector(self, dtype: np.dtype[Any] | type[np.unsignedinteger[Any]]) -> np.ndarray:
        if len(self.data) % np.dtype(dtype).itemsize:
            raise SecAggProtocolError(f"a masked input of {len(self.data)} bytes is not whole ring elements")
        return np.frombuffer(self.data, dtype=np.dtype(dtype).newbyteorder("<"))

    def encode(self) -> bytes:
        """The same bytes as ``Message.encode``, with the vector copied once: msgpack's head, then it."""
        data = memoryview(self.data)
        if not data.c_contiguous or data.nbytes >= 1 << 32:
            return Message.encode(self)  # msgpack says what is wrong
        data = data.cast("B")
        head = codec.encode([self.KIND, self.round_id, self.sender])  # a fixarray of 3: one header byte
        size = data.nbytes
        bin_head = (b"\xc4" + size.to_bytes(1, "big") if size < 1 << 8 else
                    b"\xc5" + size.to_bytes(2, "big") if size < 1 << 16 else b"\xc6" + size.to_bytes(4, "big"))
        return b"".join((b"\x94", memoryview(head)[1:], bin_head, data))


@_message
@dataclass(frozen=True, slots=True)
class UnmaskRequest(Message):
    """Server to the clients that sent masked inputs: who survived, who dropped."""

    KIND = "secagg/unmask-request"
    round_id: RoundId
    survivors: ClientIds
    dropped: ClientIds


@_message
@dataclass(frozen=True, slots=True)
class UnmaskShares(Message):
    """Client to server: shares of survivors' self-mask seeds and of dropped clients' mask keys."""

    KIND = "secagg/unmask-shares"
    round_id: RoundId
    sender: ClientId
    self_mask_shares: Pairs
    key_shares: Pairs


# -- the active-adversary variant (Bonawitz et al. 2017, figure 4 with signatures): used instead
# of AdvertiseKeys, KeyBroadcast and UnmaskRequest when the clients have signing identities, and
# the consistency-check round between masked input and unmasking.


@_message
@dataclass(frozen=True, slots=True)
class SignedAdvertiseKeys(Message):
    """Client to server: ``AdvertiseKeys`` with the digest of the client's attestation of what it
    will mask (``NO_ATTESTATION`` if none) and its long-term signature over the two keys, that
    attestation and the round's parameters (``identity.advertised_keys_statement``)."""

    KIND = "secagg/signed-advertise-keys"
    round_id: RoundId
    sender: ClientId
    cipher_key: Key
    mask_key: Key
    attestation: AttestationDigest
    signature: Signature


@_message
@dataclass(frozen=True, slots=True)
class SignedKeyBroadcast(Message):
    """Server to the clients that advertised: everyone's keys, attestations and signatures, as
    (id, cipher, mask, attestation, sig)."""

    KIND = "secagg/signed-key-broadcast"
    round_id: RoundId
    keys: SignedKeys


@_message
@dataclass(frozen=True, slots=True)
class ConsistencyCheck(Message):
    """Server to the clients whose masked inputs arrived: that set, U3, for each of them to sign."""

    KIND = "secagg/consistency-check"
    round_id: RoundId
    survivors: ClientIds


@_message
@dataclass(frozen=True, slots=True)
class SurvivorSignature(Message):
    """Client to server: its signature over the round and the survivor set it was told
    (``identity.survivors_statement``)."""

    KIND = "secagg/survivor-signature"
    round_id: RoundId
    sender: ClientId
    signature: Signature


@_message
@dataclass(frozen=True, slots=True)
class SignedUnmaskRequest(Message):
    """Server to the clients that signed (U4): ``UnmaskRequest`` with the collected signatures over
    the survivor set, as (signer, signature)."""

    KIND = "secagg/signed-unmask-request"
    round_id: RoundId
    survivors: ClientIds
    dropped: ClientIds
    signatures: Signatures


def decode_message(data: bytes | bytearray | memoryview) -> Message:
    """The message encoded in ``data``; anything malformed raises ``SecAggProtocolError``.

    A ``MaskedInput`` in ``bytes`` (immutable) keeps its vector as a view of ``data``, not a copy.
    """
    if type(data) is bytes:
        masked = _masked_input(data)
        if masked is not None:
            return masked
    try:
        value = codec.decode(data)
    except ProtocolError as exc:
        raise SecAggProtocolError(f"undecodable secure-aggregation message: {exc}") from exc
    if not isinstance(value, list) or not value or not isinstance(value[0], str) or value[0] not in MESSAGES:
        raise SecAggProtocolError(f"not a secure-aggregation message: {str(value)[:60]}")
    cls = MESSAGES[value[0]]
    if len(value) != len(cls.CHECKS) + 1:
        raise SecAggProtocolError(f"{cls.__name__} has {len(cls.CHECKS)} fields, got {len(value) - 1}")
    return wf.build(cls, cls.CHECKS, cls.WHERE, value[1:])


_MASKED_HEAD = b"\x94" + codec.encode(MaskedInput.KIND) + b"\xc4" + bytes([ROUND_ID_BYTES])
_UINT_WIDTH = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}  # msgpack's unsigned ints, by type byte
_BIN_WIDTH = {0xC4: 1, 0xC5: 2, 0xC6: 4}  # msgpack's bin 8, 16, 32: bytes of the length


def _masked_input(data: bytes) -> MaskedInput | None:
    """A ``MaskedInput`` laid out as ``MaskedInput.encode`` writes it, read with its vector as a view
    of ``data``; None for anything else, which ``decode_message``'s general path then reads or refuses."""
    start = len(_MASKED_HEAD)
    pos = start + ROUND_ID_BYTES
    if len(data) <= pos or not data.startswith(_MASKED_HEAD):
        return None
    tag = data[pos]
    if tag < 0x80:  # positive fixint
        sender, pos = tag, pos + 1
    elif tag in _UINT_WIDTH:
        width = _UINT_WIDTH[tag]
        sender, pos = int.from_bytes(data[pos + 1 : pos + 1 + width], "big"), pos + 1 + width
    else:
        return None
    if pos >= len(data) or data[pos] not in _BIN_WIDTH:
        return None
    width = _BIN_WIDTH[data[pos]]
    size, pos = int.from_bytes(data[pos + 1 : pos + 1 + width], "big"), pos + 1 + width
    if pos + size != len(data):  # truncated, or something after it
        return None
    return MaskedInput(data[start : start + ROUND_ID_BYTES], _id(sender, "MaskedInput.sender"), memoryview(data)[pos:])
