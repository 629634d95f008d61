"""TOML tables read into frozen dataclasses, once, at the edge: the types are the schema.

`from_table(cls, table, source)` builds ``cls`` from a parsed TOML table: every key must be one of
``cls``'s fields and have the field's type, or the file is refused with a `ConfigurationError`
that names the file, the table and the key (a typo must not silently fall back to a default).
A field's default is its one default; a field without one is required. Field types may be
``bool``, ``int``, ``float`` (an int is a number too), ``str``, a ``Literal`` of strings, ``X | None``,
``tuple[X, ...]`` (an array), ``Mapping[str, X]`` (a table of any keys), a union of those, or
another dataclass (a table). A dataclass's ``__post_init__`` may check its values further; its
`ConfigurationError` comes back prefixed with the file's name. `to_table` writes a dataclass back
into plain tables (what `from_table` reads again), without the fields left unset (None).
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from fedsecure.fl import ConfigurationError

_NUMBER = "a number"
T = TypeVar("T")


def read_toml(path: str | Path, what: str = "experiment file") -> dict[str, Any]:
    """The tables of the TOML file at ``path``."""
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigurationError(f"no {what} {path}") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigurationError(f"cannot read {path}: {exc}") from None


def set_dotted(tables: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``tables`` with ``overrides`` ("section.key" = value) written into them."""
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        table = tables.setdefault(section, {})
        if isinstance(table, dict):  # else reading the tables says that it must be one
            table[key] = value
    return tables


def from_table(cls: type[T], table: Mapping[str, Any], source: str, where: str = "") -> T:
    """An instance of the dataclass ``cls`` from ``table``, checked (see the module's docstring)."""
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    sections = not where and all(_is_table(hints[name]) for name in fields)
    values = {}
    for key, value in table.items():
        if key not in fields:
            known = ", ".join(fields)
            if sections:
                raise ConfigurationError(f"{source}: unknown section [{key}]; sections are {known}")
            raise ConfigurationError(f"{source}: unknown key {key!r}{_in(where)}; known keys: {known}")
        values[key] = _convert(hints[key], value, source, where, key)
    missing = [name for name, f in fields.items() if name not in values and _required(f)]
    if missing:
        raise ConfigurationError(f"{source}: [{where}] needs {' and '.join(missing)}")
    try:
        return cls(**values)
    except ConfigurationError as exc:
        raise ConfigurationError(f"{source}: {exc}") from None


def to_table(value: Any) -> Any:
    """Plain tables, arrays and scalars from a dataclass (fields that are None left out)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_table(getattr(value, f.name)) for f in dataclasses.fields(value)
                if f.init and getattr(value, f.name) is not None}
    if isinstance(value, Mapping):
        return {k: to_table(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [to_table(v) for v in value]
    return value


def _in(where: str) -> str:
    return f" in [{where}]" if where else ""


def _required(f: dataclasses.Field[Any]) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _options(tp: Any) -> tuple[Any, ...]:
    """The types a field may hold: the members of a union, None left out."""
    if get_origin(tp) in (Union, types.UnionType):
        return tuple(a for a in get_args(tp) if a is not type(None))
    return (tp,)


def _is_table(tp: Any) -> bool:
    return all(dataclasses.is_dataclass(t) or get_origin(t) is Mapping for t in _options(tp))


def _fits(tp: Any, value: Any) -> bool:
    """Whether ``value`` has the TOML shape of ``tp`` (its contents are checked later)."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp) or origin is Mapping:
        return isinstance(value, dict)
    if origin is tuple:
        return isinstance(value, list)
    if origin is Literal:
        return isinstance(value, str)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _name(tp: Any) -> str:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp) or origin is Mapping:
        return "a table"
    if origin is tuple:
        return "list"
    if origin is Literal:
        return "str"
    return _NUMBER if tp is float else getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, source: str, where: str, key: str) -> Any:
    options = [t for t in _options(tp) if _fits(t, value)]
    inner = f"{where}.{key}" if where else key
    if not options:
        expected = " or ".join(_name(t) for t in _options(tp))
        if _is_table(tp):
            raise ConfigurationError(f"{source}: [{inner}] must be a table")
        at = f"[{where}] " if where else ""
        raise ConfigurationError(f"{source}: {at}{key} = {value!r} has the wrong type (expected {expected})")
    chosen = options[0]
    origin = get_origin(chosen)
    if dataclasses.is_dataclass(chosen):
        return from_table(chosen, value, source, inner)  # type: ignore[arg-type]
    if origin is tuple:
        (item, _) = get_args(chosen)
        return tuple(_convert(item, v, source, where, key) for v in value)
    if origin is Mapping:
        (_, item) = get_args(chosen)
        return {k: _convert(item, v, source, inner, k) for k, v in value.items()}
    if origin is Literal and value not in get_args(chosen):
        choices = [repr(c) for c in get_args(chosen)]
        allowed = f"{', '.join(choices[:-1])} or {choices[-1]}" if len(choices) > 1 else choices[0]
        raise ConfigurationError(f"{source}: [{where}] {key} must be {allowed}, got {value!r}")
    return value
