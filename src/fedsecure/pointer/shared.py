"""Values secret-shared among workers: ``x.fix_precision().share(bob, alice, crypto_provider=james)``.

PySyft 0.2's tutorials encode a tensor in fixed point, split it into additive shares held by
workers, add shared values share by share, and decode only a sum. Here, with PySyft's meaning of
each call:

- ``fix_precision()`` of a local tensor is a `LocalFixedPrecision` (the pure math is
  `fedsecure.aggregate.shares.FixedPrecision`); ``.share(w1, w2, ...)`` splits it here, sends
  one int64 share to each worker, and returns the `SharedTensor` itself, as PySyft does.
- ``fix_precision()`` of a pointer is a `RemoteFixedPrecision`. ``.share(w1, w2, ...)`` asks the
  worker holding the value to split it and deliver the shares itself (one `Share` message): the
  value never passes through this process. As in PySyft, where the shared value is made on that
  worker, the result is a pointer to it (`SharedTensorPointer`): its ``.get()`` fetches the
  `SharedTensor` (pointers to the shares; nothing is decrypted, no share moves). Shares of a value
  derived from private data carry its owner's labels.
- `SharedTensor` adds and subtracts share by share (plain torch ops on each holder), multiplies
  by public integers, and ``SharedTensor.sum`` asks each holder for its fixed function
  (`AggregateShares`), which a strict aggregator also runs. ``get()`` fetches every share (each
  holder's release policy applies) and adds them up; ``float_precision()`` decodes to the dtype
  that was encoded (torch's promotion when float32 and float64 values were combined).

``crypto_provider`` is accepted and kept, as PySyft's spelling has it, but nothing uses it yet:
it would deal the Beaver triples that multiplying two shared values needs, and sums need none.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NoReturn, cast

import torch
from torch._C import DisableTorchFunctionSubclass

from fedsecure.aggregate.shares import (
    DEFAULT_FRAC_BITS,
    AdditiveShares,
    FixedPrecision,
    decoded_dtype,
    promote,
)
from fedsecure.errors import ObjectNotFound, OperationNotAllowed, SecAggInputError, WorkerMismatch
from fedsecure.pointer.tensor import PointerTensor, send_tensor
from fedsecure.wire import messages as m
from fedsecure.wire.ids import new_id
from fedsecure.worker.client import WorkerClient


def _holders(workers: Sequence[Any]) -> list[WorkerClient]:
    if len(workers) < 2 or not all(isinstance(w, WorkerClient) for w in workers):
        raise SecAggInputError(
            "share(...) takes two or more workers, each holding one share: x.fix_precision().share(bob, alice)"
        )
    if len({w.id for w in workers}) != len(workers):
        raise SecAggInputError(f"the share holders must be distinct workers, got {[w.id for w in workers]}")
    return list(workers)


def _provider(crypto_provider: Any, holders: Sequence[WorkerClient]) -> WorkerClient | None:
    """The crypto provider, checked: a worker that holds no share (it would deal the correlated
    randomness of multiplications, so it must not also see shares), or None."""
    if crypto_provider is None:
        return None
    if not isinstance(crypto_provider, WorkerClient):
        raise TypeError(
            f"crypto_provider must be a worker, e.g. james = fedsecure.VirtualWorker(hook, id='james'), "
            f"got {type(crypto_provider).__name__}"
        )
    if crypto_provider.id in {h.id for h in holders}:
        raise SecAggInputError(
            f"the crypto provider {crypto_provider.id!r} also holds a share: choose a worker that holds none"
        )
    return crypto_provider


def _name(worker: WorkerClient | None) -> str | None:
    return None if worker is None else worker.id


def _not_built(what: str, op: str) -> OperationNotAllowed:
    return OperationNotAllowed(
        f"{what}: multiplying shared values (or by a float or a tensor) would take Beaver triples from the "
        "crypto provider, and that is not built yet. Built: +, - and sum of shared values, + and - of public "
        "values, * by a public int. Scale before encoding ((x * 0.5).fix_precision().share(...)) or after "
        "decoding ((a + b).get().float_precision() / 2)",
        op=op,
    )


def _needs_get(what: str) -> OperationNotAllowed:
    return OperationNotAllowed(
        f"{what}: not on a pointer to a shared value (what ptr.fix_precision().share(...) returns, as in "
        "PySyft); call .get() first to fetch the SharedTensor. That decrypts nothing: its shares stay "
        "where they are, and (a + b).get() then reconstructs a sum",
        op=what.strip("."),
    )


class SharedTensor:
    """A fixed-point value held as additive shares by two or more workers (in holder order).

    ``dtype``: the floating dtype ``float_precision()`` returns; ``crypto_provider``: the worker
    named at ``share(...)`` (kept, not used: see the module docstring)."""

    def __init__(self, shares: Sequence[torch.Tensor], *, frac_bits: int, dtype: torch.dtype = torch.float64,
                 crypto_provider: WorkerClient | None = None) -> None:
        pointers = [s for s in shares if isinstance(s, PointerTensor)]
        if len(pointers) != len(shares) or len(pointers) < 2 or any(s.dtype != torch.int64 for s in pointers):
            raise SecAggInputError("a shared tensor is two or more pointers to int64 shares")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise SecAggInputError(f"a shared value decodes to a floating torch dtype, got {dtype!r}")
        self.shares, self.frac_bits, self.dtype = pointers, frac_bits, dtype
        self.crypto_provider = _provider(crypto_provider, self.holders)

    @property
    def holders(self) -> list[WorkerClient]:
        return [s.location for s in self.shares]

    @property
    def shape(self) -> torch.Size:
        return self.shares[0].shape

    def _like(self, parts: Sequence[torch.Tensor], dtype: torch.dtype | None = None,
              provider: WorkerClient | None = None) -> SharedTensor:
        return SharedTensor(parts, frac_bits=self.frac_bits, dtype=dtype or self.dtype,
                            crypto_provider=provider or self.crypto_provider)

    def _check(self, other: SharedTensor) -> tuple[torch.dtype, WorkerClient | None]:
        """That ``other`` combines with this value; the combination's dtype and crypto provider."""
        if [w.id for w in self.holders] != [w.id for w in other.holders]:
            raise WorkerMismatch(
                f"shares held by {[w.id for w in self.holders]} and by {[w.id for w in other.holders]} cannot "
                "be combined: share both values among the same workers, in the same order"
            )
        if self.frac_bits != other.frac_bits:
            raise SecAggInputError(f"cannot combine {self.frac_bits} and {other.frac_bits} fractional bits: "
                                   "encode both with the same frac_bits")
        if self.shape != other.shape:
            raise SecAggInputError(f"cannot combine shared values of shapes {tuple(self.shape)} and {tuple(other.shape)}")
        mine, theirs = self.crypto_provider, other.crypto_provider
        if mine is not None and theirs is not None and mine.id != theirs.id:
            raise WorkerMismatch(f"values shared with crypto providers {mine.id!r} and {theirs.id!r} cannot be "
                                 "combined: share both with the same crypto_provider")
        return promote(self.dtype, other.dtype), mine or theirs

    def _public(self, value: Any) -> tuple[PointerTensor, torch.dtype]:
        """A public value, encoded in this fixed point, at the first holder; the result's dtype."""
        if isinstance(value, SharedTensorPointer):
            raise _needs_get("combining it with a shared value")
        if isinstance(value, PointerTensor):
            raise WorkerMismatch("a remote value cannot be added to a shared one as a public value: share it "
                                 "among the same workers first, ptr.fix_precision().share(...).get()")
        if isinstance(value, FixedPrecision):
            if value.frac_bits != self.frac_bits:
                raise SecAggInputError(f"cannot add {value.frac_bits} fractional bits to {self.frac_bits}")
            ring, dtype = value, promote(self.dtype, value.dtype)
        elif isinstance(value, torch.Tensor):  # torch's promotion: a 0-dim tensor keeps this dtype
            dtype = promote(self.dtype, value.dtype) if value.is_floating_point() and value.dim() else self.dtype
            ring = FixedPrecision.encode(value.detach(), frac_bits=self.frac_bits)
        elif isinstance(value, int | float):
            ring, dtype = FixedPrecision.encode(torch.tensor(float(value), dtype=torch.float64),
                                                frac_bits=self.frac_bits), self.dtype
        else:
            raise SecAggInputError(f"a shared value combines with numbers, tensors and shared values, got "
                                   f"{type(value).__name__}")
        if torch.broadcast_shapes(ring.shape, self.shape) != self.shape:
            raise SecAggInputError(f"a public value of shape {ring.shape} would change the shared value's shape "
                                   f"{tuple(self.shape)}: give one that broadcasts to it")
        encoded = torch.from_numpy(ring.ring.view("int64").reshape(ring.shape))
        return send_tensor(encoded, self.holders[0]), dtype

    def _combine(self, other: Any, sign: int) -> SharedTensor:
        """Share by share: each holder adds (subtracts) the two shares it holds; a public value
        is added (subtracted) once, by the first holder."""
        if isinstance(other, SharedTensor):
            dtype, provider = self._check(other)
            parts = [a + b if sign > 0 else a - b for a, b in zip(self.shares, other.shares, strict=True)]
            return self._like(parts, dtype, provider)
        public, dtype = self._public(other)
        first = self.shares[0] + public if sign > 0 else self.shares[0] - public
        return self._like([first, *(s.clone() for s in self.shares[1:])], dtype)

    def __add__(self, other: Any) -> SharedTensor:
        return self._combine(other, 1)

    __radd__ = __add__

    def __sub__(self, other: Any) -> SharedTensor:
        return self._combine(other, -1)

    def __rsub__(self, other: Any) -> SharedTensor:
        return (-self)._combine(other, 1)

    def __neg__(self) -> SharedTensor:
        return self._like([-s for s in self.shares])

    def __mul__(self, k: Any) -> SharedTensor:
        """By a public integer: each holder multiplies its share."""
        if isinstance(k, SharedTensor | SharedTensorPointer):
            raise _not_built("shared * shared", "mul")
        if type(k) is not int:
            raise _not_built(f"shared * {type(k).__name__}", "mul")
        return self._like([s * k for s in self.shares])

    __rmul__ = __mul__

    def __truediv__(self, other: Any) -> NoReturn:
        raise _not_built(f"shared / {type(other).__name__}", "truediv")

    def __matmul__(self, other: Any) -> NoReturn:
        raise _not_built("shared @ value", "matmul")

    __rmatmul__ = __matmul__

    @staticmethod
    def sum(values: Iterable[SharedTensor]) -> SharedTensor:
        """The sum, computed by each holder's fixed function (`AggregateShares`): a strict
        aggregator runs it too. The inputs are consumed: each share joins one sum only."""
        items = list(values)
        if not items:
            raise SecAggInputError("nothing to sum")
        if not all(isinstance(v, SharedTensor) for v in items):
            if any(isinstance(v, SharedTensorPointer) for v in items):
                raise _needs_get("SharedTensor.sum")
            raise SecAggInputError("SharedTensor.sum takes shared values: x.fix_precision().share(bob, alice)")
        dtype, provider = items[0].dtype, items[0].crypto_provider
        for other in items[1:]:
            other_dtype, _ = items[0]._check(other)
            theirs = other.crypto_provider
            if provider is not None and theirs is not None and provider.id != theirs.id:
                raise WorkerMismatch(f"values shared with crypto providers {provider.id!r} and {theirs.id!r} cannot "
                                     "be summed: share them all with the same crypto_provider")
            dtype, provider = promote(dtype, other_dtype), provider or other.crypto_provider
        out = []
        for i, holder in enumerate(items[0].holders):
            result = new_id()
            meta = holder.request(m.AggregateShares([v.shares[i].id_at_location for v in items],
                                                    result))
            for v in items:
                v.shares[i]._fs.live = False  # the holder consumed it
            out.append(PointerTensor._from_meta(holder, meta))
        return items[0]._like(out, dtype, provider)

    def get(self) -> LocalFixedPrecision:
        """Fetch every share and add them up: the value, in fixed point (as PySyft's ``get()`` of a
        shared value reconstructs it). Each holder's release policy applies to its share."""
        parts = [s.get() for s in self.shares]
        value = AdditiveShares.from_tensors(parts, frac_bits=self.frac_bits, dtype=self.dtype).reconstruct()
        return LocalFixedPrecision(ring=value.ring, shape=value.shape, frac_bits=value.frac_bits, dtype=value.dtype)

    def float_precision(self) -> torch.Tensor:
        """``get().float_precision()`` in one step."""
        return self.get().float_precision()

    def __repr__(self) -> str:
        return (f"SharedTensor(shape={tuple(self.shape)}, dtype={self.dtype}, frac_bits={self.frac_bits}, "
                f"held by {[w.id for w in self.holders]}, crypto_provider={_name(self.crypto_provider)!r})")


