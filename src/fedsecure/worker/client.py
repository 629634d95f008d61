"""The model owner's handle on one worker: the same interface over any transport.

`WorkerClient` turns calls into `wire` requests, sends their bytes through a
transport (one function, bytes in and bytes out) and turns error replies back
into typed exceptions. `VirtualWorker` gives it a transport that calls an
in-process `WorkerCore`; a network transport gives it one that calls a server.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from fedsecure.errors import OperationNotAllowed
from fedsecure.wire import messages as m
from fedsecure.wire.codec import message_size

Transport = Callable[[bytes], bytes]

_DEFER_BATCH = 64

# Where a tensor (local, or a pointer) keeps what ``t.tag(...)`` and ``t.describe(...)`` gave it.
TAGS_ATTR = "_fs_tags"
DESCRIPTION_ATTR = "_fs_description"
_MAX_TAG = 255  # characters of a tag's name; with its "#", a wire string (messages.py)


def clean_tags(tags: Iterable[Any]) -> list[str]:
    """Tags in their one spelling, "#name" ("x" and "#x" are the same tag), checked for the wire."""
    out: list[str] = []
    for tag in tags:
        if not isinstance(tag, str):
            raise TypeError(f"a tag is a string such as '#data', got {type(tag).__name__} {tag!r}")
        name = tag[1:] if tag.startswith("#") else tag
        if not name or len(name) > _MAX_TAG:
            raise ValueError(f"a tag needs a name of 1 to {_MAX_TAG} characters after its '#', got {tag!r}")
        if f"#{name}" not in out:
            out.append(f"#{name}")
    return out


def clean_description(text: Any) -> str:
    if not isinstance(text, str):
        raise TypeError(f"a description is a string, got {type(text).__name__}")
    if len(text) > m.MAX_TEXT:
        raise ValueError(f"a description has at most {m.MAX_TEXT} characters, got {len(text)}; shorten it")
    return text


def tags_of(obj: Any) -> list[str]:
    """The tags ``obj.tag(...)`` gave a tensor or pointer ([] when it has none)."""
    return list(getattr(obj, TAGS_ATTR, None) or [])


def description_of(obj: Any) -> str | None:
    """The text ``obj.describe(...)`` gave a tensor or pointer (None when it has none)."""
    return getattr(obj, DESCRIPTION_ATTR, None)


def tag(obj: Any, *tags: str) -> Any:
    """``t.tag("#a", "#b")``: add tags ("#a" and "a" are the same tag, kept as "#a") that travel
    with ``send`` and that ``worker.search`` matches; returns ``obj``. On a pointer they label the
    pointer here only: the worker's object keeps the tags it was sent with."""
    setattr(obj, TAGS_ATTR, clean_tags([*tags_of(obj), *tags]))
    return obj


def describe(obj: Any, description: str) -> Any:
    """``t.describe("text")``: a description that travels with ``send`` and whose words
    ``worker.search`` matches; returns ``obj``."""
    setattr(obj, DESCRIPTION_ATTR, clean_description(description))
    return obj


def _set_tags(obj: Any, tags: Any) -> None:
    setattr(obj, TAGS_ATTR, clean_tags([tags] if isinstance(tags, str) else tags or ()))


def _set_description(obj: Any, text: str | None) -> None:
    setattr(obj, DESCRIPTION_ATTR, None if text is None else clean_description(text))


# ``t.tags`` (a set, empty when untagged) and ``t.description`` (None when undescribed), for local
# tensors (added by the hook) and pointers alike
TAGS = property(lambda t: set(tags_of(t)), _set_tags, doc="The tensor's tags, as a set of '#name'.")
DESCRIPTION = property(description_of, _set_description, doc="The tensor's description, or None.")


def search_items(query: str | Sequence[str]) -> list[str]:
    """A query, a tag or a list of tags and words, as the list of its items."""
    items = [query] if isinstance(query, str) else query
    if not isinstance(items, Sequence) or not items or not all(isinstance(x, str) and x for x in items):
        raise TypeError(
            f"search() takes a tag such as '#data', or a non-empty list of tags and words, got {query!r}"
        )
    if len(items) > m.MAX_TERMS + 1:
        raise ValueError(f"a search has at most {m.MAX_TERMS + 1} items, got {len(items)}")
    if any(len(x) > 256 for x in items):
        raise ValueError("a search item has at most 256 characters")
    return list(items)


class PointerFactory(Protocol):
    """How the pointer layer (above this one) wraps what workers return."""

    def tensor(self, worker: WorkerClient, meta: dict[str, Any]) -> Any: ...

    def aggregate(self, worker: WorkerClient, values: list[Any], weighted: bool) -> Any: ...


_pointers: list[PointerFactory] = []


