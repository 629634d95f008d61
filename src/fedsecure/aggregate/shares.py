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

A value remembers the floating dtype it was encoded from, and ``float_precision()`` decodes to it
(float32 in, float32 out, as in PySyft); a sum of values of two dtypes decodes to the dtype torch
promotes them to. Integers, and shares that arrive without a dtype, decode to float64.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any, Self

import numpy as np
import torch

from fedsecure.aggregate.masks import MaskStream
from fedsecure.errors import FixedPointOverflow, SecAggInputError

DEFAULT_FRAC_BITS = 16
_BLOCK = 1 << 16  # entries per block of encoding's float64 scratch (512 KB)


def decoded_dtype(dtype: Any) -> torch.dtype:
    """The torch floating dtype a decoded value takes: ``dtype`` itself when floating, else float64."""
    if isinstance(dtype, torch.dtype):
        return dtype if dtype.is_floating_point else torch.float64
    numpy_dtype = np.dtype(dtype)
    if np.issubdtype(numpy_dtype, np.floating) and numpy_dtype.itemsize <= 8:
        return torch.from_numpy(np.zeros(0, numpy_dtype)).dtype
    return torch.float64


def _checked_dtype(dtype: Any) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise SecAggInputError(f"a fixed-point value decodes to a floating torch dtype, got {dtype!r}")
    return dtype


class FixedPrecision:
    """A tensor in fixed point over Z_(2^64); ``share(n)`` splits it among n aggregators.
    ``dtype``: the floating dtype ``float_precision()`` returns (the one encoded)."""

    def __init__(self, *, ring: np.ndarray, shape: tuple[int, ...], frac_bits: int,
                 dtype: torch.dtype = torch.float64) -> None:
        if ring.dtype != np.uint64 or ring.size != int(np.prod(shape)):
            raise SecAggInputError(f"a fixed-point tensor of shape {shape} needs {int(np.prod(shape))} uint64 values")
        self.ring, self.shape, self.frac_bits, self.dtype = ring, tuple(shape), frac_bits, _checked_dtype(dtype)

    @classmethod
    def encode(cls, tensor: torch.Tensor | np.ndarray, *, frac_bits: int = DEFAULT_FRAC_BITS) -> Self:
        if type(frac_bits) is not int or not 0 <= frac_bits <= 52:
            raise SecAggInputError(f"frac_bits must be an int in [0, 52], got {frac_bits!r}")
        if isinstance(tensor, torch.Tensor):
            t = tensor.detach().cpu()
            x = (t.float() if t.dtype == torch.bfloat16 else t).numpy()  # numpy has no bfloat16
        else:
            x = np.asarray(tensor)
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
        dtype = decoded_dtype(tensor.dtype if isinstance(tensor, torch.Tensor) else x.dtype)
        return cls(ring=ring.view(np.uint64), shape=x.shape, frac_bits=frac_bits, dtype=dtype)

    def share(self, n: int = 2, /) -> AdditiveShares:
        """n shares here, each uniform on its own, adding up to this value. (Sharing among workers,
        ``x.fix_precision().share(bob, alice)``, is the pointer layer's: ``fedsecure.fix_precision``.)"""
        if type(n) is not int:
            raise SecAggInputError(
                f"share(n) splits a value into n local shares, got {type(n).__name__}: to share among workers, "
                "encode with fedsecure.fix_precision(x) (or x.fix_precision() after fedsecure.TorchHook(torch)), "
                "then .share(bob, alice)"
            )
        if n < 2:
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
        return AdditiveShares(parts=[*parts, last], shape=self.shape, frac_bits=self.frac_bits, dtype=self.dtype)

    def float_precision(self) -> torch.Tensor:
        """Back to the encoded dtype: the value, within 2^-(frac_bits + 1) per summand (decoded in
        float64, then rounded once to the dtype)."""
        x = self.ring.view(np.int64).astype(np.float64) / 2.0**self.frac_bits
        return torch.from_numpy(x.reshape(self.shape)).to(self.dtype)

    def __add__(self, other: FixedPrecision) -> FixedPrecision:
        dtype = _same(self, other)
        return type(self)(ring=self.ring + other.ring, shape=self.shape, frac_bits=self.frac_bits, dtype=dtype)

    def __repr__(self) -> str:
        return f"FixedPrecision(shape={self.shape}, dtype={self.dtype}, frac_bits={self.frac_bits})"


