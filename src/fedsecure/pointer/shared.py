"""Values secret-shared among workers: ``x.fix_precision().share(bob, alice)``.

PySyft's tutorials write ``x.fix_precision().share(bob, alice, crypto_provider=...)`` and get a
tensor whose additive shares live on the workers; sums are computed share by share and only
``.get().float_precision()`` puts a value together again. Here:

- ``fix_precision()`` of a local tensor is a `FixedPrecision` (fedsecure.aggregate.shares);
  ``.share(w1, w2, ...)`` splits it here and sends one int64 share to each worker.
- ``fix_precision()`` of a pointer is `RemoteFixedPrecision`: ``.share(w1, w2, ...)`` asks the
  worker holding the value to split it and to deliver the shares itself (one `Share` message),
  so the value never passes through this process and no single worker sees it. Shares of a
  value derived from private data carry its owner's labels.
- `SharedTensor` adds and subtracts share by share (plain torch ops on each holder), multiplies
  by public integers, and ``SharedTensor.sum`` asks each holder for its fixed function
  (`AggregateShares`), which a strict aggregator also runs.
- ``get()`` fetches every share (each holder's release policy applies) and returns the
  `FixedPrecision` they add up to; ``float_precision()`` decodes it.

Multiplying two shared values (Beaver triples, a crypto provider) is not supported: secure
aggregation needs sums only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from fedsecure.aggregate.shares import DEFAULT_FRAC_BITS, AdditiveShares, FixedPrecision
from fedsecure.errors import SecAggInputError, WorkerMismatch
from fedsecure.pointer.tensor import PointerTensor, send_tensor
from fedsecure.wire import messages as m
from fedsecure.worker.client import WorkerClient
from fedsecure.worker.core import new_id


def _holders(workers: Sequence[Any]) -> list[WorkerClient]:
    if len(workers) < 2 or not all(isinstance(w, WorkerClient) for w in workers):
        raise SecAggInputError(
            "share(...) takes two or more workers, each holding one share: x.fix_precision().share(bob, alice)"
        )
    if len({w.id for w in workers}) != len(workers):
        raise SecAggInputError(f"the share holders must be distinct workers, got {[w.id for w in workers]}")
    return list(workers)


class SharedTensor:
    """A fixed-point value held as additive shares by two or more workers (in holder order)."""

    def __init__(self, shares: Sequence[torch.Tensor], *, frac_bits: int) -> None:
        pointers = [s for s in shares if isinstance(s, PointerTensor)]
        if len(pointers) != len(shares) or len(pointers) < 2 or any(s.dtype != torch.int64 for s in pointers):
            raise SecAggInputError("a shared tensor is two or more pointers to int64 shares")
        self.shares, self.frac_bits = pointers, frac_bits

    @property
    def holders(self) -> list[WorkerClient]:
        return [s.location for s in self.shares]

    @property
    def shape(self) -> torch.Size:
        return self.shares[0].shape

    def _check(self, other: SharedTensor) -> None:
        if [w.id for w in self.holders] != [w.id for w in other.holders]:
            raise WorkerMismatch(
                f"shares held by {[w.id for w in self.holders]} and by {[w.id for w in other.holders]} cannot "
                "be combined: share both values among the same workers, in the same order"
            )
        if self.frac_bits != other.frac_bits:
            raise SecAggInputError(f"cannot combine {self.frac_bits} and {other.frac_bits} fractional bits")
        if self.shape != other.shape:
            raise SecAggInputError(f"cannot combine shared values of shapes {tuple(self.shape)} and {tuple(other.shape)}")

    def _public(self, value: Any) -> PointerTensor:
        """A public value, encoded in this fixed point, at the first holder."""
        if isinstance(value, FixedPrecision):
            if value.frac_bits != self.frac_bits:
                raise SecAggInputError(f"cannot add {value.frac_bits} fractional bits to {self.frac_bits}")
            ring = value
        else:
            ring = FixedPrecision.encode(torch.as_tensor(value, dtype=torch.float64), frac_bits=self.frac_bits)
        encoded = torch.from_numpy(ring.ring.view("int64").reshape(ring.shape))
        return send_tensor(encoded, self.holders[0])

    def _combine(self, other: Any, sign: int) -> SharedTensor:
        """Share by share: each holder adds (subtracts) the two shares it holds; a public value
        is added (subtracted) once, by the first holder."""
        if isinstance(other, SharedTensor):
            self._check(other)
            parts = [a + b if sign > 0 else a - b for a, b in zip(self.shares, other.shares, strict=True)]
        else:
            public = self._public(other)
            first = self.shares[0] + public if sign > 0 else self.shares[0] - public
            parts = [first, *(s.clone() for s in self.shares[1:])]
        return SharedTensor(parts, frac_bits=self.frac_bits)

    def __add__(self, other: Any) -> SharedTensor:
        return self._combine(other, 1)

    __radd__ = __add__

    def __sub__(self, other: Any) -> SharedTensor:
        return self._combine(other, -1)

    def __rsub__(self, other: Any) -> SharedTensor:
        return (-self)._combine(other, 1)

    def __neg__(self) -> SharedTensor:
        return SharedTensor([-s for s in self.shares], frac_bits=self.frac_bits)

    def __mul__(self, k: Any) -> SharedTensor:
        """By a public integer (a float would need the truncation protocol, not built)."""
        if type(k) is not int:
            raise SecAggInputError(
                f"a shared value can be multiplied by a public int only, got {type(k).__name__}: scale the "
                "values before fix_precision()"
            )
        return SharedTensor([s * k for s in self.shares], frac_bits=self.frac_bits)

    __rmul__ = __mul__

    @staticmethod
    def sum(values: Iterable[SharedTensor]) -> SharedTensor:
        """The sum, computed by each holder's fixed function (`AggregateShares`): a strict
        aggregator runs it too. The inputs are consumed: each share joins one sum only."""
        items = list(values)
        if not items:
            raise SecAggInputError("nothing to sum")
        for other in items[1:]:
            items[0]._check(other)
        out = []
        for i, holder in enumerate(items[0].holders):
            result = new_id()
            meta = holder.request(m.AggregateShares(holder.take_release(), [v.shares[i].id_at_location for v in items],
                                                    result))
            for v in items:
                v.shares[i]._fs.live = False  # the holder consumed it
            out.append(PointerTensor._from_meta(holder, meta))
        return SharedTensor(out, frac_bits=items[0].frac_bits)

    def get(self) -> FixedPrecision:
        """Fetch every share and add them up: the value, in fixed point."""
        return AdditiveShares.from_tensors([s.get() for s in self.shares], frac_bits=self.frac_bits).reconstruct()

    def float_precision(self) -> torch.Tensor:
        """``get().float_precision()`` in one step."""
        return self.get().float_precision()

    def __repr__(self) -> str:
        return (f"SharedTensor(shape={tuple(self.shape)}, frac_bits={self.frac_bits}, "
                f"held by {[w.id for w in self.holders]})")


def share_local(value: FixedPrecision, workers: Sequence[Any]) -> SharedTensor:
    """Split a local fixed-point value here and send one share to each worker."""
    holders = _holders(workers)
    parts = value.share(len(holders)).to_tensors()
    return SharedTensor([send_tensor(p, w) for p, w in zip(parts, holders, strict=True)], frac_bits=value.frac_bits)


def share_remote(source: WorkerClient, object_id: int, workers: Sequence[Any], *, frac_bits: int,
                 reference_id: int = 0, weighted: bool = False, privacy: dict[str, Any] | None = None
                 ) -> tuple[list[int], dict[str, Any]]:
    """Ask ``source`` to split its value ``object_id`` (or, with ``reference_id``, the update of
    model ``object_id`` from model ``reference_id``) and deliver one share to each worker; the
    shares' ids (one per worker) and the source's reply. If it fails, the shares that arrived
    before the failure are released on their holders."""
    holders = _holders(workers)
    ids = [new_id() for _ in holders]
    try:
        reply = source.request(m.Share(source.take_release(), object_id, reference_id, weighted, dict(privacy or {}),
                                       [w.id for w in holders], ids, frac_bits))
    except BaseException:
        for holder, i in zip(holders, ids, strict=True):
            holder.release(i)
        raise
    return ids, reply


class RemoteFixedPrecision:
    """``pointer.fix_precision()``: the value on its worker, to be shared from there."""

    def __init__(self, pointer: PointerTensor, frac_bits: int = DEFAULT_FRAC_BITS) -> None:
        if type(frac_bits) is not int or not 0 <= frac_bits <= 52:
            raise SecAggInputError(f"frac_bits must be an int in [0, 52], got {frac_bits!r}")
        self.pointer, self.frac_bits = pointer, frac_bits

    def share(self, *workers: Any) -> SharedTensor:
        source = self.pointer.location
        ids, reply = share_remote(source, self.pointer.id_at_location, workers, frac_bits=self.frac_bits)
        owners = self.pointer._fs_owners
        shares = [PointerTensor(w, i, reply["shape"], torch.int64, owners=owners) for w, i in zip(workers, ids, strict=True)]
        return SharedTensor(shares, frac_bits=self.frac_bits)

    def __repr__(self) -> str:
        return f"RemoteFixedPrecision({self.pointer!r}, frac_bits={self.frac_bits})"


def fix_precision(tensor: torch.Tensor, frac_bits: int = DEFAULT_FRAC_BITS) -> FixedPrecision | RemoteFixedPrecision:
    """``x.fix_precision()``: a local tensor in fixed point, or a pointer's value marked for sharing."""
    if isinstance(tensor, PointerTensor):
        return RemoteFixedPrecision(tensor, frac_bits)
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"fix_precision() takes a tensor, got {type(tensor).__name__}")
    return FixedPrecision.encode(tensor, frac_bits=frac_bits)
