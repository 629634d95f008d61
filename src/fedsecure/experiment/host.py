"""Simulation hosts: processes forked by `zygote`, which `Simulation` starts (`serve` is also what
each Ray actor of `fedsecure.experiment.ray_hosts` runs). `Simulation` starts the zygote with
``python -c`` (`fedsecure.experiment.simulation.HOST_MAIN`) rather than ``python -m
fedsecure.experiment.host``: the package imports this module (through `ray_hosts`), and running an
imported module as ``__main__`` makes Python warn on every start.

The zygote reads the hosts' specs as JSON on stdin (the secret travels on a pipe, never on a
command line) and forks one host per spec. Each host loads the data set itself, keeps the shares
of the owners assigned to it as their private data, serves them all from one gRPC server (one
`WorkerCore` per owner), prints the address it listens on and serves until SIGTERM or until its
zygote is gone; the zygote stops the hosts when the run that started it is gone (a killed run
leaves no host serving).

Forked, the hosts share what the zygote imported (torch, gRPC, fedsecure), memory that a fresh
process writes as it imports them, until one of them writes to it. `benchmarks/memory.py
--modes processes` (two hosts, 3,000 Fashion-MNIST images, McMahan's CNN), alternating runs with
the hosts started as processes of their own: the tree's peak PSS 844 and 860 MB then, 737 and
732 MB forked, at the same time per round. The zygote runs nothing that starts a thread of its
own (no torch operation, no gRPC channel), so that forking it is safe; numpy's OpenBLAS, which
starts its pool at import, stops and restarts it around a fork itself (tests/test_memory.py trains
in forked hosts).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedsecure.aggregate.identity import SigningIdentity
from fedsecure.experiment.config import Experiment, parse
from fedsecure.experiment.owners import MODEL_OWNER, owner_id, shares_of
from fedsecure.experiment.simulation import FAILED, LISTENING, token_for
from fedsecure.fl import ConfigurationError
from fedsecure.transport.grpc import WorkerServer
from fedsecure.worker.core import WorkerCore
from fedsecure.worker.labels import Policy
from fedsecure.worker.secure import SecAggIdentity


def _identity(secagg: Mapping[str, Any] | None, name: str) -> SecAggIdentity | None:
    """Owner ``name``'s signing identity for the consistency check, when the run uses it."""
    if not secagg:
        return None
    verify = {int(cid): bytes.fromhex(key) for cid, key in secagg["verify"].items()}
    signing = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(secagg["keys"][name]))
    return SecAggIdentity(secagg["ids"][name], SigningIdentity(signing, verify))