def register_pointer_factory(factory: PointerFactory) -> None:
    _pointers[:] = [factory]


class WorkerClient:
    """A worker as the model owner sees it. ``id`` names the worker."""

    def __init__(self, id: str, transport: Transport) -> None:
        self.id = id
        self._transport = transport
        self._release: list[int] = []
        self._deferred: list[bytes] = []
        self.grad_epoch = 0  # counts the requests that may change gradients (see pointer.tensor)
        # Pipelined: ops whose result the client can work out (shapes on meta tensors) do
        # not wait for the worker. Worth it where a round trip costs more than that (a network).
        self.pipelined = False
        # Framed: large tensors travel beside the message, for a transport that carries them.
        self.framed = False
        self.bytes_sent = 0
        self.bytes_received = 0

    def __repr__(self) -> str:
        return f"<{type(self).__name__} id={self.id!r}>"

    # A worker is an identity: copying a model that points to it must not copy it.
    def __copy__(self) -> WorkerClient:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> WorkerClient:
        return self

    # -- used by pointers --------------------------------------------------------------

    def release(self, obj_id: int) -> None:
        """Forget ``obj_id``; the worker frees it with the next request.

        Called from pointers' ``__del__``, that is from the garbage collector, which
        may run in the middle of another request: so this only takes a note.
        """
        self._release.append(obj_id)

    def take_release(self) -> list[int]:
        ids, self._release = self._release, []
        return ids

    def defer(self, msg: m.Request) -> None:
        """Queue ``msg``, whose reply the caller can predict, to go with the next request.

        Errors it causes are raised by that next request, naming the op.
        """
        self._deferred.append(m.encode_request(msg, release=self.take_release()))
        if len(self._deferred) >= _DEFER_BATCH:
            self.flush()

    def request(self, msg: m.Request, *, deadline: float | None = None) -> Any:
        """Send ``msg`` and wait for its reply. ``deadline``: seconds this request may take, where
        the transport has deadlines (a round of local training takes longer than an op)."""
        data = m.encode_request(msg, framed=self.framed, release=self.take_release())
        if self._deferred:
            self._deferred.append(data)
            data = m.encode_request(m.Batch(self._deferred), framed=self.framed)
            self._deferred = []
        self.bytes_sent += message_size(data)
        if deadline is not None and getattr(self._transport, "takes_deadline", False):
            raw = self._transport(data, deadline=deadline)  # type: ignore[call-arg]
        else:
            raw = self._transport(data)
        self.bytes_received += message_size(raw)
        return m.reply_value(raw, worker=self.id)

    # -- public ------------------------------------------------------------------------

    def flush(self) -> None:
        """Run every queued in-place op and free every object whose last pointer is gone."""
        self.request(m.Count())

    def object_count(self) -> int:
        """How many objects this model owner has on the worker (not counting the worker's
        own data), after freeing those no pointer refers to any more."""
        gc.collect()  # pointers caught in reference cycles are freed too
        return int(self.request(m.Count()))

    def search(self, query: str | Sequence[str]) -> list[Any]:
        """Pointers to the tensors that match every item of ``query`` (a tag, or a list of tags and
        words). An item matches an object's tag exactly ("#x" and "x" are the same tag) or occurs
        in its description: PySyft 0.2.9's rule. A model owner finds the worker's own data and
        its own objects, never another model owner's. Each pointer shows ``tags`` and
        ``description``."""
        items = search_items(query)
        metas = self.request(m.Search(items[0], items[1:]))
        return [_pointers[0].tensor(self, meta) for meta in metas]

    @property
    def _objects(self) -> Mapping[int, Any]:
        """What this model owner may see of the objects on the worker (`VirtualWorker._objects`):
        listed for a worker in this process only."""
        raise OperationNotAllowed(
            f"_objects lists the objects of a worker in this process; {self.id!r} is reached over "
            "a transport. Use search(tag) to find its data and object_count() to count your objects",
            op="_objects",
        )

    def clear_objects(self) -> WorkerClient:
        """Free every object this model owner made on the worker (`VirtualWorker.clear_objects`)."""
        raise OperationNotAllowed(
            f"clear_objects() frees objects of a worker in this process; on {self.id!r}, reached "
            "over a transport, drop the pointers you no longer need (del ptr) and call flush()",
            op="clear_objects",
        )

    def aggregate(self, values: list[Any], *, weighted: bool = False) -> Any:
        """This worker's own aggregation function: the (sample-weighted) mean of ``values``.

        ``values`` are pointers, or sent models, all held by this worker. A strict
        aggregator releases nothing else; weights are the sample counts that the
        contributing workers reported themselves, never the caller's.
        """
        return _pointers[0].aggregate(self, list(values), weighted)
