"""Workers as gRPC servers, and the model owner's connection to them.

The servicer is thin (as in gRPC's own examples): it carries a request's bytes to
`WorkerCore.handle` and its reply back; the core stays sans-I/O and is the same one
`VirtualWorker` drives in one process. There is no .proto to compile: the methods take
and return raw bytes. ``Stream`` (what `connect` uses) is a long-lived bidirectional
stream of requests and replies in the format of `frames`: a message's large tensors
travel beside it, straight from and into tensor storage. ``Handle`` is one request in,
one reply out, with tensors inside the message (a reply of at most `frames.CHUNK` bytes).

One server may host several workers (`WorkerServer.add`), each with its own core, lock,
callers and peers; a request names the worker it is for (in the stream message's head,
or the ``fedsecure-worker`` metadata of a ``Handle`` call).

Every caller is authenticated before a byte of its message is decoded: with mutual TLS
(`TLS`, certificates from ``fedsecure certs``) by the common name of its certificate,
or, without TLS (loopback experiments only), by a bearer token in the call's metadata,
compared in constant time. Each hosted worker has its own callers: the name says who the
caller is, the model owner (a client) or another worker (a peer, for worker-to-worker
moves). Every request has a deadline; a worker that is down surfaces as
`WorkerUnavailable` naming it.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import hmac
import socket
import threading
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import grpc

from fedsecure.errors import FedsecureError, ProtocolError, WorkerUnavailable
from fedsecure.transport import frames, streams
from fedsecure.transport.certs import common_name, load_pem
from fedsecure.transport.frames import CHUNK
from fedsecure.transport.gate import Gate
from fedsecure.wire import codec
from fedsecure.worker.client import WorkerClient
from fedsecure.worker.core import Sender, WorkerCore

SERVICE = "fedsecure.Worker"
METHOD = f"/{SERVICE}/Handle"  # one request in, one reply out, tensors inside (small messages)
STREAM = f"/{SERVICE}/Stream"  # requests and replies on a long-lived stream, tensors beside
DEFAULT_DEADLINE = 30.0
DEFAULT_MAX_MESSAGE = 4 << 30  # 4 GiB: the largest message, tensors included (configurable)
WORKER_KEY = "fedsecure-worker"  # a Handle call's metadata: the hosted worker it is for


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
                channel = grpc.secure_channel(address, creds, options=_options())
            else:
                channel = grpc.insecure_channel(address, options=_options())
            metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()
            link = _links[key] = streams.Link(channel, STREAM, metadata)
        return link


class GrpcTransport:
    """A transport (bytes in, bytes out) to one worker's server, with a deadline per request.

    ``persistent``: requests go over pooled long-lived streams (for a model owner, whose
    requests follow one another); otherwise each request opens a stream of its own (for
    worker-to-worker moves, which are few and large).
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
                self.worker_id, data, deadline=seconds, limit=self.max_message, keep=self.persistent
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


@dataclass
class _Hosted:
    """One worker a server hosts: its core, who may call it, and its links to peers."""

    core: WorkerCore
    callers: list[tuple[bytes, Sender]]
    peers: dict[str, GrpcTransport]
    gate: Gate = field(default_factory=Gate)

    def caller(self, credential: bytes) -> Sender | None:
        found = None
        for known, sender in self.callers:  # compare with every one: timing says nothing
            if hmac.compare_digest(credential, known):
                found = sender
        return found


