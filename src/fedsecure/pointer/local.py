"""The local worker: this process, the model owner, as PySyft 0.2 names it (``"me"``).

PySyft keeps a worker object for the process that drives the others (``hook.local_worker``,
``sy.local_worker``) and makes it the ``owner`` of every pointer. Here the model owner holds its
values as plain torch tensors and its remote values as pointers, so this object stands for the
process without storing anything: ``_objects`` is always empty.
"""

from __future__ import annotations

import html

from fedsecure.worker.virtual import ObjectsView


class LocalWorker:
    """This process: the model owner, id ``"me"``. The ``owner`` of every pointer it holds."""

    id = "me"

    def __init__(self) -> None:
        self._is_client_worker = True

    @property
    def is_client_worker(self) -> bool:
        """PySyft's switch for whether the local worker stores the objects it makes (tutorials
        set it to False before building plans). Plans here are built by tracing the function
        on the model owner's side, never by storing objects on the local worker, so the flag
        changes nothing; accepting it is safe because this process keeps its tensors as torch
        tensors either way and no worker's policy depends on it."""
        return self._is_client_worker

    @is_client_worker.setter
    def is_client_worker(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"is_client_worker is True or False, got {value!r}")
        self._is_client_worker = value

    @property
    def _objects(self) -> ObjectsView:
        """Always empty: this process keeps its values as plain tensors, not as stored objects."""
        return ObjectsView({})

    def __repr__(self) -> str:
        return f"<LocalWorker id:{self.id} (this process, the model owner) #objects:0>"

    def _repr_html_(self) -> str:
        return f"<b>LocalWorker</b> <code>{html.escape(self.id)}</code>: this process, the model owner"


local_worker = LocalWorker()
