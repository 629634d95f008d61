"""The ``fedsecure`` command.

``fedsecure worker serve``: run a worker (a data owner or an aggregator) as a gRPC server.
"""

from fedsecure.cli.main import main

__all__ = ["main"]