def serve(spec: Mapping[str, Any], host: str = "127.0.0.1",
          shares: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> WorkerServer:
    """A host's owners, from its spec: their data, one worker core each, one server for all of them,
    listening on ``host`` and started (what a host process and a Ray actor host alike run).

    ``shares``: each owner's data by owner index (as text) and tag, as `shares_of` gives it, when
    the model owner's process sent them (a Ray actor with ``ship_data``); else the host loads the
    data set and partitions it itself."""
    torch.set_num_threads(int(spec["threads"]))
    exp = parse(spec["config"], base=Path(spec["base"]))
    peers: dict[str, str] = spec["peers"]
    owned = _shipped(spec["owners"], shares) if shares is not None else _loaded(exp, spec["owners"])
    policy = Policy(trusted_aggregators=frozenset(peers), private_sends=False)
    server = WorkerServer(host=host)
    for i in spec["owners"]:
        name = owner_id(i)
        core = WorkerCore(name, policy=policy, secagg_identity=_identity(spec.get("secagg"), name),
                          device=spec.get("device", "cpu"))
        for tag, tensor in owned.pop(i).items():
            core.load(tensor, (tag,))
        server.add(core, callers={spec["owner_token"]: ("client", MODEL_OWNER)},
                   peers=peers, token=token_for(spec["secret"], name))
    return server.start()


def _loaded(exp: Experiment, owners: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    """The owners' shares, from the data set as this host reads it."""
    data = exp.dataset()
    parts = exp.partitions(data)
    return {i: shares_of(exp, data, parts, i) for i in owners}


def _shipped(owners: list[int], shares: Mapping[str, Mapping[str, np.ndarray]]) -> dict[int, dict[str, torch.Tensor]]:
    """The owners' shares as sent, each a tensor of its own (the arrays as received may be read-only
    views of Ray's object store)."""
    if sorted(shares) != sorted(str(i) for i in owners):
        raise ConfigurationError(f"the shares sent are those of owners {sorted(shares)}, this host serves {owners}")
    return {i: {tag: torch.from_numpy(np.array(a)) for tag, a in shares[str(i)].items()} for i in owners}


_STOPS = {signal.SIGTERM, signal.SIGINT}
POLL_S = 0.1
"""How often a host looks whether it was told to stop or lost its zygote, and the zygote whether it
lost the process that started it. Python runs a signal's handler only once the main thread wakes,
so a SIGTERM that the kernel gives one of gRPC's threads leaves a main thread that waits with no
timeout waiting for good (tests/test_memory.py sends one so). In one test run a host outlived its
run by minutes, its main thread waiting on a lock with no timeout, and held the pipe that the
run's caller read to its end; a host whose zygote was killed had no one left to stop it."""
GRACE_S = 2.0  # what a host's calls in flight get to finish when it stops
STOP_S = 5.0  # how much longer a host waits for its server to stop


def host(spec: Mapping[str, Any], index: int) -> None:
    """A host process: serves its owners (`serve`), prints its address, and serves until SIGTERM,
    SIGINT or the end of its zygote (killed, it could not pass a stop on)."""
    zygote = os.getppid()
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOPS)  # blocked by the zygote while it forks
    server = serve(spec)
    # One write (shorter than a pipe's atomic size): the hosts share the zygote's stdout, and print's
    # separate write of the newline would let another host's line fall between.
    sys.stdout.write(f"simulation host {index} {LISTENING}{server.address}\n")
    sys.stdout.flush()
    while not stopping.wait(POLL_S) and os.getppid() == zygote:
        pass
    # calls in flight get GRACE_S; a server whose stop never ends does not keep the host
    stop = threading.Thread(target=server.stop, args=(GRACE_S,), daemon=True)
    stop.start()
    stop.join(GRACE_S + STOP_S)
    if stop.is_alive():
        sys.stderr.write(f"simulation host {index}: its server did not stop within {GRACE_S + STOP_S:g} s; "
                         "the host ends without it\n")


def zygote(specs: list[Mapping[str, Any]]) -> int:
    """Fork one host per spec; forward SIGTERM and SIGINT to them, and a SIGTERM when the process
    that started this one ends (killed, a run cannot stop its hosts); wait for all; the exit status
    (0 where every host stopped cleanly)."""
    owner = os.getppid()
    gc.collect()
    gc.freeze()  # the imports' objects: a collection in a host would write to (so copy) their pages
    children: list[int] = []
    # A stop that comes while the hosts are forked waits until each process has its handler.
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS)
    for index, spec in enumerate(specs):
        try:
            pid = os.fork()
        except OSError:  # no process left to make: the hosts made so far stop too
            for made in children:
                os.kill(made, signal.SIGKILL)
            raise
        if pid == 0:  # the host
            status = 0
            try:
                host(spec, index)
            except BaseException:  # noqa: BLE001  said on stderr, as a process of its own would
                traceback.print_exc()
                status = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
        children.append(pid)

    def forward(signum: int, _frame: Any) -> None:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOPS)
    failed, left, orphaned = 0, set(children), False
    while left:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:  # none ended: the process that started this one (the run) may have
            if not orphaned and os.getppid() != owner:
                orphaned = True
                forward(signal.SIGTERM, None)
            time.sleep(POLL_S)
            continue
        left.discard(pid)
        if status != 0:  # said at once: `Simulation` waits for every host's line
            sys.stdout.write(f"simulation host {children.index(pid)} {FAILED}{os.waitstatus_to_exitcode(status)}\n")
            sys.stdout.flush()
            failed = 1
    return failed


def main() -> None:
    """The zygote's body: the hosts' specs from stdin (a JSON list), then `zygote`."""
    sys.exit(zygote(json.loads(sys.stdin.read())))
