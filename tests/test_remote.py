"""Workers in their own processes, reached over gRPC: the same API, the same rules.

One federation of three real `fedsecure worker serve` processes (bob and alice with
private data from .npz files, served with the full pointer API, ``--policy full``; a
strict aggregator), with mutual TLS on every connection, serves the module's tests.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import fedsecure as sy
from fedsecure.transport.certs import write_federation
from fedsecure.transport.grpc import WorkerServer
from fedsecure.worker.core import WorkerCore

OWNER = "owner-token-0123456789"  # for the workers that run without TLS


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    write_federation(d, ["owner", "bob", "alice", "secure_worker", "mallory"])
    return d


@pytest.fixture(scope="module")
def owner(certs: Path) -> sy.TLS:
    return sy.TLS.from_dir(certs, "owner")


@pytest.fixture(scope="module")
def federation(
    tmp_path_factory: pytest.TempPathFactory, certs: Path
) -> Iterator[dict[str, sy.WorkerProcess]]:
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for name, n in (("bob", 8), ("alice", 6)):
        x = rng.normal(size=(n, 2)).astype("float32")
        np.savez(d / f"{name}.npz", x=x, y=(x @ np.array([[1.0], [-1.0]], "float32")))
    clients = {"owner": ""}  # known by its certificate
    tls = str(certs)
    sw = sy.WorkerProcess(
        "secure_worker", clients=clients, tls_dir=tls, accept_peers=["bob", "alice"],
        aggregator=True,
    ).start()
    peers = {"secure_worker": sw.address}
    bob = sy.WorkerProcess(
        "bob", clients=clients, tls_dir=tls, data=str(d / "bob.npz"), peers=peers,
        trust=["secure_worker"], policy="full",
    ).start()
    alice = sy.WorkerProcess(
        "alice", clients=clients, tls_dir=tls, data=str(d / "alice.npz"), peers=peers, policy="full",
    ).start()  # alice trusts nobody
    try:
        yield {"bob": bob, "alice": alice, "secure_worker": sw}
    finally:
        for proc in (bob, alice, sw):
            proc.stop()


def test_remote_workers_train_move_and_aggregate(
    federation: dict[str, sy.WorkerProcess], owner: sy.TLS
) -> None:
    bob, sw = federation["bob"].connect(owner), federation["secure_worker"].connect(owner)
    (x,), (y,) = bob.search("#x"), bob.search("#y")
    assert x.shape == (8, 2) and x.owners == ["bob"]
    with pytest.raises(sy.PermissionDenied):
        x.get()
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    remote = model.copy().send(bob)
    opt = torch.optim.SGD(remote.parameters(), lr=0.1)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = ((remote(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.get().item())
    assert losses[-1] < losses[0]
    with pytest.raises(sy.PermissionDenied):
        remote.get()
    before = bob.bytes_sent + bob.bytes_received + sw.bytes_sent + sw.bytes_received
    remote.move(sw)  # bob's server sends it straight to the secure worker's
    assert bob.bytes_sent + bob.bytes_received + sw.bytes_sent + sw.bytes_received - before < 1000
    assert remote.weight.location is sw
    with pytest.raises(sy.PermissionDenied) as info:
        remote.get()
    assert info.value.rule == "strict-aggregator"
    with pytest.raises(sy.PermissionDenied, match="at least 2"):
        sw.aggregate([remote])


def test_private_data_moves_only_where_its_owner_trusts(
    federation: dict[str, sy.WorkerProcess], owner: sy.TLS
) -> None:
    alice = federation["alice"].connect(owner)
    sw = federation["secure_worker"].connect(owner)
    (x,) = alice.search("x")
    with pytest.raises(sy.PermissionDenied) as info:
        x.copy().move(sw)
    assert info.value.rule == "untrusted-destination"
    public = torch.ones(3).send(alice)  # the model owner's own data moves freely
    public.move(sw)
    assert torch.equal(public.get(), torch.ones(3))


def test_a_remote_worker_accepts_no_data_labelled_as_its_owners(
    federation: dict[str, sy.WorkerProcess], owner: sy.TLS
) -> None:
    bob = federation["bob"].connect(owner)
    with pytest.raises(sy.PermissionDenied) as info:
        torch.zeros(2).send(bob, private=True)
    assert info.value.rule == "private-sends"


def test_certificates_decide_who_may_call(
    federation: dict[str, sy.WorkerProcess], certs: Path, tmp_path: Path
) -> None:
    bob = federation["bob"]
    # signed by the federation's CA, but not a model owner this worker accepts
    with pytest.raises(sy.AuthenticationFailed):
        bob.connect(sy.TLS.from_dir(certs, "mallory")).object_count()
    # a certificate from another CA: the handshake fails
    write_federation(tmp_path, ["owner"])
    with pytest.raises(sy.WorkerUnavailable, match="TLS"):
        bob.connect(sy.TLS.from_dir(tmp_path, "owner"), deadline=3.0).object_count()
    # a token where a certificate is required
    with pytest.raises(sy.WorkerUnavailable):
        bob.connect(OWNER, deadline=3.0).object_count()
    # a peer's certificate is not a model owner's: it may only deliver moved values
    as_peer = federation["secure_worker"].connect(sy.TLS.from_dir(certs, "bob"))
    with pytest.raises(sy.ProtocolError, match="not accepted from a peer"):
        as_peer.object_count()


def test_wrong_or_missing_tokens_are_refused() -> None:
    with sy.WorkerProcess("erin", clients={"owner": OWNER}) as proc:
        for token in ("not-the-token", "", OWNER[:-1], OWNER + " "):
            with pytest.raises(sy.AuthenticationFailed):
                proc.connect(token).object_count()
        assert proc.connect(OWNER).object_count() == 0


def test_a_dead_worker_is_unavailable_within_the_deadline(tmp_path: Path) -> None:
    proc = sy.WorkerProcess("carol", clients={"owner": OWNER}).start()
    carol = proc.connect(OWNER, deadline=2.0)
    ptr = torch.ones(2).send(carol)
    proc.process.kill()  # type: ignore[union-attr]
    proc.process.wait()  # type: ignore[union-attr]
    start = time.monotonic()
    with pytest.raises(sy.WorkerUnavailable, match="carol"):
        ptr.get()
    assert time.monotonic() - start < 5.0
    proc.stop()


def test_sigterm_lets_calls_in_flight_finish_then_stops() -> None:
    import signal
    import threading

    proc = sy.WorkerProcess("dave", clients={"owner": OWNER}).start()
    dave = proc.connect(OWNER, pipelined=False)
    a = torch.randn(3000, 3000).send(dave)
    results: list[object] = []
    slow = threading.Thread(target=lambda: results.append(torch.matmul(a, a)))  # about a second
    slow.start()
    time.sleep(0.2)  # the product is running on the worker
    proc.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    slow.join(30)
    assert len(results) == 1 and isinstance(results[0], sy.PointerTensor)  # it finished
    with pytest.raises(sy.WorkerUnavailable):
        a.sum()  # a new call after SIGTERM is not taken
    assert proc.process.wait(30) == 0  # type: ignore[union-attr]
    proc.stop()


def test_the_command_explains_itself() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fedsecure", "worker", "serve", "--help"],
        capture_output=True, text=True, check=True,
    ).stdout
    for flag in ("--data", "--client", "--peer", "--trust", "--aggregator", "--config"):
        assert flag in out
    missing = subprocess.run(
        [sys.executable, "-m", "fedsecure", "worker", "serve", "--id", "x"],
        capture_output=True, text=True,
    )
    assert missing.returncode != 0 and "--client NAME=TOKEN" in missing.stderr


def test_large_tensors_travel_in_chunks(federation: dict[str, sy.WorkerProcess], owner: sy.TLS) -> None:
    bob, sw = federation["bob"].connect(owner), federation["secure_worker"].connect(owner)
    big = torch.randn(3_000_000)  # 12 MB: twelve chunks each way
    ptr = big.send(bob)
    assert torch.equal(ptr.copy().get(), big)
    ptr.move(sw)  # worker to worker, in chunks too
    assert torch.equal(ptr.get(), big)


@contextlib.contextmanager
def in_process_server(name: str, **settings: Any) -> Iterator[WorkerServer]:
    """A worker served over gRPC from this process (quicker to start than a process)."""
    with WorkerServer(WorkerCore(name), callers={OWNER: ("client", "owner")}, **settings) as server:
        yield server


def test_messages_over_the_maximum_get_a_clear_error() -> None:
    with in_process_server("frank", max_message=3_000_000) as server:
        small = sy.connect("frank", server.address, credentials=OWNER)
        with pytest.raises(sy.WorkerUnavailable, match="exceeds the maximum of 3000000 bytes"):
            torch.zeros(1_000_000).send(small)  # 4 MB
        ok = torch.ones(500_000).send(small)  # 2 MB: fine, in two chunks
        tiny = sy.connect("frank", server.address, credentials=OWNER, max_message=1000)
        with pytest.raises(ValueError, match="exceeds the maximum"):
            torch.zeros(1000).send(tiny)  # refused by the client's own limit
        assert torch.equal(ok.get(), torch.ones(500_000))


def test_ops_are_pipelined_and_errors_come_back_naming_the_op() -> None:
    with in_process_server("gina") as server:
        gina = sy.connect("gina", server.address, credentials=OWNER)
        calls: list[int] = []
        transport = gina._transport
        gina._transport = lambda data: (calls.append(len(data)), transport(data))[1]  # type: ignore[method-assign]
        x = torch.arange(6.0).send(gina)
        calls.clear()
        y = ((x.view(2, 3) * 2 - 1) ** 2).sum(dim=1)  # four ops, their shapes worked out here
        assert isinstance(y, sy.PointerTensor) and y.shape == (2,) and calls == []
        assert torch.equal(y.get(), ((torch.arange(6.0).view(2, 3) * 2 - 1) ** 2).sum(dim=1))
        assert len(calls) == 1  # one round trip for all five
        with pytest.raises(sy.RemoteError, match="Tensor.mm"):
            x.view(3, 2).mm(x.view(3, 2))  # a shape error: no meta result, so it waits and fails
        logits, labels = torch.zeros(2, 3).send(gina), torch.tensor([0, 7]).send(gina)
        loss = torch.nn.functional.cross_entropy(logits, labels)  # class 7 of 3: only data can tell
        assert loss.shape == ()
        with pytest.raises(sy.RemoteError, match="F.cross_entropy, sent earlier without waiting"):
            loss.get()


def test_predicted_results_match_the_workers() -> None:
    """Pipelined pointers' specs (worked out locally, cached per op and spec) are the worker's."""
    with in_process_server("hana") as server:
        hana = sy.connect("hana", server.address, credentials=OWNER)
        ints, bools = torch.arange(4).send(hana), torch.tensor([True, False]).send(hana)
        for _ in range(2):  # the second time from the cache
            cases = [ints + 1, ints + 1.0, ints + True, bools + True, bools + 1, ints.float() / 2, ints[1:]]
            for ptr in cases:
                value = ptr.get()
                assert (value.shape, value.dtype) == (ptr.shape, ptr.dtype)
