"""A curious model owner attacks real `fedsecure worker serve` processes over mutual TLS.

Every attack uses only what a model owner has: pointers, `fedsecure.send`/`get`/`move`, a strict
aggregator's `aggregate`, `fix_precision().share(...)`, `fedsecure.fl`, and raw
`fedsecure.wire.messages` requests through its `WorkerClient` where the pointer API would not send
them. Where it can, a test asserts **noninterference**: the same attack program runs against two
workers whose private data differ (same shapes and dtypes), every reply the model owner sees is
recorded (pointer shapes and dtypes, released values, error types, rules and texts with object
ids normalised), and the two transcripts must be identical; where the attack reads values, no
private value may appear among them. Where a behaviour is part of the contract, it is asserted:
`PermissionDenied` and its rule, `OperationNotAllowed` for refused operations.

The workers with data serve with ``--max-metric-numel=0`` (no metric leaves) and trust the strict
aggregator ``secure_worker`` unless a test says otherwise. Attacks 1-3 (writes that fail half way,
result shapes and failures that depend on values) target workers serving the full pointer API
(``--policy full``); under the default training-only policy the same programs are refused
outright. Attacks on aggregation (known contributions) target a training-only data owner; the
memory quota a worker of its own.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fedsecure as sy
from fedsecure import fl
from fedsecure.aggregate.shares import DEFAULT_FRAC_BITS
from fedsecure.pointer.module import remote_of
from fedsecure.pointer.shared import share_remote
from fedsecure.transport.certs import write_federation
from fedsecure.wire import messages as m
from fedsecure.wire.codec import Ref
from fedsecure.wire.ids import new_id

# -- the private data ---------------------------------------------------------------------------
# Two data sets of the same shapes and dtypes. Values are exact binary fractions, so a released
# float equals a private one exactly when it is one. B = -A: x[0, 0] is negative in A, positive
# in B; A has 9 positive entries, B 7; A's classes are 0 and 1, B's 0, 1 and 2.

X_A = np.array(
    [[-0.8125, 1.4375], [0.3125, -1.1875], [1.0625, 0.5625], [-0.6875, -0.1875],
     [0.9375, 1.3125], [-1.5625, 0.6875], [0.4375, -0.9375], [1.1875, -0.3125]],
    dtype="float32",
)
X_B = -X_A
K_A = np.array([0, 1, 1, 0, 1, 0, 0, 1], dtype="int64")
K_B = np.array([2, 1, 0, 2, 1, 0, 2, 2], dtype="int64")
X_ALICE = np.array(
    [[0.5625, -0.4375], [-1.3125, 0.8125], [0.1875, 1.5625], [-0.9375, -1.0625], [1.6875, 0.0625],
     [-0.0625, -1.4375]],
    dtype="float32",
)
TO_Y = np.array([[1.0], [-1.0]], dtype="float32")


def dataset(x: np.ndarray, k: np.ndarray | None = None) -> dict[str, np.ndarray]:
    arrays = {"x": x, "y": x @ TO_Y}
    if k is not None:
        arrays["k"] = k
    return arrays


DATA = {"A": dataset(X_A, K_A), "B": dataset(X_B, K_B), "alice": dataset(X_ALICE)}
MiB = 1 << 20
QUOTA = "64M"


# -- workers ------------------------------------------------------------------------------------


@functools.cache
def _serve_help() -> str:
    return subprocess.run(
        [sys.executable, "-m", "fedsecure", "worker", "serve", "--help"],
        capture_output=True, text=True, check=True,
    ).stdout


def policy_full() -> list[str]:
    """``--policy=full`` for a worker with data; a worker that predates the flag serves the full
    pointer API anyway."""
    return ["--policy=full"] if "--policy" in _serve_help() else []


def memory_quota(size: str) -> list[str]:
    """``--memory-quota``; a worker that predates the flag has no quota (the tests then show what
    an unlimited worker lets a caller do)."""
    return [f"--memory-quota={size}"] if "--memory-quota" in _serve_help() else []


@dataclass
class Served:
    """One served worker and the model owner's handle on it."""

    proc: sy.WorkerProcess
    data: dict[str, np.ndarray] = field(default_factory=dict)
    _client: sy.WorkerClient | None = None

    @property
    def client(self) -> sy.WorkerClient:
        assert self._client is not None, "not started"
        return self._client

    def private_values(self) -> set[float]:
        return {float(v) for v in self.data["x"].flatten()} if self.data else set()


@contextlib.contextmanager
def serving(owner: sy.TLS, *workers: Served) -> Iterator[None]:
    """Start the workers side by side (each takes seconds to import torch); stop them all."""
    try:
        with ThreadPoolExecutor(max_workers=len(workers)) as pool:
            for started in [pool.submit(w.proc.start) for w in workers]:
                started.result()
        for w in workers:
            w._client = w.proc.connect(owner)
        yield
    finally:
        for w in workers:
            w.proc.stop()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    write_federation(d, ["owner", "bob", "alice", "secure_worker", "carol", "erin"])
    return d


