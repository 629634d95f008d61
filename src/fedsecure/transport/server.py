"""The worker's side: gRPC servers that host workers.

The servicer is thin (as in gRPC's own examples): it carries a request's bytes to
`WorkerCore.handle` and its reply back; the core stays sans-I/O and is the same one
`VirtualWorker` drives in one process. The core's settings for this transport are given once,
when a worker is added; what differs between requests (a ``Handle`` call's reply carries its
tensors inside and is at most one chunk) travels with the request (`WorkerCore.handle`'s ``framed`` and ``max_reply``).

One server may host several workers (`WorkerServer.add`), each with its own core, lock,
callers and peers; a request names the worker it is for (in the stream message's head,
or the ``fedsecure-worker`` metadata of a ``Handle`` call).

Every caller is authenticated before a byte of its message is decoded: with mutual TLS by
the common name of its certificate, or, without TLS (loopback experiments only), by a bearer
token in the call's metadata, compared in constant time.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import hmac
import socket
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from fedsecure.errors import ProtocolError, WorkerUnavailable
from fedsecure.transport import frames, kept
from fedsecure.transport.certs import common_name
from fedsecure.transport.client import GrpcTransport
from fedsecure.transport.frames import CHUNK
from fedsecure.transport.gate import Gate
from fedsecure.transport.service import (
    DEFAULT_DEADLINE,
    DEFAULT_MAX_MESSAGE,
    SERVICE,
    TLS,
    WORKER_KEY,
    options,
)
from fedsecure.wire import codec
from fedsecure.worker.core import WorkerCore
from fedsecure.worker.store import Sender


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
        self.kept = kept.Kept(min(kept.BUDGET, max_message))  # frames callers sent, to be named again
        self._lock = threading.Lock()
        self._stopping = False
        self._idle: set[grpc.ServicerContext] = set()  # streams waiting for their next request
        # Without SO_REUSEPORT (which gRPC sets by default) a second server on a busy port
        # fails to bind instead of silently taking a share of the first one's connections.
        self._server = grpc.server(
            ThreadPoolExecutor(max_workers=threads), options=[*options(), ("grpc.so_reuseport", 0)]
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
        # The core's settings for this server, once: what it sends (to its peers, in the
        # replies of streams) may carry tensors beside the message, up to max_message bytes.
        core.framed, core.max_reply = True, self.max_message
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
        with hosted.gate.enter(sender):  # this method's replies carry their tensors inside, one chunk at most
            return hosted.core.handle(request, sender, framed=False, max_reply=min(CHUNK, self.max_message))

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
                named = self.kept.copies(credential, announced)  # or refused before a byte of the frames is read
                tensors = frames.receive(announced, requests, named)
            for frame, tensor in zip(announced, tensors, strict=True):
                if frame.keep:
                    self.kept.keep(credential, tensor)
        with hosted.gate.enter(sender):
            with codec.incoming(tensors):
                reply = hosted.core.handle(body, sender, framed=True, max_reply=self.max_message)
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
        with source.gate.waiting_for_peer(), target.gate.enter(sender):
            return target.core.handle_local(data, sender, max_reply=self.max_message)

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
        self.kept.clear()
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
    except kept.Missing as exc:  # the caller sends the frame again in full
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
    except ProtocolError as exc:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
