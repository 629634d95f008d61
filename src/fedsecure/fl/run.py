"""Run an `Experiment`: build its data owners, aggregator, model and strategy, then train.

``local`` mode builds one `VirtualWorker` per partition in this process (each holds its share as
its private data, trusting only the aggregator); ``remote`` mode connects to worker servers that
hold their data themselves. Either way the model owner keeps only the test set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np
import torch

from fedsecure.aggregate.identity import generate_federation
from fedsecure.data import Dataset, partition_summary
from fedsecure.fl.config import Experiment
from fedsecure.fl.engine import Engine
from fedsecure.fl.history import History
from fedsecure.fl.models import build_model
from fedsecure.fl.progress import Progress
from fedsecure.fl.simulation import Simulation, owner_id
from fedsecure.fl.strategy import ConfigurationError
from fedsecure.worker.client import WorkerClient
from fedsecure.worker.labels import Policy
from fedsecure.worker.secure import SecAggIdentity
from fedsecure.worker.virtual import Federation, VirtualWorker


@dataclass(slots=True)
class Federated:
    workers: list[WorkerClient]
    aggregator: WorkerClient
    parallelism: int
    groups: dict[str, int] | None = None  # workers sharing a process train one after the other
    holders: list[WorkerClient] = field(default_factory=list)  # share holders ("shares" mode)
    secagg_ids: dict[str, int] | None = None  # each owner's id in the secure aggregation PKI


def _split(x: torch.Tensor, y: torch.Tensor, fraction: float, seed: int) -> dict[str, torch.Tensor]:
    if fraction <= 0:
        return {"x": x, "y": y}
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))
    cut = max(1, int(round(len(y) * fraction)))
    test, train = order[:cut], order[cut:]
    return {"x": x[train], "y": y[train], "x_test": x[test], "y_test": y[test]}


def shares_of(exp: Experiment, data: Dataset, parts: Sequence[np.ndarray], i: int) -> dict[str, torch.Tensor]:
    """Owner ``i``'s private data, by tag: its training share, and its held-out part if any."""
    fraction = float(exp.get("data", "test_fraction", 0.0))
    if not 0 <= fraction < 1:
        raise ConfigurationError(f"{exp.source}: [data] test_fraction must be in [0, 1), got {fraction}")
    rows = torch.from_numpy(np.asarray(parts[i], dtype=np.int64))
    return _split(data.x_train[rows], data.y_train[rows], fraction, exp.seed + i)


def local_workers(exp: Experiment, data: Dataset, parts: Sequence[np.ndarray]) -> Federated:
    aggregator_id = str(exp.get("workers", "aggregator", "secure_worker"))
    holders = exp.share_holders()
    served = list(dict.fromkeys([aggregator_id, *holders]))
    federation = Federation()
    owner_policy = Policy(trusted_aggregators=frozenset(served), private_sends=False)
    workers: list[WorkerClient] = []
    # The simulated owners' signing identities, made here: this run is every simulated owner's operator.
    ids = {owner_id(i): i + 1 for i in range(len(parts))} if exp.consistency_check else None
    pki = generate_federation(ids.values()) if ids else {}
    for i in range(len(parts)):
        identity = SecAggIdentity(i + 1, pki[i + 1]) if ids else None
        workers.append(VirtualWorker(id=owner_id(i), data=shares_of(exp, data, parts, i), policy=owner_policy,
                                     federation=federation, secagg_identity=identity))
    strict = bool(exp.get("workers", "strict", True))
    servers = {n: VirtualWorker(id=n, policy=Policy(strict=strict), federation=federation) for n in served}
    return Federated(workers, servers[aggregator_id], int(exp.get("workers", "parallelism", 1)),
                     holders=[servers[h] for h in holders], secagg_ids=ids)


def remote_workers(exp: Experiment) -> Federated:
    from fedsecure.transport.certs import load_secagg_ids
    from fedsecure.transport.grpc import TLS, connect

    token, tls_dir = exp.get("workers", "token"), exp.get("workers", "tls_dir")
    if (token is None) == (tls_dir is None):
        raise ConfigurationError(f"{exp.source}: remote workers need one of [workers] token or tls_dir")
    credentials: str | TLS = TLS.from_dir(exp.path(tls_dir), "owner") if tls_dir else token
    remote = exp.get("workers", "remote", [])
    if not remote or not all(isinstance(r, dict) and {"id", "address"} <= set(r) for r in remote):
        raise ConfigurationError(
            f"{exp.source}: remote mode needs [[workers.remote]] tables, each with id and address"
        )
    address = exp.get("workers", "aggregator_address")
    if address is None:
        raise ConfigurationError(f"{exp.source}: remote mode needs [workers] aggregator_address")
    aggregator_id = str(exp.get("workers", "aggregator", "secure_worker"))
    workers: list[WorkerClient] = [connect(r["id"], r["address"], credentials=credentials, pipelined=False) for r in remote]
    aggregator = connect(aggregator_id, address, credentials=credentials, pipelined=False)
    addresses = {aggregator_id: address, **exp.get("workers", "share_holder_addresses", {})}
    holder_ids = exp.share_holders()
    missing = [h for h in holder_ids if not isinstance(addresses.get(h), str)]
    if missing:
        raise ConfigurationError(f"{exp.source}: remote mode needs an address for the share holders {missing} in "
                                 "[workers.share_holder_addresses] (id = \"host:port\")")
    holders = [aggregator if h == aggregator_id else connect(h, addresses[h], credentials=credentials, pipelined=False)
               for h in holder_ids]
    secagg_ids = None
    if exp.consistency_check:
        pki = exp.get("workers", "secagg_pki")
        if pki is None:
            raise ConfigurationError(f"{exp.source}: consistency_check in remote mode needs [workers] secagg_pki, "
                                     "the federation's secagg.json (`fedsecure certs --secagg NAME ...`)")
        try:
            secagg_ids = load_secagg_ids(exp.path(pki))
        except ValueError as exc:
            raise ConfigurationError(f"{exp.source}: {exc}") from None
    return Federated(workers, aggregator, int(exp.get("workers", "parallelism", len(workers))), holders=holders,
                     secagg_ids=secagg_ids)


