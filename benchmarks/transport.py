"""What the wire costs: fedsecure's gRPC workers on loopback versus a raw TCP socket.

Measured on this machine, against workers in their own processes (`WorkerProcess`):
1. latency of one op that waits for its reply (``a + b`` on 4-float pointers), also against an
   in-process `WorkerServer` and a `VirtualWorker` (no network), next to a raw TCP ping-pong and
   a bare gRPC echo over a long-lived bidirectional stream to another process (what gRPC Python
   itself costs per message, no fedsecure code: the floor for a worker process).
   Target: at most 300 us against a worker process;
2. pipelining: N in-place ops (``p.add_(1)``, which ride with the next request) finished by
   ``worker.flush()``, versus N ops that each wait (``p = p + 1``), in ops per second; and, where
   the client can pipeline ops that return new pointers (``WorkerClient.pipelined``), N of those;
3. tensor transfers of float32 tensors (1 MiB, 100 MiB, 1 GiB): ``send``, ``get`` and a
   worker-to-worker ``move``, next to a raw TCP copy of the same bytes (``sendall`` of a
   memoryview into a thread's ``recv_into`` a preallocated buffer, then a one-byte ack) as the
   ceiling. Target: at least half the ceiling at 100 MiB.
4. one tensor to many workers of one server (the round's model to the owners a simulation host
   serves): ``x.send(w)`` of the same 6.4 MiB tensor to each of N workers hosted by one in-process
   `WorkerServer`, where the server keeps it after the second send and the rest name it by digest
   (`fedsecure.transport.kept`), against sends of new content each time (never named); a new
   tensor every round.
Prints a table and writes JSON (default benchmarks/results/transport.json).

Run:  python benchmarks/transport.py [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import queue
import resource
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import torch

try:
    import fedsecure as sy
except ModuleNotFoundError:  # a checkout without `pip install -e .`: the workers need the path too
    SRC = str(Path(__file__).resolve().parents[1] / "src")
    sys.path.insert(0, SRC)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")]))
    import fedsecure as sy
from fedsecure.transport.grpc import DEFAULT_MAX_MESSAGE, WorkerServer
from fedsecure.worker.core import WorkerCore

TARGET_LATENCY_US = 300.0
TARGET_RATIO = 0.5  # of the raw TCP ceiling, at 100 MiB
TARGET_SIZE = 100 << 20
MIB = 1 << 20
OWNER, PEER = "owner-bench-token", "peer-bench-token"
_LEN = struct.Struct(">Q")


class RawSink:
    """A plain TCP server in a thread: takes a length-prefixed payload into a preallocated
    buffer with ``recv_into`` and acks with one byte. The client end is ``send``."""

    def __init__(self) -> None:
        self.buffer = bytearray(MIB)
        self._listener = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._serve, daemon=True).start()
        self._conn = socket.create_connection(self._listener.getsockname())
        self._conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _serve(self) -> None:
        conn, _ = self._listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        header = bytearray(_LEN.size)
        with conn:
            while _recv_exactly(conn, memoryview(header)):
                (n,) = _LEN.unpack(header)
                if not _recv_exactly(conn, memoryview(self.buffer)[:n]):
                    return
                conn.sendall(b"k")

    def reserve(self, n: int) -> None:
        """Preallocate the receive buffer (outside the timed part)."""
        self.buffer = bytearray(0)
        self.buffer = bytearray(n)

    def send(self, payload: memoryview) -> None:
        self._conn.sendall(_LEN.pack(payload.nbytes))
        self._conn.sendall(payload)
        if self._conn.recv(1) != b"k":
            raise ConnectionError("raw sink closed")

    def close(self) -> None:
        self._conn.close()
        self._listener.close()
        self.buffer = bytearray(0)


def _recv_exactly(conn: socket.socket, view: memoryview) -> bool:
    while view.nbytes:
        got = conn.recv_into(view)
        if got == 0:
            return False
        view = view[got:]
    return True


ECHO_SERVER = """
import sys
from concurrent.futures import ThreadPoolExecutor
import grpc
def echo(requests, context):
    yield from requests
