"""Layer 2: workers: an object store with provenance labels, a release policy and an executor."""

from fedsecure.worker.client import WorkerClient
from fedsecure.worker.core import WorkerCore
from fedsecure.worker.labels import Policy
from fedsecure.worker.virtual import Federation, VirtualWorker

__all__ = ["Federation", "Policy", "VirtualWorker", "WorkerClient", "WorkerCore"]