@pytest.fixture(scope="module")
def owner(certs: Path) -> sy.TLS:
    return sy.TLS.from_dir(certs, "owner")


@pytest.fixture(scope="module")
def data_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("data")
    for name, arrays in DATA.items():
        np.savez(d / f"{name}.npz", **arrays)  # type: ignore[arg-type]
    return {name: str(d / f"{name}.npz") for name in DATA}


def data_owner(name: str, certs: Path, data_file: str, data: dict[str, np.ndarray], *, extra: list[str],
               peers: dict[str, str] | None = None, trust: tuple[str, ...] = ("secure_worker",)) -> Served:
    proc = sy.WorkerProcess(
        name, clients={"owner": ""}, tls_dir=str(certs), data=data_file, peers=peers, trust=trust,
        extra=["--max-metric-numel=0", *extra],
    )
    return Served(proc, data)


@pytest.fixture(scope="module")
def full(certs: Path, owner: sy.TLS, data_files: dict[str, str]) -> Iterator[dict[str, Served]]:
    """bob serving the full pointer API, once with data set A and once with data set B."""
    pair = {
        key: data_owner("bob", certs, data_files[key], DATA[key], extra=policy_full()) for key in ("A", "B")
    }
    with serving(owner, *pair.values()):
        yield pair


@pytest.fixture(scope="module")
def cohort(certs: Path, owner: sy.TLS, data_files: dict[str, str]) -> Iterator[dict[str, Served]]:
    """A federation: bob, a data owner under the default policy (training only) with data set A;
    alice, serving the full pointer API (a lax or colluding owner); the strict aggregator
    secure_worker; carol, an ordinary (not strict) aggregator. Both owners trust both aggregators.
    ``bob_b`` is a second bob under the same policy, with data set B (for noninterference)."""
    tls = str(certs)
    aggregators = {
        "secure_worker": Served(sy.WorkerProcess("secure_worker", clients={"owner": ""}, tls_dir=tls,
                                                 accept_peers=["bob", "alice"], aggregator=True)),
        "carol": Served(sy.WorkerProcess("carol", clients={"owner": ""}, tls_dir=tls,
                                         accept_peers=["bob", "alice"])),
    }
    with serving(owner, *aggregators.values()):
        peers = {name: w.proc.address for name, w in aggregators.items()}
        trust = ("secure_worker", "carol")
        owners = {
            "bob": data_owner("bob", certs, data_files["A"], DATA["A"], extra=[], peers=peers, trust=trust),
            "bob_b": data_owner("bob", certs, data_files["B"], DATA["B"], extra=[], peers=peers, trust=trust),
            "alice": data_owner("alice", certs, data_files["alice"], DATA["alice"], extra=policy_full(),
                                peers=peers, trust=trust),
        }
        with serving(owner, *owners.values()):
            yield {**aggregators, **owners}


@pytest.fixture(scope="module")
def erin(certs: Path, owner: sy.TLS) -> Iterator[Served]:
    """A worker with a memory quota of 64 MiB per model owner."""
    served = Served(sy.WorkerProcess("erin", clients={"owner": ""}, tls_dir=str(certs), extra=memory_quota(QUOTA)))
    with serving(owner, served):
        yield served


# -- transcripts --------------------------------------------------------------------------------

Event = tuple[Any, ...]
_IDS = re.compile(r"0x[0-9a-fA-F]+")
_ADDRESSES = re.compile(r"\d+\.\d+\.\d+\.\d+:\d+")


def normalise(text: str) -> str:
    return _ADDRESSES.sub("HOST:PORT", _IDS.sub("0x?", text))


@dataclass
class Transcript:
    """Everything the model owner sees while it runs an attack program on one worker."""

    worker: sy.WorkerClient
    events: list[Event] = field(default_factory=list)
    released: list[torch.Tensor] = field(default_factory=list)

    def step(self, what: str, action: Callable[[], Any]) -> Any:
        """Run ``action`` and wait for every op it sent (pipelined ops report their errors when
        the worker runs them); record the reply."""
        try:
            value = action()
            self.worker.flush()
        except sy.FedsecureError as exc:
            rule = getattr(exc, "rule", None)
            self.events.append((what, type(exc).__name__, rule, normalise(str(exc))))
            return None
        self.events.append((what, "ok", self.summary(value)))
        return value

    def summary(self, value: Any) -> Any:
        if isinstance(value, sy.PointerTensor):
            return ("pointer", tuple(value.shape), str(value.dtype))
        if isinstance(value, torch.Tensor):  # a released value
            local = value.detach().clone()
            self.released.append(local)
            return ("tensor", tuple(local.shape), str(local.dtype), tuple(local.flatten().tolist()))
        if isinstance(value, nn.Module):
            return ("model", tuple(self.summary(t) for t in value.state_dict().values()))
        if isinstance(value, tuple | list):
            return tuple(self.summary(v) for v in value)
        return value

    def refusals(self, rule: str) -> int:
        return sum(1 for e in self.events if e[1] == "PermissionDenied" and e[2] == rule)