server = grpc.server(ThreadPoolExecutor(4))
server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
    "Echo", {"Stream": grpc.stream_stream_rpc_method_handler(echo)}),))
print(server.add_insecure_port("127.0.0.1:0"), flush=True)
server.start()
sys.stdin.read()  # until the benchmark closes it
"""


class GrpcEcho:
    """A bare gRPC echo in another process, over one long-lived bidirectional stream."""

    def __init__(self) -> None:
        self._proc = subprocess.Popen([sys.executable, "-c", ECHO_SERVER], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)
        assert self._proc.stdout is not None
        self._channel = grpc.insecure_channel(f"127.0.0.1:{int(self._proc.stdout.readline())}")
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._replies = self._channel.stream_stream("/Echo/Stream")(iter(self._outbox.get, None))

    def ping(self, message: bytes = b"x" * 64) -> bytes:
        self._outbox.put(message)
        reply: bytes = next(self._replies)
        return reply

    def close(self) -> None:
        self._outbox.put(None)
        self._channel.close()
        assert self._proc.stdin is not None
        self._proc.stdin.close()
        self._proc.wait(10)


def interleave(
    cases: dict[str, Callable[[], Any]], blocks: int, reps: int, warmup: int
) -> dict[str, dict[str, float]]:
    """Per-call time in us, median and best over blocks; the cases alternate block by block (ABBA)."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    gc.collect()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for block in range(blocks):
        for name in list(cases) if block % 2 == 0 else reversed(list(cases)):
            fn, t0 = cases[name], time.perf_counter_ns()
            for _ in range(reps):
                fn()
            times[name].append((time.perf_counter_ns() - t0) / reps / 1e3)
    return {name: {"median_us": statistics.median(t), "best_us": min(t)} for name, t in times.items()}


def set_pipelined(worker: sy.WorkerClient, on: bool) -> bool:
    """Let ops that return a new pointer skip waiting for the reply (``WorkerClient.pipelined``),
    or make them wait; False where this version of fedsecure has no such setting."""
    if not hasattr(worker, "pipelined"):
        return False
    worker.pipelined = on
    return True


def bench_latency(
    workers: dict[str, sy.WorkerClient], sink: RawSink, echo: GrpcEcho, blocks: int, reps: int
) -> dict[str, Any]:
    one_byte = memoryview(b"x")
    cases: dict[str, Callable[[], Any]] = {
        "raw TCP ping-pong (1 byte)": lambda: sink.send(one_byte),
        "bare gRPC stream echo (64 bytes)": echo.ping,
    }
    for name, worker in workers.items():
        set_pipelined(worker, False)  # every op waits for its reply
        a, b = torch.randn(4).send(worker), torch.randn(4).send(worker)
        cases[f"a + b, {name}"] = lambda a=a, b=b: a + b
    return interleave(cases, blocks, reps, warmup=min(reps, 200))


def bench_pipeline(name: str, worker: sy.WorkerClient, n: int) -> dict[str, Any]:
    """n ops that each wait (p = p + 1), n in-place ops (p.add_(1)) and, where the client can
    pipeline ops that return new pointers, n of those (p = p + 1); each run ends with flush()."""
    warmup = min(n, 200)  # the first pipelined op loads torch's meta kernels (about a second)
    rates: dict[str, float | None] = {}
    per_op: dict[str, float] = {}
    correct = True
    for case in ("waiting", "in-place", "new pointers"):
        if not set_pipelined(worker, case == "new pointers") and case == "new pointers":
            rates[case] = None
            continue
        p = torch.zeros(4).send(worker)
        for k in (warmup, n):
            sent0, t0 = worker.bytes_sent, time.perf_counter()
            for _ in range(k):
                if case == "in-place":
                    p.add_(1)  # no reply awaited: queued, sent in batches with the next request
                else:
                    p = p + 1
            worker.flush()
        rates[case] = n / (time.perf_counter() - t0)
        per_op[case] = (worker.bytes_sent - sent0) / n
        correct = correct and bool((p.get() == warmup + n).all())
    set_pipelined(worker, False)
    wait, new = rates["waiting"], rates["new pointers"]
    assert wait is not None and rates["in-place"] is not None
    return {"target": name, "ops": n, "waiting_ops_s": wait, "in_place_ops_s": rates["in-place"],
            "in_place_speedup": rates["in-place"] / wait, "new_pointer_ops_s": new,
            "new_pointer_speedup": new / wait if new else None, "bytes_sent_per_op": per_op,
            "correct": correct}


