"""Noninterference: what a model owner sees does not depend on a data owner's private values.

A *world* is one data owner's private data: ``x`` (float32, 4x3), ``y`` (int64 labels, 4) and
``m`` (float32, 3x3: square, so that it can be singular), held by the worker ``bob`` under
``Policy(max_metric_numel=0)``, so that no metric leaves and nothing derived from the data may
leave at all. Two worlds have the same shapes and dtypes and different values.

A *program* is what a model owner sends: a list of steps, each an allow-listed op (`CallStep`,
sent as a raw `Call` message, so that nothing is predicted on the model owner's side and every
op reaches the worker), a ``get()`` (`GetStep`), a tensor of the model owner's own
(`PutStep`), or a question about a value's labels (`OwnersStep`). Step ``k`` names the values
it produces ``sk`` (and ``sk.1``, ``sk.2``, ... for further results); the private values are
``x``, ``y`` and ``m``.

`run` executes a program against a fresh world and returns its `Transcript`: what the model
owner saw at each step (result metadata, released values as bytes, plain values, or the error:
its type, rule or op, and its text), object ids replaced by the names of the values they stand
for. Noninterference holds for a program if the transcripts of any two worlds are equal.

`scenarios` draws two worlds and a random program from the allow-list (with hypothesis): each
op gets arguments drawn to fit the values the model owner holds (their shapes and dtypes, as
the worker reported them), and sometimes ones that do not fit; programs that fail on metadata
grounds are fine, as long as they fail alike in both worlds.
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import torch
from hypothesis import strategies as st

import fedsecure as sy
from fedsecure.wire import codec
from fedsecure.wire import messages as m
from fedsecure.wire.codec import Ref
from fedsecure.wire.ids import new_id
from fedsecure.worker.allowlist import ALLOWED
from fedsecure.worker.client import WorkerClient
from fedsecure.worker.labels import Policy

T = TypeVar("T")

WORKER = "bob"
POLICY = Policy(max_metric_numel=0)
PRIVATE: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
    "x": ((4, 3), torch.float32),
    "y": ((4,), torch.int64),
    "m": ((3, 3), torch.float32),
}
World = dict[str, torch.Tensor]
MISSING = 1  # the object id sent for a value that a step never produced in this world
SEED = 0  # torch's RNG is seeded with this before every run (rand_like, dropout)

# Indexing first: hypothesis draws the first op more often than the others, and indexing (with
# masks, index tensors, private integers) is the op with the most ways to go wrong.
OPS: tuple[str, ...] = ("Tensor.__getitem__", *sorted(set(ALLOWED) - {"Tensor.__getitem__"}))
FLOAT_DTYPES = ("float32", "float64", "float16", "bfloat16")
INT_DTYPES = ("int64", "int32", "int16", "int8", "uint8")
PLAIN_OPS = ("Tensor.item", "Tensor.tolist", "Tensor.__bool__", "Tensor.__float__", "Tensor.__int__")


def writes(op: str) -> bool:
    """Whether ``op`` writes to its first argument."""
    name = op.partition(".")[2]
    if name in ("__setitem__", "data.__set__", "grad.__set__", "__iadd__", "__isub__", "__imul__",
                "__itruediv__", "__ipow__"):
        return True
    return name.endswith("_") and not name.endswith("__")


IN_PLACE_OPS: tuple[str, ...] = tuple(op for op in OPS if op.startswith("Tensor.") and writes(op))

# -- programs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class V:
    """A value the model owner points to, by name: ``x``, ``y``, ``m``, ``s3``, ``s3.1``."""

    name: str

    def __repr__(self) -> str:
        return self.name


@dataclass(frozen=True, eq=False)
class PutStep:
    """``tensor.send(bob)``: a tensor of the model owner's own."""

    value: torch.Tensor
    requires_grad: bool = False

    def __repr__(self) -> str:
        flag = ", requires_grad=True" if self.requires_grad else ""
        return f"send({_literal(self.value)}{flag})"


@dataclass(frozen=True)
class CallStep:
    """One allow-listed op, as a raw `Call` message."""

    op: str
    args: tuple[Any, ...] = ()
    kwargs: tuple[tuple[str, Any], ...] = ()
    grad: bool = True  # torch.is_grad_enabled() on the model owner's side

    def __repr__(self) -> str:
        parts = [_show(a) for a in self.args] + [f"{k}={_show(v)}" for k, v in self.kwargs]
        mode = "  [no_grad]" if not self.grad else ""
        return f"{self.op}({', '.join(parts)}){mode}"


@dataclass(frozen=True)
class GetStep:
    """``value.get()``."""

    target: V

    def __repr__(self) -> str:
        return f"get({self.target})"


@dataclass(frozen=True)
class OwnersStep:
    """``value.owners``: whose private data the worker says a value derives from."""

    target: V

    def __repr__(self) -> str:
        return f"owners({self.target})"


Step = PutStep | CallStep | GetStep | OwnersStep
Program = tuple[Step, ...]


def _literal(t: torch.Tensor) -> str:
    dtype = codec.dtype_name(t.dtype)
    return f"tensor({t.tolist()}, {dtype})"


