"""Fixed-point encoding: decoded sums within the stated error bound, overflow refused up front."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedsecure.aggregate.fixedpoint import FixedPointCodec
from fedsecure.errors import FixedPointOverflow, SecAggInputError


def ring_sum(codec: FixedPointCodec, rows: list[np.ndarray]) -> np.ndarray:
    total = np.zeros(rows[0].size, codec.dtype)
    for r in rows:
        total += codec.encode(r)  # wraps around the ring, as masked sums do
    return total


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 12),
    bound=st.floats(1e-3, 1e4),
    bits=st.sampled_from([32, 64]),
    dtype=st.sampled_from([np.float32, np.float64]),
    data=st.data(),
)
def test_decoded_sum_is_within_the_stated_bound(n: int, bound: float, bits: int, dtype: type, data: st.DataObject) -> None:
    codec = FixedPointCodec(summands=n, bound=bound, bits=bits)
    top = float(np.nextafter(dtype(2 * bound), dtype(0)))  # representable in the row's dtype
    elems = st.floats(-top, top, width=32 if dtype is np.float32 else 64)
    rows = [data.draw(hnp.arrays(dtype, 7, elements=elems)) for _ in range(n)]
    got = codec.decode(ring_sum(codec, rows), summands=n)
    for j in range(7):  # against the exact sum of the clipped values
        exact = math.fsum(min(max(float(r[j]), -codec.bound), codec.bound) for r in rows)
        # fsum's result is itself rounded to a float64: allow an ulp of it on top of the codec's bound
        assert abs(got[j] - exact) <= codec.max_error(n) * (1 + 1e-12) + math.ulp(exact)


def test_frac_bits_are_the_largest_that_cannot_overflow() -> None:
    codec = FixedPointCodec(summands=100, bound=3.0)
    assert 100 * codec.limit <= 2**31 - 1
    assert 100 * round(3.0 * 2.0 ** (codec.frac_bits + 1)) > 2**31 - 1
    assert codec.max_error() == 100 / 2 ** (codec.frac_bits + 1)
    # the extreme: every summand at the bound, all with the same sign, still decodes
    rows = [np.full(3, s * 3.0, np.float32) for s in (1, -1)]
    for sign_rows in (rows[:1] * 100, rows[1:] * 100):
        assert np.allclose(codec.decode(ring_sum(codec, sign_rows)), sign_rows[0] * 100, atol=codec.max_error())


@pytest.mark.parametrize(
    ("kwargs", "hint"),
    [
        ({"summands": 1000, "bound": 10.0, "frac_bits": 20}, "frac_bits <= 17"),
        ({"summands": 2**20, "bound": 4096.0}, "bits=64"),
        ({"summands": 10, "bound": 2.0**62, "bits": 64}, "bits=64"),
    ],
)
def test_overflow_is_refused_with_a_way_out(kwargs: dict, hint: str) -> None:
    with pytest.raises(FixedPointOverflow, match=hint.replace("=", "=")):
        FixedPointCodec(**kwargs)


def test_values_beyond_the_bound_are_clipped_and_64_bit_rings_are_finer() -> None:
    x = np.array([-5.0, -1.0, 0.25, 1.0, 7.0])
    for bits in (32, 64):
        codec = FixedPointCodec(summands=4, bound=1.0, bits=bits)
        assert np.allclose(codec.decode(codec.encode(x)), np.clip(x, -1, 1), atol=codec.max_error(1))
    assert FixedPointCodec(summands=4, bound=1.0, bits=64).max_error() < 1e-14


def test_torch_and_numpy_inputs_encode_alike() -> None:
    codec = FixedPointCodec(summands=3, bound=2.0)
    t = torch.linspace(-3, 3, 11).reshape(1, 11)
    assert np.array_equal(codec.encode(t), codec.encode(t.numpy()))
    assert codec.encode(t.half()).dtype == np.uint32


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c: c.encode(np.array([1.0, np.nan])), "NaN"),
        (lambda c: c.encode(np.array([1 + 2j])), "real numbers"),
        (lambda c: c.encode([1.0]), "numpy array or torch tensor"),
        (lambda c: c.decode(np.zeros(2, np.uint32), summands=9), "at most 3"),
        (lambda c: c.decode(np.zeros(2, np.int64)), "uint32"),
        (lambda c: FixedPointCodec(summands=0, bound=1.0), "summands"),
        (lambda c: FixedPointCodec(summands=2, bound=math.inf), "bound"),
        (lambda c: FixedPointCodec(summands=2, bound=1.0, bits=16), "bits"),
        (lambda c: FixedPointCodec.from_wire({"summands": 2}), "malformed"),
    ],
)
def test_bad_input_is_named(call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SecAggInputError, match=message):
        call(FixedPointCodec(summands=3, bound=1.0))


def test_wire_form_round_trips() -> None:
    codec = FixedPointCodec(summands=7, bound=0.5, bits=64)
    assert FixedPointCodec.from_wire(codec.to_wire()) == codec
