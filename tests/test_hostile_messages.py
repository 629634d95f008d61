"""Hostile messages: what someone who can send arbitrary bytes to a worker can achieve.

Every test talks to `WorkerCore.handle` directly, as a client unless noted. The contract:
``handle`` always answers with a well-formed reply (an error reply for anything malformed
or refused), never raises, runs nothing outside the allow-list, and releases a worker's
private data only as a scalar metric. A refusal loses nothing. Each bug these tests
found has a test of its own, kept as its regression test.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fedsecure.errors import ProtocolError
from fedsecure.wire import messages as m
from fedsecure.wire.codec import Ref, encode
from fedsecure.worker import labels as lb
from fedsecure.worker.allowlist import ALLOWED
from fedsecure.worker.core import WorkerCore
from fedsecure.worker.store import Sender

CLIENT = Sender("client", "mallory")
PEER = Sender("peer", "alice")
FUZZ = settings(max_examples=300, deadline=None)
PRIVATE = torch.arange(4.0) + 0.5  # the owner's data: 0.5, 1.5, 2.5, 3.5
PUBLIC = 1  # id of a public tensor every test worker holds


def send(core: WorkerCore, msg: m.Request | bytes, sender: Sender = CLIENT) -> m.Reply:
    raw = core.handle(msg if isinstance(msg, bytes) else m.encode_request(msg), sender)
    assert isinstance(raw, bytes)
    return m.decode_reply(raw)  # raises if the reply is malformed


def kind(reply: m.Reply) -> str | None:
    return None if reply.error is None else reply.error[0]


def worker() -> tuple[WorkerCore, int]:
    """A worker with private data (tags "data", "matrix", "loss") and a public 4-vector."""
    core = WorkerCore("bob")
    private_id = core.load(PRIVATE, tags=("data",))
    core.load(torch.arange(16.0).reshape(4, 4), tags=("matrix",))
    core.load(torch.tensor(0.25), tags=("loss",))
    assert send(core, m.Put(PUBLIC, torch.ones(4), False, False, [])).error is None
    return core, private_id


def found(core: WorkerCore, tag: str = "data") -> int:
    """The id a client gets for private data: via Search, like any model owner."""
    (meta,) = send(core, m.Search(tag)).value
    return int(meta["id"])


def assert_healthy(core: WorkerCore, private_id: int) -> None:
    """The worker still serves requests, and its private data is still there, still labelled."""
    reply = send(core, m.Count())
    mine = sum(1 for e in core.objects.values() if e.owner == CLIENT.id)
    assert reply.error is None and reply.value == mine
    obj = core.objects[private_id].obj
    assert torch.equal(obj, PRIVATE) and core.own_label in lb.labels_of(obj)


def refs(value: Any, ids: dict[str, int]) -> Any:
    """Replace names in ``ids`` by references to the objects they name."""
    if isinstance(value, str) and value in ids:
        return Ref(ids[value])
    if isinstance(value, list):
        return [refs(v, ids) for v in value]
    return value


# -- fuzzing ---------------------------------------------------------------------------------

_LEAF = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=12) | st.binary(max_size=12)
)


def _nest(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=4) | st.integers(0, 9), children, max_size=3)
        | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=24))
        | st.builds(lambda code, v: msgpack.ExtType(code, msgpack.packb(v)), st.integers(1, 8), children)
    )


MSGPACK = st.recursive(_LEAF, _nest, max_leaves=16)
REQUEST_SHAPED = st.builds(
    lambda k, release, rest: [k, release, *rest],
    st.integers(0, 24), st.lists(st.integers(0, 2**64 - 1), max_size=2), st.lists(MSGPACK, max_size=7),
)
VALID = [
    m.encode_request(msg)
    for msg in (
        m.Put(7, torch.randn(2, 3), True, True, ["train", "#x"]),
        m.Call("Tensor.__getitem__", [Ref(PUBLIC), (slice(0, 2, None), ...)], {}, 8, True, release=[9]),
        m.Call("Tensor.to", [Ref(PUBLIC), torch.float64], {"memory_format": torch.preserve_format}, 8, False),
        m.Get(PUBLIC),
        m.Search("data"),
        m.Count(release=[3, 4]),
        m.Aggregate([PUBLIC, PUBLIC], False, 8),
    )
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        how = draw(st.sampled_from(["truncate", "flip", "insert", "append"]))
        if how == "truncate":
            del data[at:]
        elif how == "flip" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif how == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        else:
            data += draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


def _check_any_bytes(data: bytes) -> None:
    core, private_id = worker()
    reply = send(core, data)
    try:
        m.decode_request(data)  # may raise nothing but ProtocolError
    except ProtocolError:
        assert kind(reply) == "protocol"
    assert_healthy(core, private_id)


@FUZZ
@given(st.binary(max_size=256))
def test_random_bytes(data: bytes) -> None:
    _check_any_bytes(data)


@FUZZ
@given(MSGPACK | REQUEST_SHAPED)
def test_random_msgpack_structures(value: Any) -> None:
    _check_any_bytes(msgpack.packb(value))


@FUZZ
@given(mutated())
def test_mutated_valid_requests(data: bytes) -> None:
    _check_any_bytes(data)


_NAMES = ["P", "M", "pub", "w", "r0", "r1", "r2", "r3"]
_ARG = (
    st.sampled_from(_NAMES) | st.integers(-2, 4) | st.sampled_from([0.5, -1.0, None])
    | st.lists(st.integers(-1, 4), max_size=3)
)
_STEP = st.tuples(
    st.sampled_from(sorted(ALLOWED)),
    st.lists(_ARG, min_size=1, max_size=3),
    st.booleans(),
)


def _released(steps: list[tuple[str, list[Any], bool]], seed: int) -> list[Any]:
    """Run ``steps`` on a worker whose private data is drawn from ``seed``; what left it?"""
    core = WorkerCore("bob")
    g = torch.Generator().manual_seed(seed)
    core.load(torch.randn(4, generator=g), tags=("data",))
    core.load(torch.randn(4, 4, generator=g), tags=("matrix",))
    ids = {"P": found(core), "M": found(core, "matrix"), "pub": 1, "w": 2}
    ids.update({f"r{i}": 100 + i for i in range(4)})
    send(core, m.Put(1, torch.linspace(-1, 1, 4), False, False, []))
    send(core, m.Put(2, torch.linspace(0, 3, 4), True, False, []))
    out: list[Any] = []
    for i, (op, args, grad) in enumerate(steps):
        torch.manual_seed(i)
        reply = send(core, m.Call(op, refs(args, ids), {}, ids[f"r{i}"], grad))
        plain = reply.error is None and isinstance(reply.value, list) and "{" not in repr(reply.value)
        out.append(torch.tensor(reply.value, dtype=torch.float64) if plain else None)
    for name in _NAMES:
        reply = send(core, m.Get(ids[name]))
        out.append(reply.value["tensor"] if reply.error is None else None)
    return out


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch's deprecation notices for odd arguments
@settings(max_examples=200, deadline=None)
@given(st.lists(_STEP, min_size=1, max_size=4))
def test_no_sequence_of_allowed_ops_releases_private_data(steps: list[tuple[str, list[Any], bool]]) -> None:
    """Differential: whatever leaves the worker (beyond one-element metrics) must not depend
    on the private data, so two workers holding different private data release the same."""
    for a, b in zip(_released(steps, 1), _released(steps, 2), strict=True):
        if a is not None and b is not None and (a.numel() > 1 or b.numel() > 1):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


# -- crafted messages ------------------------------------------------------------------------

OFF_LIST = [
    "torch.load", "torch.save", "Tensor.__reduce_ex__", "os.system", "Tensor.numpy", "__import__",
    "builtins.eval", "Tensor.data_ptr", "Tensor.untyped_storage", "Tensor.register_hook",
    "torch.empty_like", "Tensor.get", "Tensor.send", "Tensor.__class__", "Tensor.grad.__delete__",
    "F.linear.__globals__", "torch.Tensor.add", "Tensor.add ", "",
]


@pytest.mark.parametrize("op", OFF_LIST)
def test_ops_off_the_allow_list_are_refused(op: str, tmp_path: Path) -> None:
    core, private_id = worker()
    target = tmp_path / "pwned"
    reply = send(core, m.Call(op, [f"touch {target}", Ref(PUBLIC)], {}, 2, False))
    assert op not in ALLOWED and kind(reply) == "not_allowed"
    assert not target.exists() and 2 not in core.objects
    assert_healthy(core, private_id)


def test_out_keyword_is_refused() -> None:
    core, _ = worker()
    send(core, m.Put(2, torch.zeros(4), False, False, []))
    reply = send(core, m.Call("torch.add", [Ref(PUBLIC), Ref(PUBLIC)], {"out": Ref(2)}, 3, False))
    assert kind(reply) == "not_allowed" and torch.equal(core.objects[2].obj, torch.zeros(4))


def tensor_ext(header: Any, raw: bytes = b"", hlen: int | None = None) -> msgpack.ExtType:
    packed = msgpack.packb(header)
    return msgpack.ExtType(6, struct.pack(">Q", len(packed) if hlen is None else hlen) + packed + raw)


BAD_VALUES = {
    "too_few_bytes": tensor_ext(["float32", [4]], bytes(15)),
    "too_many_bytes": tensor_ext(["float32", [4]], bytes(17)),
    "negative_dim": tensor_ext(["float32", [-1]], bytes(4)),
    "enormous_dim": tensor_ext(["float32", [2**62]]),
    "oversized_shape": tensor_ext(["float64", [2**31, 2**31]], bytes(8)),
    "overflowing_empty_shape": tensor_ext(["float32", [2**61, 2**61, 0]]),
    "33_dims": tensor_ext(["float32", [1] * 33], bytes(4)),
    "float_dim": tensor_ext(["float32", [1.0]], bytes(4)),
    "bool_dim": tensor_ext(["float32", [True]], bytes(4)),
    "shape_not_a_list": tensor_ext(["float32", 1], bytes(4)),
    "unknown_dtype": tensor_ext(["float128", [1]], bytes(16)),
    "object_dtype": tensor_ext(["object", [1]], bytes(8)),
    "dtype_not_a_name": tensor_ext([7, [1]], bytes(4)),
    "header_one_field": tensor_ext(["float32"]),
    "header_a_map": tensor_ext({"dtype": "float32", "shape": [1]}, bytes(4)),
    "header_past_the_end": tensor_ext(["float32", [1]], bytes(4), hlen=1000),
    "header_length_huge": tensor_ext(["float32", [1]], bytes(4), hlen=2**64 - 1),
    "header_truncated": msgpack.ExtType(6, b"\0\0"),
    "header_garbage": msgpack.ExtType(6, struct.pack(">Q", 3) + b"\xc1\xc1\xc1"),
    "dtype_ext": msgpack.ExtType(5, b"\xff\xfe"),
    "memory_format_ext": msgpack.ExtType(7, b"torch.load"),
    "device_ext": msgpack.ExtType(8, b"file:///etc/passwd"),
    "device_ext_bad_cuda": msgpack.ExtType(8, b"cudaXYZ"),
    "short_ref": msgpack.ExtType(1, bytes(7)),
    "float_slice": msgpack.ExtType(3, msgpack.packb([1.5, None, None])),
    "unknown_ext": msgpack.ExtType(42, b""),
}


@pytest.mark.parametrize("value", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_malformed_values_are_protocol_errors(value: msgpack.ExtType) -> None:
    core, private_id = worker()
    reply = send(core, msgpack.packb([3, [], 2, value, False, False, []]))
    assert kind(reply) == "protocol" and 2 not in core.objects
    assert_healthy(core, private_id)


def test_timestamp_ext_is_harmless() -> None:
    """msgpack decodes ext type -1 as a Timestamp without asking the codec; it is only a value."""
    core, private_id = worker()
    # Call([], "torch.add", [<Timestamp(1)>], {}, 2, False), spelled out byte by byte
    data = b"\x97\x01\x90\xa9torch.add\x91" + b"\xd6\xff\x00\x00\x00\x01" + b"\x80\x02\xc2"
    assert kind(send(core, data)) == "remote" and 2 not in core.objects
    assert_healthy(core, private_id)


def test_impossible_allocations_are_refused() -> None:
    core, private_id = worker()
    huge = send(core, m.Call("Tensor.new_zeros", [Ref(PUBLIC), [2**40, 2**40]], {}, 2, False))
    assert kind(huge) == "remote"
    assert send(core, m.Call("Tensor.expand", [Ref(PUBLIC), [2**50, 4]], {}, 3, False)).error is None
    assert kind(send(core, m.Call("Tensor.contiguous", [Ref(3)], {}, 4, False))) == "remote"
    assert_healthy(core, private_id)


@pytest.mark.parametrize("depth", [10, 900, 2_000, 10_000])
def test_deeply_nested_lists_get_an_error_reply(depth: int) -> None:
    core, private_id = worker()  # msgpack refuses > 1024 levels; _resolve recurses below that
    data = b"\x97\x01\x90\xa9torch.add\x91" + b"\x91" * depth + b"\x00\x80\x02\xc2"
    assert send(core, data).error is not None
    assert_healthy(core, private_id)


_DEEP_TUPLES = textwrap.dedent(
    """
    import msgpack
    from fedsecure.wire.messages import decode_reply
    from fedsecure.worker.core import WorkerCore
    from fedsecure.worker.store import Sender
    value = msgpack.packb([])
    for _ in range(10_000):
        value = msgpack.packb(msgpack.ExtType(2, value))
    request = msgpack.packb([1, [], "torch.add", [msgpack.ExtType(2, value)], {}, 1, False])
    reply = decode_reply(WorkerCore("bob").handle(request, Sender("client", "x")))
    print("ok" if reply.error is None else reply.error[0])
    """
)


def test_deeply_nested_tuples_do_not_kill_the_process() -> None:
    src = Path(m.__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-c", _DEEP_TUPLES], capture_output=True, text=True, timeout=120,
        env={"PYTHONPATH": str(src), "PATH": ""},
    )
    assert proc.returncode == 0, f"the worker process died with status {proc.returncode}"
    assert proc.stdout.strip() in {"protocol", "internal"}


def test_senders_may_send_only_their_own_kinds_of_message() -> None:
    core, private_id = worker()
    forged = [["carol", None, 10**9, 2]]  # a label claiming another owner with lax rules
    for msg in (m.Deliver(5, torch.ones(3), forged, 100, False, ""), m.DeliverModule(5, {}, [], [], [], 0, ""),
                m.DeliverFold(5, True, {}, [], [], 0, "")):
        assert kind(send(core, msg)) == "protocol"  # peer-only, sent by a client
    for msg in (m.Call("Tensor.clone", [Ref(PUBLIC)], {}, 5, False), m.Get(PUBLIC), m.Count()):
        assert kind(send(core, msg, PEER)) == "protocol"  # client requests, sent by a peer
    assert 5 not in core.objects and PUBLIC in core.objects
    assert_healthy(core, private_id)


# -- reading objects -------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**64 - 1))
def test_guessed_ids_are_not_found(guess: int) -> None:
    core, private_id = worker()
    assume(guess not in core.objects)
    for msg in (
        m.Get(guess), m.GetModule(guess), m.Move(guess, "alice", 3),
        m.Call("Tensor.sum", [Ref(guess)], {}, 3, False), m.CallModule(guess, [], {}, 3, False, False),
        m.Aggregate([PUBLIC, guess], False, 3), m.CopyModule(guess, 3, []),
    ):
        assert kind(send(core, msg)) == "not_found"
    assert_healthy(core, private_id)


def test_get_of_private_data_is_refused_and_loses_nothing() -> None:
    core, private_id = worker()
    ref = found(core)
    before = len(core.objects)
    for obj_id in (ref, ref, private_id):  # also with the owner's own id, as if it had leaked
        reply = send(core, m.Get(obj_id))
        assert kind(reply) == "permission" and reply.error[2] == "private-data"
        assert "2.5" not in reply.error[1]
    assert len(core.objects) == before and ref in core.objects
    assert send(core, m.Call("Tensor.sum", [Ref(ref)], {}, 2, False)).error is None
    assert_healthy(core, private_id)


DERIVED = [  # op, args, kwargs; P is a private vector, M a private matrix, pub a public vector
    ("Tensor.__add__", ["P", 1.0], {}), ("Tensor.__mul__", ["P", "P"], {}), ("torch.add", ["pub", "P"], {}),
    ("Tensor.sum", ["M"], {"dim": 0}), ("torch.matmul", ["M", "P"], {}), ("F.relu", ["P"], {}),
    ("Tensor.detach", ["P"], {}), ("Tensor.view", ["M", -1], {}), ("Tensor.data.__get__", ["P"], {}),
    ("Tensor.T.__get__", ["M"], {}), ("Tensor.__getitem__", ["M", 0], {}), ("Tensor.double", ["P"], {}),
    ("torch.stack", [["P", "pub"]], {}),
]


@pytest.mark.parametrize(("op", "args", "kwargs"), DERIVED, ids=[d[0] for d in DERIVED])
def test_results_derived_from_private_data_are_refused(op: str, args: list[Any], kwargs: dict[str, Any]) -> None:
    core, private_id = worker()
    ids = {"P": found(core), "M": found(core, "matrix"), "pub": PUBLIC}
    meta = send(core, m.Call(op, refs(args, ids), kwargs, 2, False)).value
    assert meta["owners"] == ["bob"]
    assert kind(send(core, m.Get(2))) == "permission" and 2 in core.objects
    assert_healthy(core, private_id)


WRITES = [
    ("Tensor.copy_", ["pub", "P"]),
    ("Tensor.add_", ["pub", "P"]),
    ("Tensor.data.__set__", ["pub", "P"]),
    ("Tensor.__setitem__", ["pub", "mask", 2.5]),  # a public value, written where P > 2
]


@pytest.mark.parametrize(("op", "args"), WRITES, ids=[w[0] for w in WRITES])
def test_writing_private_data_into_a_public_tensor_taints_it_and_its_views(op: str, args: list[Any]) -> None:
    core, _ = worker()
    ids = {"P": found(core), "pub": PUBLIC, "mask": 9}
    send(core, m.Call("Tensor.__gt__", [Ref(ids["P"]), 2.0], {}, 9, False))
    send(core, m.Call("Tensor.view", [Ref(PUBLIC), 2, 2], {}, 3, False))  # an alias made beforehand
    assert send(core, m.Call(op, refs(args, ids), {}, 2, False)).error is None
    for obj_id in (PUBLIC, 3):
        assert kind(send(core, m.Get(obj_id))) == "permission"


def test_scalar_metrics_leave_but_vectors_do_not() -> None:
    core, private_id = worker()
    vector, loss = found(core), found(core, "loss")
    assert send(core, m.Call("Tensor.item", [Ref(loss)], {}, 2, False)).value == 0.25
    assert send(core, m.Call("Tensor.__float__", [Ref(loss)], {}, 2, False)).value == 0.25
    assert kind(send(core, m.Call("Tensor.tolist", [Ref(vector)], {}, 2, False))) == "permission"
    assert send(core, m.Call("Tensor.sum", [Ref(vector)], {}, 3, False)).error is None
    assert send(core, m.Get(3)).value["tensor"].item() == 8.0  # a scalar: a metric
    failed = send(core, m.Call("Tensor.item", [Ref(vector)], {}, 2, False))  # 4 elements
    assert kind(failed) == "remote" and "withheld" in failed.error[1] and "2.5" not in failed.error[1]
    assert_healthy(core, private_id)


@pytest.mark.parametrize("write", ["data_set", "copy_into_data_alias"])
def test_autograd_graph_cannot_launder_private_data(write: str) -> None:
    core, _ = worker()
    private = found(core)
    send(core, m.Put(2, torch.zeros(4), True, False, []))  # w, a weight
    send(core, m.Call("Tensor.__mul__", [Ref(2), Ref(PUBLIC)], {}, 3, True))  # saves PUBLIC
    send(core, m.Call("Tensor.sum", [Ref(3)], {}, 4, True))  # an unlabelled loss
    if write == "data_set":
        send(core, m.Call("Tensor.data.__set__", [Ref(PUBLIC), Ref(private)], {}, 5, False))
    else:
        send(core, m.Call("Tensor.data.__get__", [Ref(PUBLIC)], {}, 5, False))
        send(core, m.Call("Tensor.copy_", [Ref(5), Ref(private)], {}, 6, False))
    assert send(core, m.Call("Tensor.backward", [Ref(4)], {}, 7, False)).error is None
    send(core, m.Call("Tensor.grad.__get__", [Ref(2)], {}, 8, False))  # w.grad == private data
    reply = send(core, m.Get(8))
    assert kind(reply) == "permission", f"released {reply.value}"


@pytest.mark.parametrize(
    ("value", "op", "extra"),
    [(torch.tensor([1 + 2j, 3 - 1j]), "Tensor.conj", []), (torch.ones(3), "Tensor.to", ["meta"])],
    ids=["conj", "meta"],
)
def test_a_failed_get_loses_nothing(value: torch.Tensor, op: str, extra: list[Any]) -> None:
    core, _ = worker()
    send(core, m.Put(2, value, False, False, []))
    made = send(core, m.Call(op, [Ref(2), *extra], {}, 3, False))
    if made.error is not None:  # refused up front (a meta tensor is not data): also fine
        assert kind(made) == "not_allowed" and 3 not in core.objects
        return
    reply = send(core, m.Get(3))
    assert reply.error is None or 3 in core.objects, f"{reply.error} and object 3 is gone"


# -- odd names and replays -------------------------------------------------------------------

ODD_TAGS = ["../../etc/passwd", "/etc/shadow", "\x00", "a\x00b", "~root", "C:\\Windows\\win.ini", "💥", "a" * 256]


def test_odd_tags_are_only_names() -> None:
    core, private_id = worker()
    assert send(core, m.Put(2, torch.ones(2), False, False, ODD_TAGS)).error is None
    for tag in ODD_TAGS:
        (meta,) = send(core, m.Search(tag)).value
        assert meta["shape"] == [2] and meta["owners"] == []
    for tag in ("../../etc", "passwd", "/etc/passwd", "a" * 255, "b\x00"):
        assert send(core, m.Search(tag)).value == []
    assert_healthy(core, private_id)


@pytest.mark.parametrize("length", [257, 1_000_000])
def test_overlong_names_are_refused(length: int) -> None:
    core, private_id = worker()
    long = "a" * length
    for raw in ([9, [], long, []], [3, [], 2, torch.ones(1), False, False, [long], ""], [1, [], long, [], {}, 2, False]):
        assert kind(send(core, encode(raw))) == "protocol"
    assert 2 not in core.objects
    assert_healthy(core, private_id)


def test_replayed_requests() -> None:
    core, private_id = worker()
    put = m.encode_request(m.Put(2, torch.tensor([1.0, 2.0]), False, False, ["x"]))
    before = len(core.objects)
    assert send(core, put).error is None and send(core, put).error is None
    assert len(core.objects) == before + 1
    get = m.encode_request(m.Get(2))
    assert torch.equal(send(core, get).value["tensor"], torch.tensor([1.0, 2.0]))
    assert kind(send(core, get)) == "not_found"
    refused = m.encode_request(m.Get(found(core)))
    assert [kind(send(core, refused)) for _ in range(3)] == ["permission"] * 3
    assert_healthy(core, private_id)


# -- optimizers built on the worker -----------------------------------------------------------


@pytest.mark.parametrize(
    ("optimizer", "group", "expected"),
    [
        ("LBFGS", {"params": [2], "lr": 0.1}, "not_allowed"),
        ("SGD", {"params": [2], "lr": 0.1, "fused": True}, "not_allowed"),
        ("SGD", {"params": [2], "lr": 0.1, "differentiable": True}, "not_allowed"),
        ("SGD", {"params": [2], "lr": "0.1"}, "protocol"),
        ("SGD", {"params": [987654321], "lr": 0.1}, "not_found"),
    ],
)
def test_hostile_optimizers_are_refused(optimizer: str, group: dict[str, Any], expected: str) -> None:
    core, private_id = worker()
    send(core, m.Put(2, torch.ones(2, requires_grad=True), True, False, []))
    assert kind(send(core, m.MakeOptimizer(5, optimizer, [group]))) == expected
    assert 5 not in core.objects
    assert_healthy(core, private_id)


def test_optimizer_calls_only_step_and_zero_grad() -> None:
    core, private_id = worker()
    send(core, m.Put(2, torch.ones(2, requires_grad=True), True, False, []))
    assert send(core, m.MakeOptimizer(5, "SGD", [{"params": [2], "lr": 0.1}])).error is None
    for method in ("load_state_dict", "state_dict", "__init__", "add_param_group"):
        assert kind(send(core, m.OptimizerCall(5, method, [{}]))) == "not_allowed"
    assert kind(send(core, m.OptimizerCall(2, "step", [{}]))) == "not_allowed"
    assert kind(send(core, m.OptimizerCall(5, "step", [{}, {}]))) == "protocol"
    assert send(core, m.OptimizerCall(5, "step", [{"lr": 0.5}])).error is None
    assert_healthy(core, private_id)


def test_a_step_with_settings_the_optimizer_would_ignore_or_refuse_changes_nothing() -> None:
    core, private_id = worker()
    send(core, m.Put(2, torch.ones(2, requires_grad=True), True, False, []))
    send(core, m.Put(3, torch.ones(2, requires_grad=True), True, False, []))
    groups = [{"params": [2], "lr": 0.1}, {"params": [3], "lr": 0.1}]
    assert send(core, m.MakeOptimizer(5, "SGD", groups)).error is None
    for step_settings in ([{"lr": 0.5}, {"betas": [0.9, 0.99]}],  # SGD has no betas: it would be ignored
                          [{"lr": 0.5}, {"lr": -1.0}],
                          [{"lr": 0.5}, {"momentum": 0.0, "nesterov": True}]):
        reply = send(core, m.OptimizerCall(5, "step", step_settings))
        assert kind(reply) == "protocol", reply
        assert [g["lr"] for g in core.objects[5].obj.param_groups] == [0.1, 0.1]  # the first group too
    assert "has no setting(s) ['betas']" in send(core, m.OptimizerCall(5, "step", [{}, {"betas": [0.9, 0.9]}])).error[1]
    assert_healthy(core, private_id)


def test_model_owners_of_one_worker_cannot_see_each_others_objects() -> None:
    core, private_id = worker()
    alice_owner, mallory = Sender("client", "owner-a"), Sender("client", "eve")
    assert send(core, m.Put(77, torch.arange(3.0), False, False, []), alice_owner).error is None
    for request in (m.Get(77), m.Call("Tensor.clone", [Ref(77)], {}, 78, False)):
        assert kind(send(core, request, mallory)) == "not_found"
    assert kind(send(core, m.Put(77, torch.zeros(3), False, False, []), mallory)) == "protocol"
    send(core, m.Count(release=[77]), mallory)  # releasing someone else's id does nothing
    assert send(core, m.Count(), mallory).value == 0
    assert send(core, m.Count(), alice_owner).value == 1
    assert torch.equal(send(core, m.Get(77), alice_owner).value["tensor"], torch.arange(3.0))
    assert_healthy(core, private_id)