def _show(value: Any) -> str:
    if isinstance(value, slice):
        parts = ["" if x is None else str(x) for x in (value.start, value.stop, value.step)]
        return ":".join(parts[:2] if value.step is None else parts)
    if value is Ellipsis:
        return "..."
    if isinstance(value, tuple):
        inner = ", ".join(_show(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, torch.dtype):
        return str(value)
    return repr(value)


def render(program: Sequence[Step]) -> list[str]:
    """One line per step: ``sK = <step>``."""
    return [f"s{k} = {step!r}" for k, step in enumerate(program)]


def slot_step(name: str) -> int | None:
    """The step that produces the value named ``name`` (None for private data)."""
    match = re.fullmatch(r"s(\d+)(?:\.\d+)?", name)
    return int(match.group(1)) if match else None


def _rename(value: Any, fn: Callable[[V], V]) -> Any:
    if isinstance(value, V):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(_rename(v, fn) for v in value)
    if isinstance(value, list):
        return [_rename(v, fn) for v in value]
    return value


def drop_step(program: Program, index: int) -> Program:
    """``program`` without step ``index``; later references to what it produced dangle, and
    references to later steps are renumbered."""

    def fix(v: V) -> V:
        k = slot_step(v.name)
        if k is None or k < index:
            return v
        if k == index:
            return V(f"gone{index}" + v.name[len(f"s{k}"):])
        return V(f"s{k - 1}" + v.name[len(f"s{k}"):])

    out: list[Step] = []
    for k, step in enumerate(program):
        if k == index:
            continue
        if isinstance(step, CallStep):
            step = replace(step, args=_rename(step.args, fix),
                           kwargs=tuple((n, _rename(v, fix)) for n, v in step.kwargs))
        elif isinstance(step, GetStep | OwnersStep):
            step = replace(step, target=fix(step.target))
        out.append(step)
    return tuple(out)


# -- running a program ----------------------------------------------------------------------

Entry = tuple[Any, ...]


@dataclass(frozen=True)
class Meta:
    """What the worker told the model owner about a remote tensor."""

    shape: tuple[int, ...]
    dtype: str
    requires_grad: bool
    owners: tuple[str, ...]


@dataclass(frozen=True)
class Transcript:
    """What the model owner saw: the private values' metadata, then one entry per step."""

    search: tuple[Any, ...]
    steps: tuple[Entry, ...]


_HEX = re.compile(r"0x[0-9a-fA-F]+")


class Runner:
    """Sends a program's steps to one worker, one at a time, and records what comes back."""

    def __init__(self, client: WorkerClient) -> None:
        self.client = client
        self.slots: dict[str, int] = {}  # value name -> object id
        self.names: dict[int, str] = {}  # object id -> the name it was first seen under
        self.meta: dict[int, Meta] = {}  # object id -> its latest metadata, in order of appearance
        self.gone: set[int] = set()  # fetched with get(): the worker deleted them
        self.writer: dict[int, str] = {}  # object id -> the last op that made or wrote it
        self.entries: list[Entry] = []
        search = []
        for tag in PRIVATE:
            metas = client.request(m.Search(tag))
            search.append(tuple(self._canon(-1, meta, [0], tag) for meta in metas))
            for meta in metas:
                self.writer[meta["id"]] = "private data"
        self.search = tuple(search)

    def transcript(self) -> Transcript:
        return Transcript(self.search, tuple(self.entries))

    def live(self) -> list[tuple[V, Meta]]:
        """The values the model owner holds, in order of appearance (one name per object)."""
        return [(V(self.names[i]), meta) for i, meta in self.meta.items() if i not in self.gone]

    def meta_of(self, v: V) -> Meta | None:
        i = self.slots.get(v.name)
        return None if i is None else self.meta.get(i)

    def execute(self, step: Step) -> Entry:
        k = len(self.entries)
        try:
            entry: Entry = ("ok", self._send(k, step))
        except Exception as exc:  # every failure is part of what the model owner sees
            entry = (
                "error",
                type(exc).__name__,
                getattr(exc, "rule", None),
                getattr(exc, "op", None),
                self._text(str(exc)),
            )
        self.entries.append(entry)
        return entry

    def _id(self, v: V) -> int:
        return self.slots.get(v.name, MISSING)

    def _wire(self, value: Any) -> Any:
        if isinstance(value, V):
            return Ref(self._id(value))
        if isinstance(value, tuple):
            return tuple(self._wire(v) for v in value)
        if isinstance(value, list):
            return [self._wire(v) for v in value]
        return value

    def _send(self, k: int, step: Step) -> Any:
        client = self.client
        if isinstance(step, PutStep):
            oid = new_id()
            reply = client.request(m.Put(oid, step.value.clone(), step.requires_grad, False, []))
            self.writer[oid] = "send"
            return self._canon(k, reply, [0])
        if isinstance(step, CallStep):
            args = list(self._wire(step.args))
            kwargs = {name: self._wire(v) for name, v in step.kwargs}
            if writes(step.op) and step.args and isinstance(step.args[0], V):
                self.writer[self._id(step.args[0])] = step.op  # even if it fails: partial writes
            reply = client.request(m.Call(step.op, args, kwargs, new_id(), step.grad))
            return self._canon(k, reply, [0], op=step.op)
        if isinstance(step, GetStep):
            oid = self._id(step.target)
            reply = client.request(m.Get(oid))
            self.gone.add(oid)
            return self._canon(k, reply, [0])
        oid = self._id(step.target)
        return ("owners", tuple(client.request(m.Owners(oid))))

    def _canon(self, k: int, value: Any, part: list[int], name: str | None = None, op: str = "") -> Any:
        """``value`` with ids replaced by names, floats by their hex form (NaN equals NaN)
        and tensors by their dtype, shape and bytes."""
        if isinstance(value, dict):
            if "tensor" in value:
                t = value["tensor"].detach().contiguous()
                raw = codec.tensor_bytes(t).tobytes()
                return ("value", codec.dtype_name(t.dtype), tuple(t.shape), raw, value.get("requires_grad"))
            if "id" in value and "shape" in value:
                oid = value["id"]
                slot = name or (f"s{k}" if part[0] == 0 else f"s{k}.{part[0]}")
                part[0] += 1
                self.slots[slot] = oid
                if oid not in self.names:
                    self.names[oid] = slot
                    if op:
                        self.writer[oid] = op
                meta = Meta(tuple(value["shape"]), value["dtype"], bool(value["requires_grad"]),
                            tuple(value["owners"]))
                self.meta[oid] = meta
                return ("tensor", self.names[oid], meta.shape, meta.dtype, meta.requires_grad, meta.owners)
            return ("map", tuple((key, self._canon(k, v, part, op=op)) for key, v in sorted(value.items())))
        if isinstance(value, list | tuple):
            return (type(value).__name__, *(self._canon(k, v, part, op=op) for v in value))
        if isinstance(value, bool):
            return ("bool", value)
        if isinstance(value, int):
            return ("int", value)
        if isinstance(value, float):
            return ("float", value.hex())
        if isinstance(value, str):
            return ("str", self._text(value))
        if value is None:
            return None
        return ("other", type(value).__name__, self._text(repr(value)))

    def _text(self, text: str) -> str:
        def name(match: re.Match[str]) -> str:
            i = int(match.group(0), 16)
            return f"<{self.names.get(i, 'missing' if i == MISSING else 'id')}>"

        return _HEX.sub(name, text)


@contextmanager
def seeded() -> Iterator[None]:
    """torch's RNG seeded alike for every run, without touching the caller's; torch's warnings
    (which stay on the worker) silenced."""
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(SEED)
        yield


def make_worker(world: World, federation: sy.Federation | None = None) -> sy.VirtualWorker:
    """``bob`` holding ``world`` as his private data, in a federation of its own."""
    return sy.VirtualWorker(
        id=WORKER,
        federation=federation or sy.Federation(),
        data={tag: world[tag] for tag in PRIVATE},
        policy=POLICY,
    )


def run_on(client: WorkerClient, program: Sequence[Step]) -> Transcript:
    """Run ``program`` against a worker that holds the private values under the tags x, y, m."""
    with seeded():
        runner = Runner(client)
        for step in program:
            runner.execute(step)
    return runner.transcript()


def run(program: Sequence[Step], world: World) -> Transcript:
    """Run ``program`` against a fresh world."""
    return run_on(make_worker(world), program)


# -- comparing transcripts ------------------------------------------------------------------


@dataclass(frozen=True)
class Divergence:
    """The first step at which two worlds' transcripts differ."""

    step: int
    op: str  # the op, or what a get released ("get <- <the op that made or wrote it>")
    what: str  # what differs
    a: Entry
    b: Entry

    @property
    def key(self) -> tuple[str, str]:
        return (self.op, self.what)


def _first_difference(a: Any, b: Any) -> str:
    """What differs between two canonical replies."""
    if isinstance(a, tuple) and isinstance(b, tuple) and a and b and a[0] == b[0]:
        kind = a[0]
        if kind == "tensor":
            fields = ("result id", "result shape", "result dtype", "result requires_grad", "result owners")
            return next((f"{f} differs" for f, x, y in zip(fields, a[1:], b[1:], strict=True) if x != y), "")
        if kind == "value":
            if a[1:3] != b[1:3]:
                return "released shape or dtype differs"
            return "released values differ" if a[3] != b[3] else "released requires_grad differs"
        if kind in ("tuple", "list"):
            if len(a) != len(b):
                return "number of results differs"
            return next((_first_difference(x, y) for x, y in zip(a[1:], b[1:], strict=True) if x != y), "")
        if kind == "map":
            if [key for key, _ in a[1]] != [key for key, _ in b[1]]:
                return "reply fields differ"
            return next((_first_difference(x, y) for (_, x), (_, y) in zip(a[1], b[1], strict=True) if x != y), "")
        return "returned value differs"
    if a is None or b is None:
        return "one reply is None"
    return "reply kind differs"


def describe(a: Entry, b: Entry) -> str:
    if a[0] != b[0]:
        err = a if a[0] == "error" else b
        rule = f"[{err[2]}]" if err[2] else ""
        return f"succeeds in one world, {err[1]}{rule} in the other"
    if a[0] == "error":
        if a[1] != b[1]:
            first, second = sorted((a[1], b[1]))
            return f"error type differs ({first} vs {second})"
        if a[2:4] != b[2:4]:
            return "error rule differs"
        return "error text differs"
    return _first_difference(a[1], b[1]) or "reply differs"


def _label(program: Sequence[Step], k: int, runner: Runner | None) -> str:
    step = program[k]
    if isinstance(step, CallStep):
        return step.op
    if isinstance(step, PutStep):
        return "send"
    verb = "get" if isinstance(step, GetStep) else "owners"
    if runner is None:
        return verb
    source = runner.writer.get(runner.slots.get(step.target.name, MISSING), "?")
    if source == "Tensor.grad.__get__" and any(
        isinstance(s, CallStep) and s.op == "Tensor.backward" for s in program[:k]
    ):
        source = "Tensor.backward"
    return f"{verb} <- {source}"


def compare(program: Sequence[Step], a: Transcript, b: Transcript, runner: Runner | None = None) -> Divergence | None:
    """The first difference between two transcripts of ``program``, or None."""
    if a.search != b.search:
        return Divergence(-1, "search", "private metadata differs", a.search, b.search)
    for k, (x, y) in enumerate(zip(a.steps, b.steps, strict=True)):
        if x != y:
            return Divergence(k, _label(program, k, runner), describe(x, y), x, y)
    return None


class Nondeterministic(AssertionError):
    """The same program gave two transcripts in the same world: not a divergence of worlds."""


def check(program: Sequence[Step], a: World, b: World, trace: list[Transcript] | None = None) -> Divergence | None:
    """Run ``program`` in both worlds; the first divergence, or None. A difference that the
    same world also shows between two runs is raised as `Nondeterministic`. ``trace``, if
    given, receives world A's transcript."""
    with seeded():
        runner_a = Runner(make_worker(a))
        for step in program:
            runner_a.execute(step)
    ta = runner_a.transcript()
    if trace is not None:
        trace.append(ta)
    tb = run(program, b)
    found = compare(program, ta, tb, runner_a)
    if found is not None:
        again = run(program, a)
        if again != ta:
            raise Nondeterministic(f"{again}\n!=\n{ta}")
    return found


def show(value: Any) -> str:
    """An entry of a transcript, released tensors shown as values rather than bytes."""
    if isinstance(value, tuple) and len(value) == 5 and value[0] == "value" and isinstance(value[3], bytes):
        _, dtype, shape, raw, _ = value
        t = torch.frombuffer(bytearray(raw), dtype=codec.DTYPES[dtype]) if raw else torch.zeros(0)
        return f"released {dtype}{list(shape)} {t.reshape(shape).tolist()}"
    if isinstance(value, tuple):
        return "(" + ", ".join(show(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return repr(value)


def identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same dtype, shape and bytes (NaN equals NaN, -0.0 differs from 0.0)."""
    return a.dtype == b.dtype and a.shape == b.shape and a.numpy().tobytes() == b.numpy().tobytes()


def report(program: Sequence[Step], a: World, b: World, found: Divergence) -> str:
    """A readable account of a divergence: the program up to it, and the two replies."""
    lines = [f"divergence at step {found.step} ({found.op}): {found.what}", "program:"]
    lines += ["  " + line for line in render(program[: found.step + 1])]
    lines += [f"world A: {show(found.a)}", f"world B: {show(found.b)}", "private values:"]
    for tag in PRIVATE:
        if not identical(a[tag], b[tag]):
            lines.append(f"  {tag}: A={a[tag].tolist()} B={b[tag].tolist()}")
    return "\n".join(lines)


def assert_noninterference(program: Sequence[Step], a: World, b: World) -> None:
    __tracebackhide__ = True
    found = check(program, a, b)
    if found is not None:
        raise AssertionError(report(program, a, b, found))


def minimise(program: Program, a: World, b: World, key: tuple[str, str]) -> tuple[Program, World]:
    """A smaller program and a world B closer to A that still diverge with ``key``: steps are
    dropped, then B's private values set to A's one tensor, then one element, at a time."""

    def same(p: Program, wb: World) -> bool:
        try:
            found = check(p, a, wb)
        except Nondeterministic:
            return False
        return found is not None and found.key == key

    first = check(program, a, b)
    if first is not None:  # nothing after the divergence matters
        program = program[: first.step + 1]
    k = len(program) - 1
    while k >= 0:
        smaller = drop_step(program, k)
        if same(smaller, b):
            program = smaller
        k -= 1
    b = dict(b)
    for tag in PRIVATE:
        trial = {**b, tag: a[tag].clone()}
        if same(program, trial):
            b = trial
            continue
        flat_a, flat_b = a[tag].reshape(-1), b[tag].reshape(-1)
        for i in range(flat_b.numel()):
            if identical(flat_a[i], flat_b[i]):
                continue
            candidate = flat_b.clone()
            candidate[i] = flat_a[i]
            trial = {**b, tag: candidate.reshape(a[tag].shape)}
            if same(program, trial):
                b, flat_b = trial, candidate
    return program, b


# -- worlds ---------------------------------------------------------------------------------

NAN, INF = math.nan, math.inf
# No sizes between ~1e3 and ~1e12: a private integer used as a size must be either small or
# too large to allocate at all, never one that fills this machine's memory.
PRIVATE_FLOATS = (0.0, -0.0, 1.0, -1.0, 0.5, 2.0, -3.0, 1e30, -1e30, 1e-30, NAN, INF, -INF)
PRIVATE_INTS = (0, 1, 2, 3, -1, 4, 5, -4, 100, 2**40, 2**62, -(2**63))


def _floats() -> st.SearchStrategy[float]:
    return st.sampled_from(PRIVATE_FLOATS) | st.floats(-10, 10, width=32)


def _ints() -> st.SearchStrategy[int]:
    return st.integers(0, 2) | st.sampled_from(PRIVATE_INTS) | st.integers(-5, 8)


@functools.cache
def private_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> st.SearchStrategy[torch.Tensor]:
    """Values for one private tensor: elementwise, all one value, or (square float matrices)
    singular."""
    n = math.prod(shape)
    element = _floats() if dtype.is_floating_point else _ints()
    flat = st.lists(element, min_size=n, max_size=n) | element.map(lambda v: [v] * n)
    if dtype.is_floating_point and len(shape) == 2 and shape[0] == shape[1]:
        side = shape[0]
        rows = st.lists(st.lists(_floats(), min_size=side, max_size=side), min_size=side - 1, max_size=side - 1)
        singular = st.tuples(rows, st.integers(0, side - 2), st.integers(0, side - 1)).map(
            lambda r: [v for row in (*r[0][: r[2]], r[0][r[1]], *r[0][r[2]:]) for v in row]
        )  # one row repeated
        flat = flat | singular
    return flat.map(lambda values: torch.tensor(values, dtype=torch.float64 if dtype.is_floating_point
                                                 else torch.int64).to(dtype).reshape(shape))


@functools.cache
def worlds() -> st.SearchStrategy[World]:
    return st.fixed_dictionaries({tag: private_tensor(shape, dtype) for tag, (shape, dtype) in PRIVATE.items()})


# -- drawing programs -----------------------------------------------------------------------

PUBLIC_FLOATS = (0.0, 1.0, -1.0, 0.5, 2.0, -2.5, 3.0, 1e30, NAN, INF, -INF)
PUBLIC_INTS = (-100, 100, 2**40)
NUMBERS: tuple[Any, ...] = (0, 1, 2, -1, 3, 0.5, -2.5, 1e30, NAN, INF, -INF, True, 1e-3, 2**40)
TORCH_DTYPES = (torch.float32, torch.float64, torch.int64, torch.int32, torch.bool, torch.float16,
                torch.bfloat16, torch.uint8, torch.int8, torch.complex64)


@functools.cache
def _integers(lo: int, hi: int) -> st.SearchStrategy[int]:
    return st.integers(lo, hi)


@functools.cache
def _sampled(items: tuple[Any, ...]) -> st.SearchStrategy[Any]:
    return st.sampled_from(items)


@functools.cache
def _public_values(dtype: str, n: int) -> st.SearchStrategy[list[Any]]:
    if dtype in FLOAT_DTYPES:
        element: st.SearchStrategy[Any] = st.sampled_from(PUBLIC_FLOATS) | st.floats(-4, 4, width=32)
    elif dtype == "bool":
        element = st.booleans()
    elif dtype == "complex64":
        element = st.complex_numbers(max_magnitude=4, allow_nan=False, width=64)
    else:
        element = st.integers(-2, 5) | st.sampled_from(PUBLIC_INTS)
    return st.lists(element, min_size=n, max_size=n)


def _kind_ok(meta: Meta, kind: str) -> bool:
    if kind == "float":
        return meta.dtype in FLOAT_DTYPES
    if kind == "int":
        return meta.dtype in INT_DTYPES
    if kind == "long":
        return meta.dtype == "int64"
    if kind == "bool":
        return meta.dtype == "bool"
    return True


def _kind_dtype(kind: str) -> str:
    return {"float": "float32", "int": "int64", "long": "int64", "bool": "bool"}.get(kind, "")


def _shapes(n: int, limit: int = 3) -> list[tuple[int, ...]]:
    """Shapes of up to ``limit`` dimensions with ``n`` elements."""
    if limit == 0:
        return [()] if n == 1 else []
    out: list[tuple[int, ...]] = [()] if n == 1 else []
    for first in range(1, n + 1):
        if n % first == 0:
            out += [(first, *rest) for rest in _shapes(n // first, limit - 1)]
    return list(dict.fromkeys(out))


@dataclass
class Builder:
    """Draws a program step by step, running each step against a world as it goes, so that
    arguments are drawn to fit the values the model owner holds (as the worker described them)."""

    draw: st.DrawFn
    runner: Runner
    steps: list[Step] = field(default_factory=list)
    own_target: bool = False  # the next tensor drawn is the model owner's own (an in-place op's target)
    prefer_private: bool = False  # later tensors are private ones where possible

    # -- randomness ---------------------------------------------------------------------

    def chance(self, percent: int) -> bool:
        return self.draw(_integers(0, 99)) < percent

    def randint(self, lo: int, hi: int) -> int:
        return self.draw(_integers(lo, max(lo, hi)))

    def pick(self, items: Sequence[T]) -> T:
        picked: T = self.draw(_sampled(tuple(items)))
        return picked

    # -- the model owner's knowledge ------------------------------------------------------

    def meta(self, v: V) -> Meta:
        return self.runner.meta_of(v) or Meta((), "float32", False, ())

    def shape(self, v: V) -> tuple[int, ...]:
        return self.meta(v).shape

    def dtype(self, v: V) -> str:
        return self.meta(v).dtype

    # -- steps --------------------------------------------------------------------------

    def add(self, step: Step) -> V | None:
        k = len(self.steps)
        self.runner.execute(step)
        self.steps.append(step)
        return V(f"s{k}") if f"s{k}" in self.runner.slots else None

    def call(self, op: str, *args: Any, **kwargs: Any) -> V | None:
        return self.add(CallStep(op, args, tuple(kwargs.items()), grad=not self.chance(3)))

    def values(self, dtype: str, n: int) -> list[Any]:
        return self.draw(_public_values(dtype, n))

    def put(self, shape: tuple[int, ...], dtype: str, requires_grad: bool | None = None) -> V:
        values = self.values(dtype, math.prod(shape))
        target = codec.DTYPES[dtype]
        if target.is_floating_point:
            t = torch.tensor(values, dtype=torch.float64).to(target)
        elif target.is_complex:
            t = torch.tensor(values, dtype=torch.complex64)
        elif target == torch.bool:
            t = torch.tensor(values, dtype=torch.bool)
        else:
            t = torch.tensor([v if -(2**7) <= v < 2**7 or dtype == "int64" else 1 for v in values],
                             dtype=torch.int64).to(target)
        if requires_grad is None:
            requires_grad = target.is_floating_point and self.chance(25)
        made = self.add(PutStep(t.reshape(shape), requires_grad))
        assert made is not None
        return made

    def random_shape(self, ndim: int | None = None) -> tuple[int, ...]:
        n = self.randint(0, 3) if ndim is None else ndim
        return tuple(0 if self.chance(3) else self.randint(1, 4) for _ in range(n))

    # -- arguments ----------------------------------------------------------------------

    def tensor(self, kind: str = "any", ndim: int | None = None) -> V:
        """A remote value of ``kind`` (any, float, int, long, bool) and ``ndim``: one the model
        owner holds, one made from it by a reshape, or a new one of its own."""
        live = self.runner.live()
        fits = [(v, meta) for v, meta in live if _kind_ok(meta, kind) and (ndim is None or len(meta.shape) == ndim)]
        if self.own_target:
            self.own_target = False
            own = [v for v, meta in fits if not meta.owners]
            if own and self.chance(70):
                return self.pick(own)
            return self.put(self.random_shape(ndim), _kind_dtype(kind) or self.pick(("float32", "int64")))
        if self.prefer_private:
            private = [v for v, meta in fits if meta.owners]
            if private and self.chance(70):
                return self.pick(private)
        if fits and self.chance(85):
            return self.pick([v for v, _ in fits])
        if ndim is not None and self.chance(50):
            others = [v for v, meta in live if _kind_ok(meta, kind)]
            if others:
                made = self.conform(self.pick(others), ndim)
                if made is not None:
                    return made
        if live and self.chance(10):
            return self.pick([v for v, _ in live])  # one that may not fit
        dtype = _kind_dtype(kind) or self.pick(("float32", "float32", "int64", "bool", "float64"))
        return self.put(self.random_shape(ndim), dtype)

    def conform(self, v: V, ndim: int) -> V | None:
        """``v`` reshaped to ``ndim`` dimensions (ones added, or leading dimensions merged)."""
        shape = self.shape(v)
        if len(shape) == ndim:
            return v
        if len(shape) < ndim:
            pad = (1,) * (ndim - len(shape))
            new = pad + shape if self.chance(50) else shape + pad
        elif ndim == 0:
            if math.prod(shape) == 0:
                return None
            return self.call("Tensor.__getitem__", v, tuple(0 for _ in shape))
        else:
            cut = len(shape) - ndim + 1
            new = (math.prod(shape[:cut]), *shape[cut:])
        return self.call("Tensor.reshape", v, new)

    def fit(self, shape: tuple[int, ...], dtype: str) -> V:
        """A value of exactly ``shape`` and ``dtype``: one the model owner holds, or its own."""
        fits = [v for v, meta in self.runner.live() if meta.shape == shape and meta.dtype == dtype]
        if fits and self.chance(60):
            return self.pick(fits)
        return self.put(shape, dtype)

    def like(self, v: V) -> V:
        """A value that fits ``v`` for an elementwise op: the same shape, broadcastable, or (rarely)
        not fitting at all."""
        shape, dtype = self.shape(v), self.dtype(v)
        r = self.randint(0, 19)
        if r == 0:
            return self.tensor()
        if r <= 2 and shape:
            shape = shape[self.randint(1, len(shape)):] if r == 1 else tuple(1 if self.chance(50) else d for d in shape)
        if r == 3:
            dtype = self.pick(("float32", "int64", "bool", "float64"))
        return self.fit(shape, dtype)

    def number(self) -> Any:
        return self.pick(NUMBERS)

    def private_scalar(self, kind: str) -> V:
        """A 0-dimensional value derived from private data, where torch expects a Python number."""
        fits = [v for v, meta in self.runner.live() if meta.shape == () and meta.owners and _kind_ok(meta, kind)]
        if fits and self.chance(60):
            return self.pick(fits)
        source = V("y") if kind in ("int", "long") else V(self.pick(("x", "m")))
        made = self.conform(source, 0) if self.chance(30) else self.call(
            "Tensor.__getitem__", source, tuple(self.randint(0, 2) for _ in PRIVATE[source.name][0])
        )
        return made or source

    def integer(self, lo: int, hi: int) -> int | V:
        """A Python int in [lo, hi], or (sometimes) a private 0-d integer tensor in its place."""
        if self.chance(8):
            return self.private_scalar("int")
        return self.randint(lo, hi)

    def dim(self, v: V, extra: int = 0) -> int | V:
        n = len(self.shape(v)) + extra
        lo, hi = (-n, n - 1) if n else (-1, 0)
        if self.chance(6):
            return self.pick((n, -n - 1, 5))
        return self.integer(lo, hi)

    def dims(self, v: V) -> list[int]:
        n = len(self.shape(v))
        return self.draw(st.lists(st.integers(-n - 1, n) if n else st.integers(-1, 1), max_size=max(n, 1)))

    def new_shape(self, v: V) -> tuple[Any, ...]:
        """A shape with ``v``'s number of elements (sometimes with -1, or a private int, or wrong)."""
        numel = math.prod(self.shape(v))
        options = _shapes(numel) if 0 < numel <= 64 else [(numel,)]
        shape: list[Any] = list(self.pick(options))
        if shape and self.chance(20):
            shape[self.randint(0, len(shape) - 1)] = -1
        if self.chance(8):
            shape = list(self.random_shape())
        if shape and self.chance(6):
            shape[self.randint(0, len(shape) - 1)] = self.private_scalar("int")
        return tuple(shape)

    def small_shape(self) -> tuple[Any, ...]:
        return tuple(self.integer(0, 4) for _ in range(self.randint(0, 3)))

    def mask(self, shape: tuple[int, ...]) -> V:
        """A bool tensor of ``shape``: often a comparison of private values (a private mask)."""
        live = self.runner.live()
        held = [v for v, meta in live if meta.dtype == "bool" and meta.shape == shape]
        if held and self.chance(50):
            return self.pick(held)
        same = [v for v, meta in live if meta.shape == shape and meta.dtype != "bool"]
        private = [v for v in same if self.meta(v).owners]
        if same and self.chance(70):
            source = self.pick(private) if private and self.chance(70) else self.pick(same)
            op = self.pick(("Tensor.__gt__", "Tensor.__lt__", "Tensor.__eq__", "Tensor.__ne__"))
            made = self.call(op, source, self.pick((0, 1, 0.5)))
            if made is not None:
                return made
        return self.put(shape, "bool")

    def index(self, v: V) -> Any:
        """An index for ``v[...]``: ints, slices, None, Ellipsis, masks, index tensors."""
        shape = self.shape(v)
        parts: list[Any] = []
        at = 0
        ellipsis = False
        for _ in range(self.randint(1, max(1, len(shape)))):
            size = shape[at] if at < len(shape) else 1
            r = self.randint(0, 11)
            if r <= 1:
                parts.append(self.integer(-size - 1, size))
                at += 1
            elif r <= 3:
                ends = (None, *range(-size, size + 1))
                parts.append(slice(self.pick(ends), self.pick(ends), self.pick((None, 1, 2))))
                at += 1
            elif r == 4:
                parts.append(None)
            elif r == 5 and not ellipsis:
                parts.append(Ellipsis)
                ellipsis = True
            elif r <= 8:
                k = self.randint(1, max(1, len(shape) - at))
                parts.append(self.mask(tuple(shape[at : at + k])))
                at += k
            else:
                parts.append(self.tensor("long", ndim=self.pick((1, 1, 0, 2))))
                at += 1
        return parts[0] if len(parts) == 1 and self.chance(60) else tuple(parts)

    def torch_dtype(self) -> torch.dtype:
        return self.pick(TORCH_DTYPES)

    def maybe(self, percent: int, kwargs: dict[str, Any], name: str, value: Callable[[], Any]) -> None:
        if self.chance(percent):
            kwargs[name] = value()


# -- arguments for each op --------------------------------------------------------------------

Args = tuple[list[Any], dict[str, Any]]
Drawer = Callable[[Builder, str], Args]
DRAWERS: dict[str, Drawer] = {}


def drawer(*names: str) -> Callable[[Drawer], Drawer]:
    """Register a drawer for ops by full name (``torch.where``) or by name (``where``)."""

    def register(fn: Drawer) -> Drawer:
        for name in names:
            DRAWERS[name] = fn
        return fn

    return register


def base(op: str) -> str:
    return op.partition(".")[2]


def draw_args(b: Builder, op: str) -> Args:
    fn = DRAWERS.get(op) or DRAWERS.get(base(op))
    if fn is None or b.chance(4):
        return _garbage(b, op)
    return fn(b, op)


def _garbage(b: Builder, op: str) -> Args:
    """Arguments drawn without regard to what the op takes."""
    args: list[Any] = [b.tensor()]
    for _ in range(b.randint(0, 2)):
        r = b.randint(0, 4)
        args.append(b.number() if r == 0 else b.tensor() if r == 1 else b.dim(args[0]) if r == 2
                    else None if r == 3 else b.small_shape())
    return args, {}


UNARY = ("abs", "neg", "sign", "square", "sigmoid", "tanh", "relu", "exp", "log", "log1p", "expm1",
    "sqrt", "rsqrt", "sin", "cos", "erf", "reciprocal", "floor", "ceil", "trunc", "conj", "isnan",
    "isfinite", "clone", "contiguous", "detach", "float", "double", "half", "bfloat16", "long", "int",
    "bool", "cpu", "t", "T.__get__", "__neg__", "__abs__", "relu_", "exp_", "log_", "abs_", "neg_",
    "sqrt_", "sigmoid_", "tanh_", "zero_", "detach_", "data.__get__", "relu6", "silu")


@drawer(*UNARY)
def _unary(b: Builder, op: str) -> Args:
    return [b.tensor(b.pick(("any", "float", "float")))], {}


@drawer("__invert__")
def _invert(b: Builder, op: str) -> Args:
    return [b.tensor(b.pick(("int", "bool", "any")))], {}


@drawer("round")
def _round(b: Builder, op: str) -> Args:
    kwargs: dict[str, Any] = {}
    b.maybe(30, kwargs, "decimals", lambda: b.integer(-1, 3))
    return [b.tensor("float")], kwargs


@drawer("item", "tolist", "__bool__", "__float__", "__int__")
def _plain(b: Builder, op: str) -> Args:
    return [b.tensor(ndim=0 if b.chance(70) else None)], {}


@drawer("zeros_like", "ones_like", "rand_like", "randn_like")
def _like(b: Builder, op: str) -> Args:
    kwargs: dict[str, Any] = {}
    b.maybe(20, kwargs, "dtype", b.torch_dtype)
    return [b.tensor()], kwargs


@drawer("full_like")
def _full_like(b: Builder, op: str) -> Args:
    a = b.tensor()
    return [a, b.private_scalar("float") if b.chance(20) else b.number()], {}


@drawer("F.leaky_relu", "F.elu", "F.softplus", "F.gelu")
def _activation(b: Builder, op: str) -> Args:
    kwargs: dict[str, Any] = {}
    name = base(op)
    if name == "leaky_relu":
        b.maybe(40, kwargs, "negative_slope", lambda: b.private_scalar("float") if b.chance(20) else b.number())
    elif name == "elu":
        b.maybe(40, kwargs, "alpha", b.number)
    elif name == "softplus":
        b.maybe(40, kwargs, "beta", b.number)
        b.maybe(40, kwargs, "threshold", b.number)
    else:
        b.maybe(40, kwargs, "approximate", lambda: b.pick(("none", "tanh", "bad")))
    return [b.tensor("float")], kwargs


BINARY = ("add", "sub", "mul", "div", "true_divide", "pow", "maximum", "minimum", "eq", "ne", "lt",
    "le", "gt", "ge", "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__",
    "__truediv__", "__rtruediv__", "__floordiv__", "__rfloordiv__", "__mod__", "__pow__", "__rpow__",
    "__and__", "__or__", "__xor__", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__",
    "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ipow__", "add_", "sub_", "mul_", "div_",
    "pow_", "isclose", "allclose", "equal")
_INTEGER_OPS = {"__and__", "__or__", "__xor__", "__floordiv__", "__rfloordiv__", "__mod__"}


@drawer(*BINARY)
def _binary(b: Builder, op: str) -> Args:
    name = base(op)
    kind = b.pick(("int", "bool", "any")) if name in _INTEGER_OPS else b.pick(("any", "float", "int"))
    a = b.tensor(kind)
    r = b.randint(0, 9)
    other: Any = b.like(a) if r < 5 else b.tensor() if r < 7 else b.number()
    kwargs: dict[str, Any] = {}
    if name in ("add", "sub", "add_", "sub_"):
        b.maybe(20, kwargs, "alpha", b.number)
    elif name in ("div", "div_"):
        b.maybe(40, kwargs, "rounding_mode", lambda: b.pick((None, "trunc", "floor")))
    elif name in ("isclose", "allclose"):
        b.maybe(30, kwargs, "equal_nan", lambda: b.pick((True, False)))
        b.maybe(20, kwargs, "rtol", b.number)
    return [a, other], kwargs


def _matrix_partner(b: Builder, a: V, name: str) -> V:
    shape, dtype = b.shape(a), b.dtype(a)
    last = shape[-1] if shape else 1
    first = shape[0] if shape else 1
    if b.chance(8):
        return b.tensor("float")
    if name in ("dot", "outer"):
        return b.fit(shape if name == "dot" else (b.randint(1, 4),), dtype)
    if name == "mv":
        return b.fit((last,), dtype)
    if name == "bmm":
        return b.fit((first, last, b.randint(1, 3)), dtype)
    if name == "__rmatmul__":
        return b.fit((b.randint(1, 3), first), dtype)
    if b.chance(20):
        return b.fit((last,), dtype)
    return b.fit((last, b.randint(1, 3)), dtype)


@drawer("mm", "matmul", "bmm", "mv", "dot", "outer", "__matmul__", "__rmatmul__")
def _matmul(b: Builder, op: str) -> Args:
    name = base(op)
    ndim = {"mm": 2, "mv": 2, "bmm": 3, "dot": 1, "outer": 1}.get(name, b.pick((1, 2, 2, 3)))
    a = b.tensor("float", ndim=ndim)
    return [a, _matrix_partner(b, a, name)], {}


@drawer("lerp", "lerp_")
def _lerp(b: Builder, op: str) -> Args:
    a = b.tensor("float")
    return [a, b.like(a), b.like(a) if b.chance(40) else b.number()], {}


@drawer("addcmul", "addcmul_", "addcdiv", "addcdiv_")
def _addc(b: Builder, op: str) -> Args:
    a = b.tensor("float")
    kwargs: dict[str, Any] = {}
    b.maybe(30, kwargs, "value", b.number)
    return [a, b.like(a), b.like(a)], kwargs


@drawer("torch.where")
def _where(b: Builder, op: str) -> Args:
    a = b.tensor()
    cond = b.mask(b.shape(a))
    if b.chance(15):
        return [cond], {}  # the one-argument form: the indices where cond holds
    return [cond, a, b.like(a) if b.chance(60) else b.number()], {}


@drawer("Tensor.where")
def _tensor_where(b: Builder, op: str) -> Args:
    a = b.tensor()
    return [a, b.mask(b.shape(a)), b.like(a) if b.chance(60) else b.number()], {}


@drawer("masked_fill", "masked_fill_")
def _masked_fill(b: Builder, op: str) -> Args:
    a = b.tensor()
    shape = b.shape(a)
    mask = b.mask(shape[b.randint(0, len(shape)):] if shape and b.chance(20) else shape)
    return [a, mask, b.private_scalar("float") if b.chance(20) else b.number()], {}


@drawer("clamp", "clip", "clamp_", "clip_")
def _clamp(b: Builder, op: str) -> Args:
    a = b.tensor()

    def bound() -> Any:
        r = b.randint(0, 9)
        return b.like(a) if r < 3 else b.private_scalar("float") if r == 3 else b.number()

    kwargs: dict[str, Any] = {}
    b.maybe(60, kwargs, "min", bound)
    b.maybe(60, kwargs, "max", bound)
    return [a], kwargs


@drawer("nan_to_num")
def _nan_to_num(b: Builder, op: str) -> Args:
    kwargs: dict[str, Any] = {}
    for name in ("nan", "posinf", "neginf"):
        b.maybe(30, kwargs, name, b.number)
    return [b.tensor()], kwargs


@drawer("fill_")
def _fill(b: Builder, op: str) -> Args:
    a = b.tensor()
    return [a, b.private_scalar("float") if b.chance(30) else b.number()], {}


@drawer("copy_", "type_as", "view_as", "reshape_as", "expand_as", "data.__set__")
def _with_other(b: Builder, op: str) -> Args:
    a = b.tensor()
    return [a, b.like(a) if b.chance(60) else b.tensor()], {}


@drawer("grad.__set__")
def _grad_set(b: Builder, op: str) -> Args:
    a = b.tensor("float")
    return [a, None if b.chance(20) else b.like(a)], {}


@drawer("grad.__get__", "requires_grad_")
def _grad_get(b: Builder, op: str) -> Args:
    leaves = [v for v, meta in b.runner.live() if meta.requires_grad]
    a = b.pick(leaves) if leaves and b.chance(70) else b.tensor("float")
    if base(op) == "requires_grad_" and b.chance(50):
        return [a, b.pick((True, False))], {}
    return [a], {}


@drawer("new_zeros", "new_ones", "new_full")
def _new(b: Builder, op: str) -> Args:
    args: list[Any] = [b.tensor(), b.small_shape()]
    if base(op) == "new_full":
        args.append(b.number())
    return args, {}


@drawer("to")
def _to(b: Builder, op: str) -> Args:
    a = b.tensor()
    if b.chance(50):
        return [a, b.torch_dtype()], {}
    return [a], {"dtype": b.torch_dtype()}


REDUCTIONS = ("sum", "mean", "prod", "amax", "amin", "argmax", "argmin", "all", "any", "logsumexp",
    "cumsum", "softmax", "log_softmax", "std", "var", "norm")
_NEEDS_DIM = {"logsumexp", "cumsum", "softmax", "log_softmax"}
_FLOAT_ONLY = {"mean", "logsumexp", "softmax", "log_softmax", "std", "var", "norm"}


@drawer(*REDUCTIONS)
def _reduce(b: Builder, op: str) -> Args:
    name = base(op)
    a = b.tensor("float" if name in _FLOAT_ONLY and b.chance(85) else "any")
    kwargs: dict[str, Any] = {}
    if name in _NEEDS_DIM or b.chance(60):
        kwargs["dim"] = b.dim(a)
        if name not in ("cumsum", "softmax", "log_softmax"):
            b.maybe(40, kwargs, "keepdim", lambda: b.pick((True, False)))
    if name in ("sum", "mean", "prod", "cumsum", "softmax", "log_softmax"):
        b.maybe(10, kwargs, "dtype", b.torch_dtype)
    if name in ("std", "var"):
        b.maybe(30, kwargs, "correction", lambda: b.integer(0, 2))
    if name == "norm":
        b.maybe(30, kwargs, "p", lambda: b.pick((1, 2, INF, "fro", 0.5, -1)))
    return [a], kwargs


@drawer("max", "min")
def _max(b: Builder, op: str) -> Args:
    a = b.tensor()
    r = b.randint(0, 2)
    if r == 0:
        return [a], {}
    if r == 1:
        kwargs: dict[str, Any] = {}
        b.maybe(40, kwargs, "keepdim", lambda: b.pick((True, False)))
        return [a, b.dim(a)], kwargs
    return [a, b.like(a)], {}


@drawer("topk")
def _topk(b: Builder, op: str) -> Args:
    a = b.tensor()
    shape = b.shape(a)
    kwargs: dict[str, Any] = {}
    b.maybe(40, kwargs, "dim", lambda: b.dim(a))
    b.maybe(30, kwargs, "largest", lambda: b.pick((True, False)))
    b.maybe(20, kwargs, "sorted", lambda: b.pick((True, False)))
    return [a, b.integer(0, (shape[-1] if shape else 1) + 1)], kwargs


@drawer("sort")
def _sort(b: Builder, op: str) -> Args:
    a = b.tensor()
    kwargs: dict[str, Any] = {}
    b.maybe(40, kwargs, "dim", lambda: b.dim(a))
    b.maybe(40, kwargs, "descending", lambda: b.pick((True, False)))
    b.maybe(20, kwargs, "stable", lambda: b.pick((True, False)))
    return [a], kwargs


@drawer("transpose")
def _transpose(b: Builder, op: str) -> Args:
    a = b.tensor()
    return [a, b.dim(a), b.dim(a)], {}


@drawer("permute")
def _permute(b: Builder, op: str) -> Args:
    a = b.tensor()
    n = len(b.shape(a))
    perm: list[Any] = list(b.draw(st.permutations(range(n))))
    if b.chance(10):
        perm = b.dims(a)
    return ([a, *perm] if b.chance(50) else [a, tuple(perm)]), {}


@drawer("view", "reshape")
def _reshape(b: Builder, op: str) -> Args:
    a = b.tensor()
    shape = b.new_shape(a)
    if op.startswith("Tensor.") and b.chance(40):
        return [a, *shape], {}
    return [a, shape], {}


@drawer("squeeze")
def _squeeze(b: Builder, op: str) -> Args:
    a = b.tensor()
    return ([a, b.dim(a)] if b.chance(50) else [a]), {}


@drawer("unsqueeze")
def _unsqueeze(b: Builder, op: str) -> Args:
    a = b.tensor()
    return [a, b.dim(a, extra=1)], {}


@drawer("expand")
def _expand(b: Builder, op: str) -> Args:
    a = b.tensor()
    shape: list[int | V] = [b.randint(1, 3) for _ in range(b.randint(0, 1))]
    shape += [d if d != 1 or b.chance(50) else b.integer(1, 3) for d in b.shape(a)]
    if shape and b.chance(20):
        shape[b.randint(0, len(shape) - 1)] = -1
    return [a, *shape], {}


@drawer("repeat")
def _repeat(b: Builder, op: str) -> Args:
    a = b.tensor()
    n = len(b.shape(a)) + b.randint(0, 1)
    return [a, *(b.integer(0, 3) for _ in range(max(n, 1)))], {}


@drawer("flip")
def _flip(b: Builder, op: str) -> Args:
    a = b.tensor()
    return [a, b.dims(a)], {}


@drawer("roll")
def _roll(b: Builder, op: str) -> Args:
    a = b.tensor()
    kwargs: dict[str, Any] = {}
    b.maybe(50, kwargs, "dims", lambda: b.dim(a))
    return [a, b.integer(-3, 3)], kwargs


@drawer("narrow")
def _narrow(b: Builder, op: str) -> Args:
    a = b.tensor()
    return [a, b.dim(a), b.integer(-2, 4), b.integer(0, 3)], {}


@drawer("select")
def _select(b: Builder, op: str) -> Args:
    a = b.tensor()
    return [a, b.dim(a), b.integer(-4, 4)], {}


@drawer("chunk", "split")
def _chunk(b: Builder, op: str) -> Args:
    a = b.tensor()
    kwargs: dict[str, Any] = {}
    b.maybe(50, kwargs, "dim", lambda: b.dim(a))
    if base(op) == "split" and b.chance(30):
        return [a, [b.integer(0, 3) for _ in range(b.randint(1, 3))]], kwargs
    return [a, b.integer(0, 4)], kwargs


@drawer("unbind")
def _unbind(b: Builder, op: str) -> Args:
    a = b.tensor()
    return ([a, b.dim(a)] if b.chance(50) else [a]), {}


@drawer("gather")
def _gather(b: Builder, op: str) -> Args:
    a = b.tensor()
    return [a, b.dim(a), b.tensor("long", ndim=len(b.shape(a)))], {}


@drawer("index_select")
def _index_select(b: Builder, op: str) -> Args:
    a = b.tensor()
    return [a, b.dim(a), b.tensor("long", ndim=1)], {}


@drawer("stack", "cat")
def _stack(b: Builder, op: str) -> Args:
    a = b.tensor()
    rest = [b.like(a) for _ in range(b.randint(0, 2))]
    kwargs: dict[str, Any] = {}
    b.maybe(50, kwargs, "dim", lambda: b.dim(a, extra=1 if base(op) == "stack" else 0))
    return [[a, *rest]], kwargs


@drawer("flatten")
def _flatten(b: Builder, op: str) -> Args:
    a = b.tensor()
    kwargs: dict[str, Any] = {}
    b.maybe(30, kwargs, "start_dim", lambda: b.dim(a))
    b.maybe(30, kwargs, "end_dim", lambda: b.dim(a))
    return [a], kwargs


@drawer("__getitem__")
def _getitem(b: Builder, op: str) -> Args:
    a = b.tensor()
    return [a, b.index(a)], {}


@drawer("__setitem__")
def _setitem(b: Builder, op: str) -> Args:
    a = b.tensor()
    index = b.index(a)
    r = b.randint(0, 9)
    value: Any = b.number() if r < 4 else b.tensor(ndim=1) if r < 7 else b.tensor()
    return [a, index, value], {}


@drawer("backward")
def _backward(b: Builder, op: str) -> Args:
    graded = [v for v, meta in b.runner.live() if meta.requires_grad]
    a = b.pick(graded) if graded and b.chance(85) else b.tensor("float")
    if b.shape(a) and b.chance(70):
        a = b.call("Tensor.sum", a) or a
    kwargs: dict[str, Any] = {}
    b.maybe(10, kwargs, "gradient", lambda: b.like(a))
    b.maybe(30, kwargs, "retain_graph", lambda: True)
    return [a], kwargs


# torch.nn.functional ------------------------------------------------------------------------


def _optional(b: Builder, percent: int, make: Callable[[], V]) -> V | None:
    return make() if b.chance(percent) else None


@drawer("F.linear")
def _linear(b: Builder, op: str) -> Args:
    x = b.tensor("float")
    shape = b.shape(x)
    out = b.randint(1, 3)
    weight = b.fit((out, shape[-1] if shape else 1), b.dtype(x))
    return [x, weight, _optional(b, 50, lambda: b.fit((out,), b.dtype(x)))], {}


@drawer("F.bilinear")
def _bilinear(b: Builder, op: str) -> Args:
    x1 = b.tensor("float", ndim=2)
    n, i1 = (b.shape(x1) + (1, 1))[:2]
    i2, out = b.randint(1, 3), b.randint(1, 2)
    x2 = b.fit((n, i2), b.dtype(x1))
    return [x1, x2, b.fit((out, i1, i2), b.dtype(x1)), _optional(b, 50, lambda: b.fit((out,), b.dtype(x1)))], {}


@drawer("F.conv1d", "F.conv2d")
def _conv(b: Builder, op: str) -> Args:
    spatial = 1 if op == "F.conv1d" else 2
    x = b.tensor("float", ndim=spatial + 2)
    shape = (b.shape(x) + (1,) * 4)[: spatial + 2]
    out = b.randint(1, 2)
    kernel = tuple(b.randint(1, max(1, d)) for d in shape[2:])
    weight = b.fit((out, shape[1], *kernel), b.dtype(x))
    kwargs: dict[str, Any] = {}
    b.maybe(30, kwargs, "stride", lambda: b.integer(1, 2))
    b.maybe(30, kwargs, "padding", lambda: b.integer(0, 1))
    return [x, weight, _optional(b, 40, lambda: b.fit((out,), b.dtype(x)))], kwargs


@drawer("F.max_pool1d", "F.avg_pool1d", "F.max_pool2d", "F.avg_pool2d")
def _pool(b: Builder, op: str) -> Args:
    spatial = 1 if op.endswith("1d") else 2
    x = b.tensor("float", ndim=spatial + b.randint(1, 2))
    shape = b.shape(x)
    size = min(shape[-spatial:]) if len(shape) >= spatial and shape else 1
    kwargs: dict[str, Any] = {}
    b.maybe(30, kwargs, "stride", lambda: b.integer(1, 2))
    b.maybe(20, kwargs, "padding", lambda: b.integer(0, 1))
    b.maybe(20, kwargs, "ceil_mode", lambda: b.pick((True, False)))
    if op.startswith("F.max"):
        b.maybe(20, kwargs, "return_indices", lambda: True)
    return [x, b.integer(1, max(1, size))], kwargs


@drawer("F.adaptive_avg_pool2d")
def _adaptive(b: Builder, op: str) -> Args:
    x = b.tensor("float", ndim=b.pick((3, 4)))
    size: Any = b.integer(1, 3) if b.chance(50) else (b.randint(1, 3), b.randint(1, 3))
    return [x, size], {}


@drawer("F.batch_norm")
def _batch_norm(b: Builder, op: str) -> Args:
    x = b.tensor("float", ndim=b.pick((2, 3)))
    shape = b.shape(x)
    c = shape[1] if len(shape) > 1 else 1
    dtype = b.dtype(x)
    stat = lambda: b.fit((c,), dtype)  # noqa: E731
    kwargs: dict[str, Any] = {}
    b.maybe(50, kwargs, "weight", stat)
    b.maybe(50, kwargs, "bias", stat)
    b.maybe(70, kwargs, "training", lambda: b.pick((True, False)))
    b.maybe(20, kwargs, "momentum", lambda: b.pick((0.1, 0.0, 1.0)))
    return [x, _optional(b, 80, stat), _optional(b, 80, stat)], kwargs


@drawer("F.layer_norm")
def _layer_norm(b: Builder, op: str) -> Args:
    x = b.tensor("float")
    shape = b.shape(x)
    normalized = shape[len(shape) - b.randint(1, len(shape)):] if shape else ()
    kwargs: dict[str, Any] = {}
    b.maybe(40, kwargs, "weight", lambda: b.fit(normalized, b.dtype(x)))
    b.maybe(40, kwargs, "bias", lambda: b.fit(normalized, b.dtype(x)))
    return [x, normalized], kwargs


@drawer("F.group_norm")
def _group_norm(b: Builder, op: str) -> Args:
    x = b.tensor("float", ndim=b.pick((2, 3)))
    shape = b.shape(x)
    c = shape[1] if len(shape) > 1 else 1
    groups = b.pick([g for g in range(1, c + 1) if c % g == 0] or [1]) if b.chance(85) else b.integer(1, 4)
    kwargs: dict[str, Any] = {}
    b.maybe(40, kwargs, "weight", lambda: b.fit((c,), b.dtype(x)))
    b.maybe(40, kwargs, "bias", lambda: b.fit((c,), b.dtype(x)))
    return [x, groups], kwargs


@drawer("F.embedding")
def _embedding(b: Builder, op: str) -> Args:
    index = b.tensor("long")
    kwargs: dict[str, Any] = {}
    b.maybe(15, kwargs, "padding_idx", lambda: b.integer(-1, 2))
    return [index, b.fit((b.randint(1, 6), b.randint(1, 3)), "float32")], kwargs


@drawer("F.one_hot")
def _one_hot(b: Builder, op: str) -> Args:
    index = b.tensor("long")
    return ([index, b.integer(-1, 6)] if b.chance(60) else [index]), {}


@drawer("F.normalize", "F.cosine_similarity")
def _normalize(b: Builder, op: str) -> Args:
    x = b.tensor("float")
    kwargs: dict[str, Any] = {}
    b.maybe(40, kwargs, "dim", lambda: b.dim(x))
    if op == "F.normalize":
        b.maybe(30, kwargs, "p", lambda: b.pick((1.0, 2.0, 0.0, INF)))
        return [x], kwargs
    return [x, b.like(x)], kwargs


@drawer("F.pad")
def _pad(b: Builder, op: str) -> Args:
    x = b.tensor("float")
    n = max(1, min(len(b.shape(x)), 3))
    pad = [b.integer(-1, 2) for _ in range(2 * b.randint(1, n))]
    kwargs: dict[str, Any] = {}
    b.maybe(25, kwargs, "mode", lambda: b.pick(("constant", "reflect", "replicate", "circular")))
    b.maybe(20, kwargs, "value", b.number)
    return [x, pad], kwargs


@drawer("F.mse_loss", "F.l1_loss", "F.smooth_l1_loss", "F.huber_loss", "F.kl_div",
        "F.binary_cross_entropy", "F.binary_cross_entropy_with_logits")
def _loss(b: Builder, op: str) -> Args:
    x = b.tensor("float")
    kwargs: dict[str, Any] = {}
    reductions = ("mean", "sum", "none", "batchmean") if op == "F.kl_div" else ("mean", "sum", "none")
    b.maybe(40, kwargs, "reduction", lambda: b.pick(reductions))
    if op == "F.kl_div":
        b.maybe(30, kwargs, "log_target", lambda: b.pick((True, False)))
    elif op == "F.binary_cross_entropy":
        b.maybe(20, kwargs, "weight", lambda: b.like(x))
    elif op == "F.binary_cross_entropy_with_logits":
        b.maybe(20, kwargs, "pos_weight", lambda: b.like(x))
    elif op in ("F.smooth_l1_loss", "F.huber_loss"):
        b.maybe(20, kwargs, "beta" if op == "F.smooth_l1_loss" else "delta", b.number)
    return [x, b.like(x)], kwargs


@drawer("F.cross_entropy", "F.nll_loss")
def _classification(b: Builder, op: str) -> Args:
    x = b.tensor("float", ndim=b.pick((2, 2, 1)))
    shape = b.shape(x)
    n, c = (shape[0], shape[1]) if len(shape) == 2 else (None, shape[0] if shape else 1)
    if op == "F.cross_entropy" and b.chance(25):
        target = b.like(x)  # class probabilities
    else:
        target = b.fit((n,) if n is not None else (), "int64")
    kwargs: dict[str, Any] = {}
    b.maybe(30, kwargs, "reduction", lambda: b.pick(("mean", "sum", "none")))
    b.maybe(20, kwargs, "ignore_index", lambda: b.integer(-1, 3))
    b.maybe(15, kwargs, "weight", lambda: b.fit((c,), b.dtype(x)))
    if op == "F.cross_entropy":
        b.maybe(15, kwargs, "label_smoothing", lambda: b.pick((0.1, 0.0, 1.5)))
    return [x, target], kwargs


@drawer("F.dropout")
def _dropout(b: Builder, op: str) -> Args:
    kwargs: dict[str, Any] = {}
    b.maybe(50, kwargs, "p", lambda: b.private_scalar("float") if b.chance(20) else b.pick((0.0, 0.5, 1.0, 1.5)))
    b.maybe(50, kwargs, "training", lambda: b.pick((True, False)))
    return [b.tensor("float")], kwargs


@drawer("softmax", "log_softmax")
def _softmax(b: Builder, op: str) -> Args:
    x = b.tensor("float")
    return [x, b.dim(x)], {}


# -- whole programs -----------------------------------------------------------------------------

# What a step does, weighted: mostly ops, then in-place writes to the model owner's own tensors
# from private ones, get(), plain values, backward passes, sends and label queries.
# Ops that take indices or masks (the richest source of value-dependent shapes and failures) are
# drawn more often than the others.
KINDS = ("op",) * 12 + ("index",) * 3 + ("in-place",) * 3 + ("get",) * 3 + ("plain",) + ("backward",) + (
    "send",) + ("owners",)
INDEXING_OPS = ("Tensor.__getitem__", "Tensor.__setitem__", "torch.where", "Tensor.gather", "Tensor.index_select",
                "Tensor.masked_fill", "F.embedding", "F.one_hot", "F.cross_entropy", "F.nll_loss")


def draw_step(b: Builder) -> None:
    kind = b.pick(KINDS)
    if kind == "get" or kind == "owners":
        live = b.runner.live()
        if live:
            public = [v for v, meta in live if not meta.owners]
            target = b.pick(public) if public and b.chance(70) else b.pick([v for v, _ in live])
            b.add(GetStep(target) if kind == "get" else OwnersStep(target))
            return
        kind = "op"
    if kind == "send":
        b.put(b.random_shape(), b.pick(("float32", "int64", "bool", "float64")))
        return
    if kind == "in-place":
        op = b.pick(IN_PLACE_OPS)
        b.own_target, b.prefer_private = True, True
    elif kind == "plain":
        op = b.pick(PLAIN_OPS)
    elif kind == "backward":
        op = "Tensor.backward"
    elif kind == "index":
        op = b.pick(INDEXING_OPS)
    else:
        op = b.pick(OPS)
    try:
        args, kwargs = draw_args(b, op)
    finally:
        b.own_target, b.prefer_private = False, False
    b.call(op, *args, **kwargs)
    if kind == "in-place" and args and isinstance(args[0], V) and b.chance(50):
        b.add(GetStep(args[0]))  # did the write (or the part of it done before a failure) label it?
    elif kind == "backward" and b.chance(60):
        leaves = [v for v, meta in b.runner.live() if meta.requires_grad and not meta.owners]
        if leaves:
            grad = b.call("Tensor.grad.__get__", b.pick(leaves))
            if grad is not None:
                b.add(GetStep(grad))


def draw_program(draw: st.DrawFn, world: World, max_steps: int) -> Program:
    """A program of up to ``max_steps`` steps (and the steps that make their arguments), drawn
    while running against ``world``."""
    with seeded():
        b = Builder(draw, Runner(make_worker(world)))
        for _ in range(draw(st.integers(min(2, max_steps), max_steps))):
            draw_step(b)
    return tuple(b.steps)


@dataclass(frozen=True, eq=False)
class Scenario:
    """Two worlds and one program."""

    a: World
    b: World
    program: Program

    def __repr__(self) -> str:
        lines = ["Scenario(", *("  " + line for line in render(self.program)), "  private values:"]
        lines += [f"    {tag}: A={self.a[tag].tolist()} B={self.b[tag].tolist()}" for tag in PRIVATE]
        return "\n".join([*lines, ")"])


@st.composite
def scenarios(draw: st.DrawFn, max_steps: int = 12) -> Scenario:
    """Two worlds (same shapes and dtypes, different values) and a program drawn against the first."""
    a = draw(worlds())
    b = draw(worlds())
    return Scenario(a, b, draw_program(draw, a, max_steps))


def ops_of(program: Sequence[Step]) -> list[str]:
    return [step.op for step in program if isinstance(step, CallStep)]


# -- hand-written programs ----------------------------------------------------------------------


class ProgramBuilder:
    """Writes a program by hand: ``p = ProgramBuilder(); mask = p.call("Tensor.__gt__", X, 0.0)``."""

    def __init__(self) -> None:
        self.steps: list[Step] = []

    def _next(self, step: Step) -> V:
        self.steps.append(step)
        return V(f"s{len(self.steps) - 1}")

    def send(self, value: torch.Tensor, requires_grad: bool = False) -> V:
        return self._next(PutStep(value, requires_grad))

    def call(self, op: str, *args: Any, **kwargs: Any) -> V:
        return self._next(CallStep(op, args, tuple(kwargs.items())))

    def get(self, target: V) -> V:
        return self._next(GetStep(target))

    def owners(self, target: V) -> V:
        return self._next(OwnersStep(target))

    def program(self) -> Program:
        return tuple(self.steps)


X, Y, M = V("x"), V("y"), V("m")
