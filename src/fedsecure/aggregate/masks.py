"""Masks for secure aggregation: key agreement, a cryptographic PRG into numpy, the neighbour graph.

After Bonawitz et al. 2017 (CCS, "Practical Secure Aggregation for Privacy-Preserving Machine
Learning"): two clients agree on a secret by Diffie-Hellman (X25519 here) and both expand it
with a PRG into the same mask, which one adds and the other subtracts. The PRG is AES-128 in
counter mode keyed by HKDF-SHA256 of the agreed secret (128-bit security, as X25519 gives);
it writes its keystream a block at a time into a small numpy buffer that stays in cache (OpenSSL
with AES-NI, several GB/s), from which masks are added in place: all of a client's masks cost one
pass over its vector, and no Python loop per entry.

The sparse graph is the one of Bell et al. 2020 (CCS, "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead"): a random Harary graph, where clients sit on a ring in a random
order and each is joined to the k/2 nearest on either side, so each client masks and shares
with k = O(log n) others instead of n - 1.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedsecure.errors import SecAggInputError, SecAggProtocolError

KEY_BYTES = 32
_ZERO_IV = bytes(16)
# MaskStream.apply's block: a key's keystream block and the accumulator's stay in a core's L2 cache
BLOCK_BYTES = 256 << 10


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
    """Adds and subtracts PRG masks of one length and ring dtype into accumulators, in place.

    ``apply`` adds many masks in one sweep over the accumulator: it goes through it a block at
    a time (``BLOCK_BYTES``), and for each block makes every key's next keystream block into
    one small reused buffer and adds it from there, so the keystream never goes to main
    memory and the accumulator is read and written once in all. The AES-CTR stream of a key
    is the same as in one piece (``expand``): the cipher carries on from block to block.
    """

    def __init__(self, *, size: int, dtype: type[np.unsignedinteger]) -> None:  # type: ignore[type-arg]
        self.size = size
        self.dtype = np.dtype(dtype)
        self._full: np.ndarray | None = None  # expand's whole-mask buffer, made on first use
        step = max(1, BLOCK_BYTES // self.dtype.itemsize)
        self._step = min(step, max(size, 1))
        block = self._step * self.dtype.itemsize
        self._zeros = memoryview(bytes(block))
        # the cipher may ask for up to one block more room than it writes
        self._block = np.empty(block + 16, np.uint8)
        self._out = memoryview(self._block)  # type: ignore[arg-type]
        self._words = self._block[:block].view(self.dtype)

    def expand(self, key: bytes) -> np.ndarray:
        """The mask for ``key`` (16 bytes), valid until the next call: a view of a reused buffer."""
        if self._full is None:
            self._full = np.zeros(self.size, self.dtype)
        else:
            self._full.fill(0)
        self.apply(self._full, [(key, 1)])
        return self._full

    def add(self, acc: np.ndarray, key: bytes, sign: int = 1) -> None:
        """acc += sign * PRG(key), wrapping around the ring."""
        self.apply(acc, [(key, sign)])

    def apply(self, acc: np.ndarray, masks: Iterable[tuple[bytes, int]]) -> None:
        """acc += the sum of sign * PRG(key) over ``masks`` (key, sign) pairs, wrapping around the ring."""
        if acc.dtype != self.dtype or acc.size != self.size or not acc.flags.c_contiguous or not acc.flags.writeable:
            raise SecAggInputError(f"masks go into a writable contiguous array of {self.size} {self.dtype.name}, "
                                   f"got {acc.size} {acc.dtype.name}")
        ops = [(Cipher(algorithms.AES(key), modes.CTR(_ZERO_IV)).encryptor().update_into,
                np.add if sign > 0 else np.subtract) for key, sign in masks]
        if not ops:
            return
        flat = acc.reshape(-1)
        step, zeros, out, words = self._step, self._zeros, self._out, self._words
        for start in range(0, self.size, step):
            part = flat[start : start + step]
            if part.size < step:  # the last, shorter block
                zeros, words = zeros[: part.nbytes], words[: part.size]
            for update_into, op in ops:
                update_into(zeros, out)
                op(part, words, out=part)


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
