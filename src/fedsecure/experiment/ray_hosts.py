"""Simulation on a Ray cluster: the data owners hosted in Ray actors, several owners per actor.

`RaySimulation` is `Simulation` with Ray actors where `Simulation` starts host processes. Each
actor loads the data set itself (once, when it starts), or with ``ship_data`` receives just its
owners' shares, read and partitioned in this process and put once into Ray's object store (for
a data set that only this machine can read); it keeps the shares of the owners assigned to it
as their private data, serves them from one gRPC server (`fedsecure.experiment.host.serve`, the
code a host process runs) and tells the model owner its address. The aggregator stays in this
process; trained models move from an actor straight to it, and this process receives only the
aggregate. As with processes, every owner has its own token, derived from a secret of the run that
reaches the actors as an argument (never on a command line).

Where things listen: when the cluster's nodes all run on this machine (a local Ray, which
`RaySimulation` starts and stops itself when given no address), everything listens on loopback;
otherwise each actor listens on its node's address (``ray.util.get_node_ip_address()``) and the
aggregator on this node's. Requests carry tokens but are not encrypted: run a multi-machine
simulation on a private network, as its operator runs every simulated owner anyway.

When an actor dies (its process, or its node), the requests in flight to its owners fail, and the
engine records those owners as failures of the round (`fedsecure.fl.Failure`). Ray restarts the
actor at once, on any node with room for it; the restarted actor loads its owners' data again and
serves them at a new address. The model owner's handle on each owner (`_OwnerTransport`) notices:
the failure's message says what became of the actor, and the owner's next request waits for the
restart (at most ``startup_timeout`` seconds) and then goes to the new address, so the owners take
part again from their next request on, at the latest from the next round.

Ray is an optional dependency (``pip install 'fedsecure[ray]'``): this module imports it only when
a simulation starts, so that ``import fedsecure`` never does.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from typing import Any, NoReturn

from fedsecure.data import Dataset
from fedsecure.errors import DatasetNotFound, WorkerUnavailable
from fedsecure.experiment.config import Experiment
from fedsecure.experiment.host import serve
from fedsecure.experiment.local_ray import start_local_ray
from fedsecure.experiment.owners import shares_of
from fedsecure.experiment.simulation import Simulation, assign
from fedsecure.fl import ConfigurationError
from fedsecure.transport.grpc import GrpcTransport
from fedsecure.worker import heap
from fedsecure.worker.client import WorkerClient

INSTALL = "pip install 'fedsecure[ray]'"
LOOPBACK = "127.0.0.1"
ASK_S = 10.0  # seconds to ask a live actor where it serves (it answers in milliseconds)
RETRY_S = 1.0  # seconds a request waits for an actor that already failed to come back once


def import_ray() -> Any:
    """The ``ray`` module, or a `ConfigurationError` saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise ConfigurationError(f'[workers] mode = "ray" needs Ray, which is not installed here ({exc}): '
                                 f"{INSTALL}") from None
    return ray


class OwnerHost:
    """The body of one Ray actor (``ray.remote(OwnerHost)`` at run time): its owners served from one
    server on ``bind`` (None: its node's address), as a host process serves them."""

    def __init__(self, spec: Mapping[str, Any], bind: str | None, shares: Mapping[str, Any] | None = None) -> None:
        import ray

        self._instance = os.urandom(8).hex()  # this start of the actor (Ray may restart it at the same address)
        try:
            self._server = serve(spec, bind or ray.util.get_node_ip_address(), shares)
        except DatasetNotFound as exc:  # the path is the model owner's, read on this actor's node
            raise DatasetNotFound(f"{exc} (on Ray node {ray.get_runtime_context().get_node_id()}); a data set that "
                                  "only the model owner's machine can read reaches the actors with [workers] "
                                  "ship_data = true") from None

    def where(self) -> tuple[str, str]:
        """Where it serves, and which start of the actor serves there."""
        return self._server.address, self._instance

    def node(self) -> str:
        """The id of the Ray node this actor runs on."""
        import ray

        return str(ray.get_runtime_context().get_node_id())


