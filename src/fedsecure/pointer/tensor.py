"""`PointerTensor`: a torch tensor whose data lives on a worker.

As DTensor does, the pointer is a wrapper subclass holding only a spec (worker,
object id, shape, dtype). One dispatcher, ``__torch_function__``, turns every
torch call on pointers into one `Call` to the worker that holds them: the
worker runs the op (autograd included) and replies with the result's spec.
Metadata queries (shape, dtype, ...) are answered locally, without a message.
An op outside the allow-list fails loudly, naming the op; so does mixing
pointers to two workers, or a pointer with a local tensor.
"""

from __future__ import annotations

from typing import Any

import torch
from torch._C import DisableTorchFunctionSubclass
from torch.overrides import resolve_name

from fedsecure.errors import OperationNotAllowed, WorkerMismatch
from fedsecure.pointer import render
from fedsecure.pointer.chains import chain_call, remote_get
from fedsecure.pointer.local import LocalWorker, local_worker
from fedsecure.pointer.predict import predict
from fedsecure.wire import codec
from fedsecure.wire import messages as m
from fedsecure.wire.codec import Ref
from fedsecure.wire.ids import new_id
from fedsecure.worker.allowlist import NAME_OF
from fedsecure.worker.client import (
    DESCRIPTION,
    DESCRIPTION_ATTR,
    TAGS,
    TAGS_ATTR,
    WorkerClient,
    clean_tags,
    describe,
    description_of,
    tag,
    tags_of,
)

_T = torch.Tensor
_CPU = torch.device("cpu")

# Answered from the pointer's own spec, never sent.
_LOCAL: set[Any] = {
    *(
        getattr(_T, name).__get__
        for name in ["shape", "dtype", "device", "requires_grad", "is_leaf", "layout", "is_sparse", "is_sparse_csr", "is_cuda", "is_meta", "is_quantized", "is_mkldnn", "is_nested", "is_cpu", "is_xpu", "is_mps", "ndim", "grad_fn", "output_nr", "_version", "retains_grad", "itemsize", "nbytes"]
    ),
    *(
        getattr(_T, name)
        for name in ["size", "dim", "ndimension", "numel", "nelement", "__len__", "element_size", "is_complex", "is_floating_point", "is_signed", "is_contiguous", "stride", "get_device", "__hash__", "is_inference", "storage_offset"]
    ),
    torch.is_complex,
    torch.is_floating_point,
    torch.numel,
}

# Python-level spellings of allowed ops, mapped onto them.
_ALIASES: dict[Any, str] = {_T.requires_grad.__set__: "Tensor.requires_grad_"}  # type: ignore[attr-defined]


class _Remote:
    """Where a pointer's object lives (mutable: a move re-points it in place)."""

    __slots__ = ("worker", "id", "live")

    def __init__(self, worker: WorkerClient, obj_id: int) -> None:
        self.worker = worker
        self.id = obj_id
        self.live = True

    def release(self) -> None:
        if self.live:
            self.live = False
            self.worker.release(self.id)