def run_experiment(
    exp: Experiment,
    *,
    resume: bool = False,
    progress: bool = True,
    stream: TextIO | None = None,
) -> History:
    """Run ``exp``; its history and checkpoints go to ``exp.output``."""
    out = stream or sys.stderr
    mode = str(exp.get("workers", "mode", "local"))
    data = exp.dataset()
    torch.manual_seed(exp.seed)
    model_options = {k: v for k, v in exp.config.get("model", {}).items() if k != "name"}
    model = build_model(str(exp.get("model", "name", "mlp")), tuple(data.x_train.shape[1:]), data.num_classes,
                        **model_options)
    if mode not in ("local", "processes", "remote"):
        raise ConfigurationError(
            f"{exp.source}: [workers] mode must be 'local', 'processes' or 'remote', got {mode!r}"
        )
    parts = exp.partitions(data) if mode != "remote" else []  # remote owners hold their own data
    if mode != "remote" and progress:
        out.write(f"{exp.name}: {data.name}, {len(data.y_train)} training samples over {len(parts)} workers\n")
        out.write(partition_summary(data.y_train, parts, data.num_classes) + "\n")
    strategy = exp.strategy()
    secure_mode, secure_settings = exp.secure()
    exp.output.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if mode == "local":
            fed = local_workers(exp, data, parts)
        elif mode == "processes":
            sim = stack.enter_context(Simulation(
                exp.config, processes=int(exp.get("workers", "processes", os.cpu_count() or 1)),
                threads=int(exp.get("workers", "threads", 1)),
                aggregator=str(exp.get("workers", "aggregator", "secure_worker")),
                share_holders=exp.share_holders(), consistency_check=exp.consistency_check,
                strict=bool(exp.get("workers", "strict", True)),
                sizes=[len(p) for p in parts],
            ))
            fed = Federated(sim.workers, sim.aggregator, sim.processes, sim.groups, sim.share_holders,
                            sim.secagg_ids)
        else:
            fed = remote_workers(exp)
        engine = Engine(
            model, fed.workers, strategy, aggregator=fed.aggregator, test_data=(data.x_test, data.y_test),
            seed=exp.seed, parallelism=fed.parallelism, groups=fed.groups,
            progress=Progress(enabled=progress, stream=out), checkpoint=exp.output / "checkpoint",
            settings=exp.settings(), on_round=tensorboard(exp),
            secure_aggregation=secure_mode, share_holders=fed.holders,
            secure=dataclasses.replace(secure_settings, consistency_check=True, client_ids=fed.secagg_ids)
            if fed.secagg_ids is not None else secure_settings,
            work_deadline=float(exp.get("workers", "work_deadline", 3600.0)),
        )
        if resume and not engine.resume() and progress:
            out.write(f"no checkpoint in {exp.output / 'checkpoint'}: starting at round 1\n")
        _, history = engine.run(exp.rounds)
    history.to_json(exp.output / "history.json")
    history.to_csv(exp.output / "history.csv")
    if progress:
        last = history.last
        accuracy = last.get("central_accuracy")
        shown = f"accuracy {accuracy:.4f}" if accuracy is not None else f"loss {last.get('central_loss')}"
        total = sum(r["round_seconds"] for r in history)
        out.write(f"{exp.name}: {len(history)} rounds, {shown}, {total:.1f} s; history in {exp.output}\n")
    return history


def tensorboard(exp: Experiment) -> Callable[[dict[str, Any]], None] | None:
    """A callback writing each round's numbers to ``[experiment] tensorboard``, if set."""
    folder = exp.get("experiment", "tensorboard")
    if folder is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigurationError(
            f"{exp.source}: [experiment] tensorboard needs the tensorboard package: pip install tensorboard"
        ) from None
    writer = SummaryWriter(str(exp.path(folder)))

    def log(row: dict[str, Any]) -> None:
        for key, value in row.items():
            if isinstance(value, int | float) and key != "round":
                writer.add_scalar(key, value, row["round"])
        writer.flush()

    return log
