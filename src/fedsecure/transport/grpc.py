"""Workers as gRPC servers, and the model owner's connection to them.

The servicer is thin (as in gRPC's own examples): one unary method carries a
request's bytes to `WorkerCore.handle` and its reply back; the core stays
sans-I/O and is the same one `VirtualWorker` drives in one process. There is no
.proto to compile: the method takes and returns raw bytes, which are `wire`
messages.

Every caller is authenticated before a byte of its message is decoded: with
mutual TLS (`TLS`, certificates from ``fedsecure certs``) by the common name of
its certificate, or, without TLS (loopback experiments only), by a bearer token
in the call's metadata, compared in constant time. The name says who the caller
is: the model owner (a client) or another worker (a peer, for worker-to-worker
moves). Every call has a deadline; a worker that is down surfaces as
`WorkerUnavailable` naming it.
"""

from __future__ import annotations

import hmac
import secrets
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from fedsecure.errors import FedsecureError, WorkerUnavailable
from fedsecure.transport.certs import common_name, load_pem
from fedsecure.worker.client import WorkerClient
from fedsecure.worker.core import Sender, WorkerCore

SERVICE = "fedsecure.Worker"
METHOD = f"/{SERVICE}/Handle"  # a request that fits in one chunk, its reply (or a ticket)
UPLOAD = f"/{SERVICE}/Upload"  # a larger request, in chunks; its reply (or a ticket)
FETCH = f"/{SERVICE}/Fetch"  # a ticket in; a large reply out, in chunks
DEFAULT_DEADLINE = 30.0
DEFAULT_MAX_MESSAGE = 4 << 30  # 4 GiB: the largest message, tensors included (configurable)
CHUNK = 1 << 20  # messages travel in 1 MiB gRPC messages, never one huge one
_TICKET = "fedsecure-reply-ticket"
_UNFETCHED = 4  # large replies a caller may leave unfetched; older ones are dropped
_LENGTH = "fedsecure-length"


class AuthenticationFailed(FedsecureError, PermissionError):
    """The worker refused the caller's credentials."""


@dataclass(frozen=True)
class TLS:
    """One party's side of mutual TLS: the federation's CA, its certificate and key (PEM)."""

    ca: bytes
    cert: bytes
    key: bytes

    @classmethod
    def from_dir(cls, directory: str | Path, name: str) -> TLS:
        """``ca.pem``, ``NAME.pem`` and ``NAME.key`` as ``fedsecure certs DIR --party NAME`` wrote them."""
        d = Path(directory)
        return cls(load_pem(d / "ca.pem"), load_pem(d / f"{name}.pem"), load_pem(d / f"{name}.key"))


def _options() -> list[tuple[str, int]]:
    # Every gRPC message is one chunk at most (plus framing); size limits apply to the
    # whole request or reply, counted by fedsecure.
    return [
        ("grpc.max_send_message_length", 2 * CHUNK),
        ("grpc.max_receive_message_length", 2 * CHUNK),
    ]


def _chunks(data: bytes | bytearray | memoryview) -> Any:
    view = memoryview(data)
    for start in range(0, len(view), CHUNK):
        yield bytes(view[start : start + CHUNK])


def _too_large(what: str, size: int, limit: int) -> str:
    return (
        f"{what} of {size} bytes exceeds the maximum of {limit} bytes; raise it on both ends "
        "(max_message=..., fedsecure worker serve --max-message)"
    )