class _Budget:
    """Bytes of tensor frames being received, per caller: at most ``limit`` at a time,
    so a caller cannot make the server allocate more by opening more streams."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._used: dict[bytes, int] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def reserve(self, caller: bytes, nbytes: int) -> Iterator[None]:
        if not nbytes:  # most requests carry no frames
            yield
            return
        with self._lock:
            used = self._used.get(caller, 0)
            if used + nbytes > self._limit:
                raise frames.TooLarge(
                    f"this caller is already sending {used} bytes; with {nbytes} more it would "
                    f"exceed the maximum of {self._limit} bytes in flight (wait for its other requests)"
                )
            self._used[caller] = used + nbytes
        try:
            yield
        finally:
            with self._lock:
                self._used[caller] -= nbytes
                if not self._used[caller]:
                    del self._used[caller]


class WorkerServer:
    """Serves one `WorkerCore` over gRPC, or several (`add`).

    ``callers`` maps each accepted credential to the caller it identifies:
    ``("client", name)`` for a model owner, ``("peer", worker_id)`` for another worker.
    With ``tls`` the credential is the common name of the caller's certificate
    (signed by the federation's CA); without, a bearer token.
    ``peers`` maps worker ids to the addresses this worker sends moved values to;
    ``token`` is this worker's own token towards them when there is no TLS.
    ``threads``: requests served at once; each connected model owner's open stream
    (one per thread of its that talks to this server) holds one while it is open.
    """

    def __init__(
        self,
        core: WorkerCore | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        callers: Mapping[str, tuple[str, str]] | None = None,
        peers: Mapping[str, str] | None = None,
        token: str = "",
        tls: TLS | None = None,
        deadline: float = DEFAULT_DEADLINE,
        max_message: int = DEFAULT_MAX_MESSAGE,
        threads: int = 16,
    ) -> None:
        from concurrent.futures import ThreadPoolExecutor

        if tls is not None and core is not None and common_name(tls.cert) != core.id:
            raise ValueError(
                f"the certificate is {common_name(tls.cert)!r}'s, not {core.id!r}'s: "
                "pass the worker's own certificate"
            )
        self._tls = tls
        self.deadline = deadline
        self.max_message = max_message
        self._hosted: dict[str, _Hosted] = {}
        self._budget = _Budget(max_message)
        self._lock = threading.Lock()
        self._stopping = False
        self._idle: set[grpc.ServicerContext] = set()  # streams waiting for their next request
        # Without SO_REUSEPORT (which gRPC sets by default) a second server on a busy port
        # fails to bind instead of silently taking a share of the first one's connections.
        self._server = grpc.server(
            ThreadPoolExecutor(max_workers=threads), options=[*_options(), ("grpc.so_reuseport", 0)]
        )
        handlers = {
            "Handle": grpc.unary_unary_rpc_method_handler(self._handle),
            "Stream": grpc.stream_stream_rpc_method_handler(self._stream),
        }
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, handlers),)
        )
        try:
            if tls is not None:
                creds = grpc.ssl_server_credentials(
                    [(tls.key, tls.cert)], root_certificates=tls.ca, require_client_auth=True
                )
                self.port = self._server.add_secure_port(f"{host}:{port}", creds)
            else:
                self.port = self._server.add_insecure_port(f"{host}:{port}")
        except RuntimeError:  # grpcio >= 1.5x raises where older versions returned 0
            self.port = 0
        if self.port == 0:
            raise OSError(_cannot_listen(host, port))
        self.address = f"{host}:{self.port}"
        self.core: WorkerCore | None = None  # the first worker hosted
        if core is not None:
            if not callers:
                raise ValueError("a worker server needs at least one caller's token (callers=...)")
            self.add(core, callers=callers, peers=peers, token=token)

    def add(
        self,
        core: WorkerCore,
        *,
        callers: Mapping[str, tuple[str, str]],
        peers: Mapping[str, str] | None = None,
        token: str = "",
        tls: TLS | None = None,
    ) -> WorkerCore:
        """Host ``core`` too: its own callers (a credential accepted for one worker reaches
        no other unless listed for it too) and peers. ``tls``: the worker's own certificate,
        which it presents to its peers (by default the server's). Moves between workers of
        one server stay in the process; the receiver must list the sender among its callers
        as a peer all the same."""
        if not callers:
            raise ValueError(f"worker {core.id!r} needs at least one caller's token (callers=...)")
        if any(not credential for credential in callers):
            raise ValueError("an empty credential would let anyone in: give every caller a token")
        if core.id in self._hosted:
            raise ValueError(f"this server already hosts a worker {core.id!r}")
        tls = tls or self._tls
        if peers and tls is not None and common_name(tls.cert) != core.id:
            raise ValueError(
                f"worker {core.id!r} would present {common_name(tls.cert)!r}'s certificate to its "
                "peers: pass its own (tls=TLS.from_dir(dir, id))"
            )
        hosted = _Hosted(
            core,
            [(cred.encode(), Sender(kind, name)) for cred, (kind, name) in callers.items()],  # type: ignore[arg-type]
            {
                pid: GrpcTransport(
                    pid,
                    address,
                    token=None if tls else token,
                    tls=tls,
                    deadline=self.deadline,
                    max_message=self.max_message,
                    persistent=False,
                )
                for pid, address in (peers or {}).items()
            },
        )
        core._send_to_peer = functools.partial(self._send_to_peer, hosted)
        core.max_reply = self.max_message
        core.framed = True
        with self._lock:
            self._hosted[core.id] = hosted
        if self.core is None:
            self.core = core
        return core

    # -- who is calling, and for which worker --------------------------------------------

    def _credential(self, context: grpc.ServicerContext) -> bytes:
        if self._tls is not None:  # gRPC verified the chain; the name is the certificate's CN
            names = context.auth_context().get("x509_common_name", [])
            return names[0] if len(names) == 1 else b""
        values = [v for k, v in context.invocation_metadata() if k == "authorization"]
        if len(values) != 1 or not isinstance(values[0], str) or not values[0].startswith("Bearer "):
            return b""  # none, or several: a proxy might have checked another one
        return values[0][len("Bearer ") :].encode()

    def _known(self, credential: bytes) -> bool:
        """Whether any hosted worker accepts ``credential`` (every one is asked)."""
        accepted = False
        for hosted in list(self._hosted.values()):
            if hosted.caller(credential) is not None:
                accepted = True
        return accepted

    def _admit(self, worker: str, credential: bytes, context: grpc.ServicerContext) -> tuple[_Hosted, Sender]:
        """The worker a request is for and who sends it, or the call ends with an error."""
        hosted = self._hosted.get(worker)
        if hosted is None and not worker and len(self._hosted) == 1:
            hosted = next(iter(self._hosted.values()))  # a single worker needs no name
        sender = hosted.caller(credential) if hosted is not None else None
        if sender is not None and hosted is not None:
            return hosted, sender
        if not self._known(credential):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown or missing credentials")
        if hosted is None:
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no worker {worker!r} at this address" if worker
                else "this server hosts several workers: name one",
            )
        context.abort(
            grpc.StatusCode.UNAUTHENTICATED, f"these credentials are not accepted by {worker!r}"
        )
        raise AssertionError("abort raises")

    # -- serving -------------------------------------------------------------------------

    def _handle(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        credential = self._credential(context)
        named = [v for k, v in context.invocation_metadata() if k == WORKER_KEY]
        hosted, sender = self._admit(str(named[0]) if len(named) == 1 else "", credential, context)
        if len(request) > self.max_message:
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, frames.too_large("the request", len(request), self.max_message)
            )
        with hosted.gate.enter(sender) as holds:
            if holds:  # replies to this method carry their tensors inside, one chunk at most
                hosted.core.framed, hosted.core.max_reply = False, min(CHUNK, self.max_message)
            reply = hosted.core.handle(request, sender)
            if getattr(reply, "frames", None):  # a guest's reply, encoded the holder's way
                reply = codec.encode(codec.decode(reply))
        return reply

    def _next_request(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes | None:
        """The next request's head; None when the caller is done or the server stops."""
        with self._lock:
            if self._stopping:
                return None
            self._idle.add(context)
        try:
            return next(requests, None)
        except grpc.RpcError:  # cancelled
            return None
        finally:
            with self._lock:
                self._idle.discard(context)

    def _stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        credential = self._credential(context)
        if not self._known(credential):  # before a byte of any message is read
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown or missing credentials")
        while (head := self._next_request(requests, context)) is not None:
            yield from self._serve_one(head, requests, credential, context)

    def _serve_one(
        self, head: bytes, requests: Iterator[bytes], credential: bytes, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        with _refusing(context):
            worker, rest = frames.split_head(head)
        hosted, sender = self._admit(worker, credential, context)
        with _refusing(context):
            announced, body = frames.read_manifest(rest, limit=self.max_message, what="the request")
            with self._budget.reserve(credential, sum(f.nbytes for f in announced)):
                tensors = frames.receive(announced, requests)
        with hosted.gate.enter(sender) as holds:
            if holds:
                hosted.core.framed, hosted.core.max_reply = True, self.max_message
            with codec.incoming(tensors):
                reply = hosted.core.handle(body, sender)
            del tensors
            reply_head, views = frames.outgoing("", reply)
            # The reply's tensors are views of the worker's own: copied into the chunks gRPC
            # sends while no other request may change them, so that the caller reads them
            # (or does not) without holding the worker.
            outgoing = collections.deque(frames.chunks(reply_head, views))
            del reply, views
        if len(outgoing) == 1:
            yield outgoing.popleft()
            return
        with _cancelled_after(self.deadline, context):  # a reply nobody reads ends at the deadline
            while outgoing:
                yield outgoing.popleft()  # each chunk is freed once gRPC has it

    def _send_to_peer(self, hosted: _Hosted, destination: str, data: bytes) -> bytes:
        local = self._hosted.get(destination)
        if local is not None and local is not hosted:
            return self._deliver_here(hosted, local, data)
        transport = hosted.peers.get(destination)
        if transport is None:
            raise WorkerUnavailable(
                f"{hosted.core.id!r} has no address for worker {destination!r}; add it to its peers"
            )
        with hosted.gate.waiting_for_peer():  # a move towards us meanwhile does not deadlock
            return transport(data)

    def _deliver_here(self, source: _Hosted, target: _Hosted, data: bytes) -> bytes:
        """A move between two workers of this server: no network, the same checks."""
        sender = Sender("peer", source.core.id)
        if sender not in (s for _, s in target.callers):
            raise WorkerUnavailable(
                f"{target.core.id!r} accepts no values from {source.core.id!r}: list it among "
                f"{target.core.id!r}'s callers as a peer"
            )
        tensors = [t.clone() for t in getattr(data, "frames", ())]  # the receiver's own copy
        with source.gate.waiting_for_peer(), target.gate.enter(sender) as holds:
            if holds:
                target.core.framed, target.core.max_reply = True, self.max_message
            with codec.incoming(tensors):
                return target.core.handle(bytes(data), sender)

    # -- life ----------------------------------------------------------------------------

    def start(self) -> WorkerServer:
        self._server.start()
        return self

    def stop(self, grace: float | None = 5.0) -> None:
        """Stop accepting calls; calls in flight get ``grace`` seconds to finish, open
        streams waiting for their next request end now."""
        with self._lock:
            self._stopping = True
            idle = list(self._idle)
        for context in idle:
            context.cancel()  # type: ignore[attr-defined]
        self._server.stop(grace).wait()
        for hosted in self._hosted.values():
            for transport in hosted.peers.values():
                transport.close()

    def wait(self) -> None:
        self._server.wait_for_termination()

    def __enter__(self) -> WorkerServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _cannot_listen(host: str, port: int) -> str:
    """Why gRPC could not bind ``host:port`` (it does not say): a plain socket bound the same
    way tells."""
    what = f"cannot listen on {host}:{port}"
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        return f"{what}: cannot resolve {host!r} ({exc})"
    family, kind, proto, _, address = infos[0]
    try:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
            probe.bind(address)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return f"{what}: the port is in use (is another worker serving there?); choose another --port"
        if exc.errno == errno.EADDRNOTAVAIL:
            return f"{what}: {host} is not an address of this machine; choose another --host"
        if exc.errno == errno.EACCES:
            return f"{what}: permission denied (ports below 1024 need privileges); choose another --port"
        return f"{what}: {exc.strerror or exc}"
    if port == 0:
        return f"{what}: no free port on that address"
    return f"{what}: the port was in use or unavailable; choose another --port"


@contextlib.contextmanager
def _cancelled_after(seconds: float, context: grpc.ServicerContext) -> Iterator[None]:
    """Cancel the call if the block (sending a reply to a caller that may not read it) takes
    longer than ``seconds``."""
    timer = threading.Timer(seconds, context.cancel)  # type: ignore[attr-defined]
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


@contextlib.contextmanager
def _refusing(context: grpc.ServicerContext) -> Iterator[None]:
    """A malformed or oversized stream message ends the stream with an error that says so."""
    try:
        yield
    except frames.TooLarge as exc:
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
    except ProtocolError as exc:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
