"""t-of-n Shamir secret sharing of short byte strings (seeds, keys) over GF(2^521 - 1).

Shamir, "How to Share a Secret", Communications of the ACM 22(11), 1979: a secret s is the
constant term of a random polynomial of degree t - 1; share i is the point (x_i, p(x_i)). Any t
shares determine p, hence s (Lagrange interpolation at 0); any t - 1 shares are consistent with
every secret, each completed by exactly one polynomial, so they reveal nothing about it.

The field is the Mersenne prime 2^521 - 1, so one field element holds a secret of up to 64
bytes, stored as one length byte and the secret padded with zero bytes to 64. The padding lets
reconstruction notice shares that do not belong together: a wrong or mixed set of t shares
interpolates to a random field element, which has the right form with probability below
2^-(8 * (64 - len(secret))), 2^-256 for the 32-byte seeds and keys of secure aggregation.
Shares beyond the first t are checked against the polynomial of the first t.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from fedsecure.errors import SecAggInputError, ShareReconstructionError

PRIME = (1 << 521) - 1
MAX_SECRET_BYTES = 64
MAX_X = (1 << 32) - 1
_Y_BYTES = 66
SHARE_BYTES = 4 + _Y_BYTES


@dataclass(frozen=True, slots=True)
class Share:
    """The point (x, y) of a sharing polynomial; x is the holder's nonzero index."""

    x: int
    y: int

    def to_bytes(self) -> bytes:
        return self.x.to_bytes(4, "big") + self.y.to_bytes(_Y_BYTES, "big")

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        if not isinstance(data, bytes) or len(data) != SHARE_BYTES:
            raise ShareReconstructionError(f"a share is {SHARE_BYTES} bytes, got {len(data) if isinstance(data, bytes) else type(data).__name__}")
        x, y = int.from_bytes(data[:4], "big"), int.from_bytes(data[4:], "big")
        if x == 0 or y >= PRIME:
            raise ShareReconstructionError("malformed share: x must be nonzero and y below the field's prime")
        return cls(x, y)


def split(secret: bytes, *, threshold: int, xs: Sequence[int]) -> list[Share]:
    """Shares of ``secret``, one per x in ``xs``; any ``threshold`` of them reconstruct it."""
    if not isinstance(secret, bytes) or len(secret) > MAX_SECRET_BYTES:
        raise SecAggInputError(f"the secret must be at most {MAX_SECRET_BYTES} bytes")
    if len(set(xs)) != len(xs) or not all(type(x) is int and 0 < x <= MAX_X for x in xs):
        raise SecAggInputError(f"share indices must be distinct ints in [1, {MAX_X}]")
    if type(threshold) is not int or not 1 <= threshold <= len(xs):
        raise SecAggInputError(f"threshold must be in [1, {len(xs)}] (the number of shares), got {threshold!r}")
    coeffs = [int.from_bytes(bytes([len(secret)]) + secret.ljust(MAX_SECRET_BYTES, b"\0"), "big")]
    coeffs += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return [Share(x, _evaluate(coeffs, x)) for x in xs]


def reconstruct(shares: Iterable[Share], *, threshold: int) -> bytes:
    """The secret behind ``shares``: at least ``threshold`` of them, from distinct holders."""
    by_x: dict[int, int] = {}
    for s in shares:
        if s.x in by_x:
            kind = "duplicate" if by_x[s.x] == s.y else "inconsistent (two values)"
            raise ShareReconstructionError(f"{kind} shares for index {s.x}: pass each holder's share once")
        by_x[s.x] = s.y
    if len(by_x) < threshold:
        raise ShareReconstructionError(f"{threshold} shares are needed to reconstruct, got {len(by_x)}")
    xs = tuple(sorted(by_x))
    base, extra = xs[:threshold], xs[threshold:]
    value = sum(c * by_x[x] for c, x in zip(_lagrange_at(base, 0), base, strict=True)) % PRIME
    for x in extra:
        at_x = sum(c * by_x[b] for c, b in zip(_lagrange_at(base, x), base, strict=True)) % PRIME
        if at_x != by_x[x]:
            raise ShareReconstructionError(f"the share of index {x} does not lie on the polynomial of the others")
    if value >> (8 * MAX_SECRET_BYTES) <= MAX_SECRET_BYTES:
        raw = value.to_bytes(MAX_SECRET_BYTES + 1, "big")
        size = raw[0]
        if not any(raw[1 + size :]):
            return raw[1 : 1 + size]
    raise ShareReconstructionError(
        "the shares are inconsistent: they belong to different secrets, or some were altered"
    )


def _evaluate(coeffs: Sequence[int], x: int, prime: int = PRIME) -> int:
    y = 0
    for c in reversed(coeffs):  # Horner; x is small, so each step is cheap
        y = (y * x + c) % prime
    return y


@lru_cache(maxsize=256)
def _lagrange_at(xs: tuple[int, ...], at: int, prime: int = PRIME) -> tuple[int, ...]:
    """Coefficients c_j with p(at) = sum c_j p(x_j) for every p of degree < len(xs)."""
    out = []
    for j, xj in enumerate(xs):
        num = den = 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * (at - xm) % prime
                den = den * (xj - xm) % prime
        out.append(num * pow(den, -1, prime) % prime)
    return tuple(out)
