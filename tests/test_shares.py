"""Additive sharing across aggregators: sums of owners' values, and no single share tells anything."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsecure.aggregate.shares import AdditiveShares, FixedPrecision, fix_precision
from fedsecure.errors import FixedPointOverflow, SecAggInputError


@pytest.mark.parametrize("n", [2, 3, 5])
def test_owners_share_and_only_the_sum_is_reconstructed(n: int) -> None:
    owners = [torch.randn(4, 3, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    shared = [fix_precision(x).share(n) for x in owners]
    total = AdditiveShares.sum(shared)
    exact = sum(x.double() for x in owners)
    assert total.float_precision().dtype == torch.float32  # the dtype that was encoded
    assert torch.allclose(total.float_precision().double(), exact, atol=len(owners) * 2.0**-17)
    assert torch.allclose((shared[0] + shared[1]).float_precision().double(), (owners[0] + owners[1]).double(),
                          atol=2 * 2.0**-17)


def test_one_share_is_uniform_whatever_the_value() -> None:
    for x in (torch.zeros(1 << 15), torch.full((1 << 15,), 123.5)):
        part = fix_precision(x).share(2).parts[0]
        counts = np.bincount(part.view(np.uint8), minlength=256)
        expected = part.nbytes / 256
        assert (((counts - expected) ** 2) / expected).sum() < 377  # chi-square, 255 dof, p ~ 1e-6


def test_shares_travel_as_int64_tensors_and_add_on_the_aggregators() -> None:
    a, b = fix_precision(torch.tensor([1.5, -2.25])).share(2), fix_precision(torch.tensor([0.5, 4.0])).share(2)
    # each aggregator adds the two int64 tensors it was sent; torch's int64 addition wraps like Z_2^64
    summed = [ta + tb for ta, tb in zip(a.to_tensors(), b.to_tensors(), strict=True)]
    back = AdditiveShares.from_tensors(summed, frac_bits=a.frac_bits)
    assert back.float_precision().tolist() == [2.0, 1.75]


def test_fixed_precision_adds_and_round_trips() -> None:
    x = fix_precision(np.array([[0.1, -3.0]]), frac_bits=20)
    assert isinstance(x, FixedPrecision) and x.float_precision().shape == (1, 2)
    assert torch.allclose((x + x).float_precision(), torch.tensor([[0.2, -6.0]], dtype=torch.float64), atol=2**-20)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: fix_precision(torch.tensor([2.0**50])), FixedPointOverflow, "fewer frac_bits"),
        (lambda: fix_precision(torch.tensor([float("nan")])), SecAggInputError, "NaN"),
        (lambda: fix_precision(torch.ones(2)).share(1), SecAggInputError, "at least 2"),
        (lambda: fix_precision(torch.ones(2)) + fix_precision(torch.ones(3)), SecAggInputError, "do not match"),
        (lambda: fix_precision(torch.ones(2)).share(2) + fix_precision(torch.ones(2)).share(3), SecAggInputError,
         "same aggregators"),
        (lambda: fix_precision(torch.ones(2), frac_bits=8) + fix_precision(torch.ones(2)), SecAggInputError,
         "same frac_bits"),
        (lambda: AdditiveShares.sum([]), SecAggInputError, "nothing"),
        (lambda: AdditiveShares.from_tensors([torch.ones(2)], frac_bits=16), SecAggInputError, "int64"),
    ],
)
def test_bad_input_is_named(call, error: type, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=message):
        call()