class PointerTensor(torch.Tensor):
    """A pointer to a tensor on ``location``; torch code runs on it unchanged.

    Users get pointers from ``tensor.send(worker)`` (or ``fedsecure.send``), never
    from this class's constructor.
    """

    _fs: _Remote
    _fs_owners: list[str]
    _fs_child: PointerTensor | None
    # (the worker's gradient epoch, the gradient pointer or None) when last read or set
    _fs_grad: tuple[int, PointerTensor | None] | None

    @staticmethod
    def __new__(
        cls,
        worker: WorkerClient,
        obj_id: int,
        shape: Any,
        dtype: torch.dtype,
        requires_grad: bool = False,
        owners: list[str] | None = None,
    ) -> PointerTensor:
        r = _T._make_wrapper_subclass(
            cls, shape, dtype=dtype, device=_CPU, requires_grad=requires_grad
        )
        remote = _Remote(worker, obj_id)
        r._fs = remote
        r._fs_owners = owners or []
        r._fs_child = None
        r._fs_grad = None
        return r

    def __del__(self) -> None:
        # Frees the remote object lazily (with the next request); cheaper than a
        # weakref.finalize per pointer, and a pointer is never resurrected (no C++
        # structure holds it: every torch call on it stops at __torch_function__).
        remote = self.__dict__.get("_fs")
        if remote is not None:
            remote.release()

    @classmethod
    def _from_meta(cls, worker: WorkerClient, meta: dict[str, Any]) -> PointerTensor:
        ptr = cls(
            worker,
            meta["id"],
            meta["shape"],
            codec.DTYPES[meta["dtype"]],
            meta["requires_grad"],
            meta["owners"],
        )
        if "tags" in meta:  # what the worker holds it under (Put and Search replies)
            tags, text = meta["tags"], meta.get("description")
            setattr(ptr, TAGS_ATTR, [f"#{t}" for t in tags if isinstance(t, str)] if isinstance(tags, list) else [])
            setattr(ptr, DESCRIPTION_ATTR, text if isinstance(text, str) and text else None)
        return ptr

    # -- the spec ------------------------------------------------------------------------

    @property
    def location(self) -> WorkerClient:
        """The worker that holds the data."""
        return self._fs.worker

    @property
    def id_at_location(self) -> int:
        return self._fs.id

    @property
    def owner(self) -> LocalWorker:
        """The process holding this pointer: the local worker, ``"me"`` (`fedsecure.local_worker`)."""
        return local_worker

    # tags and description: the same verbs and properties as a local tensor's (`worker.client`)
    tags = TAGS
    description = DESCRIPTION
    tag = tag
    describe = describe

    @property
    def owners(self) -> list[str]:
        """The data owners whose private data this value derives from, as the worker
        labels it now (one message; ``repr`` shows the last answer without asking)."""
        remote = self._fs
        self._fs_owners = remote.worker.request(m.Owners(remote.id))
        return list(self._fs_owners)

    def __repr__(self, **_: Any) -> str:  # type: ignore[override]
        return render.text(self)

    def _repr_html_(self) -> str:
        """How a notebook shows the pointer: where its value is, what it is, and whose data."""
        return render.html(self)

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return format(repr(self), spec)

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError("a PointerTensor cannot be pickled; .get() its value first")

    def __deepcopy__(self, memo: dict[int, Any]) -> PointerTensor:
        return self.copy()

    # -- verbs -------------------------------------------------------------------------

    def get(self) -> Any:
        """Fetch the value and delete the remote copy (if the worker's policy allows)."""
        remote = self._fs
        value = remote.worker.request(m.Get(remote.id))
        remote.live = False  # the worker deleted it
        if "ref" in value:
            child = self._fs_child
            if child is None or value["ref"] != [child.location.id, child.id_at_location]:
                raise WorkerMismatch("the worker returned a pointer this process did not send")
            return child
        t: torch.Tensor = value["tensor"]
        if value["requires_grad"]:
            t.requires_grad_(True)
            t.grad = value.get("grad")
        return t

    def move(self, worker: WorkerClient) -> PointerTensor:
        """Send the value straight from its worker to ``worker``; this pointer follows it.

        The caller sends one instruction; the data never passes through this process.
        """
        remote = self._fs
        if worker is remote.worker:
            return self
        if self._fs_child is not None:
            raise OperationNotAllowed("a pointer to a pointer cannot move; get() it first", op="move")
        obj_id = new_id()
        remote.worker.request(m.Move(remote.id, worker.id, obj_id))
        remote.worker, remote.id = worker, obj_id
        self._fs_grad = None
        return self

    def send(self, worker: WorkerClient, **_: Any) -> PointerTensor:
        """Give ``worker`` this pointer: the result points to the pointer held there."""
        obj_id = new_id()
        with DisableTorchFunctionSubclass():
            shape, dtype = list(self.shape), self.dtype
        worker.request(
            m.PutRef(
                obj_id,
                self._fs.worker.id,
                self._fs.id,
                shape,
                codec.dtype_name(dtype),
            )
        )
        ptr = PointerTensor(worker, obj_id, shape, dtype)
        ptr._fs_child = self
        return ptr

    def remote_get(self) -> PointerTensor:
        """For a pointer to a pointer (``t.send(bob).send(alice)``): the worker in the middle (alice)
        takes the value from the end of the chain (bob), which no longer holds it; this pointer then
        points to the value on alice. Returns this pointer."""
        return remote_get(self)

    def copy(self) -> PointerTensor:
        """A new remote copy of the value, on the same worker (a leaf, like ``deepcopy``)."""
        with torch.no_grad():
            twin = self.detach().clone()
        if self.requires_grad:
            twin.requires_grad_(True)
        return twin  # type: ignore[return-value]

    # -- the dispatcher ------------------------------------------------------------------

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _LOCAL:
            with DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        name = NAME_OF.get(func) or _ALIASES.get(func)
        if name in _GRAD_OPS:
            return _grad(name, args, kwargs)
        if name is None:
            raise OperationNotAllowed(
                f"{resolve_name(func) or func} is not supported on pointers (it is not on the "
                "workers' allow-list, docs/allowlist.md); .get() the value if you may, or "
                "express the computation with allowed ops",
                op=str(resolve_name(func) or func),
            )
        try:
            return call(name, args, kwargs)
        except _ChainOp:
            return chain_call(func, name, args, kwargs, cls)

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:  # type: ignore[override]
        # Reached only by a path that bypassed __torch_function__: refuse rather than guess.
        raise OperationNotAllowed(f"{func} reached a pointer below the dispatcher", op=str(func))


