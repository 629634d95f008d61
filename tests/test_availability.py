"""A worker stays available to its callers: a second worker cannot take its port, and a
caller that does not read its reply holds nobody but itself."""

from __future__ import annotations

import queue
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import torch

import fedsecure as sy
from fedsecure.cli.worker import parse_size
from fedsecure.transport import frames
from fedsecure.transport.grpc import STREAM, WorkerServer
from fedsecure.wire import messages as m
from fedsecure.worker.core import WorkerCore

OWNER, OTHER = "owner-token-0123456789", "other-owner-token-9876543210"
CALLERS = {OWNER: ("client", "owner")}
BEARER = (("authorization", f"Bearer {OWNER}"),)


# -- one worker per port -------------------------------------------------------------------


def test_a_second_server_on_a_busy_port_is_refused_and_the_first_serves_on() -> None:
    with WorkerServer(WorkerCore("ann"), callers=CALLERS) as first:
        with pytest.raises(OSError, match=rf"cannot listen on 127\.0\.0\.1:{first.port}: the port is in use"):
            WorkerServer(WorkerCore("ben"), callers=CALLERS, port=first.port)
        # nor can a gRPC server with gRPC's default options (SO_REUSEPORT) share the port
        other = grpc.server(futures_pool(), options=[])
        try:
            with pytest.raises(RuntimeError):
                if other.add_insecure_port(first.address) == 0:  # older grpcio returns 0
                    raise RuntimeError("not bound")
        finally:
            other.stop(None)
        ann = sy.connect("ann", first.address, credentials=OWNER)
        assert torch.equal(torch.arange(3).send(ann).get(), torch.arange(3))


def futures_pool() -> Any:
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=1)


def test_worker_serve_on_a_busy_port_exits_with_a_message() -> None:
    with sy.WorkerProcess("ann", clients={"owner": OWNER}) as ann:
        port = ann.address.rsplit(":", 1)[1]
        second = subprocess.run(
            [sys.executable, "-m", "fedsecure", "worker", "serve", "--id=ben", f"--client=owner={OWNER}",
             f"--port={port}"],
            capture_output=True, text=True, timeout=120,
        )
        assert second.returncode != 0
        assert f"cannot listen on 127.0.0.1:{port}: the port is in use (is another worker serving there?)" in second.stderr
        assert "choose another --port" in second.stderr and "Traceback" not in second.stderr
        assert "listening on" not in second.stdout
        assert ann.connect(OWNER).object_count() == 0  # the first worker is untouched


# -- a reply nobody reads ------------------------------------------------------------------


def unread_get(channel: grpc.Channel, object_id: int, timeout: float) -> Any:
    """A raw stream that asks for ``object_id`` and does not read the reply (yet)."""
    head, _ = frames.outgoing("ann", m.encode_request(m.Get(object_id)))
    outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
    outbox.put(head)
    return channel.stream_stream(STREAM)(iter(outbox.get, None), metadata=BEARER, timeout=timeout)


def read_reply(replies: Iterator[bytes]) -> Any:
    _, rest = frames.split_head(next(replies))
    announced, body = frames.read_manifest(rest, limit=1 << 30, what="the reply")
    return m.reply_value(frames.body_and_frames(body, frames.receive(announced, replies)), worker="ann")


def wait_until_taken(ann: sy.WorkerClient, objects_left: int, seconds: float = 60.0) -> None:
    """Wait until the worker has run the unread Get (its object is gone); every request here
    has a deadline of several seconds, far below the unread reply's."""
    give_up = time.monotonic() + seconds
    while ann.request(m.Count(), deadline=10.0) != objects_left:
        assert time.monotonic() < give_up, "the worker never ran the Get"
        time.sleep(0.05)


