"""Simulation in worker processes: many data owners on one machine, every core busy.

`Simulation` starts ``processes`` host processes, forked by one process that imported what they
run (`fedsecure.experiment.host.zygote`: they share those pages until they write to them); each
loads the data set itself, keeps the shares of the owners assigned to it (balanced by the shares'
sizes, `assign`) as those owners' private data, and serves them all from one gRPC server, one
`WorkerCore` per owner, with torch limited to ``threads`` threads so that the hosts do not
oversubscribe the cores. The aggregator is served from this process. The engine then drives
the hosted owners exactly as it drives remote workers (`fedsecure.connect`): the global model
goes to each owner, the owner trains in its host, the trained model moves from the host to the
aggregator, and this process receives only the aggregate. Each host trains ``concurrency`` of its
owners at a time (default 1), each in a thread of its own, the others waiting their turn: so
``processes * concurrency`` owners train at a time, and a host that trains several at once costs
one process's memory (one torch, the data set loaded once) instead of one each.

Every owner has its own token (derived from a random secret of the run), so the aggregator knows
which owner each moved update comes from; everything listens on loopback only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from fedsecure.aggregate.identity import generate_federation
from fedsecure.experiment.config import DEFAULT_AGGREGATOR, Experiment, parse
from fedsecure.experiment.owners import MODEL_OWNER, owner_id
from fedsecure.fl import ConfigurationError
from fedsecure.transport.grpc import WorkerServer, connect
from fedsecure.worker import heap
from fedsecure.worker.client import WorkerClient
from fedsecure.worker.core import WorkerCore
from fedsecure.worker.device import DeviceError, resolve
from fedsecure.worker.labels import Policy

LISTENING = "listening on "  # the line a host prints when it serves, before its address
HOST_MAIN = "from fedsecure.experiment.host import main; main()"  # the hosts' zygote (python -c)
FAILED = "stopped with exit status "  # the zygote's line for a host that failed
_READY = re.compile(r"simulation host (\d+) " + LISTENING + r"(\S+)")  # a host's line, its index and address
_FAILED = re.compile(r"simulation host (\d+) " + FAILED + r"(-?\d+)")

def assign(sizes: list[int], processes: int) -> list[int]:
    """The host of each owner: largest shares first, each to the host with the least data so far
    (the longest-processing-time rule), so that the hosts finish a round at about the same time."""
    load = [0] * processes
    host = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        p = min(range(processes), key=lambda p: (load[p], p))
        host[i] = p
        load[p] += sizes[i]
    return host


def owner_device(exp: Experiment) -> str:
    """Where the simulated owners train (``[workers] device``, "auto" resolved on this machine),
    checked here, before any worker starts."""
    try:
        return str(resolve(exp.config.workers.device))
    except DeviceError as exc:
        raise ConfigurationError(f"{exp.source}: [workers] {exc}") from None


def token_for(secret: str, name: str) -> str:
    return hmac.new(secret.encode(), name.encode(), hashlib.sha256).hexdigest()


class Simulation:
    """``with Simulation(config, processes=2) as sim: fl.fit(model, sim.workers, ...,
    aggregator=sim.aggregator, groups=sim.groups)``; ``config`` is an `Experiment`, or an
    experiment file's tables (its ``[data]`` section says what each owner holds)."""

    bind = "127.0.0.1"  # where the aggregator listens for the hosts' moves

    def __init__(
        self,
        config: Experiment | Mapping[str, Any],
        *,
        processes: int = 2,
        threads: int = 1,
        concurrency: int = 1,
        aggregator: str = DEFAULT_AGGREGATOR,
        share_holders: Sequence[str] = (),
        consistency_check: bool = False,
        strict: bool = True,
        sizes: list[int] | None = None,
        startup_timeout: float = 120.0,
    ) -> None:
        if processes < 1 or threads < 1 or concurrency < 1:
            raise ConfigurationError(f"processes, threads and concurrency must be >= 1, got {processes}, {threads} "
                                     f"and {concurrency}")
        self.experiment = config if isinstance(config, Experiment) else parse(config)
        self.owners = self.experiment.config.data.workers
        self.device = self._owner_device()
        self.processes = min(processes, self.owners)
        self.threads = threads
        self.concurrency = concurrency
        if sizes is not None and len(sizes) != self.owners:
            raise ConfigurationError(f"{len(sizes)} share sizes for {self.owners} owners")
        self.sizes = sizes or [1] * self.owners
        self.hosts = assign(self.sizes, self.processes)
        self.aggregator_id = aggregator
        # the workers served from this process: the aggregator, and share holders ("shares" mode)
        self.served = list(dict.fromkeys([aggregator, *share_holders]))
        self.holder_ids = list(share_holders)
        # With the consistency check, each owner's signing key (made here: this run operates every
        # simulated owner) goes to its host on the pipe; the PKI's public half to all of them.
        self.secagg_ids = {owner_id(i): i + 1 for i in range(self.owners)} if consistency_check else None
        self._pki = generate_federation(self.secagg_ids.values()) if self.secagg_ids else {}
        self.strict = strict
        self.timeout = startup_timeout
        self.secret = secrets.token_hex(32)
        self.owner_token = secrets.token_urlsafe(32)
        self._hosts: list[subprocess.Popen[str]] = []
        self._server: WorkerServer | None = None
        self.workers: list[WorkerClient] = []
        self.aggregator: WorkerClient | None = None
        self.share_holders: list[WorkerClient] = []
        self.groups: dict[str, int] = {}

    def _owner_device(self) -> str:
        """Where the owners train, resolved on this machine, which runs the hosts."""
        return owner_device(self.experiment)

    def start(self) -> Simulation:
        names = [owner_id(i) for i in range(self.owners)]
        callers = {self.owner_token: ("client", MODEL_OWNER)}
        callers.update({token_for(self.secret, n): ("peer", n) for n in names})
        self._server = WorkerServer(host=self.bind)
        for name in self.served:
            self._server.add(WorkerCore(name, policy=Policy(strict=self.strict)), callers=callers,
                             token=token_for(self.secret, name))
        self._server.start()
        try:
            addresses = self._start_hosts()
        except BaseException:
            self.stop()
            raise
        for i, name in enumerate(names):
            host = self.hosts[i]
            self.workers.append(self._owner(name, host, addresses[host]))
        self.groups = {names[i]: g for i, g in enumerate(self._lanes())}
        served = {name: connect(name, self._server.address, credentials=self.owner_token, pipelined=False)
                  for name in self.served}
        self.aggregator = served[self.aggregator_id]
        self.share_holders = [served[name] for name in self.holder_ids]
        return self

    def _lanes(self) -> list[int]:
        """Each owner's lane: the owners that train one after the other (``fl.fit``'s groups). A
        host's owners share ``concurrency`` lanes, balanced by size as the hosts are (`assign`)."""
        lanes = [0] * self.owners
        for p in range(self.processes):
            owners = self.owners_on(p)
            for i, lane in zip(owners, assign([self.sizes[i] for i in owners], self.concurrency), strict=True):
                lanes[i] = p * self.concurrency + lane
        return lanes

    def _start_hosts(self) -> list[str]:
        """Start the hosts, forked by one process that imported what they run (`host.zygote`); the
        address where each serves its owners."""
        self._hosts.append(self._spawn([self.host_spec(p) for p in range(self.processes)]))
        return self._addresses(self._hosts[0])

    def _owner(self, name: str, host: int, address: str) -> WorkerClient:
        """The model owner's handle on owner ``name``, served by host ``host`` at ``address``."""
        return connect(name, address, credentials=self.owner_token, pipelined=False)

    def owners_on(self, p: int) -> list[int]:
        """The indices of the owners host ``p`` serves."""
        return [i for i in range(self.owners) if self.hosts[i] == p]

    def host_spec(self, p: int) -> dict[str, Any]:
        """What host ``p`` starts from: the experiment, its owners, the secret their tokens derive
        from, where the aggregator listens (and, with the consistency check, its owners' keys)."""
        assert self._server is not None
        return {
            "config": self.experiment.tables(),
            "base": str(self.experiment.base),
            "owners": self.owners_on(p),
            "threads": self.threads,
            "device": self.device,
            "secret": self.secret,
            "owner_token": self.owner_token,
            "peers": {name: self._server.address for name in self.served},
            "secagg": None if self.secagg_ids is None else {
                "ids": self.secagg_ids,
                "keys": {owner_id(i): self._pki[i + 1].signing_key.private_bytes_raw().hex()
                         for i in range(self.owners) if self.hosts[i] == p},
                "verify": {str(cid): self._pki[cid].signing_key.public_key().public_bytes_raw().hex()
                           for cid in self.secagg_ids.values()},
            },
        }

    def _spawn(self, specs: list[dict[str, Any]]) -> subprocess.Popen[str]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(self.threads),
               **heap.arena_limit(self.concurrency)}
        proc = subprocess.Popen([sys.executable, "-c", HOST_MAIN], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=None, text=True, env=env)
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(specs))
        proc.stdin.close()  # the secret travels on a pipe, never on a command line
        return proc

    def _addresses(self, proc: subprocess.Popen[str]) -> list[str]:
        """Each host's address, from the lines its hosts print (in the order they are ready)."""
        assert proc.stdout is not None
        found: dict[int, str] = {}
        failed: list[tuple[str, str]] = []

        def read() -> None:
            for line in proc.stdout:  # type: ignore[union-attr]
                found.update((int(p), address) for p, address in _READY.findall(line))
                failed.extend(_FAILED.findall(line))
                if len(found) == self.processes or failed:
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(self.timeout)
        if failed:
            p, status = failed[0]
            raise ConfigurationError(f"simulation host {p} stopped with exit status {status} as it started; "
                                     "its error is above")
        if len(found) < self.processes:
            missing = sorted(set(range(self.processes)) - set(found))
            raise ConfigurationError(
                f"simulation host{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} did not start "
                f"within {self.timeout:g} s (exit code {proc.poll()}); the error is above"
            )
        return [found[p] for p in range(self.processes)]

    def stop(self) -> None:
        for proc in self._hosts:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self._hosts:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        self._hosts = []
        if self._server is not None:
            self._server.stop(1.0)
            self._server = None

    def __enter__(self) -> Simulation:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
