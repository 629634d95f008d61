"""The model owner's side: a connection to a worker's server, and the transport under it.

`connect` returns a `WorkerClient` (a handle like a `VirtualWorker`) whose transport,
`GrpcTransport`, sends each request's bytes over a pooled long-lived stream (`streams`)
and returns the reply's bytes, within a deadline; a worker that is down surfaces as
`WorkerUnavailable` naming it. Workers use the same transport towards their peers.
"""

from __future__ import annotations

import threading
import weakref
from typing import NoReturn

import grpc

from fedsecure.errors import ProtocolError, WorkerUnavailable
from fedsecure.transport import frames, streams
from fedsecure.transport.service import (
    DEFAULT_DEADLINE,
    DEFAULT_MAX_MESSAGE,
    STREAM,
    TLS,
    AuthenticationFailed,
    options,
)
from fedsecure.wire import codec
from fedsecure.worker.client import WorkerClient

# Links live while a transport (or an open stream) uses them; a channel closes when its
# link is collected.
_links: weakref.WeakValueDictionary[tuple[str, str | None, TLS | None], streams.Link] = (
    weakref.WeakValueDictionary()
)
_links_lock = threading.Lock()


def _link(address: str, token: str | None, tls: TLS | None) -> streams.Link:
    """The shared link to ``address`` with these credentials (see `streams`)."""
    key = (address, token, tls)
    with _links_lock:
        link = _links.get(key)
        if link is None:
            if tls is not None:
                creds = grpc.ssl_channel_credentials(tls.ca, tls.key, tls.cert)
                channel = grpc.secure_channel(address, creds, options=options())
            else:
                channel = grpc.insecure_channel(address, options=options())
            metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()
            link = _links[key] = streams.Link(channel, STREAM, metadata)
        return link


class GrpcTransport:
    """A transport (bytes in, bytes out) to one worker's server, with a deadline per request.

    ``persistent``: requests go over pooled long-lived streams (for a model owner, whose
    requests follow one another), and a large tensor sent to the same server again is named
    instead (`fedsecure.transport.kept`: the round's model to each owner a server hosts);
    otherwise each request opens a stream of its own (for worker-to-worker moves, which are
    few and large, and never the same twice).
    """

    def __init__(
        self,
        worker_id: str,
        address: str,
        *,
        token: str | None = None,
        tls: TLS | None = None,
        deadline: float = DEFAULT_DEADLINE,
        max_message: int = DEFAULT_MAX_MESSAGE,
        persistent: bool = True,
    ) -> None:
        if token is None and tls is None:
            raise ValueError(f"connecting to {worker_id!r} needs credentials: a token or TLS")
        self.worker_id = worker_id
        self.address = address
        self.deadline = deadline
        self.max_message = max_message
        self.persistent = persistent
        self._tls = tls is not None
        self._link = _link(address, token, tls)

    takes_deadline = True  # `WorkerClient.request(..., deadline=)` may give one per request

    def __call__(self, data: bytes, *, deadline: float | None = None) -> bytes:
        size = codec.message_size(data)
        if size > self.max_message:
            raise ValueError(frames.too_large(f"a message to {self.worker_id!r}", size, self.max_message))
        seconds = self.deadline if deadline is None else deadline
        try:
            return self._link.exchange(
                self.worker_id, data, deadline=seconds, limit=self.max_message, keep=self.persistent,
                reuse=self.persistent,
            )
        except streams.Expired:
            raise WorkerUnavailable(
                f"worker {self.worker_id!r} at {self.address} did not answer within {seconds:g} s"
            ) from None
        except streams.Closed:
            raise WorkerUnavailable(
                f"worker {self.worker_id!r} at {self.address} closed the connection (is it stopping?)"
            ) from None
        except frames.TooLarge as exc:
            raise WorkerUnavailable(str(exc)) from None
        except grpc.RpcError as exc:
            self._raise(exc)

    def _raise(self, exc: grpc.RpcError) -> NoReturn:
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else str(exc)
        if code == grpc.StatusCode.UNAUTHENTICATED:
            raise AuthenticationFailed(
                f"worker {self.worker_id!r} at {self.address} refused our credentials; "
                f"check the token ({details})"
            ) from None
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise WorkerUnavailable(
                f"message to {self.worker_id!r} exceeds the configured maximum size: {details}"
            ) from None
        if code == grpc.StatusCode.NOT_FOUND:
            raise WorkerUnavailable(f"{details} (connecting to {self.worker_id!r})") from None
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            raise ProtocolError(f"worker {self.worker_id!r} refused the message: {details}") from None
        hint = " (or refused the TLS handshake: check both sides use the same CA)" if self._tls else ""
        raise WorkerUnavailable(
            f"worker {self.worker_id!r} at {self.address} did not answer within "
            f"{self.deadline:g} s{hint} ({code.name if code else exc})"
        ) from None

    def close(self) -> None:
        """Close the idle streams to this transport's server (other transports to it with
        the same credentials share them, and open new ones when they need them)."""
        self._link.close_idle()


def connect(
    worker_id: str,
    address: str,
    *,
    credentials: str | TLS,
    deadline: float = DEFAULT_DEADLINE,
    max_message: int = DEFAULT_MAX_MESSAGE,
    pipelined: bool = True,
) -> WorkerClient:
    """A handle on the worker ``worker_id`` serving at ``address``, like a `VirtualWorker`.

    ``pipelined``: ops that return a new pointer do not wait for the worker (their
    errors are raised by the next call that waits: ``get()``, ``.item()``, ...).

    ``credentials``: the model owner's `TLS` certificate (``TLS.from_dir(dir, "owner")``),
    or a token for a worker that runs without TLS.
    """
    token, tls = (None, credentials) if isinstance(credentials, TLS) else (credentials, None)
    transport = GrpcTransport(
        worker_id, address, token=token, tls=tls, deadline=deadline, max_message=max_message
    )
    client = WorkerClient(worker_id, transport)
    client.pipelined = pipelined
    client.framed = True
    return client
