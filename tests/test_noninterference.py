"""Noninterference: what a model owner sees of work on private data depends on its metadata only.

The same model-owner program runs against two worlds whose private data (``x``, ``y``, ``m`` on
the worker ``bob``, see tests/noninterference.py) has the same shapes and dtypes and different
values; the replies it gets (result shapes, dtypes, owners, released values, plain values,
whether each step succeeded, error types, rules and texts) must be the same in both. With
``Policy(max_metric_numel=0)`` no metric leaves, so no allowed release explains a difference.

Random programs drawn from the allow-list, hand-written programs for known channels, and one
program against a worker served over gRPC. ``benchmarks/noninterference.py`` runs the random
programs at length and lists what it finds.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import fedsecure as sy
import noninterference as ni
from fedsecure.transport.grpc import WorkerServer
from fedsecure.worker.core import WorkerCore
from noninterference import M, ProgramBuilder, X, Y

NAN, INF = float("nan"), float("inf")

# Two worlds that differ in every way the values can: signs, zeros, magnitudes, NaN and inf,
# labels in and out of the usual index range, a regular and a singular matrix.
PLAIN: ni.World = {
    "x": torch.linspace(0.1, 0.9, 12).reshape(4, 3),
    "y": torch.tensor([0, 1, 2, 0]),
    "m": torch.eye(3) * 2,
}
EDGE: ni.World = {
    "x": torch.tensor([[0.0, -1.0, 1e30], [NAN, INF, -INF], [-0.0, 2.5, -3.0], [1e-30, 7.0, -1e30]]),
    "y": torch.tensor([-1, 3, 100, 2**40]),
    "m": torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [0.0, 0.0, 0.0]]),
}
ZEROS: ni.World = {"x": torch.zeros(4, 3), "y": torch.zeros(4, dtype=torch.int64), "m": torch.zeros(3, 3)}
PAIRS = [pytest.param(PLAIN, EDGE, id="plain-edge"), pytest.param(PLAIN, ZEROS, id="plain-zeros"),
         pytest.param(ZEROS, EDGE, id="zeros-edge")]


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # the same programs on every run: CI is reproducible
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(ni.scenarios())
def test_random_programs_see_the_same_in_any_two_worlds(scenario: ni.Scenario) -> None:
    ni.assert_noninterference(scenario.program, scenario.a, scenario.b)


# -- hand-written programs for known channels -----------------------------------------------------


def _masked_selection() -> ni.Program:
    p = ProgramBuilder()
    p.call("Tensor.__getitem__", X, p.call("Tensor.__gt__", X, 0.0))  # x[x > 0]: as many as are > 0
    return p.program()


def _where_one_argument() -> ni.Program:
    p = ProgramBuilder()
    p.call("torch.where", p.call("Tensor.__gt__", X, 0.0))  # the indices of x > 0: nonzero()
    return p.program()


def _outside_the_allow_list() -> ni.Program:
    p = ProgramBuilder()
    p.call("Tensor.nonzero", X)
    p.call("torch.unique", Y)
    p.call("torch.multinomial", p.call("Tensor.abs", X), 1)
    return p.program()


def _own_indexed_by_private() -> ni.Program:
    p = ProgramBuilder()
    own = p.send(torch.zeros(5))
    p.call("Tensor.__getitem__", own, p.call("Tensor.long", X))  # own[x.long()]
    p.call("Tensor.__getitem__", own, Y)  # own[y]
    return p.program()


def _labels_as_indices() -> ni.Program:
    p = ProgramBuilder()
    p.call("Tensor.gather", X, 1, p.call("Tensor.unsqueeze", Y, 1))
    p.call("Tensor.index_select", M, 0, Y)
    p.call("F.embedding", Y, p.send(torch.ones(3, 2)))
    p.call("F.cross_entropy", X, Y)
    p.call("F.nll_loss", X, Y)
    p.call("F.one_hot", Y, 3)
    p.call("F.one_hot", Y)  # num_classes = max(y) + 1
    return p.program()


def _private_integers_as_sizes() -> ni.Program:
    p = ProgramBuilder()
    own = p.send(torch.arange(5.0))
    k = p.call("Tensor.__getitem__", Y, 0)  # a private 0-d int where torch expects a Python int
    p.call("Tensor.new_zeros", own, (k,))
    p.call("Tensor.topk", own, k)
    p.call("Tensor.split", own, k)
    p.call("Tensor.narrow", own, 0, k, 1)
    p.call("Tensor.softmax", X, k)
    return p.program()


def _value_dependent_failures() -> ni.Program:
    p = ProgramBuilder()
    p.call("Tensor.__floordiv__", Y, Y)  # integer division by zero
    p.call("Tensor.__int__", p.call("Tensor.__getitem__", X, (1, 0)))  # int(nan)
    p.call("F.binary_cross_entropy", X, X)  # inputs outside [0, 1]
    return p.program()


def _partial_write() -> ni.Program:
    p = ProgramBuilder()
    own = p.send(torch.zeros(12))
    index = p.send(torch.tensor([*range(11), 99]))  # the last index is out of range
    p.call("Tensor.__setitem__", own, index, p.call("Tensor.flatten", X))  # fails half way through
    p.get(own)
    return p.program()


def _partial_backward() -> ni.Program:
    p = ProgramBuilder()
    w1 = p.send(torch.zeros(4, 3), requires_grad=True)
    w2 = p.send(torch.zeros(3), requires_grad=True)
    s = p.call("Tensor.__mul__", w2, 2.0)
    u = p.call("Tensor.__mul__", s, s)  # saves s for its backward
    a = p.call("Tensor.sum", p.call("Tensor.__mul__", w1, X))  # its gradient for w1 is x
    p.call("Tensor.add_", s, 1.0)  # so the backward of u fails, after w1's gradient was written
    p.call("Tensor.backward", p.call("Tensor.__add__", p.call("Tensor.sum", u), a))
    p.get(p.call("Tensor.grad.__get__", w1))
    return p.program()


def _failure_and_what_it_read() -> ni.Program:
    p = ProgramBuilder()
    weight = p.send(torch.ones(3, 2))
    p.call("F.embedding", Y, weight)  # fails where a label is out of range
    p.owners(weight)  # the model owner's own weights, only read: their labels must not tell
    p.get(weight)
    own = p.send(torch.zeros(3, dtype=torch.int64))
    mask = p.send(torch.tensor([True, False, True]))
    p.call("Tensor.masked_fill_", own, mask, p.call("Tensor.__getitem__", X, (1, 1)))  # inf fits no int64
    p.get(mask)
    return p.program()


REGRESSIONS: dict[str, Callable[[], ni.Program]] = {
    "masked selection": _masked_selection,
    "torch.where with one argument": _where_one_argument,
    "nonzero, unique, multinomial": _outside_the_allow_list,
    "own[x.long()], own[y]": _own_indexed_by_private,
    "labels as indices": _labels_as_indices,
    "private integers as sizes": _private_integers_as_sizes,
    "value-dependent failures": _value_dependent_failures,
    "partial write, then get": _partial_write,
    "partial backward, then get": _partial_backward,
    "a failure and the inputs it read": _failure_and_what_it_read,
}


@pytest.mark.parametrize("a, b", PAIRS)
@pytest.mark.parametrize("name", REGRESSIONS)
def test_known_channels_show_nothing(name: str, a: ni.World, b: ni.World) -> None:
    ni.assert_noninterference(REGRESSIONS[name](), a, b)


def test_the_transcripts_show_what_the_model_owner_sees() -> None:
    """The harness itself: a program that releases a value of the model owner's own shows that
    value, so two programs that send different values differ where they should."""
    programs = []
    for value in (0.0, 1.0):
        p = ProgramBuilder()
        own = p.send(torch.full((2,), value))
        p.call("Tensor.__add__", own, 1.0)
        p.get(own)
        p.call("Tensor.sum", X)
        programs.append(p.program())
    first, second = (ni.run(program, PLAIN) for program in programs)
    found = ni.compare(programs[0], first, second)
    assert found is not None and found.step == 2 and found.what == "released values differ"
    again = ni.run(programs[0], EDGE)
    assert ni.compare(programs[0], first, again) is None  # nothing else shows x's values
    assert first.steps[3][1][-1] == ("bob",)  # x.sum() is labelled with bob's data


def test_a_world_and_its_copy_give_the_same_transcript() -> None:
    """No difference comes from the machinery: ids, the RNG (rand_like, dropout), object order."""
    p = ProgramBuilder()
    own = p.send(torch.ones(4, 3))
    p.get(p.call("torch.rand_like", own))
    p.get(p.call("F.dropout", own, 0.5))
    p.call("Tensor.__add__", X, own)
    p.call("torch.split", X, 1)
    p.owners(own)
    copy = {tag: t.clone() for tag, t in EDGE.items()}
    assert ni.run(p.program(), EDGE) == ni.run(p.program(), copy)


# -- a served worker ------------------------------------------------------------------------------

TOKEN = "noninterference-owner-token-0123456789"


def _served_program() -> ni.Program:
    p = ProgramBuilder()
    own = p.send(torch.zeros(4, 3), requires_grad=True)
    h = p.call("Tensor.__add__", p.call("Tensor.__matmul__", X, M), own)
    p.call("Tensor.backward", p.call("Tensor.sum", h))
    p.get(p.call("Tensor.grad.__get__", own))  # the gradient of a sum: ones, whatever x is
    loss = p.call("F.cross_entropy", X, Y)
    p.call("Tensor.item", loss)  # a metric, but this owner releases none
    p.get(p.call("Tensor.__getitem__", X, p.call("Tensor.__gt__", X, 0.0)))
    p.owners(own)
    p.get(own)
    p.get(X)
    return p.program()


def _served_transcript(world: ni.World, program: ni.Program) -> ni.Transcript:
    core = WorkerCore(ni.WORKER, policy=ni.POLICY)
    for tag in ni.PRIVATE:
        core.load(world[tag], tags=(tag,))
    with WorkerServer(core, callers={TOKEN: ("client", "owner")}) as server:
        client = sy.connect(ni.WORKER, server.address, credentials=TOKEN, pipelined=False)
        return ni.run_on(client, program)


def test_a_served_worker_shows_the_same_in_two_worlds() -> None:
    program = _served_program()
    plain, edge = _served_transcript(PLAIN, program), _served_transcript(EDGE, program)
    assert ni.run(program, PLAIN) == plain  # gRPC adds nothing a virtual worker does not show
    found = ni.compare(program, plain, edge)
    assert found is None, ni.report(program, PLAIN, EDGE, found)