class GrpcTransport:
    """A transport (bytes in, bytes out) to one worker's server, with a deadline per call."""

    def __init__(
        self,
        worker_id: str,
        address: str,
        *,
        token: str | None = None,
        tls: TLS | None = None,
        deadline: float = DEFAULT_DEADLINE,
        max_message: int = DEFAULT_MAX_MESSAGE,
    ) -> None:
        if token is None and tls is None:
            raise ValueError(f"connecting to {worker_id!r} needs credentials: a token or TLS")
        self.worker_id = worker_id
        self.address = address
        self.deadline = deadline
        self.max_message = max_message
        self._tls = tls is not None
        self._metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()
        if tls is not None:
            creds = grpc.ssl_channel_credentials(tls.ca, tls.key, tls.cert)
            self._channel = grpc.secure_channel(address, creds, options=_options())
        else:
            self._channel = grpc.insecure_channel(address, options=_options())
        self._call = self._channel.unary_unary(METHOD)
        self._upload = self._channel.stream_unary(UPLOAD)
        self._fetch = self._channel.unary_stream(FETCH)

    def __call__(self, data: bytes) -> bytes:
        if len(data) > self.max_message:
            raise ValueError(_too_large(f"a message to {self.worker_id!r}", len(data), self.max_message))
        try:
            if len(data) <= CHUNK:
                reply, call = self._call.with_call(data, timeout=self.deadline, metadata=self._metadata)
            else:
                metadata = (*self._metadata, (_LENGTH, str(len(data))))
                reply, call = self._upload.with_call(
                    _chunks(data), timeout=self.deadline, metadata=metadata
                )
            ticket = dict(call.trailing_metadata() or ()).get(_TICKET)
            return reply if ticket is None else self._collect(str(ticket))
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            if code == grpc.StatusCode.UNAUTHENTICATED:
                raise AuthenticationFailed(
                    f"worker {self.worker_id!r} at {self.address} refused our credentials; "
                    "check the token"
                ) from None
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise WorkerUnavailable(
                    f"message to {self.worker_id!r} exceeds the configured maximum size: "
                    f"{exc.details() if hasattr(exc, 'details') else exc}"
                ) from None
            hint = " (or refused the TLS handshake: check both sides use the same CA)" if self._tls else ""
            raise WorkerUnavailable(
                f"worker {self.worker_id!r} at {self.address} did not answer within "
                f"{self.deadline:g} s{hint} ({code.name if code else exc})"
            ) from None

    def _collect(self, ticket: str) -> bytes:
        """A reply too large for one chunk: fetch it in chunks into one buffer."""
        ticket_id, _, length = ticket.partition(":")
        size = int(length)
        if size > self.max_message:
            raise WorkerUnavailable(_too_large(f"a reply from {self.worker_id!r}", size, self.max_message))
        buffer = bytearray(size)
        at = 0
        for chunk in self._fetch(ticket_id.encode(), timeout=self.deadline, metadata=self._metadata):
            if at + len(chunk) > size:
                raise WorkerUnavailable(f"{self.worker_id!r} sent more than the {size} bytes announced")
            buffer[at : at + len(chunk)] = chunk
            at += len(chunk)
        if at != size:
            raise WorkerUnavailable(f"{self.worker_id!r} sent {at} of the {size} bytes announced")
        return buffer  # type: ignore[return-value]  # decode reads any buffer: no extra copy

    def close(self) -> None:
        self._channel.close()


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
    return client


