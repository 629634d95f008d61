"""Masks for secure aggregation: key agreement, a cryptographic PRG into numpy, the neighbour graph.

After Bonawitz et al. 2017 (CCS, "Practical Secure Aggregation for Privacy-Preserving Machine
Learning"): two clients agree on a secret by Diffie-Hellman (X25519 here) and both expand it
with a PRG into the same mask, which one adds and the other subtracts. The PRG is AES-128 in
counter mode keyed by HKDF-SHA256 of the agreed secret (128-bit security, as X25519 gives);
it writes its keystream a block at a time into a small numpy buffer that stays in cache (OpenSSL
with AES-NI or VAES, about 10 GB/s), from which masks are added in place: all of a client's masks
cost one pass over its vector, and no Python loop per entry.

The sparse graph is the one of Bell et al. 2020 (CCS, "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead"): a random Harary graph, where clients sit on a ring in a random
order and each is joined to the k/2 nearest on either side, so each client masks and shares
with k = O(log n) others instead of n - 1.
"""

from __future__ import annotations

import functools
import hashlib
import math
import time
from collections.abc import Callable, Iterable, Sequence

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

# The PRG's stream is AES-128-CTR from a zero counter block, E(0) || E(1) || E(2) || ... with a
# 128-bit counter. GCM under a zero 96-bit nonce encrypts with the counter blocks 0^96 || i for
# i = 2, 3, ..., 2^32 - 1: the very same stream from its third block on, which OpenSSL makes with
# its widest AES instructions (VAES) where the CPU has them, while its CTR mode uses AES-NI
# alone. So a long stream is made as CTR's first 32 bytes followed by GCM's output (whose tag is
# never made); the bytes are the same either way. ``KEYSTREAM``: "ctr" or "gcm" forces a way, None
# picks the faster here (timed once).
KEYSTREAM: str | None = None
_GCM_HEAD = 32  # the stream's bytes before GCM's first counter block
_GCM_NONCE = bytes(12)
_GCM_MIN = 4096  # shorter streams: CTR alone
_GCM_MAX = 1 << 36  # 16 * 2^32 bytes: GCM's 32-bit counter would wrap beyond


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
        nbytes = self.size * self.dtype.itemsize
        gcm = _GCM_MIN <= nbytes <= _GCM_MAX and _use_gcm()
        ops = [(*_keystream(key, gcm), np.add if sign > 0 else np.subtract) for key, sign in masks]
        if not ops:
            return
        flat = acc.reshape(-1)
        step, zeros, out, words = self._step, self._zeros, self._out, self._words
        for start in range(0, self.size, step):
            part = flat[start : start + step]
            if part.size < step:  # the last, shorter block
                zeros, words = zeros[: part.nbytes], words[: part.size]
            for update_into, head, op in ops:
                if head and not start:  # the stream's first bytes, before GCM's counter blocks
                    self._block[:_GCM_HEAD] = np.frombuffer(head, np.uint8)
                    update_into(zeros[_GCM_HEAD:], out[_GCM_HEAD:])
                else:
                    update_into(zeros, out)
                op(part, words, out=part)


def _keystream(key: bytes, gcm: bool) -> tuple[Callable[[memoryview, memoryview], int], bytes]:
    """Where a key's stream comes from: a writer of its next bytes, and the bytes to put first."""
    if not gcm:
        return Cipher(algorithms.AES(key), modes.CTR(_ZERO_IV)).encryptor().update_into, b""
    head = Cipher(algorithms.AES(key), modes.CTR(_ZERO_IV)).encryptor().update(bytes(_GCM_HEAD))
    return Cipher(algorithms.AES(key), modes.GCM(_GCM_NONCE)).encryptor().update_into, head


def _use_gcm() -> bool:
    return KEYSTREAM == "gcm" if KEYSTREAM is not None else _gcm_is_faster()


@functools.cache
def _gcm_is_faster() -> bool:
    """Whether OpenSSL makes the stream at least 10% faster through GCM than through CTR here
    (the best of five alternate runs over 512 KB each, once)."""
    size = 1 << 19
    src, dst = memoryview(bytes(size)), memoryview(bytearray(size + 16))
    best = {True: math.inf, False: math.inf}
    for _ in range(5):
        for gcm in best:
            update_into = _keystream(bytes(16), gcm)[0]
            start = time.perf_counter()
            update_into(src, dst)
            best[gcm] = min(best[gcm], time.perf_counter() - start)
    return best[True] < 0.9 * best[False]


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