class SharedTensorPointer:
    """What ``ptr.fix_precision().share(...)`` returns: as in PySyft, a pointer to the shared value,
    made at ``location`` (the worker that split it). ``.get()`` fetches the `SharedTensor`; nothing is
    decrypted and no share moves. Every other use asks for ``.get()`` first."""

    __slots__ = ("_shared", "location")

    def __init__(self, shared: SharedTensor, location: WorkerClient) -> None:
        self._shared: SharedTensor | None = shared
        self.location = location

    def get(self) -> SharedTensor:
        """The shared value: pointers to its shares, which stay on their holders."""
        shared = self._shared
        if shared is None:
            raise ObjectNotFound("this pointer's shared value was fetched by an earlier .get(): use the "
                                 "SharedTensor that call returned")
        self._shared = None
        return shared

    def __getattr__(self, name: str) -> NoReturn:
        if name.startswith("_"):
            raise AttributeError(name)
        raise _needs_get(f".{name}")

    def _refuse(self, *_: Any) -> NoReturn:
        raise _needs_get("arithmetic")

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __matmul__ = __neg__ = _refuse

    def __repr__(self) -> str:
        shared = self._shared
        if shared is None:
            return f"SharedTensorPointer(@{self.location.id}) (gone: fetched by .get())"
        return (f"SharedTensorPointer(@{self.location.id} -> shares on {[w.id for w in shared.holders]}, "
                f"shape={tuple(shared.shape)}, dtype={shared.dtype}, crypto_provider={_name(shared.crypto_provider)!r};"
                " .get() fetches the SharedTensor)")


