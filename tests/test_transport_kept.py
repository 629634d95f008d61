"""Kept frames over real gRPC: the round's model sent to several workers of one server crosses
the connection twice, then is named; a server that lost it is sent it again; callers are kept
apart; kept frames expire; malformed names are refused."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import pytest
import torch

import fedsecure as sy
from fedsecure.transport import frames, kept
from fedsecure.transport.grpc import STREAM, WorkerServer
from fedsecure.wire import messages as m
from fedsecure.worker.core import WorkerCore

OWNER, OTHER = "owner-token-0123456789", "other-owner-token-9876543210"
NAMES = ("ann", "ben", "cat", "dan")


@contextmanager
def hosting(*names: str, tokens: tuple[str, ...] = (OWNER,)) -> Iterator[WorkerServer]:
    server = WorkerServer()
    for name in names:
        server.add(WorkerCore(name), callers={t: ("client", f"owner{i}") for i, t in enumerate(tokens)})
    server.start()
    try:
        yield server
    finally:
        server.stop(1.0)


def big(seed: int = 0) -> torch.Tensor:
    return torch.randn(1 << 19, generator=torch.Generator().manual_seed(seed))  # 2 MiB


def test_the_same_tensor_to_every_worker_of_a_server_is_sent_twice_then_named() -> None:
    x, small = big(), torch.arange(10.0)
    with hosting(*NAMES) as server:
        workers = [sy.connect(n, server.address, credentials=OWNER) for n in NAMES]
        pointers = [(x.send(w), small.send(w)) for w in workers]
        assert server.kept.named == 2  # ann and ben were sent the bytes, ben's kept; cat and dan named them
        assert server.kept.held(OWNER.encode()) == x.nbytes  # one copy, whatever the number of workers
        for big_ptr, small_ptr in pointers:
            got = big_ptr.get()
            assert torch.equal(got, x) and got.data_ptr() != x.data_ptr()
            assert torch.equal(small_ptr.get(), small)
        # each worker's copy is its own: changing one leaves the kept bytes and the others alone
        y = x.send(workers[0])
        y.add_(1.0)
        assert torch.equal(x.send(workers[1]).get(), x) and torch.equal(y.get(), x + 1)


def test_a_frame_the_server_no_longer_holds_is_sent_again_in_full() -> None:
    x = big(1)
    with hosting(*NAMES) as server:
        workers = [sy.connect(n, server.address, credentials=OWNER) for n in NAMES]
        x.send(workers[0]), x.send(workers[1])  # kept now
        server.kept.clear()  # as after a restart, or once it expired
        assert torch.equal(x.send(workers[2]).get(), x)  # named, refused, sent again: no error
        assert server.kept.named == 0 and server.kept.held(OWNER.encode()) == x.nbytes
        assert torch.equal(x.send(workers[3]).get(), x)
        assert server.kept.named == 1


def test_kept_frames_expire_and_their_memory_goes(monkeypatch) -> None:
    monkeypatch.setattr(kept, "IDLE_S", 0.3)
    monkeypatch.setattr(kept, "MARGIN_S", 0.1)
    x = big(2)
    with hosting(*NAMES) as server:
        workers = [sy.connect(n, server.address, credentials=OWNER) for n in NAMES]
        x.send(workers[0]), x.send(workers[1])
        assert server.kept.held(OWNER.encode()) == x.nbytes
        deadline = time.monotonic() + 5
        while server.kept.held(OWNER.encode()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.kept.held(OWNER.encode()) == 0
        assert torch.equal(x.send(workers[2]).get(), x)  # the caller knew it was gone: sent, kept again
        assert server.kept.named == 0 and server.kept.held(OWNER.encode()) == x.nbytes


def _raw(server: WorkerServer, token: str, worker: str, tensor: torch.Tensor,
         plan: list[tuple[str, bytes | None]]) -> list[bytes]:
    """One stream request, sent by hand with the given frame plan."""
    head, views = frames.outgoing(worker, m.encode_request(m.Put(7, tensor, False, False, []), framed=True), plan)
    with grpc.insecure_channel(server.address) as channel:
        call = channel.stream_stream(STREAM)
        return list(call(frames.chunks(head, views), metadata=(("authorization", f"Bearer {token}"),), timeout=10))


def test_a_caller_cannot_name_another_callers_frame() -> None:
    x = big(3)
    with hosting("ann", "ben", tokens=(OWNER, OTHER)) as server:
        d = kept.digest(x)
        _raw(server, OWNER, "ann", x, [(kept.KEEP, d)])
        assert server.kept.held(OWNER.encode()) == x.nbytes
        with pytest.raises(grpc.RpcError) as info:  # the other caller names the owner's frame
            _raw(server, OTHER, "ben", x, [(kept.NAME, d)])
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "holds no frame" in info.value.details()
        assert server.kept.named == 0
        _raw(server, OWNER, "ben", x, [(kept.NAME, d)])  # its own caller may
        assert server.kept.named == 1


def test_the_server_names_what_it_received_not_what_the_caller_claims() -> None:
    x = big(4)
    with hosting("ann", "ben") as server:
        _raw(server, OWNER, "ann", x, [(kept.KEEP, b"\x01" * 32)])  # the claimed digest is not sent at all
        with pytest.raises(grpc.RpcError) as info:
            _raw(server, OWNER, "ben", x, [(kept.NAME, b"\x01" * 32)])
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        _raw(server, OWNER, "ben", x, [(kept.NAME, kept.digest(x))])


@pytest.mark.parametrize(("third", "code", "says"), [
    ("yes", grpc.StatusCode.INVALID_ARGUMENT, "third field"),
    (b"short", grpc.StatusCode.INVALID_ARGUMENT, "third field"),
])
def test_malformed_frame_names_are_refused(third, code, says) -> None:
    import msgpack

    with hosting("ann") as server, grpc.insecure_channel(server.address) as channel:
        manifest = msgpack.packb([["float32", [4]], ["float32", [1 << 18], third]])
        name = b"ann"
        head = b"".join((len(name).to_bytes(2, "big"), name, len(manifest).to_bytes(4, "big"), manifest, b"\x90"))
        with pytest.raises(grpc.RpcError) as info:
            list(channel.stream_stream(STREAM)(iter([head]), metadata=(("authorization", f"Bearer {OWNER}"),), timeout=10))
        assert info.value.code() == code and says in info.value.details()


def test_a_named_frame_of_another_shape_is_not_served() -> None:
    x = big(5)
    with hosting("ann", "ben") as server:
        d = kept.digest(x)
        _raw(server, OWNER, "ann", x, [(kept.KEEP, d)])
        with pytest.raises(grpc.RpcError) as info:
            _raw(server, OWNER, "ben", x.view(2, -1), [(kept.NAME, d)])
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_fedavg_over_one_server_names_the_rounds_model_and_trains_as_in_process() -> None:
    """Four owners served by one server: each round's model crosses the connection twice and is
    named for the other two, and the trained model is the one VirtualWorkers give."""
    from torch import nn

    from fedsecure import fl
    from fedsecure.data import federate, load_digits
    from fedsecure.worker.labels import Policy

    parts = federate(load_digits(), 4, scheme="iid", seed=0)
    names = [f"o{i}" for i in range(4)]

    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 4096), nn.ReLU(), nn.Linear(4096, 10))  # 1 MiB weight

    strategy = fl.FedAvg(training=fl.LocalTraining(epochs=1, batch_size=32, lr=0.05))
    owners_policy = Policy(trusted_aggregators=frozenset({"agg"}), private_sends=False)
    server = WorkerServer()
    for name, (x, y) in zip(names, parts, strict=True):
        core = WorkerCore(name, policy=owners_policy)
        core.load(x, ("x",)), core.load(y, ("y",))
        server.add(core, callers={OWNER: ("client", "owner")})
    server.add(WorkerCore("agg", policy=Policy(strict=True)),
               callers={OWNER: ("client", "owner"), **{f"{n}-peer-token": ("peer", n) for n in names}})
    server.start()
    try:
        served, _ = fl.fit(model(), [sy.connect(n, server.address, credentials=OWNER) for n in names], strategy,
                           rounds=3, aggregator=sy.connect("agg", server.address, credentials=OWNER), seed=5)
        assert server.kept.named == 3 * 2  # per round: o0 sent, o1 sent and kept, o2 and o3 named
    finally:
        server.stop(1.0)
    fed = sy.Federation()
    local = [sy.VirtualWorker(id=n, data={"x": x, "y": y}, policy=owners_policy, federation=fed)
             for n, (x, y) in zip(names, parts, strict=True)]
    in_process, _ = fl.fit(model(), local, strategy, rounds=3,
                           aggregator=sy.VirtualWorker(id="agg", policy=Policy(strict=True), federation=fed), seed=5)
    for a, b in zip(served.state_dict().values(), in_process.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_server_keeps_at_most_its_budget_for_a_caller_dropping_the_least_recently_used() -> None:
    store = kept.Kept(budget=5 << 20)  # room for two of the 2 MiB tensors
    a, b, c = big(10), big(11), big(12)
    store.keep(b"one", a), store.keep(b"one", b)
    announced = [frames.Frame(torch.float32, tuple(a.shape), a.nbytes, name=kept.digest(a))]
    assert torch.equal(store.copies(b"one", announced)[0], a)  # a is now the more recently used
    store.keep(b"one", c)
    assert store.held(b"one") == 2 * a.nbytes
    with pytest.raises(kept.Missing):  # b went, the least recently used
        store.copies(b"one", [frames.Frame(torch.float32, tuple(b.shape), b.nbytes, name=kept.digest(b))])
    assert torch.equal(store.copies(b"one", announced)[0], a)
    store.keep(b"two", big(13))  # another caller's copies count against its own budget
    assert store.held(b"one") == 2 * a.nbytes and store.held(b"two") == a.nbytes
    store.keep(b"one", torch.zeros(3 << 20))  # 12 MiB: more than the budget, never kept
    assert store.held(b"one") == 2 * a.nbytes
    store.clear()


def test_worker_to_worker_transports_send_every_frame_in_full() -> None:
    """Moves between workers (a stream per request) carry models that are never the same twice:
    they are neither hashed for nor kept."""
    from fedsecure.transport.client import GrpcTransport
    from fedsecure.worker.client import WorkerClient

    x = big(6)
    with hosting(*NAMES) as server:
        for name in NAMES:
            client = WorkerClient(name, GrpcTransport(name, server.address, token=OWNER, persistent=False))
            client.framed = True
            assert torch.equal(x.send(client).get(), x)
        assert server.kept.named == 0 and server.kept.held(OWNER.encode()) == 0
