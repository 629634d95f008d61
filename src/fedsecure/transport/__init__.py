"""Layer 4: carrying `wire` messages between processes and machines (gRPC)."""

from fedsecure.transport.grpc import TLS, AuthenticationFailed, GrpcTransport, WorkerServer, connect
from fedsecure.transport.process import WorkerProcess

__all__ = ["TLS", "AuthenticationFailed", "GrpcTransport", "WorkerProcess", "WorkerServer", "connect"]
