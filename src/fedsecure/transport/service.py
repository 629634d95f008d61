"""The gRPC service that workers serve and model owners call: its names, limits and credentials.

There is no .proto to compile: the methods take and return raw bytes. ``Stream`` is a
long-lived bidirectional stream of requests and replies in the format of `frames` (a
message's large tensors travel beside it); ``Handle`` is one request in, one reply out, with
tensors inside the message (a reply of at most `frames.CHUNK` bytes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedsecure.errors import FedsecureError
from fedsecure.transport.certs import load_pem
from fedsecure.transport.frames import CHUNK

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


def options() -> list[tuple[str, int]]:
    """gRPC's message limits for both sides: every gRPC message is one chunk at most (plus
    framing); size limits apply to the whole request or reply, counted by fedsecure."""
    return [
        ("grpc.max_send_message_length", 2 * CHUNK),
        ("grpc.max_receive_message_length", 2 * CHUNK),
    ]
