"""Workers: an object store with provenance labels, a release policy, and the protocol that serves it.

`core` dispatches each message to its handler over the worker's state (`store`): pointer ops
(`ops`, on the one guarded path of `execute`), objects in and out (`objects`), `optimizers`,
training rounds (`rounds`), `moves` between workers, the aggregator's fixed functions
(`aggregator`) and values that leave only hidden (`sharing`).
"""

from fedsecure.worker.client import WorkerClient
from fedsecure.worker.core import WorkerCore
from fedsecure.worker.labels import Policy
from fedsecure.worker.virtual import Federation, VirtualWorker

__all__ = ["Federation", "Policy", "VirtualWorker", "WorkerClient", "WorkerCore"]
