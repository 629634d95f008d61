"""Workers as gRPC servers, and the model owner's connection to them.

The service (`service`): no .proto to compile, the methods take and return raw bytes.
``Stream`` (what `connect` uses) is a long-lived bidirectional stream of requests and
replies in the format of `frames`: a message's large tensors travel beside it, straight
from and into tensor storage. ``Handle`` is one request in, one reply out, with tensors
inside the message (a reply of at most `frames.CHUNK` bytes).

The worker's side (`server`): `WorkerServer` hosts one `WorkerCore` or several, each with
its own callers and peers, and carries each request's bytes to the core and its reply back.
The model owner's side (`client`): `connect` returns a handle on a served worker, like a
`VirtualWorker`, whose `GrpcTransport` sends requests over pooled streams (`streams`).

Every caller is authenticated before a byte of its message is decoded: with mutual TLS
(`TLS`, certificates from ``fedsecure certs``) by the common name of its certificate,
or, without TLS (loopback experiments only), by a bearer token in the call's metadata,
compared in constant time. Each hosted worker has its own callers: the name says who the
caller is, the model owner (a client) or another worker (a peer, for worker-to-worker
moves). Every request has a deadline; a worker that is down surfaces as
`WorkerUnavailable` naming it.
"""

from __future__ import annotations

from fedsecure.transport.client import GrpcTransport, connect
from fedsecure.transport.server import WorkerServer
from fedsecure.transport.service import (
    DEFAULT_DEADLINE,
    DEFAULT_MAX_MESSAGE,
    METHOD,
    SERVICE,
    STREAM,
    TLS,
    WORKER_KEY,
    AuthenticationFailed,
)

__all__ = [
    "DEFAULT_DEADLINE",
    "DEFAULT_MAX_MESSAGE",
    "METHOD",
    "SERVICE",
    "STREAM",
    "TLS",
    "WORKER_KEY",
    "AuthenticationFailed",
    "GrpcTransport",
    "WorkerServer",
    "connect",
]