def test_a_caller_that_does_not_read_a_large_reply_does_not_hold_the_worker() -> None:
    core = WorkerCore("ann")
    # the unread reply is cancelled only after 120 s: every call below must not wait for that
    with WorkerServer(core, callers=CALLERS, deadline=120.0) as server, grpc.insecure_channel(server.address) as channel:
        ann = sy.connect("ann", server.address, credentials=OWNER, deadline=10.0, pipelined=False)
        big = torch.randn(12 << 20)  # 48 MiB: far more than gRPC buffers for a reader
        ptr = big.send(ann)
        alias = ptr.view(-1)  # shares the value's storage on the worker
        unread = unread_get(channel, ptr.id_at_location, timeout=300)
        try:
            wait_until_taken(ann, objects_left=1)  # the alias stays
            # the worker serves others while the reply waits to be read ...
            small = torch.arange(5.0).send(ann)
            assert torch.equal((small * 2).get(), torch.arange(5.0) * 2)
            alias.add_(1.0)  # ... even requests that change the storage the reply came from
            assert torch.equal(alias[:3].get(), big[:3] + 1)
            # and the reply, read at last, is the value as it was when the Get ran
            value = read_reply(unread)
            assert torch.equal(value["tensor"], big)
        finally:
            unread.cancel()


def test_several_unread_replies_hold_no_other_caller() -> None:
    core = WorkerCore("ann")
    with WorkerServer(core, callers=CALLERS, deadline=120.0) as server, grpc.insecure_channel(server.address) as channel:
        ann = sy.connect("ann", server.address, credentials=OWNER, deadline=10.0, pipelined=False)
        ptrs = [torch.full((4 << 20,), float(i)).send(ann) for i in range(3)]  # 16 MiB each
        unread = [unread_get(channel, p.id_at_location, timeout=300) for p in ptrs]
        try:
            wait_until_taken(ann, objects_left=0)
            for _ in range(3):
                assert torch.equal(torch.ones(2).send(ann).get(), torch.ones(2))
            for i, call in enumerate(unread):
                assert torch.equal(read_reply(call)["tensor"], torch.full((4 << 20,), float(i)))
        finally:
            for call in unread:
                call.cancel()


def test_a_reply_nobody_reads_is_still_cancelled_after_the_deadline() -> None:
    core = WorkerCore("ann")
    callers = {**CALLERS, OTHER: ("client", "other")}
    # two threads: one for the owner's open stream, one for the stream nobody reads
    with WorkerServer(core, callers=callers, deadline=1.0, threads=2) as server, grpc.insecure_channel(
        server.address
    ) as channel:
        ann = sy.connect("ann", server.address, credentials=OWNER, deadline=10.0)
        ptr = torch.zeros(12 << 20).send(ann)
        unread = unread_get(channel, ptr.id_at_location, timeout=300)
        try:
            wait_until_taken(ann, objects_left=0)
            # a third stream gets a thread only once the unread reply is cancelled (after 1 s)
            other = sy.connect("ann", server.address, credentials=OTHER, deadline=120.0)
            assert other.object_count() == 0
            with pytest.raises(grpc.RpcError) as info:
                for _ in unread:  # what gRPC had buffered, then the end
                    pass
            assert info.value.code() == grpc.StatusCode.CANCELLED
        finally:
            unread.cancel()


# -- the memory quota's and the policy's flags --------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1024", 1024), (2048, 2048), ("512M", 512 << 20), ("4G", 4 << 30), ("4g", 4 << 30), ("4GiB", 4 << 30),
     ("1T", 1 << 40), ("0", 0), ("none", None), ("None", None)],
)
def test_memory_quotas_in_bytes_or_binary_units(value: Any, expected: int | None) -> None:
    assert parse_size(value, "--memory-quota") == expected


@pytest.mark.parametrize("value", ["", "4X", "-1", -1, "1.5G", "G", "4 GB", True, 1.5])
def test_a_bad_memory_quota_is_refused_with_a_message(value: Any) -> None:
    with pytest.raises(SystemExit, match="--memory-quota takes a number of bytes"):
        parse_size(value, "--memory-quota")


