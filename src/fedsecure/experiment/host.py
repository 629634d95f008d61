"""A simulation host: a process that runs `main`, started by `Simulation` (`serve` is also what each
Ray actor of `fedsecure.experiment.ray_hosts` runs). `Simulation` starts it with ``python -c``
(`fedsecure.experiment.simulation.HOST_MAIN`) rather than ``python -m fedsecure.experiment.host``:
the package imports this module (through `ray_hosts`), and running an imported module as
``__main__`` makes Python warn on every start.

It reads its spec as JSON on stdin (the secret travels on a pipe, never on a command line), loads
the data set itself, keeps the shares of the owners assigned to it as their private data, serves
them all from one gRPC server (one `WorkerCore` per owner), prints the address it listens on and
serves until SIGTERM.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedsecure.aggregate.identity import SigningIdentity
from fedsecure.experiment.config import Experiment, parse
from fedsecure.experiment.owners import MODEL_OWNER, owner_id, shares_of
from fedsecure.experiment.simulation import LISTENING, token_for
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


def host(spec: Mapping[str, Any]) -> None:
    """A host process: serves its owners (`serve`), prints its address, and serves until SIGTERM."""
    server = serve(spec)
    print(f"simulation host {LISTENING}{server.address}", flush=True)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    stopping.wait()
    server.stop(2.0)


def main() -> None:
    """A host process's body: its spec from stdin (as JSON), then `host`."""
    host(json.loads(sys.stdin.read()))
