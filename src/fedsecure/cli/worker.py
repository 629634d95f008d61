"""``fedsecure worker serve``: a data owner's or an aggregator's worker, as a server.

Every setting comes from a flag or from a TOML file (``--config``); flags win. The file's keys
are `WorkerFile`'s fields, each with its default there; an unknown key or a value of the wrong
type is refused (docs/federation.md lists them). Paths in the file (data, tls_dir, secagg_key,
secagg_pki) are relative to the file's folder, paths in flags to the working directory, so
``fedsecure worker serve --config DIR/bob.toml`` serves from anywhere. A TOML file looks like::

    id = "bob"
    host = "127.0.0.1"
    port = 7001
    tls_dir = "certs"             # mutual TLS: certs/ca.pem, certs/bob.pem, certs/bob.key
    token = "..."                 # without TLS: this worker's token towards its peers
    data = "bob.npz"              # arrays loaded as bob's private data, tagged by name
    trust = ["secure_worker"]     # aggregators bob's data may move to
    memory_quota = "4G"           # tensors each model owner may hold here (bytes, K/M/G/T, "none")
    [clients]                     # model owners allowed to call, by name
    owner = "..."                 # their token ("" with TLS: the certificate's name counts)
    [peers.secure_worker]         # workers this one sends values to / accepts values from
    address = "127.0.0.1:7003"
    token = "..."                 # without TLS: the peer's token, accepted from it
    [policy]
    mode = "training"             # or "full" (see --policy; default "training" with data)
    max_metric_numel = 1
    min_contributors = 2
    strict = false

A worker with private data serves it under a deployment policy (``--policy``): ``training``
(the default) lets the model owner train and evaluate models on the data and aggregate the
results, but run no pointer op on it; ``full`` opens the whole pointer API on it, under the
release rules. An aggregator holds no data of its own: the labels of the data it receives carry
each owner's rule.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import signal
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsecure.experiment.tables import from_table, read_toml, set_dotted
from fedsecure.fl import ConfigurationError
from fedsecure.transport.certs import load_secagg_identity
from fedsecure.transport.grpc import DEFAULT_MAX_MESSAGE, TLS, WorkerServer
from fedsecure.worker.core import WorkerCore
from fedsecure.worker.device import DeviceError
from fedsecure.worker.labels import Policy
from fedsecure.worker.secure import SecAggIdentity

DEFAULT_MEMORY_QUOTA = "4G"
PATH_KEYS = ("data", "tls_dir", "secagg_key", "secagg_pki")  # in a file: relative to the file's folder
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"(\d+)\s*(?:([KMGT])(?:iB)?)?", re.IGNORECASE)

POLICIES = {
    "training": "the model owner may put models, train and evaluate them (Fit/Evaluate with "
    "allow-listed configurations), move the results to trusted aggregators and take part in "
    "secure aggregation, but runs no pointer op on the private data",
    "full": "the whole pointer API on the private data, subject to the release rules",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerFile:
    address: str | None = None  # where this worker sends values for that peer
    token: str | None = None  # without TLS: the token the peer presents when it sends values here


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyFile:
    mode: str | None = None  # "training" or "full"; default: training with data, full without
    max_metric_numel: int = 1
    min_contributors: int = 2
    strict: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerFile:
    """A served worker's settings: the ``--config`` file's keys, the flags applied over them."""

    id: str | None = None
    host: str = "127.0.0.1"
    port: int = 0
    tls_dir: str | None = None
    token: str = ""
    insecure: bool = False
    max_message: int = DEFAULT_MAX_MESSAGE
    data: str | None = None
    secagg_key: str | None = None
    secagg_pki: str | None = None
    trust: tuple[str, ...] = ()
    memory_quota: int | str = DEFAULT_MEMORY_QUOTA
    device: str = "cpu"  # where this owner trains and keeps its data: auto, cpu, cuda, cuda:N, mps
    clients: Mapping[str, str] = field(default_factory=dict)
    peers: Mapping[str, PeerFile] = field(default_factory=dict)
    policy: PolicyFile = field(default_factory=PolicyFile)


# flag (its argparse name) -> the key it sets; a flag left out (None, False, empty) keeps the file's
_FLAGS = {
    "id": "id", "host": "host", "port": "port", "token": "token", "tls_dir": "tls_dir", "insecure": "insecure",
    "max_message": "max_message", "data": "data", "secagg_key": "secagg_key", "secagg_pki": "secagg_pki",
    "trust": "trust", "memory_quota": "memory_quota", "policy": "policy.mode", "aggregator": "policy.strict",
    "max_metric_numel": "policy.max_metric_numel", "min_contributors": "policy.min_contributors",
    "device": "device",
}


def _pairs(values: list[str], flag: str, *, optional: bool = False) -> dict[str, str]:
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not key or (not optional and not (sep and value)):
            raise SystemExit(f"{flag} takes NAME=VALUE, got {item!r}")
        out[key] = value
    return out


def parse_size(value: Any, what: str) -> int | None:
    """Bytes from ``value``: an int, or a string of digits with an optional binary unit (``512M``,
    ``4G``, ``4GiB``); ``"none"`` is no limit."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.lower() == "none":
            return None
        match = _SIZE.fullmatch(text)
        if match:
            return int(match[1]) * _UNITS[(match[2] or "").upper()]
    raise SystemExit(
        f"{what} takes a number of bytes, or one with a binary unit such as 512M or 4G "
        f"(K, M, G, T: powers of 1024), or none for no limit; got {value!r}"
    )


