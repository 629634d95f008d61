"""`VirtualWorker`: a worker in the caller's process, reached through the message layer."""

from __future__ import annotations

import html
import secrets
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from fedsecure.errors import WorkerUnavailable
from fedsecure.wire import codec
from fedsecure.wire import messages as m
from fedsecure.wire.codec import dtype_name
from fedsecure.wire.ids import new_id
from fedsecure.worker import execute as ex
from fedsecure.worker import labels as lb
from fedsecure.worker.client import WorkerClient, clean_description, clean_tags, description_of, tags_of
from fedsecure.worker.core import WorkerCore
from fedsecure.worker.labels import Policy
from fedsecure.worker.secure import SecAggIdentity
from fedsecure.worker.store import Entry, RemoteRecord, Sender


class Federation:
    """The in-process network: routes worker-to-worker messages and counts their bytes."""

    def __init__(self) -> None:
        self.cores: dict[str, WorkerCore] = {}
        self.link_bytes: dict[tuple[str, str], int] = {}
        # One request at a time per worker, as a server does: the engine may train several
        # workers in threads, and their moves meet at the aggregator.
        self.locks: dict[str, threading.RLock] = {}

    def add(self, core: WorkerCore) -> None:
        self.cores[core.id] = core
        self.locks[core.id] = threading.RLock()

    def call(self, worker_id: str, data: bytes, sender: Sender) -> bytes:
        with self.locks[worker_id]:
            return self.cores[worker_id].handle_local(data, sender)

    def send(self, source: str, destination: str, data: bytes) -> bytes:
        core = self.cores.get(destination)
        if core is None:
            err = WorkerUnavailable(f"no worker {destination!r} in this federation")
            return m.encode_reply(m.error_reply(err))
        key = (source, destination)
        self.link_bytes[key] = self.link_bytes.get(key, 0) + codec.message_size(data)
        return self.call(destination, data, Sender("peer", source))


default_federation = Federation()


class Withheld:
    """What `VirtualWorker._objects` shows instead of a value the model owner may not read: what
    the object is (shape, dtype, tags, description) and whose private data it holds, never values."""

    __slots__ = ("what", "shape", "dtype", "tags", "description", "owners", "why")

    def __init__(self, what: str, *, shape: tuple[int, ...] | None = None, dtype: str | None = None,
                 tags: Sequence[str] = (), description: str = "", owners: Sequence[str] = (), why: str) -> None:
        self.what, self.shape, self.dtype = what, shape, dtype
        self.tags, self.description, self.owners, self.why = list(tags), description, list(owners), why

    def __repr__(self) -> str:
        parts = [self.what]
        if self.shape is not None:
            parts.append(f"shape={self.shape}")
        if self.dtype is not None:
            parts.append(f"dtype={self.dtype}")
        if self.tags:
            parts.append(f"tags={self.tags}")
        if self.description:
            text = self.description if len(self.description) <= 40 else self.description[:37] + "..."
            parts.append(f"description={text!r}")
        parts.append(f"private to {self.owners}" if self.owners else self.why)
        return f"<withheld {' '.join(parts)}>"


class ObjectsView(Mapping[int, Any]):
    """A read-only snapshot: object id -> a tensor (a detached copy) or a `Withheld` placeholder."""

    def __init__(self, items: Mapping[int, Any]) -> None:
        self._items = dict(items)

    def __getitem__(self, key: int) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[int]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return repr(self._items)


def _shown(entry: Entry, named: Entry | None, caller: str) -> Any:
    """What the model owner ``caller`` may see of ``entry``; ``named`` holds the tags and description
    of the object (a search result is an unnamed second id of a named object)."""
    obj = entry.obj
    tags = [f"#{t}" for t in sorted(named.tags)] if named else []
    description = named.description if named else ""
    if isinstance(obj, torch.Tensor):
        owners = lb.owners(lb.labels_of(obj))
        failed = ex.failed(obj)
        if entry.owner == caller and not owners and not failed:
            return obj.detach().clone()
        why = f"undefined: {failed} failed" if failed else "the worker's own data"
        return Withheld("tensor", shape=tuple(obj.shape), dtype=dtype_name(obj.dtype), tags=tags,
                        description=description, owners=owners, why=why)
    if isinstance(obj, RemoteRecord):
        return Withheld(f"pointer to {obj.location}:{obj.ref_id:#x}", shape=tuple(obj.shape), dtype=obj.dtype,
                        why="a pointer held by the worker")
    if isinstance(obj, torch.nn.Module):
        return Withheld(f"model {type(obj).__name__}", why="its weights are listed one by one")
    return Withheld(f"{type(obj).__name__}", why="the worker's state for it")


