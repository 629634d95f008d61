"""Worker servers as child processes on this machine: for examples, tests and trials.

``with WorkerProcess("bob", data="bob.npz", clients={"owner": token}) as bob_proc:``
starts ``fedsecure worker serve`` in its own process, waits until it listens, and
stops it with SIGTERM (calls in flight finish) when the block ends.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from fedsecure.transport.client import connect
from fedsecure.transport.service import TLS
from fedsecure.worker.client import WorkerClient

_LISTENING = re.compile(r"listening on (\S+?)(,|\s|$)")


class WorkerProcess:
    """One ``fedsecure worker serve`` child process."""

    def __init__(
        self,
        worker_id: str,
        *,
        clients: Mapping[str, str],
        tls_dir: str | None = None,
        data: str | None = None,
        token: str | None = None,
        peers: Mapping[str, str] | None = None,
        peer_tokens: Mapping[str, str] | None = None,
        accept_peers: Iterable[str] = (),
        trust: Iterable[str] = (),
        aggregator: bool = False,
        secagg: tuple[str, str] | None = None,
        policy: str | None = None,
        memory_quota: int | str | None = None,
        extra: Iterable[str] = (),
        startup_timeout: float = 60.0,
    ) -> None:
        """``policy``: ``"training"`` or ``"full"`` (``--policy``; by default the worker's own:
        training for a worker with ``data``). ``memory_quota``: bytes (or ``"512M"``, ``"4G"``,
        ``"none"``) of tensors each model owner may hold there (``--memory-quota``)."""
        self.id = worker_id
        self.token = token or secrets.token_urlsafe(24)
        # --flag=value throughout: a random token may start with "-"
        args = [sys.executable, "-m", "fedsecure", "worker", "serve", f"--id={worker_id}",
                "--port=0", f"--token={self.token}"]
        args += [f"--client={name}={tok}" if tok else f"--client={name}" for name, tok in clients.items()]
        if tls_dir:
            args.append(f"--tls-dir={tls_dir}")
        args += [f"--accept-peer={pid}" for pid in accept_peers]  # with TLS: by certificate
        args += [f"--peer={pid}={address}" for pid, address in (peers or {}).items()]
        args += [f"--peer-token={pid}={tok}" for pid, tok in (peer_tokens or {}).items()]
        args += [f"--trust={t}" for t in trust]
        if data:
            args.append(f"--data={data}")
        if aggregator:
            args.append("--aggregator")
        if policy is not None:
            args.append(f"--policy={policy}")
        if memory_quota is not None:
            args.append(f"--memory-quota={memory_quota}")
        if secagg is not None:  # (this worker's NAME.secagg.key, the federation's secagg.json)
            args += [f"--secagg-key={secagg[0]}", f"--secagg-pki={secagg[1]}"]
        args += list(extra)
        self._args = args
        self._timeout = startup_timeout
        self.process: subprocess.Popen[str] | None = None
        self.address = ""
        self.banner = ""  # the line the worker printed when it started listening

    def start(self) -> WorkerProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            self._args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()  # the server says where it listens, then serves
        match = _LISTENING.search(line)
        if match is None:
            rest = self.process.stdout.read() if self.process.poll() is not None else ""
            self.stop()
            raise RuntimeError(f"worker {self.id!r} did not start: {line}{rest}")
        self.address = match.group(1)
        self.banner = line.strip()
        return self

    def connect(self, credentials: str | TLS, **kwargs: Any) -> WorkerClient:
        """The model owner's handle on this worker (a token, or its `TLS` certificate)."""
        return connect(self.id, self.address, credentials=credentials, **kwargs)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then wait; returns the exit code."""
        proc = self.process
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        return proc.returncode

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