class LocalFixedPrecision(FixedPrecision):
    """``x.fix_precision()`` of a local tensor: a `FixedPrecision` that can also be shared among
    workers. ``share(bob, alice, crypto_provider=james)`` returns the `SharedTensor`; ``share(n)``
    splits into n local `AdditiveShares`, as `FixedPrecision` does."""

    def share(self, *holders: Any, crypto_provider: Any = None) -> Any:
        if len(holders) <= 1 and all(type(h) is int for h in holders):
            if crypto_provider is not None:
                raise SecAggInputError("crypto_provider goes with sharing among workers: "
                                       "x.fix_precision().share(bob, alice, crypto_provider=james)")
            return super().share(*holders)
        return share_local(self, holders, crypto_provider=crypto_provider)


def share_local(value: FixedPrecision, workers: Sequence[Any], *, crypto_provider: Any = None) -> SharedTensor:
    """Split a local fixed-point value here and send one share to each worker."""
    holders = _holders(workers)
    provider = _provider(crypto_provider, holders)
    parts = value.share(len(holders)).to_tensors()
    return SharedTensor([send_tensor(p, w) for p, w in zip(parts, holders, strict=True)], frac_bits=value.frac_bits,
                        dtype=value.dtype, crypto_provider=provider)


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
        reply = source.request(m.Share(object_id, reference_id, weighted, dict(privacy or {}),
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

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the shared value decodes to: the pointer's, when floating."""
        with DisableTorchFunctionSubclass():
            return decoded_dtype(self.pointer.dtype)

    def share(self, *workers: Any, crypto_provider: Any = None) -> SharedTensorPointer:
        """The worker holding the value splits it and sends one share to each of ``workers``; a
        pointer to the shared value, whose ``.get()`` gives the `SharedTensor`."""
        provider = _provider(crypto_provider, _holders(workers))
        source = self.pointer.location
        ids, reply = share_remote(source, self.pointer.id_at_location, workers, frac_bits=self.frac_bits)
        owners = self.pointer._fs_owners
        shares = [PointerTensor(w, i, reply["shape"], torch.int64, owners=owners) for w, i in zip(workers, ids, strict=True)]
        shared = SharedTensor(shares, frac_bits=self.frac_bits, dtype=self.dtype, crypto_provider=provider)
        return SharedTensorPointer(shared, source)

    def float_precision(self) -> PointerTensor:
        """Back from fixed point, on the worker: the value rounded to ``frac_bits`` fractional bits
        (x * 2^f, rounded, / 2^f: exact in binary floating point), in the pointer's dtype."""
        value = self.pointer.detach()
        if self.dtype != value.dtype:
            value = value.double()
        scale = float(2**self.frac_bits)
        return cast(PointerTensor, (value * scale).round() / scale)

    def __repr__(self) -> str:
        return f"RemoteFixedPrecision({self.pointer!r}, frac_bits={self.frac_bits})"


def fix_precision(tensor: torch.Tensor, frac_bits: int = DEFAULT_FRAC_BITS) -> LocalFixedPrecision | RemoteFixedPrecision:
    """``x.fix_precision()``: a local tensor in fixed point, or a pointer's value marked for sharing."""
    if isinstance(tensor, PointerTensor):
        return RemoteFixedPrecision(tensor, frac_bits)
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"fix_precision() takes a tensor, got {type(tensor).__name__}")
    return LocalFixedPrecision.encode(tensor, frac_bits=frac_bits)
