"""Attacks on a worker's port: what someone who can reach a real `WorkerServer` can achieve.

Every test starts a gRPC server in this process around a `WorkerCore` holding private data
(tag "x") and talks to it the way an attacker would: raw unary calls to
``/fedsecure.Worker/Handle`` with chosen metadata and bytes, next to the honest model owner's
`fedsecure.connect`. The contract: no credentials, no core; every authenticated call gets a
well-formed reply; a caller reaches only what its role and its objects allow; the worker keeps
serving and its private data stays put. Each bug found here keeps its test as a regression test.
"""

from __future__ import annotations

import os
import random
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fedsecure as sy
from fedsecure.errors import ProtocolError
from fedsecure.transport.grpc import WorkerServer
from fedsecure.wire import messages as m
from fedsecure.wire.codec import Ref
from fedsecure.worker.core import WorkerCore
from fedsecure.worker.labels import Policy

METHOD = "/fedsecure.Worker/Handle"
TOKEN = "owner-token-0123456789abcdef"
MALLORY = "mallory-token-fedcba9876543210"
PEER_TOKEN = "bob-peer-token-55aa55aa55aa"
CALLERS = {TOKEN: ("client", "owner"), MALLORY: ("client", "mallory"), PEER_TOKEN: ("peer", "bob")}
MAX_MESSAGE = 1 << 20  # the server's limit; the raw channel itself allows more
PRIVATE = torch.arange(4.0) + 0.5  # the worker's own data: 0.5, 1.5, 2.5, 3.5
WEIGHTS = torch.tensor([1.0, 10.0, 100.0, 1000.0])  # PRIVATE @ WEIGHTS == 3765.5, exactly
SECRET = torch.tensor([3.0, 1.0, 4.0])  # the model owner's own (unlabelled) data


def new_id() -> int:
    return secrets.randbits(64)


Metadata = tuple[tuple[str, str | bytes], ...]


def bearer(token: str) -> Metadata:
    return (("authorization", f"Bearer {token}"),)


def deliver(obj_id: int, labels: list[Any], owner: str = "owner") -> m.Request:
    """A peer-only `Deliver`, whichever fields this version of it has."""
    values = {"release": [], "object_id": obj_id, "value": torch.ones(3), "labels": labels,
              "samples": 100, "requires_grad": False, "owner": owner, "attestation": []}
    return m.Deliver(**{name: values[name] for name in m.Deliver.FIELDS})


def kind(reply: m.Reply) -> str | None:
    return None if reply.error is None else reply.error[0]


@dataclass
class Served:
    """A running worker server, a raw channel to it, and every call that reached the core."""

    core: WorkerCore
    server: WorkerServer
    channel: grpc.Channel
    handled: list[Any] = field(default_factory=list)

    def raw(self, data: bytes, metadata: Metadata | None = None) -> bytes:
        call = self.channel.unary_unary(METHOD)
        reply: bytes = call(data, metadata=bearer(TOKEN) if metadata is None else metadata, timeout=10)
        return reply

    def send(self, msg: m.Request | bytes, token: str = TOKEN) -> m.Reply:
        data = msg if isinstance(msg, bytes) else m.encode_request(msg)
        return m.decode_reply(self.raw(data, bearer(token)))  # raises if the reply is malformed

    def count(self, token: str = TOKEN) -> int:
        reply = self.send(m.Count(), token)
        assert reply.error is None and type(reply.value) is int, reply
        return int(reply.value)

    def owner(self) -> sy.WorkerClient:
        return sy.connect(self.core.id, self.server.address, credentials=TOKEN)

    def assert_intact(self) -> None:
        """The worker serves; its private data is still there, unchanged, and still refused."""
        found = [x for x in self.send(m.Search("#x")).value if x["owners"] == [self.core.id]]
        assert len(found) == 1 and found[0]["shape"] == [4]
        alias, weights, dot = found[0]["id"], new_id(), new_id()
        assert kind(self.send(m.Get(alias))) == "permission"
        assert self.send(m.Put(weights, WEIGHTS, False, False, [])).error is None
        assert self.send(m.Call("torch.dot", [Ref(alias), Ref(weights)], {}, dot, False)).error is None
        assert self.send(m.Call("Tensor.item", [Ref(dot)], {}, new_id(), False, release=[alias, weights])).value == 3765.5
        self.send(m.Count(release=[dot]))