class WorkerServer:
    """Serves one `WorkerCore` over gRPC.

    ``callers`` maps each accepted credential to the caller it identifies:
    ``("client", name)`` for a model owner, ``("peer", worker_id)`` for another worker.
    With ``tls`` the credential is the common name of the caller's certificate
    (signed by the federation's CA); without, a bearer token.
    ``peers`` maps worker ids to the addresses this worker sends moved values to;
    ``token`` is this worker's own token towards them when there is no TLS.
    """

    def __init__(
        self,
        core: WorkerCore,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        callers: Mapping[str, tuple[str, str]],
        peers: Mapping[str, str] | None = None,
        token: str = "",
        tls: TLS | None = None,
        deadline: float = DEFAULT_DEADLINE,
        max_message: int = DEFAULT_MAX_MESSAGE,
        threads: int = 8,
    ) -> None:
        from concurrent.futures import ThreadPoolExecutor

        if not callers:
            raise ValueError("a worker server needs at least one caller's token (callers=...)")
        if any(not credential for credential in callers):
            raise ValueError("an empty credential would let anyone in: give every caller a token")
        self.core = core
        self._tls = tls
        self._callers = [(tok.encode(), Sender(kind, name)) for tok, (kind, name) in callers.items()]  # type: ignore[arg-type]
        self._peers = {
            pid: GrpcTransport(
                pid,
                address,
                token=None if tls else token,
                tls=tls,
                deadline=deadline,
                max_message=max_message,
            )
            for pid, address in (peers or {}).items()
        }
        core._send_to_peer = self._send_to_peer
        core.max_reply = max_message
        # One request at a time: the core's store and torch's autograd are not shared safely.
        self._lock = threading.Lock()
        self.max_message = max_message
        self._replies: dict[bytes, tuple[Sender, bytes]] = {}  # ticket -> (caller, reply) to fetch
        self._server = grpc.server(ThreadPoolExecutor(max_workers=threads), options=_options())
        handlers = {
            "Handle": grpc.unary_unary_rpc_method_handler(self._handle),
            "Upload": grpc.stream_unary_rpc_method_handler(self._handle_upload),
            "Fetch": grpc.unary_stream_rpc_method_handler(self._handle_fetch),
        }
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, handlers),)
        )
        if tls is not None:
            if common_name(tls.cert) != core.id:
                raise ValueError(
                    f"the certificate is {common_name(tls.cert)!r}'s, not {core.id!r}'s: "
                    "pass the worker's own certificate"
                )
            creds = grpc.ssl_server_credentials(
                [(tls.key, tls.cert)], root_certificates=tls.ca, require_client_auth=True
            )
            self.port = self._server.add_secure_port(f"{host}:{port}", creds)
        else:
            self.port = self._server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"cannot listen on {host}:{port}")
        self.address = f"{host}:{self.port}"

    def _caller(self, context: grpc.ServicerContext) -> Sender | None:
        presented = b""
        if self._tls is not None:  # gRPC verified the chain; the name is the certificate's CN
            names = context.auth_context().get("x509_common_name", [])
            presented = names[0] if len(names) == 1 else b""
        else:
            presented = self._token(context)
        found = None
        for credential, sender in self._callers:  # compare with every one: timing says nothing
            if hmac.compare_digest(presented, credential):
                found = sender
        return found

    @staticmethod
    def _token(context: grpc.ServicerContext) -> bytes:
        values = [v for k, v in context.invocation_metadata() if k == "authorization"]
        if len(values) != 1 or not isinstance(values[0], str) or not values[0].startswith("Bearer "):
            return b""  # none, or several: a proxy might have checked another one
        return values[0][len("Bearer ") :].encode()

    def _authenticated(self, context: grpc.ServicerContext) -> Sender:
        sender = self._caller(context)
        if sender is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown or missing credentials")
        return sender  # type: ignore[return-value]

    def _respond(self, request: bytes | bytearray, sender: Sender, context: grpc.ServicerContext) -> bytes:
        with self._lock:
            reply = self.core.handle(request, sender)  # type: ignore[arg-type]
        if len(reply) <= CHUNK:
            return reply
        if len(reply) > self.max_message:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, _too_large("the reply", len(reply), self.max_message))
        ticket = secrets.token_hex(16).encode()
        with self._lock:
            mine = [t for t, (who, _) in self._replies.items() if who == sender]
            for stale in mine[: max(0, len(mine) - _UNFETCHED + 1)]:  # a caller keeps a few
                del self._replies[stale]
            self._replies[ticket] = (sender, reply)
        context.set_trailing_metadata(((_TICKET, f"{ticket.decode()}:{len(reply)}"),))
        return b""

    def _handle(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        sender = self._authenticated(context)
        if len(request) > self.max_message:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, _too_large("the request", len(request), self.max_message))
        return self._respond(request, sender, context)

    def _handle_upload(self, chunks: Any, context: grpc.ServicerContext) -> bytes:
        sender = self._authenticated(context)  # before a byte of the request is read
        declared = dict(context.invocation_metadata()).get(_LENGTH, "")
        if not str(declared).isdigit():
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"an upload must declare its length ({_LENGTH})")
        size = int(declared)
        if size > self.max_message:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, _too_large("the request", size, self.max_message))
        buffer = bytearray(size)
        at = 0
        for chunk in chunks:
            if at + len(chunk) > size:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the upload is longer than it declared")
            buffer[at : at + len(chunk)] = chunk
            at += len(chunk)
        if at != size:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the upload is shorter than it declared")
        return self._respond(buffer, sender, context)

    def _handle_fetch(self, ticket: bytes, context: grpc.ServicerContext) -> Any:
        sender = self._authenticated(context)
        with self._lock:
            stored = self._replies.get(ticket)
            if stored is None or stored[0] != sender:
                context.abort(grpc.StatusCode.NOT_FOUND, "no such reply (fetched already, or not yours)")
            del self._replies[ticket]
        yield from _chunks(stored[1])  # type: ignore[index]

    def _send_to_peer(self, destination: str, data: bytes) -> bytes:
        transport = self._peers.get(destination)
        if transport is None:
            raise WorkerUnavailable(
                f"{self.core.id!r} has no address for worker {destination!r}; add it to its peers"
            )
        # Called while this server holds its lock; the peer is another process.
        return transport(data)

    def start(self) -> WorkerServer:
        self._server.start()
        return self

    def stop(self, grace: float | None = 5.0) -> None:
        """Stop accepting calls; calls in flight get ``grace`` seconds to finish."""
        self._server.stop(grace).wait()
        for transport in self._peers.values():
            transport.close()

    def wait(self) -> None:
        self._server.wait_for_termination()

    def __enter__(self) -> WorkerServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