class VirtualWorker(WorkerClient):
    """A worker living in this process.

    ``VirtualWorker(hook, id="bob")`` as in PySyft (the hook is optional).
    ``data`` comes in two kinds, which the release policy treats differently:

    - a tensor, or a mapping from tag to tensor: the worker's own PRIVATE data, as if its owner
      had loaded it (`load`). Found with ``search(tag)``; ``get()`` of it, or of anything
      computed from it, is refused.
    - a tuple or list of tensors: data this process hands over, as PySyft's tutorials and sandbox
      do. Each keeps its ``.tag(...)`` tags and ``.describe(...)`` text; it is the model owner's
      own, as if sent with ``t.send(worker)``, so ``search`` finds it and ``get()`` reads it back.

    ``policy`` holds the owner's release rules (`fedsecure.Policy`); in one process
    the default trusts every other worker as an aggregator.
    ``secagg_identity``: the owner's signing key and the federation's verification keys, for
    secure aggregation with the consistency check (`fedsecure.worker.secure.SecAggIdentity`).
    ``device``: where the owner trains and evaluates, and keeps its private data ("cpu", "cuda",
    "cuda:N", "mps" or "auto"; `fedsecure.worker.device`).
    """

    def __init__(
        self,
        hook: Any = None,
        id: str | None = None,
        *,
        data: torch.Tensor | Mapping[str, torch.Tensor] | Sequence[torch.Tensor] | None = None,
        policy: Policy | None = None,
        federation: Federation | None = None,
        secagg_identity: SecAggIdentity | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if isinstance(hook, str) and id is None:  # VirtualWorker("bob")
            hook, id = None, hook
        if id is None:
            id = f"worker-{secrets.token_hex(3)}"
        if not isinstance(id, str) or not id:
            raise TypeError(f"a worker id must be a non-empty string, got {id!r}")
        self.federation = federation or getattr(hook, "federation", None) or default_federation
        fed = self.federation
        self.core = WorkerCore(
            id, policy=policy, send_to_peer=lambda dest, data: fed.send(id, dest, data),
            secagg_identity=secagg_identity, device=device,
        )
        fed.add(self.core)
        owner = self._owner = Sender("client", "model-owner")
        super().__init__(id, lambda data: fed.call(id, data, owner))
        # large tensors travel beside messages, both ways and between workers (`WorkerCore.handle_local`)
        self.framed = self.core.framed = True
        if isinstance(data, list | tuple):
            self._hand_over(data)
        elif isinstance(data, Mapping | torch.Tensor):
            items = data.items() if isinstance(data, Mapping) else [("data", data)]
            for tag, tensor in items:
                self.load(tensor, tags=[tag])
        elif data is not None:
            raise TypeError(
                "data is a tensor or a mapping tag -> tensor (the worker's private data), or a tuple "
                f"of tensors (handed over by this process), got {type(data).__name__}"
            )

    def _hand_over(self, tensors: Sequence[Any]) -> None:
        """Store ``tensors`` as sent by the model owner, with their tags and descriptions; no
        pointer is kept, so they stay until ``clear_objects()`` (``search`` finds them)."""
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"data=(...) holds tensors; item {i} is a {type(t).__name__}")
            tags, text = clean_tags(tags_of(t)), clean_description(description_of(t) or "")
            self.request(m.Put(new_id(), t.detach(), t.requires_grad, False, tags, text))

    @property
    def policy(self) -> Policy:
        return self.core.policy

    def _visible(self) -> list[tuple[int, Entry]]:
        """The entries this model owner may know of: its own and the worker's own data."""
        dropped = set(self._release)  # pointers gone here: the worker frees them with the next request
        with self.federation.locks[self.id]:
            return [(i, e) for i, e in self.core.objects.items()
                    if e.owner in (None, self._owner.id) and i not in dropped]

    @property
    def _objects(self) -> ObjectsView:
        """A read-only snapshot, id -> what this model owner may see of each object here: a
        detached copy of the value where it may read it (what it sent, and results that derive
        from no private data), otherwise a `Withheld` placeholder saying what the object is and
        whose private data it holds (the worker's own data, anything computed from it). Another
        model owner's objects are not listed."""
        if self._deferred:
            self.flush()  # ops sent without waiting run first, so the snapshot shows their effect
        visible = self._visible()
        named = {id(e.obj): e for _, e in visible if e.tags or e.description}
        return ObjectsView({i: _shown(e, named.get(id(e.obj)), self._owner.id) for i, e in visible})

    def clear_objects(self) -> VirtualWorker:
        """Free every object this model owner made here (the worker's own data stays); returns
        the worker. A pointer to a freed object fails if used: the worker no longer holds it."""
        self.flush()  # queued ops first: they may make objects
        mine = [i for i, e in self._visible() if e.owner == self._owner.id]
        self.request(m.Count(release=mine))
        return self

    def _summary(self) -> tuple[int, int, str]:
        visible = self._visible()
        private = sum(1 for _, e in visible if e.owner is None)
        p = self.core.policy
        if p.strict:
            rule = "strict aggregator: releases only its own aggregates"
        elif p.training_only:
            rule = "training only on private data"
        else:
            rule = f"private data leaves only in aggregates of >={p.min_contributors} owners or as metrics"
        if p.dp_sgd_budget is not None:
            rule += f", DP-SGD budget eps={p.dp_sgd_budget[0]:g}"
        return len(visible), private, rule

    def __repr__(self) -> str:
        count, private, rule = self._summary()
        return f"<{type(self).__name__} id:{self.id} #objects:{count} ({private} private) policy: {rule}>"

    def _repr_html_(self) -> str:
        """How a notebook shows the worker: its summary and one row per object."""
        count, private, rule = self._summary()
        rows = "".join(
            f"<tr><td><code>{i:#018x}</code></td><td>{html.escape(repr(v))}</td></tr>"
            for i, v in self._objects.items()
        )
        return (
            f"<b>{type(self).__name__}</b> <code>{html.escape(self.id)}</code>: {count} objects "
            f"({private} private to it)<br>policy: {html.escape(rule)}"
            f"<table><tr><th>id</th><th>object</th></tr>{rows}</table>"
        )

    def load(self, tensor: torch.Tensor, tags: Iterable[str] = ()) -> None:
        """Hold ``tensor`` as this owner's private data (the owner's side, not a message)."""
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"load() takes a tensor, got {type(tensor).__name__}")
        self.core.load(tensor, tuple(tags))