@contextmanager
def serving(callers: dict[str, tuple[str, str]] = CALLERS) -> Iterator[Served]:
    core = WorkerCore("alice", policy=Policy(trusted_aggregators=frozenset(), private_sends=False))
    core.load(PRIVATE, ("x",))
    server = WorkerServer(core, host="127.0.0.1", port=0, callers=callers, max_message=MAX_MESSAGE)
    limits = [("grpc.max_send_message_length", 8 * MAX_MESSAGE), ("grpc.max_receive_message_length", 8 * MAX_MESSAGE)]
    channel = grpc.insecure_channel(server.address, options=limits)
    served = Served(core, server, channel)
    inner = core.handle

    def counting(data: bytes, *args: Any, **kwargs: Any) -> bytes:
        served.handled.append(args)
        reply: bytes = inner(data, *args, **kwargs)
        return reply

    core.handle = counting  # this instance only
    server.start()
    try:
        yield served
    finally:
        channel.close()
        server.stop(grace=1.0)


@pytest.fixture
def served() -> Iterator[Served]:
    with serving() as s:
        yield s


@pytest.fixture(scope="module")
def shared() -> Iterator[Served]:
    with serving() as s:
        yield s


# -- authentication comes before a byte is decoded ----------------------------------------------

BAD_CREDENTIALS: dict[str, Metadata] = {
    "none": (),
    "wrong": bearer("not-the-token"),
    "empty": bearer(""),
    "other_case": bearer(TOKEN.upper()),
    "trailing_space": bearer(TOKEN + " "),
    "leading_space": bearer(" " + TOKEN),
    "prefix": bearer(TOKEN[:-1]),
    "extended": bearer(TOKEN + "0"),
    "no_scheme": (("authorization", TOKEN),),
    "lower_scheme": (("authorization", f"bearer {TOKEN}"),),
    "basic_scheme": (("authorization", f"Basic {TOKEN}"),),
    "wrong_key": (("x-api-key", f"Bearer {TOKEN}"),),
    "token_key": (("token", TOKEN),),
    "binary_key": (("authorization-bin", f"Bearer {TOKEN}".encode()),),
    "huge": bearer("A" * 4_000),  # under gRPC's 8 KiB soft limit on metadata, so it reaches us
    "enormous": bearer("A" * 100_000),  # over its 16 KiB hard limit: gRPC itself refuses it
}


@pytest.mark.parametrize("metadata", BAD_CREDENTIALS.values(), ids=BAD_CREDENTIALS.keys())
def test_bad_credentials_never_reach_the_core(served: Served, metadata: Metadata) -> None:
    for data in (m.encode_request(m.Count()), b"\xc1 garbage"):
        with pytest.raises(grpc.RpcError) as info:
            served.raw(data, metadata)
        expected = {grpc.StatusCode.UNAUTHENTICATED}
        if len(repr(metadata)) > 16_384:
            expected.add(grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert info.value.code() in expected
    assert served.handled == []
    served.count()  # the real token still works
    assert len(served.handled) == 1


def test_an_empty_token_does_not_switch_authentication_off() -> None:
    with ExitStack() as stack:
        try:
            s = stack.enter_context(serving({"": ("client", "anyone")}))
        except ValueError:
            return  # refused up front: one fix
        with pytest.raises(grpc.RpcError) as info:
            s.raw(m.encode_request(m.Count()), ())
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


# -- fuzzing with a valid token -----------------------------------------------------------------

VALID = [
    m.encode_request(msg)
    for msg in (
        m.Put(7, torch.randn(2, 3), True, False, ["train"]),
        m.Call("Tensor.__getitem__", [Ref(7), (slice(0, 2, None), ...)], {}, 8, True, release=[9]),
        m.Get(7),
        m.Search("x"),
        m.Count(release=[3, 4]),
        m.Batch([m.encode_request(m.Count()), m.encode_request(m.Get(8))]),
        deliver(5, []),
    )
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        how = draw(st.sampled_from(["truncate", "flip", "insert"]))
        if how == "truncate":
            del data[at:]
        elif how == "flip" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=6))
    return bytes(data)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=512) | mutated())
def test_fuzzed_requests_get_well_formed_replies(shared: Served, data: bytes) -> None:
    reply = shared.send(data)
    try:
        m.decode_request(data)
    except ProtocolError:
        assert kind(reply) == "protocol"
    shared.assert_intact()


# -- replays ------------------------------------------------------------------------------------


def test_replayed_requests_do_no_harm(served: Served) -> None:
    before, obj_id = served.count(), new_id()
    put = m.encode_request(m.Put(obj_id, SECRET, False, False, []))
    assert served.send(put).error is None and served.send(put).error is None
    assert served.count() == before + 1
    get = m.encode_request(m.Get(obj_id))
    assert torch.equal(served.send(get).value["tensor"], SECRET)
    assert kind(served.send(get)) == "not_found"
    (meta,) = served.send(m.Search("x")).value
    refused = m.encode_request(m.Get(meta["id"]))
    assert [kind(served.send(refused)) for _ in range(2)] == ["permission", "permission"]
    served.assert_intact()


# -- one client and another's objects -----------------------------------------------------------