Program = Callable[[sy.WorkerClient, Transcript], None]


def run(program: Program, served: Served) -> Transcript:
    w = served.client
    gc.collect()
    w.flush()  # pointers left over by earlier tests are freed first
    transcript = Transcript(w)
    torch.manual_seed(0)  # models the programs build start alike in every run
    program(w, transcript)
    return transcript


def assert_not_revealed(transcript: Transcript, served: Served) -> None:
    private = served.private_values()
    for value in transcript.released:
        found = private & {float(v) for v in value.flatten().tolist()}
        assert not found, f"private values {sorted(found)} were released: {value.flatten().tolist()}"


def assert_noninterference(program: Program, first: Served, second: Served) -> tuple[Transcript, Transcript]:
    a, b = run(program, first), run(program, second)
    assert_not_revealed(a, first)
    assert_not_revealed(b, second)
    assert a.events == b.events, "the model owner's view depends on the private data"
    return a, b


def fetch(ptr: Any) -> Any:
    return None if ptr is None else sy.get(ptr)


def setitem(target: Any, index: Any, value: Any) -> None:
    target[index] = value


def private(w: sy.WorkerClient, tag: str) -> Any:
    (ptr,) = w.search(tag)
    return ptr


def bit(x: Any) -> Any:
    """A one-element long tensor: 1 if x[0, 0] > 0, else 0 (0 for data set A, 1 for B)."""
    return (x[0:1, 0] > 0).long()


# -- 1. an op that writes and then fails must leave what it wrote labelled ----------------------