def _mib_s(nbytes: int, seconds: list[float]) -> float:
    return nbytes / statistics.median(seconds) / MIB


def bench_transfer(
    nbytes: int, reps: int, src: sy.WorkerClient, dst: sy.WorkerClient, sink: RawSink
) -> dict[str, Any]:
    """send, get and move of one float32 tensor of ``nbytes``, and the raw TCP copy of its bytes."""
    x = torch.rand(nbytes // 4)
    payload = memoryview(x.view(torch.uint8).numpy())
    sink.reserve(nbytes)
    t: dict[str, list[float]] = {"raw": [], "send": [], "get": [], "move": []}
    same = True
    for rep in range(reps):
        t0 = time.perf_counter()
        sink.send(payload)
        t["raw"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        p = x.send(src)
        t1 = time.perf_counter()
        y = p.get()
        t["send"].append(t1 - t0)
        t["get"].append(time.perf_counter() - t1)
        if rep == 0:
            same = torch.equal(x, y)
        del p, y
        p = x.send(src)
        t0 = time.perf_counter()
        p.move(dst)  # alice's server sends it straight to bob's
        t["move"].append(time.perf_counter() - t0)
        if rep == 0:
            same = same and torch.equal(x, p.get())
        del p
        src.flush()  # the workers free it now
        dst.flush()
    sink.reserve(0)
    del x, payload
    gc.collect()
    raw = _mib_s(nbytes, t["raw"])
    row: dict[str, Any] = {"size_bytes": nbytes, "reps": reps, "raw_mib_s": raw, "same_values": same}
    for kind in ("send", "get", "move"):
        row[f"{kind}_mib_s"] = _mib_s(nbytes, t[kind])
        row[f"{kind}_ratio"] = row[f"{kind}_mib_s"] / raw
        row[f"{kind}_best_mib_s"] = nbytes / min(t[kind]) / MIB
    row["seconds"] = t
    return row


def has_max_message_flag() -> bool:
    out = subprocess.run([sys.executable, "-m", "fedsecure", "worker", "serve", "--help"],
                         capture_output=True, text=True, timeout=120)
    return "--max-message" in out.stdout


def size_name(nbytes: int) -> str:
    return f"{nbytes >> 30} GiB" if nbytes >= 1 << 30 else f"{nbytes >> 20} MiB"


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


def bench_broadcast(workers: int, nbytes: int, rounds: int) -> dict[str, Any]:
    """Milliseconds per ``send`` of one tensor to each of ``workers`` workers of one server,
    repeated content (named from the third send of a round) against new content each send."""
    server = WorkerServer()
    names = [f"w{i}" for i in range(workers)]
    for name in names:
        server.add(WorkerCore(name), callers={OWNER: ("client", "owner")})
    server.start()
    try:
        clients = [sy.connect(n, server.address, credentials=OWNER) for n in names]
        t: dict[str, list[float]] = {"full": [], "named": [], "fresh": []}
        same = True
        for _ in range(rounds):
            x = torch.rand(nbytes // 4)
            fresh = [torch.rand(nbytes // 4) for _ in clients]
            for kind, tensors in (("repeat", [x] * len(clients)), ("fresh", fresh)):
                pointers = []
                for i, (w, tensor) in enumerate(zip(clients, tensors, strict=True)):
                    t0 = time.perf_counter()
                    pointers.append(tensor.send(w))
                    spent = time.perf_counter() - t0
                    t["fresh" if kind == "fresh" else "full" if i < 2 else "named"].append(spent)
                same = same and all(torch.equal(p.get(), v) for p, v in zip(pointers, tensors, strict=True))
                del pointers
                for w in clients:
                    w.flush()
        named_held = server.kept.named
    finally:
        server.stop(1.0)
    ms = {k: statistics.median(v) * 1e3 for k, v in t.items()}
    per_round = {"repeat": 2 * ms["full"] + (workers - 2) * ms["named"], "fresh": workers * ms["fresh"]}
    return {"workers": workers, "size_bytes": nbytes, "rounds": rounds, "median_ms": ms,
            "round_ms": per_round, "round_ratio": per_round["repeat"] / per_round["fresh"],
            "named_sends": named_held, "same_values": same, "seconds": t}


def report(result: dict[str, Any]) -> None:
    m = result["machine"]
    print(f"transport on loopback  {result['date']}  python {m['python']}  torch {m['torch']}  "
          f"grpcio {m['grpcio']}  {m['cpu_count']} cpus")
    cfg = result["config"]
    print(f"\nlatency: one op that waits for its reply ({cfg['blocks']} blocks x {cfg['reps']} calls)")
    print(f"{'case':48} {'median us':>10} {'best us':>9}")
    for name, r in result["latency"].items():
        print(f"{name:48} {r['median_us']:10.1f} {r['best_us']:9.1f}")
    print(f"target: a + b against a worker process at most {TARGET_LATENCY_US:.0f} us: "
          f"{'met' if result['latency_target_met'] else 'NOT met'}")
    print(f"\npipelining: {cfg['pipeline_ops']} ops on a 4-float pointer, ops/s")
    print(f"{'worker':26} {'waiting':>8} {'in-place':>9} {'speedup':>8} {'new ptrs':>9} {'speedup':>8}  correct")
    for r in result["pipeline"]:
        print(f"{r['target']:26} {r['waiting_ops_s']:8.0f} {r['in_place_ops_s']:9.0f} {r['in_place_speedup']:7.1f}x "
              f"{fmt(r['new_pointer_ops_s'], '.0f'):>9} {fmt(r['new_pointer_speedup'], '.1f', 'x'):>8}  "
              f"{'yes' if r['correct'] else 'NO'}")
    print("(waiting: p = p + 1, each waits; in-place: p.add_(1) x N, then flush(); new ptrs: p = p + 1 "
          "with the client's pipelining on, then flush(); '-': this version cannot pipeline them)")
    print("\ntransfers: float32 tensors, MiB/s (median over reps), ratio = fedsecure / raw TCP")
    print(f"{'size':>8} {'reps':>4} {'raw TCP':>9} {'send':>8} {'ratio':>6} {'get':>8} {'ratio':>6} "
          f"{'move':>8} {'ratio':>6}  same")
    for r in result["transfers"]:
        if "skipped" in r:
            print(f"{size_name(r['size_bytes']):>8}  skipped: {r['skipped']}")
            continue
        print(f"{size_name(r['size_bytes']):>8} {r['reps']:4d} {r['raw_mib_s']:9.0f} "
              + " ".join(f"{r[k + '_mib_s']:8.0f} {r[k + '_ratio']:6.2f}" for k in ("send", "get", "move"))
              + f"  {'yes' if r['same_values'] else 'NO'}")
    print("peak memory: " + ", ".join(f"{k} {v:.0f} MiB" for k, v in result["peak_rss_mib"].items()))
    met = result["transfer_target_met"]
    print(f"target: send, get and move of {size_name(TARGET_SIZE)} at least {TARGET_RATIO:.0%} of raw TCP: "
          + ("not measured" if met is None else "met" if met else "NOT met"))
    b = result["broadcast"]
    print(f"\none tensor ({b['size_bytes'] / MIB:.2f} MiB) to {b['workers']} workers of one server, {b['rounds']} rounds, "
          "ms per send (median)")
    print(f"{'new content each send':28} {b['median_ms']['fresh']:7.2f}")
    print(f"{'same: the first two':28} {b['median_ms']['full']:7.2f}")
    print(f"{'same: named (kept frames)':28} {b['median_ms']['named']:7.2f}")
    print(f"a round's sends: {b['round_ms']['repeat']:.1f} ms against {b['round_ms']['fresh']:.1f} ms "
          f"({b['round_ratio']:.2f}x); named sends {b['named_sends']}; same values: {'yes' if b['same_values'] else 'NO'}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 and 10 MiB, few repetitions (a smoke test)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "transport.json")
    args = parser.parse_args(argv)
    if args.quick:
        blocks, reps, pipeline_ops, sizes = 6, 100, 1000, {1 * MIB: 10, 10 * MIB: 5}
    else:
        blocks, reps, pipeline_ops, sizes = 20, 200, 10_000, {1 * MIB: 30, 100 * MIB: 7, 1 << 30: 3}
    # the largest tensor and its message's header; older versions allow only 1 GiB by default
    need = max(sizes) + MIB
    big_ok = need <= DEFAULT_MAX_MESSAGE or has_max_message_flag()
    extra = ["--max-message", str(need)] if need > DEFAULT_MAX_MESSAGE and big_ok else []
    opts: dict[str, Any] = {"deadline": 600.0, **({"max_message": need} if extra else {})}

    hook = sy.TorchHook(torch)
    result: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {
            "python": platform.python_version(), "torch": torch.__version__, "grpcio": grpc.__version__,
            "fedsecure": sy.__version__, "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        },
        "config": {"quick": args.quick, "blocks": blocks, "reps": reps, "pipeline_ops": pipeline_ops,
                   "sizes": {str(k): v for k, v in sizes.items()}, "worker_args": extra,
                   "default_max_message": DEFAULT_MAX_MESSAGE},
        "targets": {"latency_us": TARGET_LATENCY_US, "transfer_ratio": TARGET_RATIO, "at_bytes": TARGET_SIZE},
    }
    with contextlib.ExitStack() as stack:
        sink = RawSink()
        stack.callback(sink.close)
        echo = GrpcEcho()
        stack.callback(echo.close)
        bob_proc = stack.enter_context(sy.WorkerProcess(
            "bob", clients={"owner": OWNER}, peer_tokens={"alice": PEER}, extra=extra))
        alice_proc = stack.enter_context(sy.WorkerProcess(
            "alice", clients={"owner": OWNER}, token=PEER, peers={"bob": bob_proc.address}, extra=extra))
        bob, alice = bob_proc.connect(OWNER, **opts), alice_proc.connect(OWNER, **opts)
        server = WorkerServer(WorkerCore("carol"), callers={OWNER: ("client", "owner")}).start()
        stack.callback(server.stop, 1.0)
        workers = {
            "worker process": bob,
            "in-process WorkerServer": sy.connect("carol", server.address, credentials=OWNER),
            "VirtualWorker (no network)": sy.VirtualWorker(hook, id="dave"),
        }
        result["latency"] = bench_latency(workers, sink, echo, blocks, reps)
        result["pipeline"] = [bench_pipeline(n, w, pipeline_ops) for n, w in workers.items()]
        result["transfers"] = []
        for nbytes, n in sizes.items():
            if nbytes + MIB > DEFAULT_MAX_MESSAGE and not big_ok:
                why = f"`worker serve` has no --max-message; the limit is {size_name(DEFAULT_MAX_MESSAGE)}"
                result["transfers"].append({"size_bytes": nbytes, "skipped": why})
                continue
            try:
                result["transfers"].append(bench_transfer(nbytes, n, alice, bob, sink))
            except sy.FedsecureError as exc:
                result["transfers"].append({"size_bytes": nbytes, "skipped": f"{type(exc).__name__}: {exc}"})
        result["broadcast"] = bench_broadcast(*((6, 6400 << 10, 2) if args.quick else (20, 6400 << 10, 10)))
    # ru_maxrss is in KiB; the children's is the largest worker's, known once they have exited
    result["peak_rss_mib"] = {"client": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                              "largest worker": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}
    process_us = result["latency"]["a + b, worker process"]["median_us"]
    result["latency_target_met"] = process_us <= TARGET_LATENCY_US
    at_target = [r for r in result["transfers"] if r["size_bytes"] == TARGET_SIZE and "skipped" not in r]
    result["transfer_target_met"] = (
        all(r[f"{k}_ratio"] >= TARGET_RATIO for r in at_target for k in ("send", "get", "move"))
        if at_target else None
    )
    report(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
