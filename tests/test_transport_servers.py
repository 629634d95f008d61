"""Worker servers over real gRPC, in this process: simultaneous mutual moves, several
workers in one server, deadlines on open streams, shutdown, and the per-caller limit on
bytes in flight."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import grpc
import pytest
import torch

import fedsecure as sy
from fedsecure.transport import frames
from fedsecure.transport.grpc import STREAM, WorkerServer
from fedsecure.wire import messages as m
from fedsecure.worker.core import WorkerCore
from fedsecure.worker.labels import Policy
from fedsecure.worker.store import Sender

OWNER, OTHER = "owner-token-0123456789", "other-owner-token-9876543210"
PEER = {name: f"{name}-peer-token-abcdef" for name in ("ann", "ben", "cat", "dan")}


def callers(*peers: str, owner: str = OWNER) -> dict[str, tuple[str, str]]:
    """The model owner, and the named workers as peers (each by its own token)."""
    return {owner: ("client", "owner"), **{PEER[p]: ("peer", p) for p in peers}}


@contextmanager
def servers(*specs: dict[str, Any]) -> Iterator[list[WorkerServer]]:
    with ExitStack() as stack:
        started = []
        for spec in specs:
            server = WorkerServer(**spec)
            stack.callback(server.stop, 1.0)
            started.append(server.start())
        yield started


def hold_moves_until_both_started(*cores: WorkerCore) -> None:
    """Each core's Move waits, holding its worker, until every core is in its own Move:
    then each sends its value to the other while the other holds its worker."""
    barrier = threading.Barrier(len(cores), timeout=10)
    for core in cores:
        inner = core.handle

        def handle(data: bytes, sender: Sender, inner: Callable[..., bytes] = inner, **settings: Any) -> bytes:
            if sender.kind == "client" and isinstance(m.decode_request(data), m.Move):
                barrier.wait()
            return inner(data, sender, **settings)

        core.handle = handle  # type: ignore[method-assign]


def move_both_ways(a: Any, b: Any, a_worker: Any, b_worker: Any) -> list[BaseException]:
    failures: list[BaseException] = []

    def move(ptr: Any, worker: Any) -> None:
        try:
            ptr.move(worker)
        except BaseException as exc:  # collected: an exception in a thread would be lost
            failures.append(exc)

    threads = [threading.Thread(target=move, args=(a, b_worker)), threading.Thread(target=move, args=(b, a_worker))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    return failures


def test_two_workers_moving_values_to_each_other_at_once_do_not_wait_for_each_other() -> None:
    ann, ben = WorkerCore("ann"), WorkerCore("ben")
    with servers(
        dict(core=ann, callers=callers("ben"), token=PEER["ann"]),
        dict(core=ben, callers=callers("ann"), token=PEER["ben"]),
    ) as (ann_server, ben_server):
        ann_server._hosted["ann"].peers.update(_peer_links(ann, {"ben": ben_server.address}))
        ben_server._hosted["ben"].peers.update(_peer_links(ben, {"ann": ann_server.address}))
        deadline = 5.0
        to_ann = sy.connect("ann", ann_server.address, credentials=OWNER, deadline=deadline, pipelined=False)
        to_ben = sy.connect("ben", ben_server.address, credentials=OWNER, deadline=deadline, pipelined=False)
        x, y = torch.randn(300_000), torch.randn(300_000)  # framed: the large-tensor path
        px, py = x.send(to_ann), y.send(to_ben)
        hold_moves_until_both_started(ann, ben)
        start = time.monotonic()
        assert move_both_ways(px, py, to_ann, to_ben) == []
        assert time.monotonic() - start < deadline / 2  # no waiting out the deadline
        assert torch.equal(px.get(), x) and torch.equal(py.get(), y)
        assert px.location is to_ben and py.location is to_ann


def _peer_links(core: WorkerCore, addresses: dict[str, str]) -> dict[str, Any]:
    """Peers learnt after both servers listen (each needs the other's port)."""
    from fedsecure.transport.grpc import GrpcTransport

    return {pid: GrpcTransport(pid, address, token=PEER[core.id], persistent=False) for pid, address in addresses.items()}


def test_several_workers_in_one_server() -> None:
    ann, ben, cat = WorkerCore("ann"), WorkerCore("ben"), WorkerCore("cat")
    with servers(dict(core=cat, callers=callers("ben"), token=PEER["cat"])) as (other,):
        server = WorkerServer(ann, callers=callers(), token=PEER["ann"])  # ann accepts no peer
        server.add(
            ben, callers={**callers("ann"), OTHER: ("client", "other")}, peers={"cat": other.address}, token=PEER["ben"]
        )
        with server:
            to = {name: sy.connect(name, server.address, credentials=OWNER) for name in ("ann", "ben")}
            x = torch.randn(100_000)
            ptr = x.send(to["ann"])
            ptr.move(to["ben"])  # between two workers of one server
            assert torch.equal(ptr.copy().get(), x) and ptr.location is to["ben"]
            ptr.move(sy.connect("cat", other.address, credentials=OWNER))  # to another server
            assert torch.equal(ptr.get(), x)
            # each worker has its own objects and callers
            assert to["ann"].object_count() == 0 and to["ben"].object_count() == 0
            assert sy.connect("ben", server.address, credentials=OTHER).object_count() == 0
            with pytest.raises(sy.AuthenticationFailed, match="not accepted by 'ann'"):
                sy.connect("ann", server.address, credentials=OTHER).object_count()
            with pytest.raises(sy.AuthenticationFailed):
                sy.connect("ann", server.address, credentials="no-such-token").object_count()
            with pytest.raises(sy.WorkerUnavailable, match="no worker 'dan' at this address"):
                sy.connect("dan", server.address, credentials=OWNER).object_count()
            # ben accepts values from ann, not the other way round
            back = torch.ones(3).send(to["ben"])
            with pytest.raises(sy.WorkerUnavailable, match="'ann' accepts no values from 'ben'"):
                back.move(to["ann"])
            assert torch.equal(back.get(), torch.ones(3))  # the refused value stayed


def test_moves_between_hosted_workers_at_once_do_not_wait_for_each_other() -> None:
    ann, ben = WorkerCore("ann"), WorkerCore("ben")
    server = WorkerServer(ann, callers=callers("ben"))
    server.add(ben, callers=callers("ann"))
    with server:
        to_ann, to_ben = (sy.connect(n, server.address, credentials=OWNER, deadline=5.0) for n in ("ann", "ben"))
        x, y = torch.randn(200_000), torch.randn(200_000)
        px, py = x.send(to_ann), y.send(to_ben)
        hold_moves_until_both_started(ann, ben)
        assert move_both_ways(px, py, to_ann, to_ben) == []
        assert torch.equal(px.get(), x) and torch.equal(py.get(), y)


def test_a_request_for_an_unknown_worker_is_refused_before_its_message_is_read() -> None:
    ann, ben = WorkerCore("ann"), WorkerCore("ben")
    handled: list[bytes] = []
    for core in (ann, ben):
        inner = core.handle
        core.handle = lambda data, sender, inner=inner, **kw: (handled.append(data), inner(data, sender, **kw))[1]  # type: ignore[method-assign]
    server = WorkerServer(ann, callers=callers())
    server.add(ben, callers=callers())
    with server, grpc.insecure_channel(server.address) as channel:
        bearer = (("authorization", f"Bearer {OWNER}"),)
        head, _ = frames.outgoing("dan", b"\xc1 not msgpack")
        with pytest.raises(grpc.RpcError) as info:
            list(channel.stream_stream(STREAM)(iter([head]), metadata=bearer, timeout=10))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND and "'dan'" in info.value.details()
        handle = channel.unary_unary("/fedsecure.Worker/Handle")
        with pytest.raises(grpc.RpcError) as info:  # a server of several workers needs a name
            handle(m.encode_request(m.Count()), metadata=bearer, timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND and "name one" in info.value.details()
        reply = handle(m.encode_request(m.Count()), metadata=(*bearer, ("fedsecure-worker", "ben")), timeout=10)
        assert m.reply_value(reply, worker="ben") == 0
        assert len(handled) == 1


def test_a_stream_with_bad_credentials_is_refused_before_anything_is_read() -> None:
    core = WorkerCore("ann")
    with servers(dict(core=core, callers=callers())) as (server,), grpc.insecure_channel(server.address) as channel:
        head, _ = frames.outgoing("ann", m.encode_request(m.Count()))
        for metadata in ((), (("authorization", "Bearer wrong"),)):
            with pytest.raises(grpc.RpcError) as info:
                list(channel.stream_stream(STREAM)(iter([head]), metadata=metadata, timeout=10))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_caller_has_at_most_max_message_bytes_in_flight() -> None:
    limit = 4 << 20
    core = WorkerCore("ann")
    with servers(dict(core=core, callers=callers(), max_message=limit)) as (server,), grpc.insecure_channel(
        server.address
    ) as channel:
        bearer = (("authorization", f"Bearer {OWNER}"),)
        # a request that announces 3.5 MiB of frames, sends one chunk and stalls
        stalled: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        head, _ = frames.outgoing("ann", m.encode_request(m.Put(1, torch.zeros(7 << 17), False, False, []), framed=True))
        stalled.put(head)
        stalled.put(b"\0" * 1024)
        first = channel.stream_stream(STREAM)(iter(stalled.get, None), metadata=bearer, timeout=20)
        time.sleep(0.5)  # the server is reading the first request
        second, _ = frames.outgoing("ann", m.encode_request(m.Put(2, torch.zeros(1 << 18), False, False, []), framed=True))
        with pytest.raises(grpc.RpcError) as info:  # 3.5 + 1 MiB: over the limit together
            list(channel.stream_stream(STREAM)(iter([second]), metadata=bearer, timeout=10))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "already sending" in info.value.details()
        first.cancel()
        # once the stalled request is gone, the caller may send again
        ok = sy.connect("ann", server.address, credentials=OWNER)
        deadline = time.monotonic() + 10
        while True:
            try:
                assert torch.equal(torch.ones(1 << 18).send(ok).get(), torch.ones(1 << 18))
                break
            except sy.WorkerUnavailable:
                assert time.monotonic() < deadline
                time.sleep(0.1)


def test_a_hung_worker_is_unavailable_within_the_deadline_and_the_next_request_works() -> None:
    core = WorkerCore("ann")
    inner = core.handle
    hang = threading.Event()

    def handle(data: bytes, sender: Sender, **settings: Any) -> bytes:
        if hang.is_set():
            hang.clear()
            time.sleep(3.0)  # longer than the deadline
        return inner(data, sender, **settings)

    core.handle = handle  # type: ignore[method-assign]
    with servers(dict(core=core, callers=callers())) as (server,):
        ann = sy.connect("ann", server.address, credentials=OWNER, deadline=1.0)
        ptr = torch.ones(2).send(ann)
        hang.set()
        start = time.monotonic()
        with pytest.raises(sy.WorkerUnavailable, match="'ann' .* did not answer within 1 s"):
            ann.object_count()
        assert time.monotonic() - start < 2.0
        time.sleep(2.5)  # the hung request finishes on the worker
        assert torch.equal(ptr.get(), torch.ones(2))


def test_stop_ends_idle_streams_at_once() -> None:
    core = WorkerCore("ann")
    server = WorkerServer(core, callers=callers()).start()
    ann = sy.connect("ann", server.address, credentials=OWNER)
    assert ann.object_count() == 0  # the stream stays open, idle
    start = time.monotonic()
    server.stop(grace=5.0)
    assert time.monotonic() - start < 2.0
    with pytest.raises(sy.WorkerUnavailable, match="'ann'"):
        ann.object_count()


def test_several_threads_share_a_worker_without_queueing_on_one_stream() -> None:
    core = WorkerCore("ann", policy=Policy())
    with servers(dict(core=core, callers=callers())) as (server,):
        ann = sy.connect("ann", server.address, credentials=OWNER, pipelined=False)
        results: list[bool] = []

        def work(n: int) -> None:
            x = torch.full((50_000,), float(n))
            results.append(all(torch.equal((x.send(ann) * 2).get(), x * 2) for _ in range(5)))

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == [True] * 4


def test_a_caller_that_does_not_read_a_large_reply_holds_the_worker_only_until_the_deadline() -> None:
    core = WorkerCore("ann")
    with servers(dict(core=core, callers=callers(), deadline=1.0)) as (server,), grpc.insecure_channel(
        server.address
    ) as channel:
        ann = sy.connect("ann", server.address, credentials=OWNER, deadline=10.0)
        ptr = torch.zeros(8 << 20).send(ann)  # 32 MiB: more than gRPC buffers for a reader
        head, _ = frames.outgoing("ann", m.encode_request(m.Get(ptr.id_at_location)))
        outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        outbox.put(head)
        unread = channel.stream_stream(STREAM)(iter(outbox.get, None), metadata=((
            "authorization", f"Bearer {OWNER}"),), timeout=30)
        time.sleep(0.5)  # the worker is sending the reply, holding the worker
        start = time.monotonic()
        assert ann.object_count() == 0  # served once the unread reply's deadline passes
        assert time.monotonic() - start < 5.0
        unread.cancel()


def test_a_request_may_carry_its_own_deadline() -> None:
    core = WorkerCore("ann")
    with WorkerServer(core, callers=callers()) as server:
        ann = sy.connect("ann", server.address, credentials=OWNER)
        with pytest.raises(sy.WorkerUnavailable, match="within 1e-06 s"):
            ann.request(m.Count(), deadline=1e-6)  # no reply crosses gRPC in a microsecond
        assert ann.request(m.Count(), deadline=30.0) == 0  # the connection is still good