def test_guessed_ids_find_nothing(served: Served) -> None:
    ptr = sy.send(SECRET, served.owner())
    for guess in [*range(32), *(random.Random(0).getrandbits(64) for _ in range(32))]:
        assert kind(served.send(m.Get(guess), MALLORY)) == "not_found"
    assert torch.equal(sy.get(ptr), SECRET)


def mallory_tries(served: Served, attack: str, ptr: Any) -> m.Reply | None:
    """Mallory, a model owner too, knows the id (or tag) of the owner's object; what she read."""
    known, copy = ptr.id_at_location, new_id()
    if attack == "get":
        return served.send(m.Get(known), MALLORY)
    if attack == "compute_then_get":
        served.send(m.Call("Tensor.clone", [Ref(known)], {}, copy, False), MALLORY)
        return served.send(m.Get(copy), MALLORY)
    if attack == "search_tag_then_get":
        found = served.send(m.Search("owner-only"), MALLORY).value
        return served.send(m.Get(found[0]["id"] if found else copy), MALLORY)
    if attack == "overwrite":
        served.send(m.Put(known, torch.zeros(3), False, False, []), MALLORY)
    else:
        served.send(m.Count(release=[known]), MALLORY)  # release=[known]: frees it, if she may
    return None




@pytest.mark.parametrize(
    "attack",
    ["get", "compute_then_get", "overwrite", "release",
     "search_tag_then_get"],
)
def test_another_client_cannot_touch_known_objects(served: Served, attack: str) -> None:
    ptr = sy.send(SECRET, served.owner(), tags=["owner-only"])
    read = mallory_tries(served, attack, ptr)
    assert read is None or read.error is not None, f"mallory read {read.value}"
    assert torch.equal(sy.get(ptr), SECRET)


def test_count_does_not_reveal_another_clients_objects(served: Served) -> None:
    before = served.count(MALLORY)
    pointers = [sy.send(SECRET, served.owner()) for _ in range(3)]
    assert served.count(MALLORY) == before, f"mallory sees the owner's {len(pointers)} new objects"


# -- roles: clients and peers -------------------------------------------------------------------


@pytest.mark.parametrize(
    "msg",
    [m.Call("Tensor.clone", [Ref(1)], {}, 2, False), m.Get(1), m.Count(), m.Search("x")],
    ids=["Call", "Get", "Count", "Search"],
)
def test_a_peer_token_makes_no_client_requests(served: Served, msg: m.Request) -> None:
    reply = served.send(msg, PEER_TOKEN)
    assert reply.error is not None and reply.error[0] == "protocol" and "peer" in reply.error[1]
    served.assert_intact()


def test_a_client_token_delivers_nothing(served: Served) -> None:
    before, obj_id = served.count(), new_id()
    forged = [["bob", None, 10**9, 2]]  # a label claiming another owner with lax rules
    for token in (TOKEN, MALLORY):
        reply = served.send(deliver(obj_id, forged), token)
        assert kind(reply) == "protocol"
    assert kind(served.send(m.Get(obj_id))) == "not_found" and served.count() == before


def test_a_peer_token_sends_no_batch() -> None:
    with serving({**CALLERS, "peer-named-owner": ("peer", "owner")}) as served:
        ptr = sy.send(SECRET, served.owner())
        reply = served.send(m.Batch([], release=[ptr.id_at_location]), "peer-named-owner")
        assert kind(reply) == "protocol", f"a peer's Batch was answered {reply}"
        assert torch.equal(sy.get(ptr), SECRET)


def test_a_peer_cannot_replace_a_clients_object(served: Served) -> None:
    ptr = sy.send(SECRET, served.owner())
    served.send(deliver(ptr.id_at_location, [], owner="owner"), PEER_TOKEN)
    assert torch.equal(sy.get(ptr), SECRET)


# -- names that look like paths -----------------------------------------------------------------

PATHS = ["../../etc/passwd", "/etc/passwd", "file:///etc/passwd", "~root/.ssh/id_rsa", "..\\..\\passwd"]
_opened: list[str] = []
_watching: list[bool] = []


def _watch_opens(event: str, args: tuple[Any, ...]) -> None:
    if event == "open" and args and isinstance(args[0], str | bytes) and b"passwd" in os.fsencode(args[0]):
        _opened.append(os.fsdecode(args[0]))