def _policy_mode(s: WorkerFile) -> str | None:
    """The deployment policy's name; None for a strict aggregator, which has its own."""
    mode = s.policy.mode
    if mode is not None and mode not in POLICIES:
        raise SystemExit(f"[policy] mode must be one of {', '.join(map(repr, POLICIES))}, got {mode!r}")
    if s.policy.strict:
        if mode is not None:
            raise SystemExit(
                "--policy is the rule for a worker's own private data; an aggregator (--aggregator) holds "
                "none: the labels of the data it receives carry each owner's rule"
            )
        return None
    return mode or ("training" if s.data else "full")


def _beside(tables: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The file's paths (`PATH_KEYS`) made relative to its folder, so that it serves from anywhere."""
    for key in PATH_KEYS:
        value = tables.get(key)
        if isinstance(value, str) and value:  # else reading the tables refuses it
            tables[key] = str(folder / Path(value).expanduser())
    return tables


def _tables(args: argparse.Namespace) -> dict[str, Any]:
    """The config file's tables (its paths relative to its folder) with the flags written over them
    (their paths relative to the working directory)."""
    tables = _beside(read_toml(args.config, "config file"), Path(args.config).absolute().parent) if args.config else {}
    given = {key: getattr(args, flag) for flag, key in _FLAGS.items()}
    flags = {key: value for key, value in given.items()
             if value is not None and value is not False and value != [] and value != ""}
    tables.update({key: flags.pop(key) for key in list(flags) if "." not in key})
    set_dotted(tables, flags)
    peers: dict[str, dict[str, str]] = {pid: {} for pid in args.accept_peer}
    for pid, address in _pairs(args.peer, "--peer").items():
        peers.setdefault(pid, {})["address"] = address
    for pid, token in _pairs(args.peer_token, "--peer-token").items():
        peers.setdefault(pid, {})["token"] = token
    current = tables.setdefault("peers", {})
    if isinstance(current, dict):  # else reading the tables says that it must be one
        for pid, peer in peers.items():
            current[pid] = {**current[pid], **peer} if isinstance(current.get(pid), dict) else peer
    clients = tables.setdefault("clients", {})
    if isinstance(clients, dict):
        clients.update(_pairs(args.client, "--client", optional=True))
    return tables


def _settings(args: argparse.Namespace) -> WorkerFile:
    try:
        s = from_table(WorkerFile, _tables(args), args.config or "fedsecure worker serve")
    except ConfigurationError as exc:
        raise SystemExit(str(exc)) from None
    if not s.id:
        raise SystemExit("a worker needs an id: --id NAME (or id = ... in the config file)")
    if (s.secagg_key is None) != (s.secagg_pki is None):
        raise SystemExit("secure aggregation with the consistency check needs both --secagg-key (this worker's "
                         "NAME.secagg.key) and --secagg-pki (the federation's secagg.json), from `fedsecure certs --secagg`")
    if not s.clients:
        raise SystemExit("no model owner may call this worker: add --client NAME=TOKEN (or --client NAME with --tls-dir)")
    if not s.tls_dir:
        if any(not token for token in s.clients.values()):
            raise SystemExit("without --tls-dir each --client needs a token: --client NAME=TOKEN")
        if not s.insecure and not ipaddress.ip_address(_host_ip(s.host)).is_loopback:
            raise SystemExit(
                f"refusing to serve {s.host} without TLS: pass --tls-dir (see `fedsecure certs`), "
                "or --insecure for a trusted network"
            )
    return s


def _host_ip(host: str) -> str:
    return "127.0.0.1" if host == "localhost" else host


def _load_data(core: WorkerCore, path: str) -> list[str]:
    try:
        with np.load(path, allow_pickle=False) as arrays:
            loaded = {name: arrays[name] for name in arrays.files}
    except (OSError, ValueError) as exc:
        raise SystemExit(f"cannot load the data file {path}: {exc} (expected an .npz of numeric arrays)") from None
    for name, array in loaded.items():
        core.load(torch.from_numpy(np.ascontiguousarray(array)), (name,))
    return sorted(loaded)


def _identity(s: WorkerFile) -> SecAggIdentity | None:
    if not s.secagg_key or s.id is None or s.secagg_pki is None:
        return None
    try:
        return load_secagg_identity(s.secagg_key, s.secagg_pki, s.id)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"cannot load this worker's secure aggregation identity: {exc}") from None


