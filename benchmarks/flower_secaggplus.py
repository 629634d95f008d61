"""Flower's own SecAgg+ (and its plain FedAvg) on given n and d, for secure_aggregation.py.

Runs inside a virtual environment that has flwr (never imports fedsecure). Drives Flower's
``SecAggPlusWorkflow`` (server) and ``secaggplus_mod`` (clients) through a grid that hands each
message to the client app in this process, so what is timed is Flower's protocol code, without
a transport or a simulation engine. Prints one JSON object on stdout.

Run:  .venv-flower/bin/python benchmarks/flower_secaggplus.py '{"cells": [[10, 100000, 9, 5, 3]]}'
"""

from __future__ import annotations

import copy
import json
import logging
import statistics
import sys
import time
import uuid
from collections.abc import Iterable
from typing import Any

import flwr
import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.default_workflows import default_fit_workflow
from flwr.serverapp.grid import Grid
from flwr.supercore.task_identity import TaskIdentity

logging.getLogger("flwr").setLevel(logging.ERROR)


def update(node: int, d: int) -> np.ndarray:
    return np.random.default_rng(node).uniform(-1, 1, d).astype(np.float32)


class Client(NumPyClient):
    def __init__(self, node: int, d: int) -> None:
        self.node, self.d = node, d

    def fit(self, parameters: Any, config: Any) -> tuple[list[np.ndarray], int, dict]:
        return [update(self.node, self.d)], 1, {}


class LocalGrid(Grid):
    """Hands each message to the node's client app in this process; times the clients.

    The copy of each message that a transport would make is not counted in any time.
    """""

    def __init__(self, nodes: list[int], d: int, secure: bool) -> None:
        self.nodes = nodes
        self.app = ClientApp(client_fn=lambda ctx: Client(ctx.node_id, d).to_client(),
                             mods=[secaggplus_mod] if secure else [])
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
                         for n in nodes}
        self.client_s = self.copy_s = 0.0

    def set_run(self, run: Any) -> None:  # not needed in process
        pass

    @property
    def run(self) -> Any:
        raise NotImplementedError

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return self.nodes

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            t = time.perf_counter()
            msg = copy.deepcopy(msg)  # a transport's copy: the workflow shares one record among messages
            self.copy_s += time.perf_counter() - t
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # what the SuperLink would set
            t = time.perf_counter()
            reply = self.app(msg, self.contexts[msg.metadata.dst_node_id])
            self.client_s += time.perf_counter() - t
            replies.append(reply)
        return replies


def one_round(n: int, d: int, num_shares: int, threshold: int, secure: bool) -> dict[str, Any]:
    nodes = list(range(1, n + 1))
    grid = LocalGrid(nodes, d, secure)
    manager = SimpleClientManager()
    for node in nodes:
        manager.register(GridClientProxy(node, grid, 1))
    strategy = FedAvg(fraction_fit=1.0, min_fit_clients=n, min_available_clients=n, fraction_evaluate=0.0)
    context = LegacyContext(Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            config=ServerConfig(num_rounds=1), strategy=strategy, client_manager=manager)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: 1})
    params = ndarrays_to_parameters([np.zeros(d, np.float32)])
    from flwr.compat.common import recorddict_compat as compat

    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(params, True)
    workflow = SecAggPlusWorkflow(num_shares=num_shares, reconstruction_threshold=threshold) if secure else None
    t = time.perf_counter()
    if workflow is not None:
        workflow(grid, context)
    else:
        default_fit_workflow(grid, context)
    total = time.perf_counter() - t - grid.copy_s
    arr = context.state.array_records[MAIN_PARAMS_RECORD]
    got = parameters_to_ndarrays(compat.arrayrecord_to_parameters(arr, True))[0]
    mean = sum(update(u, d).astype(np.float64) for u in nodes) / n
    return {"round_s": total, "client_s": grid.client_s / n, "server_s": total - grid.client_s,
            "max_abs_err": float(np.abs(got - mean).max())}


def numpy_mean(n: int, d: int) -> float:
    xs = [update(u, d) for u in range(1, n + 1)]
    t = time.perf_counter()
    acc = np.zeros(d)
    for x in xs:
        acc += x
    acc /= n
    return time.perf_counter() - t


def main() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    spec = json.loads(sys.argv[1])
    out = {"flwr": flwr.__version__, "cells": []}
    for n, d, shares, threshold, reps in spec["cells"]:
        runs = {kind: [one_round(n, d, shares, threshold, kind == "secaggplus") for _ in range(reps)]
                for kind in ("secaggplus", "fedavg")}
        cell = {"n": n, "d": d, "num_shares": shares, "threshold": threshold,
                "numpy_mean_s": statistics.median(numpy_mean(n, d) for _ in range(reps))}
        for kind, rs in runs.items():
            for key in rs[0]:
                cell[f"{kind}_{key}"] = statistics.median(r[key] for r in rs)
        out["cells"].append(cell)
        print(json.dumps(cell), file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