def serve(*args: str) -> subprocess.CompletedProcess[str]:
    """``fedsecure worker serve`` with arguments it refuses before it listens."""
    return subprocess.run(
        [sys.executable, "-m", "fedsecure", "worker", "serve", "--id=x", f"--client=owner={OWNER}", *args],
        capture_output=True, text=True, timeout=120,
    )


def test_bad_quota_and_policy_settings_exit_with_a_message(tmp_path: Any) -> None:
    done = serve("--memory-quota=lots")
    assert done.returncode != 0 and "--memory-quota takes a number of bytes" in done.stderr
    done = serve("--aggregator", "--policy=full")
    assert done.returncode != 0 and "an aggregator (--aggregator) holds none" in done.stderr
    config = tmp_path / "worker.toml"
    config.write_text('[policy]\nmode = "everything"\n')
    done = serve(f"--config={config}")
    assert done.returncode != 0 and "[policy] mode must be one of 'training', 'full'" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_policy_is_explained_and_announced(tmp_path: Any) -> None:
    import numpy as np

    helped = subprocess.run(
        [sys.executable, "-m", "fedsecure", "worker", "serve", "--help"], capture_output=True, text=True, check=True
    ).stdout
    flat = " ".join(helped.split())
    assert "--policy {full,training}" in flat and "--memory-quota" in flat
    assert "runs no pointer op on the private data" in flat and "the whole pointer API" in flat
    data = tmp_path / "bob.npz"
    np.savez(data, x=np.zeros((2, 2), "float32"))
    with sy.WorkerProcess("bob", clients={"owner": OWNER}, data=str(data)) as bob:
        assert "policy: training" in bob.banner and "memory quota 4G per owner" in bob.banner
        (x,) = bob.connect(OWNER, pipelined=False).search("#x")
        with pytest.raises(sy.PermissionDenied) as info:  # by default no pointer op on the data
            x.sum()
        assert info.value.rule == "training-only"
    with sy.WorkerProcess("bob", clients={"owner": OWNER}, data=str(data), policy="full", memory_quota="512M") as bob:
        assert "policy: full" in bob.banner and "memory quota 512M per owner" in bob.banner
        (x,) = bob.connect(OWNER, pipelined=False).search("#x")
        assert x.sum().get().item() == 0.0  # a scalar metric may leave
    config = tmp_path / "bob.toml"
    config.write_text(f'data = "{data}"\nmemory_quota = 1024\n[policy]\nmode = "full"\n')
    with sy.WorkerProcess("bob", clients={"owner": OWNER}, extra=[f"--config={config}"]) as bob:
        assert "policy: full" in bob.banner and "memory quota 1K per owner" in bob.banner
    with sy.WorkerProcess("agg", clients={"owner": OWNER}, aggregator=True, memory_quota="none") as agg:
        assert "strict aggregator" in agg.banner and "policy: aggregator" in agg.banner
        assert "no memory quota" in agg.banner


# -- the quota counts what a worker already holds -------------------------------------------


def test_a_quota_set_on_a_running_worker_counts_what_it_already_holds() -> None:
    """A worker without a quota keeps no byte counts (they cost every op); a quota switched on
    later still counts the tensors sent before it, and refuses what would go over it."""
    hook = sy.TorchHook(torch)
    bob = sy.VirtualWorker(hook, id="quota-bob")
    x = torch.zeros(1000).send(bob)  # 4000 bytes, sent while there is no quota
    assert bob.core.objects.used == {}
    bob.core.memory_quota = 6000
    assert sum(bob.core.objects.used.values()) == 4000
    with pytest.raises(sy.PermissionDenied, match="memory quota of 6000 bytes"):
        x + 1  # another 4000 bytes would make 8000
    del x
    bob.core.memory_quota = None
    assert bob.core.objects.used == {}
    with pytest.raises(ValueError, match="bytes >= 0"):
        bob.core.memory_quota = -1