class AdditiveShares:
    """Shares of one fixed-point tensor, one per aggregator, in aggregator order."""

    def __init__(self, *, parts: Sequence[np.ndarray], shape: tuple[int, ...], frac_bits: int,
                 dtype: torch.dtype = torch.float64) -> None:
        size = int(np.prod(shape))
        if len(parts) < 2 or any(p.dtype != np.uint64 or p.size != size for p in parts):
            raise SecAggInputError(f"shares must be two or more uint64 arrays of {size} values")
        self.parts, self.shape, self.frac_bits, self.dtype = list(parts), tuple(shape), frac_bits, _checked_dtype(dtype)

    def __add__(self, other: AdditiveShares) -> AdditiveShares:
        """Share-wise: each aggregator adds the two shares it holds; nothing is revealed."""
        dtype = _same(self, other)
        if len(self.parts) != len(other.parts):
            raise SecAggInputError(f"cannot add {len(self.parts)} shares to {len(other.parts)}: share among the same aggregators")
        return AdditiveShares(parts=[a + b for a, b in zip(self.parts, other.parts, strict=True)],
                              shape=self.shape, frac_bits=self.frac_bits, dtype=dtype)

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
        return FixedPrecision(ring=ring, shape=self.shape, frac_bits=self.frac_bits, dtype=self.dtype)

    def float_precision(self) -> torch.Tensor:
        return self.reconstruct().float_precision()

    def to_tensors(self) -> list[torch.Tensor]:
        """Each share as an int64 tensor of the original shape, to send to its aggregator."""
        return [torch.from_numpy(p.view(np.int64).reshape(self.shape)) for p in self.parts]

    @classmethod
    def from_tensors(cls, tensors: Sequence[torch.Tensor], *, frac_bits: int,
                     dtype: torch.dtype = torch.float64) -> AdditiveShares:
        """Shares that came back from the aggregators (int64 tensors of one shape); ``dtype``: the
        floating dtype the value was encoded from."""
        if not tensors or any(t.dtype != torch.int64 or t.shape != tensors[0].shape for t in tensors):
            raise SecAggInputError("shares must be int64 tensors of one shape")
        return cls(parts=[t.detach().cpu().contiguous().numpy().reshape(-1).view(np.uint64) for t in tensors],
                   shape=tuple(tensors[0].shape), frac_bits=frac_bits, dtype=dtype)

    def __repr__(self) -> str:
        return (f"AdditiveShares({len(self.parts)} shares, shape={self.shape}, dtype={self.dtype}, "
                f"frac_bits={self.frac_bits})")


def fix_precision(tensor: torch.Tensor | np.ndarray, *, frac_bits: int = DEFAULT_FRAC_BITS) -> FixedPrecision:
    """``x.fix_precision()`` of PySyft, without patching torch."""
    return FixedPrecision.encode(tensor, frac_bits=frac_bits)


def _same(a: FixedPrecision | AdditiveShares, b: FixedPrecision | AdditiveShares) -> torch.dtype:
    """Check that two values combine; the dtype of their combination (torch's promotion)."""
    if not isinstance(b, FixedPrecision if isinstance(a, FixedPrecision) else AdditiveShares):
        raise SecAggInputError(f"cannot combine {type(a).__name__} with {type(b).__name__}")
    if a.shape != b.shape or a.frac_bits != b.frac_bits:
        raise SecAggInputError(
            f"shapes {a.shape} and {b.shape} with {a.frac_bits} and {b.frac_bits} fractional bits do not match: "
            "encode both with the same frac_bits"
        )
    return promote(a.dtype, b.dtype)


def promote(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The dtype a combination of values encoded from ``a`` and ``b`` decodes to: torch's promotion
    (float32 with float64 gives float64, as ``torch.ones(1) + torch.ones(1, dtype=torch.float64)`` does)."""
    return torch.promote_types(a, b)
