"""Masks for secure aggregation: key agreement, a cryptographic PRG into numpy, the neighbour graph.

After Bonawitz et al. 2017 (CCS, "Practical Secure Aggregation for Privacy-Preserving Machine
Learning"): two clients agree on a secret by Diffie-Hellman (X25519 here) and both expand it
with a PRG into the same mask, which one adds and the other subtracts. The PRG is AES-128 in
counter mode keyed by HKDF-SHA256 of the agreed secret (128-bit security, as X25519 gives);
it writes its keystream straight into a numpy buffer (OpenSSL with AES-NI, several GB/s), and
masks are added in place, so a mask costs two passes over memory and no Python loop per entry.

The sparse graph is the one of Bell et al. 2020 (CCS, "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead"): a random Harary graph, where clients sit on a ring in a random
order and each is joined to the k/2 nearest on either side, so each client masks and shares
with k = O(log n) others instead of n - 1.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedsecure.errors import SecAggInputError, SecAggProtocolError

KEY_BYTES = 32
_ZERO_IV = bytes(16)


def derive(secret: bytes, *, round_id: bytes, purpose: bytes, size: int = 16) -> bytes:
    """A key for one purpose in one round, from a secret (HKDF-SHA256, round id as salt)."""
    return HKDF(algorithm=hashes.SHA256(), length=size, salt=round_id, info=b"fedsecure-secagg/" + purpose).derive(
        secret
    )


def agree(private: X25519PrivateKey, public: bytes) -> bytes:
    """The X25519 secret shared with the holder of ``public`` (32 raw bytes)."""
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:  # a malformed or low-order public key
        raise SecAggProtocolError(f"unusable public key: {exc}") from exc


class MaskStream:
    """Adds and subtracts PRG masks of one length and ring dtype into accumulators, in place."""

    def __init__(self, *, size: int, dtype: type[np.unsignedinteger]) -> None:  # type: ignore[type-arg]
        self.size = size
        self.dtype = np.dtype(dtype)
        nbytes = size * self.dtype.itemsize
        self._zeros = memoryview(bytes(nbytes))
        # the cipher may ask for up to one block more room than it writes
        self._buf = np.empty(nbytes + 16, np.uint8)
        self._out = memoryview(self._buf)  # type: ignore[arg-type]
        self.mask = self._buf[:nbytes].view(self.dtype)

    def expand(self, key: bytes) -> np.ndarray:
        """The mask for ``key`` (16 bytes), valid until the next call: a view of a reused buffer."""
        enc = Cipher(algorithms.AES(key), modes.CTR(_ZERO_IV)).encryptor()
        enc.update_into(self._zeros, self._out)
        return self.mask

    def add(self, acc: np.ndarray, key: bytes, sign: int = 1) -> None:
        """acc += sign * PRG(key), wrapping around the ring."""
        (np.add if sign > 0 else np.subtract)(acc, self.expand(key), out=acc)


def harary_neighbours(
    ids: Sequence[int], *, degree: int | None, seed: bytes, only: int | None = None
) -> dict[int, frozenset[int]]:
    """Each id's neighbours (or just those of ``only``): everyone (``degree`` None or >= n - 1),
    or a random Harary graph.

    The graph is public: any party computes the same one from the ids and ``seed``.
    """
    ordered = sorted(ids)
    n = len(ordered)
    if degree is None or degree >= n - 1:
        everyone = frozenset(ordered)
        return {u: everyone - {u} for u in (ordered if only is None else [only])}
    if degree < 2 or degree % 2:
        raise SecAggInputError(f"the neighbour degree must be an even number >= 2, got {degree}")
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(b"fedsecure-secagg/graph" + seed).digest(), "big"))
    ring = [ordered[i] for i in rng.permutation(n)]
    half = degree // 2
    return {
        u: frozenset(ring[(i + off) % n] for off in range(-half, half + 1) if off)
        for i, u in enumerate(ring)
        if only is None or u == only
    }
