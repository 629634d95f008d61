"""Shamir sharing: any t shares reconstruct, t - 1 reveal nothing, bad share sets are named."""

from __future__ import annotations

import itertools
import os
from collections import Counter

import pytest

from fedsecure.aggregate import shamir
from fedsecure.aggregate.shamir import PRIME, Share, reconstruct, split
from fedsecure.errors import SecAggInputError, ShareReconstructionError

SECRETS = [b"", b"\x00", b"\x00\x00seed with leading zeros", os.urandom(32), os.urandom(64)]


@pytest.mark.parametrize("secret", SECRETS, ids=lambda s: f"{len(s)}B")
def test_any_t_of_n_shares_reconstruct(secret: bytes) -> None:
    shares = split(secret, threshold=3, xs=[1, 2, 5, 9, 4000])
    for subset in itertools.combinations(shares, 3):
        assert reconstruct(subset, threshold=3) == secret
    assert reconstruct(shares, threshold=3) == secret  # the extras are checked, and agree


def test_shares_travel_as_bytes() -> None:
    shares = split(b"k" * 32, threshold=2, xs=[7, 8])
    assert all(len(s.to_bytes()) == shamir.SHARE_BYTES for s in shares)
    assert reconstruct([Share.from_bytes(s.to_bytes()) for s in shares], threshold=2) == b"k" * 32


@pytest.mark.parametrize("secret", [0, 1, 100, 256])
def test_t_minus_1_shares_take_every_value_equally_often_whatever_the_secret(secret: int) -> None:
    """In GF(257), t = 3: over all random coefficients, 2 shares hit every pair exactly once."""
    p, xs = 257, (3, 11)
    seen = Counter(
        tuple(shamir._evaluate((secret, a1, a2), x, p) for x in xs) for a1 in range(p) for a2 in range(p)
    )
    assert len(seen) == p * p and set(seen.values()) == {1}  # uniform, so independent of the secret


@pytest.mark.parametrize("candidate", [b"", os.urandom(32), b"\xff" * 64], ids=["empty", "random", "ff64"])
def test_t_minus_1_real_shares_are_consistent_with_every_secret(candidate: bytes) -> None:
    """Two of three shares of one secret, plus a third made up, reconstruct any other secret."""
    kept = split(os.urandom(32), threshold=3, xs=[1, 2, 3])[:2]
    target = int.from_bytes(bytes([len(candidate)]) + candidate.ljust(64, b"\0"), "big")
    # the polynomial through (0, target), (1, y1), (2, y2), evaluated at x = 3
    xs = (0, 1, 2)
    coeffs = shamir._lagrange_at(xs, 3)
    y3 = sum(c * y for c, y in zip(coeffs, (target, kept[0].y, kept[1].y), strict=True)) % PRIME
    assert reconstruct([*kept, Share(3, y3)], threshold=3) == candidate


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda s, o: s[:2], "3 shares are needed"),
        (lambda s, o: [s[0], s[0], s[1]], "duplicate"),
        (lambda s, o: [s[0], Share(s[0].x, s[0].y + 1), s[1]], "inconsistent"),
        (lambda s, o: [*s[:3], Share(s[3].x, (s[3].y + 1) % PRIME)], "does not lie on the polynomial"),
        (lambda s, o: [s[0], s[1], o[2]], "inconsistent: they belong to different secrets"),
        (lambda s, o: [s[0], s[1], Share(s[2].x, (s[2].y + 1) % PRIME)], "some were altered"),
    ],
)
def test_bad_share_sets_are_refused(make, message: str) -> None:  # type: ignore[no-untyped-def]
    shares = split(os.urandom(32), threshold=3, xs=[1, 2, 3, 4])
    other = split(os.urandom(32), threshold=3, xs=[1, 2, 3, 4])
    with pytest.raises(ShareReconstructionError, match=message):
        reconstruct(make(shares, other), threshold=3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"secret": b"x" * 65, "threshold": 2, "xs": [1, 2]}, "at most 64 bytes"),
        ({"secret": b"x", "threshold": 3, "xs": [1, 2]}, r"threshold must be in \[1, 2\]"),
        ({"secret": b"x", "threshold": 2, "xs": [1, 1]}, "distinct"),
        ({"secret": b"x", "threshold": 1, "xs": [0]}, "distinct ints"),
    ],
)
def test_bad_split_arguments_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(SecAggInputError, match=message):
        split(**kwargs)


@pytest.mark.parametrize("raw", [b"", b"\x00" * shamir.SHARE_BYTES, b"\x00\x00\x00\x01" + b"\xff" * 66])
def test_malformed_share_bytes_are_refused(raw: bytes) -> None:
    with pytest.raises(ShareReconstructionError):
        Share.from_bytes(raw)