def _tls(s: WorkerFile, worker_id: str) -> TLS | None:
    if not s.tls_dir:
        return None
    try:
        return TLS.from_dir(s.tls_dir, worker_id)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"cannot load this worker's TLS files: {exc}") from None


def _callers(s: WorkerFile, tls: bool) -> dict[str, tuple[str, str]]:
    """Who may call, by credential: with TLS a caller is the name on its certificate."""
    if tls:
        return {name: ("client", name) for name in s.clients} | {pid: ("peer", pid) for pid in s.peers}
    callers = {token: ("client", name) for name, token in s.clients.items()}
    callers.update({peer.token: ("peer", pid) for pid, peer in s.peers.items() if peer.token is not None})
    return callers


def _banner(core: WorkerCore, s: WorkerFile, mode: str | None, quota: int | None, tags: list[str],
            address: str) -> str:
    role = "strict aggregator" if core.policy.strict else "worker"
    if mode is None:
        rules = "policy: aggregator (each owner's rules travel with its data)"
    elif mode == "training":
        rules = "policy: training (Fit/Evaluate only, no pointer ops on its data)"
    else:
        rules = "policy: full (the pointer API, under the release rules)"
    limit = "no memory quota" if quota is None else f"memory quota {_size_name(quota)} per owner"
    return (f"fedsecure {role} {core.id!r} listening on {address}, {rules}, {limit}"
            + (f", serving {', '.join('#' + t for t in tags)}" if tags else "")
            + ("" if s.tls_dir else ", without TLS"))


