"""Layer 4: carrying `wire` messages between processes and machines (gRPC)."""

from fedsecure.transport.client import GrpcTransport, connect
from fedsecure.transport.process import WorkerProcess
from fedsecure.transport.server import WorkerServer
from fedsecure.transport.service import TLS, AuthenticationFailed

__all__ = ["TLS", "AuthenticationFailed", "GrpcTransport", "WorkerProcess", "WorkerServer", "connect"]
