"""What each field of a message must be, said once: in its annotation.

A message is a frozen dataclass whose fields are annotated ``Annotated[T, check]``: ``T`` is
the type the code sees, ``check`` is what a decoded value must pass before the message is
built. A check is a function ``check(value, where) -> value`` that returns the value (or its
canonical form, such as a tuple for a list) and raises a `ProtocolError` (or a subclass of
it) that names ``where`` (``"Put.tags"``) when the value is not one. `checks` reads a
message class's annotations once, when the class is registered; `build` applies them to a
decoded message. The worker protocol's requests (`fedsecure.wire.requests`) and secure
aggregation's messages (`fedsecure.aggregate.messages`) both declare their fields this way,
so a new field is one annotated line.

The field types of the worker protocol are below; each names what it accepts in its error.
"""

from __future__ import annotations

import dataclasses
import operator
import typing
from collections.abc import Callable, Iterable
from typing import Annotated, Any, TypeVar

import torch

from fedsecure.errors import ProtocolError

Check = Callable[[Any, str], Any]
T = TypeVar("T")

_U64 = 2**64
MAX_STR = 256  # characters of a name (an op, a tag, a worker id)
MAX_TEXT = 8192  # characters of a free-text field (an object's description)
MAX_TERMS = 64  # items of a search query beyond the first
MAX_BLOBS = 4096  # requests in a batch


def checks(cls: type) -> tuple[tuple[Check, ...], tuple[str, ...]]:
    """Each field's check, and the name its errors give it (``"Put.tags"``), in field order,
    from the annotations of the dataclass ``cls``."""
    hints = typing.get_type_hints(cls, include_extras=True)
    found, where = [], []
    for f in dataclasses.fields(cls):
        metadata = [x for x in getattr(hints[f.name], "__metadata__", ()) if callable(x)]
        if len(metadata) != 1:
            raise TypeError(
                f"{cls.__name__}.{f.name} says nothing of what it accepts: annotate it "
                "Annotated[type, check] (see fedsecure.wire.fields)"
            )
        found.append(metadata[0])
        where.append(f"{cls.__name__}.{f.name}")
    return tuple(found), tuple(where)


def build(cls: Callable[..., T], checks: tuple[Check, ...], where: tuple[str, ...], values: Iterable[Any]) -> T:
    """``cls`` of the decoded ``values``, each checked (the caller has matched their number)."""
    return cls(*map(operator.call, checks, values, where))


def _refuse(where: str, what: str, value: Any) -> typing.NoReturn:
    raise ProtocolError(f"{where} must be {what}, got {type(value).__name__}")


def _is_id(v: Any) -> bool:
    return type(v) is int and 0 <= v < _U64


def _is_str(v: Any) -> bool:
    return isinstance(v, str) and len(v) <= MAX_STR


# Each check tests inline (one call per field: decoding is on every request's path).


def _id(v: Any, where: str) -> int:
    if type(v) is int and 0 <= v < _U64:
        return v
    _refuse(where, "id", v)


def _ids(v: Any, where: str) -> list[int]:
    if isinstance(v, list) and all(map(_is_id, v)):
        return v
    _refuse(where, "ids", v)


def _str(v: Any, where: str) -> str:
    if isinstance(v, str) and len(v) <= MAX_STR:
        return v
    _refuse(where, "str", v)


def _strs(v: Any, where: str) -> list[str]:
    if isinstance(v, list) and all(map(_is_str, v)):
        return v
    _refuse(where, "strs", v)


def _text(v: Any, where: str) -> str:
    if isinstance(v, str) and len(v) <= MAX_TEXT:
        return v
    _refuse(where, "text", v)


def _terms(v: Any, where: str) -> list[str]:
    if isinstance(v, list) and len(v) <= MAX_TERMS and all(map(_is_str, v)):
        return v
    _refuse(where, "terms", v)


def _bool(v: Any, where: str) -> bool:
    if type(v) is bool:
        return v
    _refuse(where, "bool", v)


def _int(v: Any, where: str) -> int:
    if type(v) is int:
        return v
    _refuse(where, "int", v)


def _list(v: Any, where: str) -> Any:
    if isinstance(v, list | tuple):
        return v
    _refuse(where, "list", v)


def _dict(v: Any, where: str) -> dict[str, Any]:
    if isinstance(v, dict):
        return v
    _refuse(where, "dict", v)


def _tensor(v: Any, where: str) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v
    _refuse(where, "tensor", v)


def _tensors(v: Any, where: str) -> list[torch.Tensor]:
    if isinstance(v, list) and all(isinstance(x, torch.Tensor) for x in v):
        return v
    _refuse(where, "tensors", v)


def _blobs(v: Any, where: str) -> list[bytes]:
    if isinstance(v, list) and len(v) <= MAX_BLOBS and all(isinstance(x, bytes) for x in v):
        return v
    _refuse(where, "blobs", v)


def anything(v: Any, where: str) -> Any:
    """Any value msgpack and the codec decode (the receiver checks it where it uses it)."""
    return v


Id = Annotated[int, _id]  # an object id: an unsigned 64-bit int
Ids = Annotated[list[int], _ids]
Str = Annotated[str, _str]  # a name: at most MAX_STR characters
Strs = Annotated[list[str], _strs]
Text = Annotated[str, _text]  # free text: at most MAX_TEXT characters
Terms = Annotated[list[str], _terms]  # at most MAX_TERMS names
Bool = Annotated[bool, _bool]
Int = Annotated[int, _int]
Items = Annotated[list[Any], _list]  # a list (or a tuple) of any values
Map = Annotated[dict[str, Any], _dict]
Tensor = Annotated[torch.Tensor, _tensor]
Tensors = Annotated[list[torch.Tensor], _tensors]
Blobs = Annotated[list[bytes], _blobs]  # encoded messages (a batch's requests)
Value = Annotated[Any, anything]