class _ChainOp(Exception):
    """An operand is a pointer to a pointer: the op runs where the chain ends (`chains.chain_call`)."""


_GRAD_OPS = frozenset({"Tensor.grad.__get__", "Tensor.grad.__set__", "Tensor.backward"})


def _grad(name: str, args: Any, kwargs: dict[str, Any]) -> Any:
    """``.grad`` reads come from a cache that every gradient-changing op invalidates.

    torch.optim reads ``p.grad`` several times per parameter and step; each read was
    a message. A worker's gradients change only through ``backward`` and ``.grad = ``,
    both sent by this client, so the client counts them (``grad_epoch``) and a cached
    gradient pointer stays valid until the count moves.
    """
    self: PointerTensor = args[0]
    worker = self._fs.worker
    if name == "Tensor.grad.__get__":
        cached = self._fs_grad
        if cached is not None and cached[0] == worker.grad_epoch:
            grad = cached[1]
            if grad is None or (grad._fs.live and grad._fs.worker is worker):
                return grad
        grad = call(name, args, kwargs)
        self._fs_grad = (worker.grad_epoch, grad)
        return grad
    out = call(name, args, kwargs)
    worker.grad_epoch += 1
    if name == "Tensor.grad.__set__":
        self._fs_grad = (worker.grad_epoch, args[1])
    return out


class _Site:
    """The worker an op runs on, found while encoding its arguments."""

    __slots__ = ("worker", "op", "pointers")

    def __init__(self, op: str) -> None:
        self.worker: WorkerClient | None = None
        self.op = op
        self.pointers: dict[int, PointerTensor] = {}


_PLAIN = frozenset({int, float, bool, str, type(None)})


def _encode(value: Any, site: _Site) -> Any:
    if type(value) in _PLAIN:
        return value
    if isinstance(value, PointerTensor):
        remote = value._fs
        if not remote.live:
            raise OperationNotAllowed(
                f"{site.op}: this pointer's value was fetched with get() or freed", op=site.op
            )
        if value._fs_child is not None:
            raise _ChainOp
        if site.worker is None:
            site.worker = remote.worker
        elif remote.worker is not site.worker:
            raise WorkerMismatch(
                f"{site.op}: operands live on different workers, {site.worker.id!r} and "
                f"{remote.worker.id!r}; move one of them first (ptr.move(worker))"
            )
        site.pointers[remote.id] = value
        return Ref(remote.id)
    if isinstance(value, torch.Tensor):
        raise WorkerMismatch(
            f"{site.op}: mixes a pointer with a local tensor of shape {tuple(value.shape)}; "
            "send the local tensor to the same worker first (t.send(worker))"
        )
    if isinstance(value, list | tuple):
        out = [_encode(v, site) for v in value]
        return out if isinstance(value, list) else tuple(out)
    if isinstance(value, dict):
        return {k: _encode(v, site) for k, v in value.items()}
    return value