class _Host:
    """One actor as the model owner sees it: where it serves now (and which start of it), and a
    transport to each of its owners there. After a request failed, the next one first asks the
    actor where it serves and waits for it to run again. A restarted actor gets new transports,
    also where it serves at the old address (its port free again): in one test run whose restarted
    actor did, the old transports' requests of the next round all failed at once."""

    def __init__(self, index: int, actor: Any, where: tuple[str, str], token: str, timeout: float) -> None:
        self.index, self.actor = index, actor
        self.address, self._instance = where
        self._token, self._timeout = token, timeout
        self._transports: dict[str, GrpcTransport] = {}
        self._check = False  # a request failed: ask the actor where it is before the next one
        self._waited = False  # ... and it did not come back within the timeout last time
        self._lock = threading.Lock()

    def transport(self, name: str) -> GrpcTransport:
        with self._lock:
            if self._check:
                self._find(name)
            transport = self._transports.get(name)
            if transport is None:
                transport = self._transports[name] = GrpcTransport(name, self.address, token=self._token)
            return transport

    def _ask(self, timeout: float) -> tuple[str, str]:
        ray = import_ray()
        address, instance = ray.get(self.actor.where.remote(), timeout=timeout)
        return str(address), str(instance)

    def _find(self, name: str) -> None:
        """Wait for the actor to serve again (its address may be new); else a `WorkerUnavailable`."""
        ray = import_ray()
        restarting = getattr(ray.exceptions, "ActorUnavailableError", ())
        wait = RETRY_S if self._waited else self._timeout
        deadline = time.monotonic() + wait
        while True:
            try:
                where = self._ask(max(deadline - time.monotonic(), 0.1))
                break
            except restarting:
                if time.monotonic() >= deadline:
                    self._gone(name, wait)
                time.sleep(0.2)
            except ray.exceptions.GetTimeoutError:
                self._gone(name, wait)
            except ray.exceptions.RayActorError as exc:
                raise WorkerUnavailable(f"worker {name!r}: the Ray actor hosting it (actor {self.index}) died and "
                                        f"cannot be restarted: {_reason(exc)}") from None
        if where[1] != self._instance:  # restarted, maybe at the same address (a port free again)
            (self.address, self._instance), self._transports = where, {}  # the old channels close when dropped
        self._check = self._waited = False

    def _gone(self, name: str, waited: float) -> NoReturn:
        self._waited = True
        raise WorkerUnavailable(f"worker {name!r}: the Ray actor hosting it (actor {self.index}) is not serving "
                                f"again after {waited:g} s; Ray restarts it once a node has room for it")

    def lost(self, name: str, exc: WorkerUnavailable) -> WorkerUnavailable:
        """The error for a request to ``name`` that failed with ``exc``: what became of the actor."""
        ray = import_ray()
        restarting = getattr(ray.exceptions, "ActorUnavailableError", ())
        try:
            address, instance = self._ask(ASK_S)
        except ray.exceptions.GetTimeoutError:
            what = f"does not answer Ray within {ASK_S:g} s"
        except restarting:
            what = "died, and Ray is restarting it (its owners' next requests wait for it)"
        except ray.exceptions.RayActorError as err:
            what = f"died ({_reason(err)})"
        else:
            if instance == self._instance:
                return exc  # it runs as it ran: the request itself failed (a deadline, say)
            what = f"died, and Ray restarted it at {address} without what it held"
        with self._lock:
            self._check = True
        return WorkerUnavailable(f"{exc}; the Ray actor hosting {name!r} (actor {self.index}) {what}")


def _reason(exc: BaseException) -> str:
    """The last line of Ray's account of an actor's death (its traceback is in the log above)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1][:600] if lines else type(exc).__name__


class _OwnerTransport:
    """The transport to one owner: its actor's current address, followed across restarts."""

    takes_deadline = True

    def __init__(self, name: str, host: _Host) -> None:
        self.name, self.host = name, host

    def __call__(self, data: bytes, *, deadline: float | None = None) -> bytes:
        transport = self.host.transport(self.name)
        try:
            return transport(data, deadline=deadline)
        except WorkerUnavailable as exc:
            raise self.host.lost(self.name, exc) from None