def test_path_like_names_are_only_names(served: Served) -> None:
    if not _watching:  # audit hooks stay for the process's life; this one only records
        sys.addaudithook(_watch_opens)
        _watching.append(True)
    _opened.clear()
    obj_id = new_id()
    assert served.send(m.Put(obj_id, SECRET, False, False, PATHS)).error is None
    for tag in PATHS:
        (meta,) = served.send(m.Search(tag)).value
        assert meta["shape"] == [3] and meta["owners"] == []
    assert served.send(m.Search("passwd")).value == []
    for op in ["../torch.load", "torch.load", "torch/../os.system", *PATHS]:
        reply = served.send(m.Call(op, ["/etc/passwd", Ref(obj_id)], {}, new_id(), False))
        assert kind(reply) == "not_allowed", (op, reply)
    assert kind(served.send(m.MakeOptimizer(new_id(), PATHS[0], [{"params": [obj_id]}]))) == "not_allowed"
    spec = {"type": PATHS[0], "args": {}, "children": [], "training": False, "frozen": []}
    assert kind(served.send(m.PutModule(new_id(), spec, [], [], False))) == "not_allowed"
    assert kind(served.send(m.Move(obj_id, PATHS[0], new_id()))) == "unavailable"  # no such peer
    assert _opened == []
    assert torch.equal(served.send(m.Get(obj_id)).value["tensor"], SECRET)
    served.assert_intact()


# -- sizes --------------------------------------------------------------------------------------




@pytest.mark.parametrize("factor", [
    1.5,
    3.0,
])
def test_an_oversized_request_is_refused_and_the_worker_serves_on(served: Served, factor: float) -> None:
    big = torch.zeros(int(factor * MAX_MESSAGE) // 4)
    try:
        reply = served.send(m.Put(new_id(), big, False, False, []))
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and served.handled == []
    else:  # or an error reply that says so
        assert reply.error is not None and "max" in reply.error[1], reply
    with pytest.raises(sy.WorkerUnavailable, match="maximum"):
        sy.send(big, served.owner())
    served.assert_intact()


def test_the_other_methods_authenticate_first_too(served: Served) -> None:
    data, service = m.encode_request(m.Count()), "/fedsecure.Worker"
    calls: dict[str, Callable[[Metadata], Any]] = {  # the chunked transport's methods; one that does not exist
        "Upload": lambda md: served.channel.stream_unary(f"{service}/Upload")(iter([data]), metadata=md, timeout=10),
        "Fetch": lambda md: list(served.channel.unary_stream(f"{service}/Fetch")(b"0" * 32, metadata=md, timeout=10)),
        "Shell": lambda md: served.channel.unary_unary(f"{service}/Shell")(data, metadata=md, timeout=10),
    }
    for name, call in calls.items():
        for metadata in ((), bearer("not-the-token")):
            with pytest.raises(grpc.RpcError) as info:
                call(metadata)
            assert info.value.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNIMPLEMENTED), name
    with pytest.raises(grpc.RpcError) as info:  # a guessed reply ticket, with a valid token
        calls["Fetch"](bearer(TOKEN))
    assert info.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED)
    assert served.handled == []


def test_an_oversized_reply_loses_nothing(served: Served) -> None:
    part, whole = new_id(), new_id()
    assert served.send(m.Put(part, torch.ones(MAX_MESSAGE // 8), False, False, [])).error is None
    assert served.send(m.Call("torch.cat", [[Ref(part)] * 4], {}, whole, False)).error is None
    reply = served.send(m.Get(whole))  # 2 MiB of float32: over the server's limit
    assert reply.error is not None and "maximum message" in reply.error[1]
    assert served.send(m.Call("Tensor.sum", [Ref(whole)], {}, new_id(), False)).error is None


# -- many callers at once -----------------------------------------------------------------------


def test_concurrent_callers_valid_and_hostile(served: Served) -> None:
    stop_at = time.monotonic() + 2.0
    problems: list[str] = []
    done: list[int] = []

    def hammer(n: int) -> None:
        rng, mine, value = random.Random(n), new_id(), torch.full((3,), float(n))
        for i in range(400):
            if time.monotonic() > stop_at:
                break
            try:
                step = i % 5
                if step == 0:
                    assert served.send(m.Put(mine, value, False, False, [])).error is None
                elif step == 1:
                    assert torch.equal(served.send(m.Get(mine)).value["tensor"], value)
                elif step == 2:
                    served.send(rng.randbytes(rng.randint(0, 64)), rng.choice([TOKEN, MALLORY, PEER_TOKEN]))
                elif step == 3:
                    with pytest.raises(grpc.RpcError) as info:
                        served.raw(m.encode_request(m.Count()), bearer(f"guess-{n}-{i}"))
                    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                else:
                    (meta,) = served.send(m.Search("x")).value
                    assert kind(served.send(m.Get(meta["id"]))) == "permission"
                    served.send(m.Count(release=[meta["id"]]))
                done.append(1)
            except BaseException as exc:  # collected: an assertion in a thread would be lost
                problems.append(f"thread {n}, step {i}: {exc!r}")

    threads = [threading.Thread(target=hammer, args=(n,), daemon=True) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert problems == [] and len(done) >= 40, problems[:5]
    served.assert_intact()
