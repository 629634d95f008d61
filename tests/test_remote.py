"""Workers in their own processes, reached over gRPC: the same API, the same rules.

One federation of three real `fedsecure worker serve` processes (bob and alice with
private data from .npz files, a strict aggregator) serves the module's tests.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fedsecure as sy

OWNER = "owner-token-0123456789"


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, sy.WorkerProcess]]:
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for name, n in (("bob", 8), ("alice", 6)):
        x = rng.normal(size=(n, 2)).astype("float32")
        np.savez(d / f"{name}.npz", x=x, y=(x @ np.array([[1.0], [-1.0]], "float32")))
    clients = {"owner": OWNER}
    sw = sy.WorkerProcess(
        "secure_worker", clients=clients, peer_tokens={"bob": "bob-peer", "alice": "alice-peer"},
        aggregator=True,
    ).start()
    peers = {"secure_worker": sw.address}
    bob = sy.WorkerProcess(
        "bob", clients=clients, data=str(d / "bob.npz"), token="bob-peer", peers=peers,
        trust=["secure_worker"],
    ).start()
    alice = sy.WorkerProcess(
        "alice", clients=clients, data=str(d / "alice.npz"), token="alice-peer", peers=peers
    ).start()  # alice trusts nobody
    try:
        yield {"bob": bob, "alice": alice, "secure_worker": sw}
    finally:
        for proc in (bob, alice, sw):
            proc.stop()


def test_remote_workers_train_move_and_aggregate(federation: dict[str, sy.WorkerProcess]) -> None:
    bob, sw = federation["bob"].connect(OWNER), federation["secure_worker"].connect(OWNER)
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


def test_private_data_moves_only_where_its_owner_trusts(federation: dict[str, sy.WorkerProcess]) -> None:
    alice = federation["alice"].connect(OWNER)
    sw = federation["secure_worker"].connect(OWNER)
    (x,) = alice.search("x")
    with pytest.raises(sy.PermissionDenied) as info:
        x.copy().move(sw)
    assert info.value.rule == "untrusted-destination"
    public = torch.ones(3).send(alice)  # the model owner's own data moves freely
    public.move(sw)
    assert torch.equal(public.get(), torch.ones(3))


def test_a_remote_worker_accepts_no_data_labelled_as_its_owners(federation: dict[str, sy.WorkerProcess]) -> None:
    bob = federation["bob"].connect(OWNER)
    with pytest.raises(sy.PermissionDenied) as info:
        torch.zeros(2).send(bob, private=True)
    assert info.value.rule == "private-sends"


def test_wrong_or_missing_credentials_are_refused(federation: dict[str, sy.WorkerProcess]) -> None:
    for token in ("not-the-token", "", "bob-peer"[:-1]):
        with pytest.raises(sy.AuthenticationFailed):
            federation["bob"].connect(token).object_count()
    # a peer's credential is not a model owner's: it may only deliver moved values
    as_peer = federation["secure_worker"].connect("bob-peer")
    with pytest.raises(sy.ProtocolError, match="not accepted from a peer"):
        as_peer.object_count()


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


def test_sigterm_stops_the_server_cleanly() -> None:
    proc = sy.WorkerProcess("dave", clients={"owner": OWNER}).start()
    dave = proc.connect(OWNER)
    assert dave.object_count() == 0
    assert proc.stop() == 0


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