class Stash(nn.Module):
    """Traced by torch.fx: copies its input into a buffer, then fails (a view of the wrong size)."""

    stash: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 1)
        self.register_buffer("stash", torch.zeros(8, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.stash.copy_(x)
        return self.lin(x).view(5)


class CopyInto(nn.Module):
    """Traced by torch.fx: copies its first argument into its second, then fails."""

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        out.copy_(x)
        return x.view(5)


class StashThenIndex(nn.Module):
    """Traced by torch.fx: copies its input into a buffer, then indexes a table: the index comes
    from the data, so whether it fails does too (shapes alone cannot tell)."""

    stash: torch.Tensor
    table: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("stash", torch.zeros(8, 2))
        self.register_buffer("table", torch.arange(10.0))

    def forward(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        self.stash.copy_(x)
        return self.table[index]


class NormThenOneHot(nn.Module):
    """Traced by torch.fx: batch norm (updating its running statistics), then a one-hot encoding
    of labels that fails for a label out of range: a failure that depends on the data."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(2)

    def forward(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return self.norm(x) + F.one_hot(k, 2)


def setitem_partial(w: sy.WorkerClient, t: Transcript) -> None:
    x = private(w, "x")
    own = sy.send(torch.zeros(16), w)
    index = torch.arange(16)
    index[-1] = 99  # the last index is out of range: the first 15 are written first
    index_ptr = sy.send(index, w)
    t.step("own[index] = x.flatten(), one index out of range", lambda: setitem(own, index_ptr, x.flatten()))
    t.step("own.get()", lambda: sy.get(own))


def setitem_value_dependent(w: sy.WorkerClient, t: Transcript) -> None:
    x = private(w, "x")
    own = sy.send(torch.zeros(16), w)
    index = torch.cat([sy.send(torch.arange(15), w), bit(x)[:1] * 99])  # out of range for data set B only
    t.step("own[index] = x.flatten(), the last index from the data", lambda: setitem(own, index, x.flatten()))
    t.step("own.get()", lambda: sy.get(own))


def backward_partial(w: sy.WorkerClient, t: Transcript) -> None:
    x = private(w, "x")
    w1 = sy.send(torch.zeros(8, 2, requires_grad=True), w)
    w2 = sy.send(torch.ones(2, requires_grad=True), w)
    b = (w2 * w2).sum()
    t.step("b.backward()", lambda: b.backward())
    a = (w1 * x).sum()  # made after b: autograd runs a's branch (and fills w1.grad = x) first
    t.step("(a + b).backward(), b's graph already freed", lambda: (a + b).backward())
    t.step("w1.grad.get()", lambda: fetch(w1.grad))


def batch_norm_running_stats(w: sy.WorkerClient, t: Transcript) -> None:
    x = private(w, "x")
    model = sy.send(nn.Sequential(nn.BatchNorm1d(2), nn.Linear(3, 1)), w)  # the Linear wants 3 features
    t.step("model(x): batch norm updates its statistics, the Linear fails", lambda: model(x))
    norm = model[0]
    t.step("running_mean.get()", lambda: sy.get(norm.running_mean))
    t.step("running_var.get()", lambda: sy.get(norm.running_var))


def fx_buffer(w: sy.WorkerClient, t: Transcript) -> None:
    x = private(w, "x")
    model = sy.send(Stash(), w)
    t.step("model(x): stash.copy_(x), then a failing view", lambda: model(x))
    t.step("model.stash.get()", lambda: sy.get(model.stash))


def fx_argument(w: sy.WorkerClient, t: Transcript) -> None:
    x = private(w, "x")
    own = sy.send(torch.zeros(8, 2), w)
    model = sy.send(CopyInto(), w)
    t.step("model(x, own): own.copy_(x), then a failing view", lambda: model(x, own))
    t.step("own.get()", lambda: sy.get(own))


def fx_buffer_value_dependent(w: sy.WorkerClient, t: Transcript) -> None:
    x = private(w, "x")
    model = sy.send(StashThenIndex(), w)
    index = bit(x) * 100  # in range for data set A, out of range for B
    t.step("model(x, index): stash.copy_(x), then table[index]", lambda: model(x, index))
    t.step("model.stash.get()", lambda: sy.get(model.stash))


def fx_batch_norm_value_dependent(w: sy.WorkerClient, t: Transcript) -> None:
    x, k = private(w, "x"), private(w, "k")
    model = sy.send(NormThenOneHot(), w)
    t.step("model(x, k): batch norm, then F.one_hot(k, 2)", lambda: model(x, k))
    t.step("running_mean.get()", lambda: sy.get(model.norm.running_mean))


def optimizer_partial(w: sy.WorkerClient, t: Transcript) -> None:
    x = private(w, "x")
    weights = sy.send(torch.zeros(2, requires_grad=True), w)
    counter = sy.send(torch.zeros(2, dtype=torch.long), w)
    t.step("(x @ weights).sum().backward()", lambda: (x @ weights).sum().backward())
    grad = sy.send(torch.ones(2, dtype=torch.long), w)
    t.step("counter.grad = ...", lambda: setattr(counter, "grad", grad))
    opt = sy.optim.SGD([weights, counter], lr=1.0)
    t.step("opt.step(): updates weights, then fails on the integer tensor", lambda: opt.step())
    t.step("weights.get()", lambda: sy.get(weights))


WRITES: dict[str, Program] = {
    "setitem_partial": setitem_partial,
    "setitem_value_dependent": setitem_value_dependent,
    "backward_partial": backward_partial,
    "batch_norm_running_stats": batch_norm_running_stats,
    "fx_buffer": fx_buffer,
    "fx_argument": fx_argument,
    "fx_buffer_value_dependent": fx_buffer_value_dependent,
    "fx_batch_norm_value_dependent": fx_batch_norm_value_dependent,
    "optimizer_partial": optimizer_partial,
}


@pytest.mark.parametrize("name", WRITES)
def test_a_write_that_fails_leaves_nothing_readable(full: dict[str, Served], name: str) -> None:
    assert_noninterference(WRITES[name], full["A"], full["B"])


# -- 2. result shapes must not depend on private values -----------------------------------------


def mask_count(w: sy.WorkerClient, t: Transcript) -> None:
    x = private(w, "x")
    t.step("x[x > 0]", lambda: x[x > 0])


def mask_own(w: sy.WorkerClient, t: Transcript) -> None:
    x = private(w, "x")
    own = sy.send(torch.arange(16.0), w)
    t.step("own[x.flatten() > 0]", lambda: own[x.flatten() > 0])


def where_one_argument(w: sy.WorkerClient, t: Transcript) -> None:
    x = private(w, "x")
    t.step("torch.where(x > 0)", lambda: torch.where(x > 0))


def one_hot_classes(w: sy.WorkerClient, t: Transcript) -> None:
    k = private(w, "k")
    t.step("F.one_hot(k): as many classes as the largest label", lambda: F.one_hot(k))


SHAPES: dict[str, Program] = {
    "mask_count": mask_count,
    "mask_own": mask_own,
    "where_one_argument": where_one_argument,
    "one_hot_classes": one_hot_classes,
}


@pytest.mark.parametrize("name", SHAPES)
def test_result_shapes_do_not_depend_on_private_values(full: dict[str, Served], name: str) -> None:
    a, _ = assert_noninterference(SHAPES[name], full["A"], full["B"])
    assert a.events[-1][1] in ("OperationNotAllowed", "PermissionDenied"), a.events


def raw_call(op: str, operands: Callable[[sy.WorkerClient, Any, Any], list[Any]]) -> Program:
    """An op that is not on the pointer API, sent as a raw `Call` on private data."""

    def program(w: sy.WorkerClient, t: Transcript) -> None:
        x, k = private(w, "x"), private(w, "k")
        args = [Ref(a.id_at_location) if isinstance(a, sy.PointerTensor) else a for a in operands(w, x, k)]
        t.step(op, lambda: w.request(m.Call(op, args, {}, new_id(), False)))

    return program


def _singular_if_a(x: Any) -> Any:
    return x[:2] * (x[0, 0] > 0).float()  # zero (singular) for data set A


RAW: dict[str, Program] = {
    "nonzero": raw_call("torch.nonzero", lambda w, x, k: [x]),
    "masked_select": raw_call("torch.masked_select", lambda w, x, k: [x, x > 0]),
    "unique": raw_call("torch.unique", lambda w, x, k: [k]),
    "bincount": raw_call("torch.bincount", lambda w, x, k: [k]),
    "repeat_interleave": raw_call("torch.repeat_interleave",
                                  lambda w, x, k: [sy.send(torch.arange(8.0), w), k]),
    "multinomial": raw_call("torch.multinomial", lambda w, x, k: [x.abs().flatten(), 2]),
    "linalg_inv": raw_call("torch.linalg.inv", lambda w, x, k: [_singular_if_a(x)]),
    "linalg_cholesky": raw_call("torch.linalg.cholesky", lambda w, x, k: [_singular_if_a(x)]),
}


@pytest.mark.parametrize("name", RAW)
def test_data_dependent_ops_off_the_pointer_api_are_refused(full: dict[str, Served], name: str) -> None:
    a, _ = assert_noninterference(RAW[name], full["A"], full["B"])
    assert a.events[-1][1] == "OperationNotAllowed", a.events


# -- 3. whether an op fails must not depend on private values -----------------------------------


def _indexing(action: Callable[[Any, Any, sy.WorkerClient], Any], what: str) -> Program:
    def program(w: sy.WorkerClient, t: Transcript) -> None:
        x = private(w, "x")
        own = sy.send(torch.arange(10.0), w)
        index = bit(x) * 100  # [0] for data set A, [100] (out of range) for B
        t.step(what, lambda: action(own, index, w))

    return program


def _sized(action: Callable[[Any, Any], Any], what: str) -> Program:
    def program(w: sy.WorkerClient, t: Transcript) -> None:
        x = private(w, "x")
        own = sy.send(torch.arange(10.0), w)
        n = (x[0, 0] > 0).long() + 1  # 0-dimensional: 1 for data set A, 2 for B
        t.step(what, lambda: action(own, n))

    return program


def cross_entropy_targets(w: sy.WorkerClient, t: Transcript) -> None:
    k = private(w, "k")
    logits = sy.send(torch.zeros(8, 2), w)  # two classes: a label 2 is out of range
    t.step("F.cross_entropy(logits, k)", lambda: F.cross_entropy(logits, k))


def one_hot_fixed(w: sy.WorkerClient, t: Transcript) -> None:
    k = private(w, "k")
    t.step("F.one_hot(k, 2)", lambda: F.one_hot(k, 2))


def mask_assign(w: sy.WorkerClient, t: Transcript) -> None:
    x = private(w, "x")
    own = sy.send(torch.zeros(16), w)
    ones = sy.send(torch.ones(9), w)  # fits only if exactly 9 entries are positive
    t.step("own[x.flatten() > 0] = ones(9)", lambda: setitem(own, x.flatten() > 0, ones))


def probabilities(w: sy.WorkerClient, t: Transcript) -> None:
    x = private(w, "x")
    target = sy.send(torch.zeros(1), w)
    t.step("F.binary_cross_entropy(x[0:1, 0] + 1, target)",
           lambda: F.binary_cross_entropy(x[0:1, 0] + 1, target))


def integer_division(w: sy.WorkerClient, t: Transcript) -> None:
    x = private(w, "x")
    own = sy.send(torch.tensor([7]), w)
    t.step("own // bit(x): a division by zero for data set A", lambda: own // bit(x))


FAILURES: dict[str, Program] = {
    "index_oracle": _indexing(lambda own, i, w: own[i], "own[index]"),
    "index_select": _indexing(lambda own, i, w: torch.index_select(own, 0, i), "torch.index_select(own, 0, index)"),
    "gather": _indexing(lambda own, i, w: torch.gather(own, 0, i), "torch.gather(own, 0, index)"),
    "embedding": _indexing(lambda own, i, w: F.embedding(i, own.view(5, 2)), "F.embedding(index, weight)"),
    "setitem_index": _indexing(lambda own, i, w: setitem(own, i, 1.0), "own[index] = 1.0"),
    "size_new_zeros": _sized(lambda own, n: own.new_zeros([n]), "own.new_zeros([n])"),
    "size_narrow": _sized(lambda own, n: own.narrow(0, 0, n), "own.narrow(0, 0, n)"),
    "size_repeat": _sized(lambda own, n: own.repeat(n), "own.repeat(n)"),
    "size_topk": _sized(lambda own, n: torch.topk(own, n), "torch.topk(own, n)"),
    "size_pad": _sized(lambda own, n: F.pad(own, (0, n)), "F.pad(own, (0, n))"),
    "cross_entropy_targets": cross_entropy_targets,
    "one_hot_fixed": one_hot_fixed,
    "mask_assign": mask_assign,
    "probabilities": probabilities,
    "integer_division": integer_division,
}


@pytest.mark.parametrize("name", FAILURES)
def test_failures_do_not_depend_on_private_values(full: dict[str, Served], name: str) -> None:
    assert_noninterference(FAILURES[name], full["A"], full["B"])


# -- the deployment policy: training only refuses every pointer op on private data ---------------

TRAINING_ONLY = [
    "setitem_partial", "backward_partial", "batch_norm_running_stats", "optimizer_partial", "mask_count",
    "index_oracle", "size_new_zeros", "cross_entropy_targets",
]
PROGRAMS: dict[str, Program] = {**WRITES, **SHAPES, **FAILURES}


@pytest.mark.parametrize("name", TRAINING_ONLY)
def test_training_only_refuses_pointer_ops_on_private_data(cohort: dict[str, Served], name: str) -> None:
    a, _ = assert_noninterference(PROGRAMS[name], cohort["bob"], cohort["bob_b"])
    assert a.refusals("training-only") >= 1, a.events


TRAINING = fl.LocalTraining(epochs=2, batch_size=8, lr=0.1, loss="mse_loss")  # one full batch per epoch


def regression_model() -> nn.Linear:
    torch.manual_seed(3)
    return nn.Linear(2, 1)


def fit_on(served: Served, model: nn.Module, training: fl.LocalTraining, seed: int) -> nn.Module:
    """The model owner's copy of ``model``, trained by the worker on its own data (one `Fit`)."""
    w = served.client
    remote = sy.send(copy.deepcopy(model), w)
    values = {"module_id": module_id(remote), "x_tag": "x", "y_tag": "y", "config": training.to_wire(), "seed": seed}
    w.request(m.Fit(**values))
    return remote


def module_id(model: nn.Module) -> int:
    remote = remote_of(model)
    assert remote is not None and remote.module_id is not None
    return remote.module_id


def local_fit(model: nn.Module, served: Served, training: fl.LocalTraining) -> nn.Module:
    """What the worker's training computes (full-batch SGD), here, from the test's copy of the data."""
    x, y = (torch.from_numpy(served.data[k]) for k in ("x", "y"))
    local = copy.deepcopy(model)
    opt = torch.optim.SGD(local.parameters(), lr=training.lr)
    for _ in range(training.epochs):
        opt.zero_grad()
        F.mse_loss(local(x), y).backward()
        opt.step()
    return local


def floats(model: nn.Module) -> torch.Tensor:
    return torch.cat([t.detach().double().flatten() for t in model.state_dict().values() if t.is_floating_point()])


def leaked(what: str, found: torch.Tensor, truth: torch.Tensor) -> NoReturn:
    exact = found.shape == truth.shape and torch.allclose(found.double(), truth.double(), atol=1e-4)
    pytest.fail(f"{what} was released; the model owner computed from it {found.tolist()}, "
                + ("exactly bob's private value" if exact else f"(bob's private value is {truth.tolist()})"))


def test_training_only_refuses_ops_on_a_fit_result(cohort: dict[str, Served]) -> None:
    """Write half of bob's trained weights into the model owner's tensor, failing half way."""
    bob, model = cohort["bob"], regression_model()
    trained = fit_on(bob, model, TRAINING, seed=5)
    truth = floats(local_fit(model, bob, TRAINING))
    own = sy.send(torch.zeros(3), bob.client)
    index = sy.send(torch.tensor([0, 1, 99]), bob.client)
    with pytest.raises(sy.PermissionDenied) as info:
        flat = torch.cat([p.flatten() for p in trained.parameters()])  # weight, bias
        with contextlib.suppress(sy.RemoteError):  # the out-of-range index
            setitem(own, index, flat)
            bob.client.flush()
        leaked("the model owner's tensor, after a failed write of bob's trained weights", sy.get(own)[:2],
               truth[:2])
    assert info.value.rule == "training-only"


def test_the_training_only_rule_travels_with_the_label(cohort: dict[str, Served]) -> None:
    """On an ordinary aggregator, a + 0 * b passes label counting; bob's rule refuses it there."""
    bob, alice, carol, model = cohort["bob"], cohort["alice"], cohort["carol"], regression_model()
    bobs = sy.move(fit_on(bob, model, TRAINING, seed=5), carol.client)
    alices = sy.move(fit_on(alice, model, TRAINING, seed=6), carol.client)
    truth = floats(local_fit(model, bob, TRAINING))
    with pytest.raises(sy.PermissionDenied) as info:
        mixed = bobs.weight.data + 0 * alices.weight.data
        leaked("bob's weight + 0 * alice's weight on carol", sy.get(mixed).flatten(), truth[:2])
    assert info.value.rule == "training-only"


# -- 4. a served worker accepts no model sent as its owner's own --------------------------------

SEND_TARGETS = [("full", "A"), ("cohort", "bob"), ("cohort", "secure_worker"), ("cohort", "carol")]


class Unbuildable(nn.Module):
    """A model workers cannot build (weights only: sent tensor by tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(x.numpy() * 2)  # leaves torch: not traceable into allowed ops


@pytest.mark.parametrize("target", SEND_TARGETS, ids=["-".join(t) for t in SEND_TARGETS])
@pytest.mark.parametrize("kind", ["built", "weights_only"])
def test_a_served_worker_refuses_models_sent_as_private(request: pytest.FixtureRequest, target: tuple[str, str],
                                                        kind: str) -> None:
    served: Served = request.getfixturevalue(target[0])[target[1]]
    model = nn.Linear(2, 1) if kind == "built" else Unbuildable()
    with pytest.raises(sy.PermissionDenied) as info:
        remote = sy.send(model, served.client, private=True)
        weight = remote.weight
        assert isinstance(weight, sy.PointerTensor)
        pytest.fail(f"accepted: the model owner's own weights now count as private data of {weight.owners}")
    assert info.value.rule == "private-sends"


# -- 5. known contributions: "aggregate minus what the model owner knows" ------------------------


def test_a_legitimate_round_is_aggregated_and_released(cohort: dict[str, Served]) -> None:
    bob, alice, sw, model = cohort["bob"], cohort["alice"], cohort["secure_worker"], regression_model()
    bobs = sy.move(fit_on(bob, model, TRAINING, seed=1), sw.client)
    alices = sy.move(fit_on(alice, model, TRAINING, seed=2), sw.client)
    mean = sy.get(sw.client.aggregate([bobs, alices]))
    assert isinstance(mean, nn.Linear)
    expected = (floats(local_fit(model, bob, TRAINING)) + floats(local_fit(model, alice, TRAINING))) / 2
    torch.testing.assert_close(floats(mean), expected, atol=1e-4, rtol=0)


def test_a_legitimate_engine_round_is_released(cohort: dict[str, Served]) -> None:
    workers = [cohort["bob"].client, cohort["alice"].client]
    model = regression_model()
    before = floats(model)
    trained, history = fl.fit(model, workers, fl.FedAvg(training=TRAINING), rounds=1,
                              aggregator=cohort["secure_worker"].client)
    assert len(history) == 1
    assert not torch.allclose(floats(trained), before)


def _aggregate_with(cohort: dict[str, Served], bob_model: nn.Module, alices: nn.Module) -> torch.Tensor:
    """bob's Fit of ``bob_model`` and ``alices``, moved to the strict aggregator; their released mean."""
    sw = cohort["secure_worker"].client
    bobs = sy.move(fit_on(cohort["bob"], bob_model, TRAINING, seed=1), sw)
    sy.move(alices, sw)
    return floats(sy.get(sw.aggregate([bobs, alices])))


def test_an_untrained_copy_does_not_count_as_a_contributor(cohort: dict[str, Served]) -> None:
    model = regression_model()
    with pytest.raises(sy.PermissionDenied) as info:
        mean = _aggregate_with(cohort, model, sy.send(copy.deepcopy(model), cohort["alice"].client))
        leaked("the mean of bob's model and an untrained copy", 2 * mean - floats(model),
               floats(local_fit(model, cohort["bob"], TRAINING)))
    assert info.value.rule in ("cohort", "min-contributors")


def test_a_copy_labelled_without_change_does_not_count(cohort: dict[str, Served]) -> None:
    model, alice = regression_model(), cohort["alice"]
    with pytest.raises(sy.PermissionDenied) as info:
        alices = sy.send(copy.deepcopy(model), alice.client)
        zero = private(alice.client, "x").sum() * 0
        with torch.no_grad():
            for p in alices.parameters():
                p.add_(zero)  # labelled alice's, unchanged
        mean = _aggregate_with(cohort, model, alices)
        leaked("the mean of bob's model and alice's labelled copy", 2 * mean - floats(model),
               floats(local_fit(model, cohort["bob"], TRAINING)))
    assert info.value.rule == "cohort"


def test_training_under_another_configuration_does_not_count(cohort: dict[str, Served]) -> None:
    model = regression_model()
    frozen = fl.LocalTraining(epochs=1, batch_size=8, lr=1e-30, loss="mse_loss")  # changes nothing
    with pytest.raises(sy.PermissionDenied) as info:
        alices = fit_on(cohort["alice"], model, frozen, seed=2)
        mean = _aggregate_with(cohort, model, alices)
        leaked("the mean of bob's model and alice's model trained with lr=1e-30", 2 * mean - floats(model),
               floats(local_fit(model, cohort["bob"], TRAINING)))
    assert info.value.rule == "cohort"


def relu_net(bias: float) -> nn.Sequential:
    torch.manual_seed(4)
    hidden, out = nn.Linear(2, 4), nn.Linear(4, 1)
    with torch.no_grad():
        hidden.bias.fill_(bias if bias < 0 else 0.5)
        out.bias.fill_(bias)
    return nn.Sequential(hidden, nn.ReLU(), out, nn.ReLU())


def test_training_another_reference_model_does_not_count(cohort: dict[str, Served]) -> None:
    """Same configuration, another starting model: alice's is dead (every ReLU off, every gradient
    zero), so her training leaves it as it was, and the model owner knows it."""
    live, dead = relu_net(1.0), relu_net(-100.0)
    with pytest.raises(sy.PermissionDenied) as info:
        alices = fit_on(cohort["alice"], dead, TRAINING, seed=2)
        mean = _aggregate_with(cohort, live, alices)
        leaked("the mean of bob's model and alice's training of a dead model", 2 * mean - floats(dead),
               floats(local_fit(live, cohort["bob"], TRAINING)))
    assert info.value.rule == "cohort"


def test_raw_data_shared_with_known_zeros_does_not_count(cohort: dict[str, Served]) -> None:
    bob, alice = cohort["bob"], cohort["alice"]
    holders = (cohort["secure_worker"].client, cohort["carol"].client)
    with pytest.raises(sy.PermissionDenied) as info:
        bobs = private(bob.client, "x").fix_precision().share(*holders).get()
        zeros = sy.send(torch.zeros(8, 2), alice.client) + private(alice.client, "x").sum() * 0
        alices = zeros.fix_precision().share(*holders).get()
        total = sy.SharedTensor.sum([bobs, alices]).float_precision()
        leaked("the sum of bob's shared data and alice's shared zeros", total.flatten(),
               torch.from_numpy(bob.data["x"]).flatten())
    assert info.value.rule in ("cohort", "training-only")


def test_an_update_shared_with_known_zeros_does_not_count(cohort: dict[str, Served]) -> None:
    bob, alice, model = cohort["bob"], cohort["alice"], regression_model()
    holders = [cohort["secure_worker"].client, cohort["carol"].client]
    with pytest.raises(sy.PermissionDenied) as info:
        reference = sy.send(copy.deepcopy(model), bob.client)
        trained = fit_on(bob, model, TRAINING, seed=1)
        ids, reply = share_remote(bob.client, module_id(trained), holders, frac_bits=DEFAULT_FRAC_BITS,
                                  reference_id=module_id(reference))
        bobs = sy.SharedTensor([sy.PointerTensor(h, i, reply["shape"], torch.int64) for h, i in zip(holders, ids, strict=True)],
                               frac_bits=DEFAULT_FRAC_BITS)
        zeros = sy.send(torch.zeros(reply["shape"]), alice.client) + private(alice.client, "x").sum() * 0
        alices = zeros.fix_precision().share(*holders).get()
        total = sy.SharedTensor.sum([bobs, alices]).float_precision()
        leaked("the sum of bob's shared update and alice's shared zeros", total.flatten(),
               floats(local_fit(model, bob, TRAINING)) - floats(model))
    assert info.value.rule == "cohort"


# -- 6. memory: a caller cannot grow a worker by gigabytes ---------------------------------------

HUGE = 1 << 28  # float32 elements: 1 GiB
GROWTH_LIMIT = 200 * MiB


def _memory(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in status.splitlines())
            if k in ("VmRSS", "VmHWM")}


def _reset_peak(pid: int) -> None:
    with contextlib.suppress(OSError):  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def grow_new_ones(w: sy.WorkerClient, held: list[Any]) -> None:
    held.append(sy.send(torch.ones(1), w).new_ones(HUGE))


def grow_expand(w: sy.WorkerClient, held: list[Any]) -> None:
    held.append(sy.send(torch.ones(1), w).expand(HUGE).contiguous())


def grow_repeat(w: sy.WorkerClient, held: list[Any]) -> None:
    held.append(sy.send(torch.ones(1), w).repeat(HUGE))


def grow_step_by_step(w: sy.WorkerClient, held: list[Any]) -> None:
    seed = sy.send(torch.ones(1), w)
    for _ in range(40):  # 40 x 32 MiB
        held.append(seed.new_ones(1 << 23))
        w.flush()


def grow_model_spec(w: sy.WorkerClient, held: list[Any]) -> None:
    spec = {"type": "Linear", "args": {"in_features": 1 << 14, "out_features": 1 << 14, "bias": True},
            "children": [], "training": True, "frozen": []}
    w.request(m.PutModule(new_id(), spec, [torch.zeros(1), torch.zeros(1)],
                          [new_id(), new_id()], False))


GROWTH: dict[str, Callable[[sy.WorkerClient, list[Any]], None]] = {
    "new_ones": grow_new_ones,
    "expand_contiguous": grow_expand,
    "repeat": grow_repeat,
    "step_by_step": grow_step_by_step,
    "model_spec": grow_model_spec,
}


@pytest.mark.parametrize("name", GROWTH)
def test_a_caller_cannot_grow_a_worker_by_gigabytes(erin: Served, name: str) -> None:
    w, process = erin.client, erin.proc.process
    assert process is not None
    gc.collect()
    w.flush()
    before = _memory(process.pid)["VmRSS"]
    _reset_peak(process.pid)
    held: list[Any] = []
    refused: sy.FedsecureError | None = None
    try:
        GROWTH[name](w, held)
        w.flush()
    except sy.FedsecureError as exc:
        refused = exc
    grown = _memory(process.pid)["VmHWM"] - before
    held.clear()
    gc.collect()
    w.flush()
    assert grown < GROWTH_LIMIT, f"the worker grew by {grown // MiB} MiB (refused: {refused!r})"
    assert isinstance(refused, sy.PermissionDenied) and refused.rule == "memory-quota", refused
