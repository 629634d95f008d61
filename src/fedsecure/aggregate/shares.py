"""Additive secret sharing across non-colluding aggregators, after PySyft's ``fix_precision().share()``.

A tensor x becomes a fixed-point element of Z_(2^64) (``FixedPrecision``: rint(x * 2^f)), then n
shares that are uniform ring elements adding up to it (``AdditiveShares``): any n - 1 of them
are independent of x, so no aggregator that holds one share learns anything, unless all n
collude. Sums need no interaction: each aggregator adds the shares it holds (from several data
owners), and only the sum is ever reconstructed. This is the "SPDZ-style" additive sharing of
Ryffel et al. 2018 ("A generic framework for privacy preserving deep learning", PySyft), here
for aggregation only (no multiplication of two shared values).

Fixed point: with f fractional bits, |x| must stay below 2^(62 - f) (checked on encoding) and a
sum decodes correctly while its magnitude stays below 2^(63 - f); each encoded value is within
2^-(f + 1) of x, so a sum of m values is within m * 2^-(f + 1) of the exact sum. Shares come
from AES-128-CTR under a fresh random key (``fedsecure.aggregate.masks.MaskStream``).

Each share is also a plain int64 torch tensor (``to_tensors`` / ``from_tensors``), so it can be
sent to a worker and added there with ordinary torch ops; int64 addition wraps as Z_(2^64) does.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any, overload

import numpy as np
import torch

from fedsecure.aggregate.masks import MaskStream
from fedsecure.errors import FixedPointOverflow, SecAggInputError

DEFAULT_FRAC_BITS = 16
_BLOCK = 1 << 16  # entries per block of encoding's float64 scratch (512 KB)


class FixedPrecision:
    """A tensor in fixed point over Z_(2^64); ``share(n)`` splits it among n aggregators."""

    def __init__(self, *, ring: np.ndarray, shape: tuple[int, ...], frac_bits: int) -> None:
        if ring.dtype != np.uint64 or ring.size != int(np.prod(shape)):
            raise SecAggInputError(f"a fixed-point tensor of shape {shape} needs {int(np.prod(shape))} uint64 values")
        self.ring, self.shape, self.frac_bits = ring, tuple(shape), frac_bits

    @classmethod
    def encode(cls, tensor: torch.Tensor | np.ndarray, *, frac_bits: int = DEFAULT_FRAC_BITS) -> FixedPrecision:
        if type(frac_bits) is not int or not 0 <= frac_bits <= 52:
            raise SecAggInputError(f"frac_bits must be an int in [0, 52], got {frac_bits!r}")
        x = tensor.detach().cpu().numpy() if isinstance(tensor, torch.Tensor) else np.asarray(tensor)
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise SecAggInputError(f"cannot encode {x.dtype} values: give real numbers")
        flat, scale = x.reshape(-1), 2.0**frac_bits
        limit = 2.0 ** (62 - frac_bits) * scale
        ring = np.empty(flat.size, np.int64)
        scratch = np.empty(min(flat.size, _BLOCK), np.float64)
        # A block at a time through a small float64 scratch (in cache): x * 2^f in float64,
        # checked, rounded, written once.
        for start in range(0, flat.size, _BLOCK):
            part = flat[start : start + _BLOCK]
            s = scratch[: part.size]
            np.multiply(part, scale, out=s, dtype=np.float64)
            if not np.isfinite(s).all():
                raise SecAggInputError("cannot encode NaN or infinite values")
            top = float(np.abs(s).max())
            if top >= limit:
                raise FixedPointOverflow(
                    f"values up to {top / scale:g} do not fit {frac_bits} fractional bits "
                    f"(|x| < {limit / scale:g}): use fewer frac_bits or scale the values down"
                )
            np.rint(s, out=s)
            ring[start : start + part.size] = s
        return cls(ring=ring.view(np.uint64), shape=x.shape, frac_bits=frac_bits)

    @overload
    def share(self, n: int = 2, /) -> AdditiveShares: ...
    @overload
    def share(self, *workers: Any) -> Any: ...

    def share(self, *holders: Any) -> Any:
        """``share(n)``: n shares here, each uniform on its own, adding up to this value.
        ``share(bob, alice, ...)``: one share sent to each worker (`fedsecure.pointer.shared`)."""
        if holders and not (len(holders) == 1 and isinstance(holders[0], int)):
            from fedsecure.pointer.shared import share_local  # the pointer layer sits above this one

            return share_local(self, holders)
        return self._split(holders[0] if holders else 2)

    def _split(self, n: int) -> AdditiveShares:
        if type(n) is not int or n < 2:
            raise SecAggInputError(f"sharing needs at least 2 shares (one per aggregator), got {n!r}")
        stream = MaskStream(size=self.ring.size, dtype=np.uint64)
        keys = [os.urandom(16) for _ in range(n - 1)]
        parts = []
        for key in keys:  # share i < n - 1: PRG(key_i); the last: the value minus all of them
            part = np.zeros(self.ring.size, np.uint64)
            stream.apply(part, [(key, 1)])
            parts.append(part)
        last = self.ring.copy()
        stream.apply(last, [(key, -1) for key in keys])
        return AdditiveShares(parts=[*parts, last], shape=self.shape, frac_bits=self.frac_bits)

    def float_precision(self) -> torch.Tensor:
        """Back to float64: the value, within 2^-(frac_bits + 1) per summand."""
        x = self.ring.view(np.int64).astype(np.float64) / 2.0**self.frac_bits
        return torch.from_numpy(x.reshape(self.shape))

    def __add__(self, other: FixedPrecision) -> FixedPrecision:
        _same(self, other)
        return FixedPrecision(ring=self.ring + other.ring, shape=self.shape, frac_bits=self.frac_bits)

    def __repr__(self) -> str:
        return f"FixedPrecision(shape={self.shape}, frac_bits={self.frac_bits})"


class AdditiveShares:
    """Shares of one fixed-point tensor, one per aggregator, in aggregator order."""

    def __init__(self, *, parts: Sequence[np.ndarray], shape: tuple[int, ...], frac_bits: int) -> None:
        size = int(np.prod(shape))
        if len(parts) < 2 or any(p.dtype != np.uint64 or p.size != size for p in parts):
            raise SecAggInputError(f"shares must be two or more uint64 arrays of {size} values")
        self.parts, self.shape, self.frac_bits = list(parts), tuple(shape), frac_bits

    def __add__(self, other: AdditiveShares) -> AdditiveShares:
        """Share-wise: each aggregator adds the two shares it holds; nothing is revealed."""
        _same(self, other)
        if len(self.parts) != len(other.parts):
            raise SecAggInputError(f"cannot add {len(self.parts)} shares to {len(other.parts)}: share among the same aggregators")
        return AdditiveShares(parts=[a + b for a, b in zip(self.parts, other.parts, strict=True)],
                              shape=self.shape, frac_bits=self.frac_bits)

    @staticmethod
    def sum(shared: Iterable[AdditiveShares]) -> AdditiveShares:
        """The shares of the sum of several owners' values."""
        items = list(shared)
        if not items:
            raise SecAggInputError("nothing to sum")
        total = items[0]
        for s in items[1:]:
            total = total + s
        return total

    def reconstruct(self) -> FixedPrecision:
        """The shared value: every share is needed."""
        ring = self.parts[0].copy()
        for p in self.parts[1:]:
            np.add(ring, p, out=ring)
        return FixedPrecision(ring=ring, shape=self.shape, frac_bits=self.frac_bits)

    def float_precision(self) -> torch.Tensor:
        return self.reconstruct().float_precision()

    def to_tensors(self) -> list[torch.Tensor]:
        """Each share as an int64 tensor of the original shape, to send to its aggregator."""
        return [torch.from_numpy(p.view(np.int64).reshape(self.shape)) for p in self.parts]

    @classmethod
    def from_tensors(cls, tensors: Sequence[torch.Tensor], *, frac_bits: int) -> AdditiveShares:
        """Shares that came back from the aggregators (int64 tensors of one shape)."""
        if not tensors or any(t.dtype != torch.int64 or t.shape != tensors[0].shape for t in tensors):
            raise SecAggInputError("shares must be int64 tensors of one shape")
        return cls(parts=[t.detach().cpu().contiguous().numpy().reshape(-1).view(np.uint64) for t in tensors],
                   shape=tuple(tensors[0].shape), frac_bits=frac_bits)

    def __repr__(self) -> str:
        return f"AdditiveShares({len(self.parts)} shares, shape={self.shape}, frac_bits={self.frac_bits})"


def fix_precision(tensor: torch.Tensor | np.ndarray, *, frac_bits: int = DEFAULT_FRAC_BITS) -> FixedPrecision:
    """``x.fix_precision()`` of PySyft, without patching torch."""
    return FixedPrecision.encode(tensor, frac_bits=frac_bits)


def _same(a: FixedPrecision | AdditiveShares, b: FixedPrecision | AdditiveShares) -> None:
    if type(a) is not type(b):
        raise SecAggInputError(f"cannot combine {type(a).__name__} with {type(b).__name__}")
    if a.shape != b.shape or a.frac_bits != b.frac_bits:
        raise SecAggInputError(
            f"shapes {a.shape} and {b.shape} with {a.frac_bits} and {b.frac_bits} fractional bits do not match: "
            "encode both with the same frac_bits"
        )
