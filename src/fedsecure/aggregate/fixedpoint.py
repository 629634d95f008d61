"""Fixed-point encoding of float updates into the ring Z_(2^bits), so that masked sums wrap exactly.

Secure aggregation adds masks modulo 2^bits; a float update must first become an element of
that ring. A value x is clipped to [-bound, bound] and encoded as q = rint(x * 2^f) mod 2^bits,
with f fractional bits. The sum of the encodings of n values, read back as a signed
(two's-complement) integer and divided by 2^f, is the sum of the clipped values.

Overflow bound (checked when the codec is built): with L = rint(bound * 2^f), every |q| <= L, so
the true integer sum stays in the signed range, and decodes correctly, as long as

    n * L <= 2^(bits - 1) - 1        and        n * L <= 2^53,

the second so that the decoded sum is exact in float64. The bound is rounded down to a float32
value, so float32 and float64 updates clip alike and exactly. ``FixedPointOverflow`` is raised when
these cannot hold. When ``frac_bits`` is not given, the largest f that satisfies them is used.

Quantisation error: the scale is a power of two, so x * 2^f is exact in the input's float type and
rint errs by at most 1/2; hence for n summands

    |decode(sum of encode(x_i)) - sum of clip(x_i)| <= n / 2^(f + 1)     (``max_error(n)``).

Bonawitz et al. 2017 (CCS, "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", section 3) sum vectors in Z_R; this module is the map from floats into Z_R.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from fedsecure.errors import FixedPointOverflow, SecAggInputError

RINGS: dict[int, tuple[type[np.unsignedinteger[Any]], type[np.signedinteger[Any]]]] = {
    32: (np.uint32, np.int32),
    64: (np.uint64, np.int64),
}
_EXACT = 1 << 53  # integers up to this are exact in float64
_ENCODE_BLOCK = 1 << 16  # entries per block of encode's scratch: a few hundred KB, in cache


class FixedPointCodec:
    """Encodes floats in [-bound, bound] into Z_(2^bits) so that ``summands`` of them add exactly."""

    def __init__(self, *, summands: int, bound: float, bits: int = 32, frac_bits: int | None = None) -> None:
        if type(summands) is not int or summands < 1:
            raise SecAggInputError(f"summands must be a positive int, got {summands!r}")
        if not (isinstance(bound, int | float) and math.isfinite(bound) and bound > 0):
            raise SecAggInputError(f"bound must be a positive finite number, got {bound!r}")
        if bits not in RINGS:
            raise SecAggInputError(f"bits must be 32 or 64, got {bits!r}")
        self.summands = summands
        b32 = np.float32(bound)  # rounded down to a float32, so updates of either type clip alike
        self.bound = float(b32 if b32 <= bound else np.nextafter(b32, np.float32(0)))
        self.bits = bits
        self.capacity = min((1 << (bits - 1)) - 1, _EXACT)
        if frac_bits is None:
            frac_bits = self._largest_frac_bits()
        elif type(frac_bits) is not int or not 0 <= frac_bits <= 1000:
            raise SecAggInputError(f"frac_bits must be an int in [0, 1000], got {frac_bits!r}")
        limit = round(self.bound * 2.0**frac_bits)
        if summands * limit > self.capacity:
            best = self._largest_frac_bits()
            raise FixedPointOverflow(
                f"{summands} summands of magnitude up to {self.bound} with {frac_bits} fractional bits "
                f"add up to {summands * limit}, beyond the {bits}-bit ring's {self.capacity}: use "
                f"frac_bits <= {best}, bits=64, fewer summands or a smaller bound"
            )
        self.frac_bits = frac_bits
        self.scale = 2.0**frac_bits
        self.limit = limit
        self.dtype = RINGS[bits][0]

    def _largest_frac_bits(self) -> int:
        need = self.summands * self.bound
        if need > self.capacity:
            raise FixedPointOverflow(
                f"{self.summands} summands of magnitude up to {self.bound} add up to {need:g}, "
                f"beyond the {self.bits}-bit ring's {self.capacity} even at integer resolution: "
                "use bits=64, fewer summands or clip updates to a smaller bound"
            )
        f = max(0, math.floor(math.log2(self.capacity / need)))
        while f > 0 and self.summands * round(self.bound * 2.0**f) > self.capacity:
            f -= 1
        while self.summands * round(self.bound * 2.0 ** (f + 1)) <= self.capacity:
            f += 1
        return f

    def max_error(self, summands: int | None = None) -> float:
        """The largest distance between a decoded sum and the sum of the clipped inputs."""
        return (self.summands if summands is None else summands) / (2.0 * self.scale)

    def encode(self, values: np.ndarray | torch.Tensor, *, out: np.ndarray | None = None) -> np.ndarray:
        """Clip to [-bound, bound] and encode; a flat array of the ring's unsigned dtype (``out`` if given).

        Works a block at a time through one small scratch buffer that stays in cache, so the
        update is read once and the result written once; the caller's update is left alone.
        """
        x = _as_float_array(values)
        if self.frac_bits > 100 and x.dtype != np.float64:
            x = x.astype(np.float64)  # 2^f would overflow float32
        if out is None:
            out = np.empty(x.size, self.dtype)
        elif out.dtype != self.dtype or out.shape != (x.size,) or not out.flags.c_contiguous:
            raise SecAggInputError(f"out must be a contiguous flat array of {x.size} {np.dtype(self.dtype).name}")
        ftype = x.dtype.type
        scale = ftype(self.scale)
        top = ftype(self.bound)  # exact: the bound is a float32 value
        signed = out.view(RINGS[self.bits][1])
        step = min(x.size, _ENCODE_BLOCK)
        tmp = np.empty(step, x.dtype)
        finite = np.empty(step, np.bool_)
        for start in range(0, x.size, step):
            part = x[start : start + step]
            t, ok = (tmp, finite) if part.size == step else (tmp[: part.size], finite[: part.size])
            if not np.isfinite(part, out=ok).all():
                raise SecAggInputError(
                    "the update holds NaN or infinite values; fix the training step or clip it first")
            np.clip(part, -top, top, out=t)
            np.multiply(t, scale, out=t)
            np.rint(t, out=t)
            signed[start : start + step] = t
        return out

    def decode(self, total: np.ndarray, *, summands: int | None = None) -> np.ndarray:
        """The float64 sum that ``total`` (a sum of at most ``summands`` encodings) stands for."""
        if summands is not None and summands > self.summands:
            raise SecAggInputError(
                f"a sum of {summands} encodings may have wrapped: this codec was built for at most {self.summands}"
            )
        if not isinstance(total, np.ndarray) or total.dtype != self.dtype:
            raise SecAggInputError(f"expected a numpy array of {np.dtype(self.dtype).name}, got {total!r:.60}")
        out = total.view(RINGS[self.bits][1]).astype(np.float64)
        return np.divide(out, self.scale, out=out)  # type: ignore[no-any-return]

    def to_wire(self) -> dict[str, Any]:
        return {"summands": self.summands, "bound": self.bound, "bits": self.bits, "frac_bits": self.frac_bits}

    @classmethod
    def from_wire(cls, value: Any) -> FixedPointCodec:
        if not isinstance(value, dict) or set(value) != {"summands", "bound", "bits", "frac_bits"}:
            raise SecAggInputError(f"malformed fixed-point parameters {value!r:.100}")
        return cls(**value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FixedPointCodec) and self.to_wire() == other.to_wire()

    def __hash__(self) -> int:
        return hash(tuple(self.to_wire().values()))

    def __repr__(self) -> str:
        return (f"FixedPointCodec(summands={self.summands}, bound={self.bound}, bits={self.bits}, "
                f"frac_bits={self.frac_bits})")


def _as_float_array(values: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        t = values.detach().cpu().reshape(-1)
        if not t.is_floating_point():
            t = t.double()
        elif t.dtype not in (torch.float32, torch.float64):
            t = t.float()
        return t.numpy()
    if not isinstance(values, np.ndarray):
        raise SecAggInputError(f"expected a numpy array or torch tensor, got {type(values).__name__}")
    x = values.reshape(-1)
    if x.dtype.kind not in "iubf":
        raise SecAggInputError(f"cannot encode an array of {x.dtype}: pass real numbers")
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64 if x.dtype.kind in "iub" else np.float32)
    return x