def _decode(value: Any, worker: WorkerClient, site: _Site) -> Any:
    if isinstance(value, dict):
        same = site.pointers.get(value["id"])
        if same is not None:  # in place: the same pointer, perhaps with new owners
            same._fs_owners = value["owners"]
            return same
        return PointerTensor._from_meta(worker, value)
    if isinstance(value, tuple):
        return tuple(_decode(v, worker, site) for v in value)
    return value


def _deferrable(name: str) -> bool:
    if not name.startswith("Tensor."):
        return False
    method = name[len("Tensor.") :]
    if method in ("requires_grad_", "detach_"):  # they change the pointer's own metadata
        return False
    plain_in_place = "." not in method and method.endswith("_") and not method.startswith("__")
    return plain_in_place or method in (
        "__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ipow__",
        "grad.__set__", "data.__set__",
    )


# In-place ops: their result is the pointer they were called on (or None for setters),
# so the client need not wait for the worker. They go with the next request.
DEFERRED = frozenset(name for name in NAME_OF.values() if _deferrable(name))


# Ops whose result is a plain value (it must come back) or that change what pointers know.
_SYNCHRONOUS = frozenset(
    {
        "Tensor.item", "Tensor.tolist", "Tensor.__bool__", "Tensor.__float__", "Tensor.__int__",
        "Tensor.equal", "torch.equal", "torch.allclose", "Tensor.requires_grad_", "Tensor.detach_",
        "Tensor.backward", "Tensor.grad.__get__", "Tensor.data.__get__",
    }
)


def call(
    op: str,
    args: Any,
    kwargs: dict[str, Any],
    module_id: int | None = None,
    training: bool = False,
    worker: WorkerClient | None = None,
) -> Any:
    """Run ``op`` on the worker that holds the pointers among its arguments."""
    site = _Site(op)
    site.worker = worker
    wire_args = _encode(list(args), site)
    wire_kwargs = _encode(kwargs, site) if kwargs else {}
    target = site.worker
    if target is None:
        raise WorkerMismatch(f"{op}: no pointer among the arguments")
    result_id = new_id()
    grad = torch.is_grad_enabled()
    msg: m.Request
    if module_id is None:
        msg = m.Call(op, wire_args, wire_kwargs, result_id, grad)
        if op in DEFERRED:
            target.defer(msg)
            return None if op.endswith(("__set__", "__setitem__")) else args[0]
        if target.pipelined and op not in _SYNCHRONOUS:
            predicted = predict(op, args, kwargs, PointerTensor)
            if predicted is not None:
                target.defer(msg)
                return PointerTensor(target, result_id, *predicted) if isinstance(predicted, tuple) else predicted
    else:
        msg = m.CallModule(module_id, wire_args, wire_kwargs, result_id, grad, training)
    out = _decode(target.request(msg), target, site)
    if op == "Tensor.requires_grad_" and isinstance(out, PointerTensor):
        with DisableTorchFunctionSubclass():
            _T.requires_grad_(out, bool(args[1]) if len(args) > 1 else kwargs.get("requires_grad", True))
    return out


def send_tensor(
    tensor: torch.Tensor,
    worker: WorkerClient,
    *,
    private: bool = False,
    tags: Any = (),
) -> PointerTensor:
    """Send a local tensor to ``worker``; return a pointer to it.

    ``private=True`` makes it the worker's own private data (what the worker would
    hold had it loaded the data itself): from then on the release policy applies.
    """
    if isinstance(tensor, PointerTensor):
        return tensor.send(worker)
    if not isinstance(worker, WorkerClient):
        raise TypeError(f"send() needs a worker, got {type(worker).__name__}")
    obj_id = new_id()
    meta = worker.request(
        m.Put(
            obj_id,
            tensor.detach(),
            tensor.requires_grad,
            private,
            clean_tags([*tags_of(tensor), *([tags] if isinstance(tags, str) else tags)]),
            description_of(tensor) or "",
        )
    )
    return PointerTensor._from_meta(worker, meta)