class RaySimulation(Simulation):
    """``with RaySimulation(exp, actors=2) as sim: fl.fit(model, sim.workers, ..., aggregator=
    sim.aggregator, groups=sim.groups)``: the owners of ``exp`` (an `Experiment` or an experiment
    file's tables) in Ray actors of ``num_cpus`` CPUs and ``num_gpus`` GPUs each.

    ``address``: None starts a local Ray (stopped at the end); "auto" or a cluster's address joins
    that cluster (left running). A process already connected to Ray uses that connection.
    ``actors``: default, as many as the cluster's free CPUs (and GPUs) allow, at most one per owner.
    ``concurrency``: owners each actor trains at a time (default 1), each in a thread of its own;
    ``threads``: torch threads per actor (default: its CPUs shared among them, at least 1). An
    actor of 2 CPUs that trains 2 owners at a time uses the CPUs of 2 actors of 1 CPU and the
    memory of one process (one torch, the data set loaded once). ``ship_data``: each actor receives
    its owners' shares through Ray's object store instead of reading the data set on its node;
    ``dataset``: the experiment's data set as the caller has read it (read here otherwise). The
    other options are `Simulation`'s.
    """

    def __init__(
        self,
        config: Experiment | Mapping[str, Any],
        *,
        actors: int | None = None,
        address: str | None = None,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        threads: int | None = None,
        concurrency: int = 1,
        ship_data: bool = False,
        dataset: Dataset | None = None,
        **options: Any,
    ) -> None:
        if actors is not None and actors < 1:
            raise ConfigurationError(f"[workers] actors must be >= 1, got {actors}")
        if num_cpus <= 0 or num_gpus < 0:
            raise ConfigurationError(f"[workers] num_cpus must be > 0 and num_gpus >= 0, got {num_cpus} and {num_gpus}")
        super().__init__(config, processes=actors or 1, threads=threads or max(1, int(num_cpus) // max(concurrency, 1)),
                         concurrency=concurrency, **options)
        if num_gpus and self.device == "cpu":
            raise ConfigurationError(f"[workers] num_gpus = {num_gpus:g} gives each actor GPUs that its owners would "
                                     'not use: set [workers] device = "cuda" (or "auto")')
        self.requested, self.ray_address = actors, address
        self.num_cpus, self.num_gpus = num_cpus, num_gpus
        self.ship_data = ship_data
        self._dataset = dataset if ship_data else None  # what ship_data sends from, when the caller has read it
        self._shipped: list[Any] = []  # each actor's shares in Ray's object store, kept for its restarts
        self.actors = self.processes
        self.nodes: list[str] = []  # the Ray node each actor started on
        self._actors: list[Any] = []
        self._homes: list[_Host] = []
        self._ray: Any = None
        self._disconnect = False  # this simulation started Ray (a local one) or joined it (an address)

    def _owner_device(self) -> str:
        """``[workers] device`` as written: each actor resolves it on its own node."""
        return self.experiment.config.workers.device

    def start(self) -> RaySimulation:
        self._ray = ray = import_ray()
        try:
            self._join(ray)
            self.actors = self.processes = self._count(ray)
            self.hosts = assign(self.sizes, self.actors)
            self.bind = LOOPBACK if self._local(ray) else ray.util.get_node_ip_address()
            super().start()
        except BaseException:
            self.stop()
            raise
        return self

    def _join(self, ray: Any) -> None:
        if ray.is_initialized():
            return
        try:
            if self.ray_address is None:
                cpus = self.requested * self.num_cpus if self.requested else os.cpu_count() or 1
                # the actors' environment from the raylet's: a local Ray has no runtime_env (local_ray.py)
                start_local_ray(ray, max(1, round(cpus)), heap.arena_limit(self.concurrency))
            else:
                ray.init(address=self.ray_address, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"join the Ray cluster at {self.ray_address!r}" if self.ray_address else "start a local Ray"
            raise ConfigurationError(f"[workers] cannot {where}: {exc}") from None
        self._disconnect = True

    def _count(self, ray: Any) -> int:
        """The actors to start: as asked, else as many as the cluster's free resources allow."""
        if self.requested is not None:
            return min(self.requested, self.owners)
        free = ray.available_resources()
        fits = int(free.get("CPU", 0) // self.num_cpus)
        if self.num_gpus:
            fits = min(fits, int(free.get("GPU", 0) // self.num_gpus))
        if fits < 1:
            raise ConfigurationError(
                f"[workers] the Ray cluster has {free.get('CPU', 0):g} free CPUs and {free.get('GPU', 0):g} free GPUs, "
                f"and an actor needs {self.num_cpus:g} and {self.num_gpus:g}: lower num_cpus or num_gpus, or add nodes")
        return min(fits, self.owners)

    @staticmethod
    def _local(ray: Any) -> bool:
        """Whether every node of the cluster runs on this machine (then loopback reaches them)."""
        here = ray.util.get_node_ip_address()
        return all(n["NodeManagerAddress"] == here for n in ray.nodes() if n.get("Alive"))

    def _start_hosts(self) -> list[str]:
        ray = self._ray
        own = self._disconnect and self.ray_address is None  # a local Ray: the raylet's environment has it
        env = {} if own else heap.arena_limit(self.concurrency)  # read when the actor's process starts
        actor = ray.remote(OwnerHost).options(num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_restarts=-1,
                                              scheduling_strategy="SPREAD",
                                              runtime_env={"env_vars": env} if env else None)
        bind = LOOPBACK if self.bind == LOOPBACK else None
        self._shipped = self._ship(ray) if self.ship_data else [None] * self.actors
        self._actors = [actor.remote(self.host_spec(p), bind, self._shipped[p]) for p in range(self.actors)]
        try:
            wheres = [(str(a), str(i)) for a, i in ray.get([a.where.remote() for a in self._actors], timeout=self.timeout)]
            self.nodes = [str(n) for n in ray.get([a.node.remote() for a in self._actors], timeout=self.timeout)]
        except ray.exceptions.GetTimeoutError:
            raise ConfigurationError(
                f"[workers] {self.actors} Ray actors of {self.num_cpus:g} CPUs and {self.num_gpus:g} GPUs did not all "
                f"start within {self.timeout:g} s (the cluster has {ray.cluster_resources()}): lower actors, "
                "num_cpus or num_gpus") from None
        except ray.exceptions.RayActorError as exc:
            raise ConfigurationError(f"a Ray actor hosting owners failed to start: {_reason(exc)}") from None
        self._homes = [_Host(p, a, wheres[p], self.owner_token, self.timeout) for p, a in enumerate(self._actors)]
        return [address for address, _ in wheres]

    def _ship(self, ray: Any) -> list[Any]:
        """Each actor's shares, put once into Ray's object store: read and partitioned here, so that
        an actor (and one Ray restarts on another node) never needs the data set's path."""
        exp = self.experiment
        data = self._dataset if self._dataset is not None else exp.dataset()
        parts = exp.partitions(data)
        self._dataset = None  # not kept for the run
        return [ray.put({str(i): {tag: t.numpy() for tag, t in shares_of(exp, data, parts, i).items()}
                         for i in self.owners_on(p)})
                for p in range(self.actors)]

    def _owner(self, name: str, host: int, address: str) -> WorkerClient:
        client = WorkerClient(name, _OwnerTransport(name, self._homes[host]))
        client.framed = True  # gRPC carries large tensors beside the message, as `connect` sets it
        return client

    @property
    def addresses(self) -> list[str]:
        """Where each actor serves its owners now."""
        return [home.address for home in self._homes]

    def stop(self) -> None:
        ray = self._ray
        for actor in self._actors:
            ray.kill(actor, no_restart=True)
        self._actors, self._homes, self._shipped = [], [], []
        super().stop()
        if self._disconnect:
            ray.shutdown()  # stops a local Ray; only disconnects from a cluster that was joined
            self._disconnect = False

    def __enter__(self) -> RaySimulation:
        return self.start()
