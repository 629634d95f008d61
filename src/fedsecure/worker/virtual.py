"""`VirtualWorker`: a worker in the caller's process, reached through the message layer."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from fedsecure.errors import WorkerUnavailable
from fedsecure.wire import messages as m
from fedsecure.worker.client import WorkerClient
from fedsecure.worker.core import Sender, WorkerCore
from fedsecure.worker.labels import Policy
from fedsecure.worker.secure import SecAggIdentity


class Federation:
    """The in-process network: routes worker-to-worker messages and counts their bytes."""

    def __init__(self) -> None:
        self.cores: dict[str, WorkerCore] = {}
        self.link_bytes: dict[tuple[str, str], int] = {}
        # One request at a time per worker, as a server does: the engine may train several
        # workers in threads, and their moves meet at the aggregator.
        self.locks: dict[str, threading.RLock] = {}

    def add(self, core: WorkerCore) -> None:
        self.cores[core.id] = core
        self.locks[core.id] = threading.RLock()

    def call(self, worker_id: str, data: bytes, sender: Sender) -> bytes:
        with self.locks[worker_id]:
            return self.cores[worker_id].handle(data, sender)

    def send(self, source: str, destination: str, data: bytes) -> bytes:
        core = self.cores.get(destination)
        if core is None:
            err = WorkerUnavailable(f"no worker {destination!r} in this federation")
            return m.encode_reply(m.error_reply(err))
        key = (source, destination)
        self.link_bytes[key] = self.link_bytes.get(key, 0) + len(data)
        return self.call(destination, data, Sender("peer", source))


default_federation = Federation()


class VirtualWorker(WorkerClient):
    """A worker living in this process.

    ``VirtualWorker(hook, id="bob")`` as in PySyft (the hook is optional).
    ``data`` is the owner's own data: a tensor, or a mapping from tag to tensor;
    it is private to this worker, found with ``search(tag)``.
    ``policy`` holds the owner's release rules (`fedsecure.Policy`); in one process
    the default trusts every other worker as an aggregator.
    ``secagg_identity``: the owner's signing key and the federation's verification keys, for
    secure aggregation with the consistency check (`fedsecure.worker.secure.SecAggIdentity`).
    """

    def __init__(
        self,
        hook: Any = None,
        id: str | None = None,
        *,
        data: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
        policy: Policy | None = None,
        federation: Federation | None = None,
        secagg_identity: SecAggIdentity | None = None,
    ) -> None:
        if isinstance(hook, str) and id is None:  # VirtualWorker("bob")
            hook, id = None, hook
        if id is None:
            id = f"worker-{secrets.token_hex(3)}"
        if not isinstance(id, str) or not id:
            raise TypeError(f"a worker id must be a non-empty string, got {id!r}")
        self.federation = federation or getattr(hook, "federation", None) or default_federation
        fed = self.federation
        self.core = WorkerCore(
            id, policy=policy, send_to_peer=lambda dest, data: fed.send(id, dest, data),
            secagg_identity=secagg_identity,
        )
        fed.add(self.core)
        owner = Sender("client", "model-owner")
        super().__init__(id, lambda data: fed.call(id, data, owner))
        if data is not None:
            items = data.items() if isinstance(data, Mapping) else [("data", data)]
            for tag, tensor in items:
                self.load(tensor, tags=[tag])

    @property
    def policy(self) -> Policy:
        return self.core.policy

    def load(self, tensor: torch.Tensor, tags: Iterable[str] = ()) -> None:
        """Hold ``tensor`` as this owner's private data (the owner's side, not a message)."""
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"load() takes a tensor, got {type(tensor).__name__}")
        self.core.load(tensor, tuple(tags))
