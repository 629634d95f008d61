"""Where an experiment's workers run, as ``[workers] mode`` says: the same run in every mode.

``local`` builds one `VirtualWorker` per partition in this process (each holds its share as its
private data, trusting only the aggregator and the share holders); ``processes`` hosts the owners
in worker processes on this machine (`Simulation`); ``ray`` hosts them in the actors of a Ray
cluster (`fedsecure.experiment.ray_hosts.RaySimulation`); ``remote`` connects to worker servers that
hold their data themselves. Either way the model owner keeps only the test set.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedsecure.aggregate.identity import generate_federation
from fedsecure.data import Dataset
from fedsecure.experiment.config import Experiment
from fedsecure.experiment.owners import MODEL_OWNER, owner_id, shares_of
from fedsecure.experiment.ray_hosts import RaySimulation
from fedsecure.experiment.simulation import Simulation, owner_device
from fedsecure.fl import ConfigurationError
from fedsecure.transport.certs import load_secagg_ids
from fedsecure.transport.grpc import TLS, connect
from fedsecure.worker.client import WorkerClient
from fedsecure.worker.labels import Policy
from fedsecure.worker.secure import SecAggIdentity
from fedsecure.worker.virtual import Federation, VirtualWorker


@dataclass(slots=True)
class Federated:
    workers: list[WorkerClient]
    aggregator: WorkerClient | None
    parallelism: int
    groups: dict[str, int] | None = None  # workers sharing a process train one after the other
    holders: list[WorkerClient] = field(default_factory=list)  # share holders ("shares" mode)
    secagg_ids: dict[str, int] | None = None  # each owner's id in the secure aggregation PKI
    where: str = ""  # where the owners train, in words, for the run's first lines


def makes_shares_here(exp: Experiment) -> bool:
    """Whether this process makes the owners' shares from the data set it read (owners in this
    process, or a Ray run that ships the shares to its actors); host processes, actors and remote
    owners read their data themselves otherwise."""
    w = exp.config.workers
    return w.mode == "local" or (w.mode == "ray" and w.ship_data)


def start_workers(exp: Experiment, data: Dataset | None, parts: Sequence[np.ndarray],
                  stack: contextlib.ExitStack) -> Federated:
    """The experiment's workers; ``stack`` stops the worker processes it starts. ``data``: the data
    set as read here, needed where `makes_shares_here` (a Ray run reads it again without it)."""
    w = exp.config.workers
    if w.mode == "local":
        if data is None:
            raise ValueError("owners in this process are made from the data set: pass it")
        return local_workers(exp, data, parts)
    if w.mode == "remote":
        return remote_workers(exp)
    common: dict[str, Any] = {
        "aggregator": w.aggregator, "share_holders": exp.secure.share_holders, "strict": w.strict,
        "consistency_check": exp.secure.consistency_check, "sizes": [len(p) for p in parts],
    }
    if w.mode == "ray":  # torch uses each actor's CPUs
        ray_sim = stack.enter_context(RaySimulation(
            exp, actors=w.actors, address=w.address, num_cpus=w.num_cpus, num_gpus=w.num_gpus, ship_data=w.ship_data,
            threads=w.threads, concurrency=w.concurrency, dataset=data, **common))
        gpus = f" and {w.num_gpus:g} GPU{'' if w.num_gpus == 1 else 's'}" if w.num_gpus else ""
        nodes = len(set(ray_sim.nodes))
        sim: Simulation = ray_sim
        hosts = (f"{counted(sim.processes, 'Ray actor')} of {w.num_cpus:g} CPU{'' if w.num_cpus == 1 else 's'}{gpus} "
                 f"on {counted(nodes, 'node')}")
    else:
        sim = stack.enter_context(Simulation(exp, processes=w.processes or os.cpu_count() or 1, threads=w.threads or 1,
                                             concurrency=w.concurrency, **common))
        hosts = f"{counted(sim.processes, 'host process', 'host processes')}"
    where = (f"{counted(sim.owners, 'owner')} in {hosts}, {sim.concurrency} training at a time in "
             f"{'it' if sim.processes == 1 else 'each'} with {counted(sim.threads, 'torch thread')}")
    return Federated(sim.workers, sim.aggregator, sim.processes, sim.groups, sim.share_holders, sim.secagg_ids,
                     where=where)


def counted(n: int, one: str, many: str | None = None) -> str:
    """``n`` and the word for one or for many ("1 node", "2 host processes")."""
    return f"{n} {one if n == 1 else (many or one + 's')}"


def local_workers(exp: Experiment, data: Dataset, parts: Sequence[np.ndarray]) -> Federated:
    w = exp.config.workers
    holders = exp.secure.share_holders
    served = list(dict.fromkeys([w.aggregator, *holders]))
    federation = Federation()
    owner_policy = Policy(trusted_aggregators=frozenset(served), private_sends=False)
    workers: list[WorkerClient] = []
    # The simulated owners' signing identities, made here: this run is every simulated owner's operator.
    ids = {owner_id(i): i + 1 for i in range(len(parts))} if exp.secure.consistency_check else None
    pki = generate_federation(ids.values()) if ids else {}
    device = owner_device(exp)
    for i in range(len(parts)):
        identity = SecAggIdentity(i + 1, pki[i + 1]) if ids else None
        workers.append(VirtualWorker(id=owner_id(i), data=shares_of(exp, data, parts, i), policy=owner_policy,
                                     federation=federation, secagg_identity=identity, device=device))
    servers = {n: VirtualWorker(id=n, policy=Policy(strict=w.strict), federation=federation) for n in served}
    return Federated(workers, servers[w.aggregator], w.parallelism or 1,
                     holders=[servers[h] for h in holders], secagg_ids=ids,
                     where=f"{counted(len(workers), 'owner')} in this process, {w.parallelism or 1} training at a time")


def _credentials(exp: Experiment) -> str | TLS:
    w = exp.config.workers
    if (w.token is None) == (w.tls_dir is None):
        raise ConfigurationError(f"{exp.source}: remote workers need one of [workers] token or tls_dir")
    return TLS.from_dir(exp.path(w.tls_dir), MODEL_OWNER) if w.tls_dir else str(w.token)


def _secagg_ids(exp: Experiment) -> dict[str, int] | None:
    """Each owner's id in the federation's signing PKI, for the consistency check."""
    if not exp.secure.consistency_check:
        return None
    pki = exp.config.workers.secagg_pki
    if pki is None:
        raise ConfigurationError(f"{exp.source}: consistency_check in remote mode needs [workers] secagg_pki, "
                                 "the federation's secagg.json (`fedsecure certs --secagg NAME ...`)")
    try:
        return load_secagg_ids(exp.path(pki))
    except ValueError as exc:
        raise ConfigurationError(f"{exp.source}: {exc}") from None


def remote_workers(exp: Experiment) -> Federated:
    w = exp.config.workers
    credentials = _credentials(exp)
    if not w.remote:
        raise ConfigurationError(
            f"{exp.source}: remote mode needs [[workers.remote]] tables, each with id and address"
        )
    if w.aggregator_address is None:
        raise ConfigurationError(f"{exp.source}: remote mode needs [workers] aggregator_address")
    workers: list[WorkerClient] = [connect(r.id, r.address, credentials=credentials, pipelined=False)
                                   for r in w.remote]
    aggregator = connect(w.aggregator, w.aggregator_address, credentials=credentials, pipelined=False)
    addresses = {w.aggregator: w.aggregator_address, **w.share_holder_addresses}
    missing = [h for h in exp.secure.share_holders if h not in addresses]
    if missing:
        raise ConfigurationError(f"{exp.source}: remote mode needs an address for the share holders {missing} in "
                                 "[workers.share_holder_addresses] (id = \"host:port\")")
    holders = [aggregator if h == w.aggregator else connect(h, addresses[h], credentials=credentials, pipelined=False)
               for h in exp.secure.share_holders]
    return Federated(workers, aggregator, w.parallelism or len(workers), holders=holders,
                     secagg_ids=_secagg_ids(exp))
