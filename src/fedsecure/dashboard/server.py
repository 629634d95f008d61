"""A dashboard server: a socket bound before anything starts (so the URL, with the port that
``port=0`` picked, is known at once), and uvicorn serving the application on it, in the foreground
or in a background thread beside a run."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import uvicorn

from fedsecure.dashboard.app import create_app
from fedsecure.fl import ConfigurationError

LOOPBACK = ("127.0.0.1", "::1", "localhost")


class _Server(uvicorn.Server):
    """uvicorn's server, ending the event streams first when it shuts down (they never end
    by themselves, and uvicorn waits for open responses)."""

    def __init__(self, config: uvicorn.Config, stopping: threading.Event) -> None:
        super().__init__(config)
        self.stopping = stopping

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.stopping.set()
        await super().shutdown(sockets)


def _listen(host: str, port: int) -> socket.socket:
    if not 0 <= port <= 65535:
        raise ConfigurationError(f"--port must be between 0 and 65535 (0 picks a free port), got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ConfigurationError(f"cannot serve the dashboard on host {host!r}: {exc.strerror}") from exc
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ConfigurationError(f"cannot serve the dashboard on {host}:{port}: {exc.strerror}; choose "
                                 f"another --port (0 picks a free one)") from exc
    sock.listen(128)
    return sock


class Dashboard:
    """The dashboard over the runs under ``root`` (an existing directory), bound to host:port."""

    def __init__(self, root: Path, host: str, port: int) -> None:
        self.root = root
        self.stopping = threading.Event()
        self._socket = _listen(host, port)
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self._socket.getsockname()[1]}/"
        config = uvicorn.Config(create_app(root, stopping=self.stopping), log_config=None, log_level="warning",
                                access_log=False, lifespan="off", timeout_graceful_shutdown=2)
        self._server = _Server(config, self.stopping)
        self._thread: threading.Thread | None = None

    @property
    def public(self) -> bool:
        return self.url.split("//", 1)[1].rsplit(":", 1)[0].strip("[]") not in LOOPBACK

    def run(self) -> None:
        """Serve until interrupted (Ctrl-C)."""
        self._server.run(sockets=[self._socket])

    def start(self, timeout: float = 10.0) -> None:
        """Serve in a daemon thread; returns once the server accepts requests."""
        self._thread = threading.Thread(target=self.run, name="fedsecure-dashboard", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the dashboard at {self.url} did not start")
            time.sleep(0.02)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and wait (up to ``timeout`` seconds) for the server to close."""
        self.stopping.set()
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self._socket.close()

    def __enter__(self) -> Dashboard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