def serve(args: argparse.Namespace) -> int:
    s = _settings(args)
    mode = _policy_mode(s)
    quota = parse_size(s.memory_quota, "--memory-quota")
    policy = Policy(
        trusted_aggregators=frozenset(s.trust), max_metric_numel=s.policy.max_metric_numel,
        min_contributors=s.policy.min_contributors, strict=s.policy.strict, private_sends=False,
        training_only=mode == "training",
    )
    try:
        core = WorkerCore(str(s.id), policy=policy, secagg_identity=_identity(s), memory_quota=quota, device=s.device)
    except DeviceError as exc:
        raise SystemExit(f"--device: {exc}") from None
    tags = _load_data(core, s.data) if s.data else []
    tls = _tls(s, core.id)
    try:
        server = WorkerServer(
            core, host=s.host, port=s.port, callers=_callers(s, tls is not None),
            peers={pid: p.address for pid, p in s.peers.items() if p.address is not None},
            token=s.token, tls=tls, max_message=s.max_message,
        ).start()
    except OSError as exc:  # the port is taken, or the address is not this machine's
        raise SystemExit(str(exc)) from None
    print(_banner(core, s, mode, quota, tags, server.address), flush=True)
    stopping = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stopping.wait(0.5):  # wakes to run a handler that a signal to another thread left waiting
        pass
    server.stop(grace=5.0)  # calls in flight finish first
    print(f"fedsecure {'strict aggregator' if policy.strict else 'worker'} {core.id!r} stopped", flush=True)
    return 0


def _size_name(n: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if n and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return f"{n} bytes"


def add_commands(commands: Any) -> None:
    p = commands.add_parser("serve", help="serve a worker (a data owner, or an aggregator) over gRPC")
    p.add_argument("--config", help="TOML file with any of the settings below (flags win)")
    p.add_argument("--id", help="the worker's name, e.g. bob")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default: any free port, printed)")
    p.add_argument("--data", help=".npz file: its arrays become this worker's private data, tagged by name")
    p.add_argument("--secagg-key", help="this worker's NAME.secagg.key (`fedsecure certs --secagg NAME`): it then "
                   "signs in secure aggregation and takes part only with the consistency check")
    p.add_argument("--secagg-pki", help="the federation's secagg.json: every signer's verification key")
    p.add_argument("--tls-dir", help="mutual TLS with the certificates `fedsecure certs` wrote there "
                   "(ca.pem, ID.pem, ID.key); callers are then known by their certificates' names")
    p.add_argument("--insecure", action="store_true",
                   help="allow serving a non-loopback address without TLS (tokens in the clear)")
    p.add_argument("--max-message", type=int,
                   help=f"largest message in bytes, tensors included (default {DEFAULT_MAX_MESSAGE})")
    p.add_argument("--token", help="without TLS: this worker's own token, presented to its peers")
    p.add_argument("--client", action="append", default=[], metavar="NAME[=TOKEN]",
                   help="a model owner allowed to call this worker (repeatable; the token without TLS)")
    p.add_argument("--peer", action="append", default=[], metavar="ID=HOST:PORT",
                   help="another worker this one may send moved values to (repeatable)")
    p.add_argument("--peer-token", action="append", default=[], metavar="ID=TOKEN",
                   help="without TLS: the token another worker presents when it sends values here")
    p.add_argument("--accept-peer", action="append", default=[], metavar="ID",
                   help="with TLS: another worker allowed to send values here (repeatable)")
    p.add_argument("--trust", action="append", default=[], metavar="ID",
                   help="an aggregator this worker's private data may move to (repeatable; default none)")
    p.add_argument("--aggregator", action="store_true",
                   help="a strict aggregator: runs no op on others' data, releases only its own mean")
    p.add_argument("--policy", choices=sorted(POLICIES),
                   help="what a model owner may do with this worker's private data (--data; default "
                   + "training). " + " ".join(f"{name}: {what}." for name, what in POLICIES.items())
                   + " Not for an aggregator: the data it receives carries its owner's rule.")
    p.add_argument("--memory-quota", metavar="BYTES",
                   help="bytes of tensors each model owner may hold on this worker, e.g. 512M or 4G "
                   f"(binary units; none: no limit; default {DEFAULT_MEMORY_QUOTA})")
    p.add_argument("--device", help="where this worker trains and evaluates, and keeps its data: auto, cpu, "
                   "cuda, cuda:N or mps (default cpu; auto: a GPU where there is one)")
    p.add_argument("--max-metric-numel", type=int,
                   help="largest value that may leave as a metric (default 1: scalars; 0: none)")
    p.add_argument("--min-contributors", type=int,
                   help="owners an aggregate must combine before it may leave (default 2)")
    p.set_defaults(run=serve)
