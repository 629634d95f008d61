"""The ``fedsecure`` command: ``run`` trains as an experiment file says, ``plot`` draws its
history, ``worker serve`` runs a worker as a server, ``certs`` makes the certificates of a test
federation.

``fedsecure worker serve``: a data owner's or an aggregator's worker, as a server.

Every setting comes from a flag or from a TOML file (``--config``); flags win.
A TOML file looks like::

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
import sys
import threading
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsecure.cli import experiment
from fedsecure.transport import certs
from fedsecure.transport.certs import load_secagg_identity
from fedsecure.transport.grpc import DEFAULT_MAX_MESSAGE, TLS, WorkerServer
from fedsecure.worker.core import WorkerCore
from fedsecure.worker.labels import Policy


def _pairs(values: list[str], flag: str, *, optional: bool = False) -> dict[str, str]:
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not key or (not optional and not (sep and value)):
            raise SystemExit(f"{flag} takes NAME=VALUE, got {item!r}")
        out[key] = value
    return out


DEFAULT_MEMORY_QUOTA = "4G"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"(\d+)\s*(?:([KMGT])(?:iB)?)?", re.IGNORECASE)

POLICIES = {
    "training": "the model owner may put models, train and evaluate them (Fit/Evaluate with "
    "allow-listed configurations), move the results to trusted aggregators and take part in "
    "secure aggregation, but runs no pointer op on the private data",
    "full": "the whole pointer API on the private data, subject to the release rules",
}


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


def _policy_mode(args: argparse.Namespace, policy: dict[str, Any], data: Any, strict: bool) -> str | None:
    """The deployment policy's name; None for a strict aggregator, which has its own."""
    mode = args.policy or policy.get("mode")
    if mode is not None and mode not in POLICIES:
        raise SystemExit(f"[policy] mode must be one of {', '.join(map(repr, POLICIES))}, got {mode!r}")
    if strict:
        if mode is not None:
            raise SystemExit(
                "--policy is the rule for a worker's own private data; an aggregator (--aggregator) holds "
                "none: the labels of the data it receives carry each owner's rule"
            )
        return None
    return mode or ("training" if data else "full")


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    config: dict[str, Any] = {}
    if args.config:
        try:
            config = tomllib.loads(Path(args.config).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SystemExit(f"cannot read the config file {args.config}: {exc}") from None
    policy = dict(config.get("policy", {}))
    peers = {k: dict(v) for k, v in config.get("peers", {}).items()}
    for pid, address in _pairs(args.peer, "--peer").items():
        peers.setdefault(pid, {})["address"] = address
    for pid, token in _pairs(args.peer_token, "--peer-token").items():
        peers.setdefault(pid, {})["token"] = token
    for pid in args.accept_peer:
        peers.setdefault(pid, {})
    clients = {**config.get("clients", {}), **_pairs(args.client, "--client", optional=True)}
    s = {
        "id": args.id or config.get("id"),
        "host": args.host or config.get("host", "127.0.0.1"),
        "port": args.port if args.port is not None else config.get("port", 0),
        "token": args.token or config.get("token", ""),
        "tls_dir": args.tls_dir or config.get("tls_dir"),
        "insecure": args.insecure or config.get("insecure", False),
        "max_message": args.max_message or config.get("max_message", DEFAULT_MAX_MESSAGE),
        "data": args.data or config.get("data"),
        "secagg_key": args.secagg_key or config.get("secagg_key"),
        "secagg_pki": args.secagg_pki or config.get("secagg_pki"),
        "trust": args.trust or config.get("trust", []),
        "clients": clients,
        "peers": peers,
        "strict": args.aggregator or policy.get("strict", False),
        "memory_quota": parse_size(
            args.memory_quota if args.memory_quota is not None else config.get("memory_quota", DEFAULT_MEMORY_QUOTA),
            "--memory-quota",
        ),
        "max_metric_numel": args.max_metric_numel
        if args.max_metric_numel is not None
        else policy.get("max_metric_numel", 1),
        "min_contributors": args.min_contributors
        if args.min_contributors is not None
        else policy.get("min_contributors", 2),
    }
    s["mode"] = _policy_mode(args, policy, s["data"], bool(s["strict"]))
    if not s["id"]:
        raise SystemExit("a worker needs an id: --id NAME (or id = ... in the config file)")
    if (s["secagg_key"] is None) != (s["secagg_pki"] is None):
        raise SystemExit("secure aggregation with the consistency check needs both --secagg-key (this worker's "
                         "NAME.secagg.key) and --secagg-pki (the federation's secagg.json), from `fedsecure certs --secagg`")
    if not clients:
        raise SystemExit("no model owner may call this worker: add --client NAME=TOKEN (or --client NAME with --tls-dir)")
    if not s["tls_dir"]:
        if any(not token for token in clients.values()):
            raise SystemExit("without --tls-dir each --client needs a token: --client NAME=TOKEN")
        if not s["insecure"] and not ipaddress.ip_address(_host_ip(s["host"])).is_loopback:
            raise SystemExit(
                f"refusing to serve {s['host']} without TLS: pass --tls-dir (see `fedsecure certs`), "
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


def serve(args: argparse.Namespace) -> int:
    s = _settings(args)
    policy = Policy(
        trusted_aggregators=frozenset(s["trust"]),
        max_metric_numel=int(s["max_metric_numel"]),
        min_contributors=int(s["min_contributors"]),
        strict=bool(s["strict"]),
        private_sends=False,
        training_only=s["mode"] == "training",
    )
    identity = None
    if s["secagg_key"]:
        try:
            identity = load_secagg_identity(s["secagg_key"], s["secagg_pki"], s["id"])
        except (OSError, ValueError) as exc:
            raise SystemExit(f"cannot load this worker's secure aggregation identity: {exc}") from None
    core = WorkerCore(s["id"], policy=policy, secagg_identity=identity, memory_quota=s["memory_quota"])
    tags = _load_data(core, s["data"]) if s["data"] else []
    tls = None
    if s["tls_dir"]:
        try:
            tls = TLS.from_dir(s["tls_dir"], core.id)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"cannot load this worker's TLS files: {exc}") from None
        # With TLS a caller is the name on its certificate.
        callers = {name: ("client", name) for name in s["clients"]}
        callers.update({pid: ("peer", pid) for pid in s["peers"]})
    else:
        callers = {token: ("client", name) for name, token in s["clients"].items()}
        for pid, peer in s["peers"].items():
            if "token" in peer:
                callers[peer["token"]] = ("peer", pid)
    try:
        server = WorkerServer(
            core,
            host=s["host"],
            port=int(s["port"]),
            callers=callers,
            peers={pid: p["address"] for pid, p in s["peers"].items() if "address" in p},
            token=s["token"],
            tls=tls,
            max_message=int(s["max_message"]),
        ).start()
    except OSError as exc:  # the port is taken, or the address is not this machine's
        raise SystemExit(str(exc)) from None
    role = "strict aggregator" if policy.strict else "worker"
    if s["mode"] is None:
        rules = "policy: aggregator (each owner's rules travel with its data)"
    elif s["mode"] == "training":
        rules = "policy: training (Fit/Evaluate only, no pointer ops on its data)"
    else:
        rules = "policy: full (the pointer API, under the release rules)"
    quota = "no memory quota" if s["memory_quota"] is None else f"memory quota {_size_name(s['memory_quota'])} per owner"
    print(f"fedsecure {role} {core.id!r} listening on {server.address}, {rules}, {quota}"
          + (f", serving {', '.join('#' + t for t in tags)}" if tags else "")
          + ("" if tls else ", without TLS"), flush=True)

    stopping = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stopping.wait()
    server.stop(grace=5.0)  # calls in flight finish first
    print(f"fedsecure {role} {core.id!r} stopped", flush=True)
    return 0


def _size_name(n: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if n and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return f"{n} bytes"


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="fedsecure", description="Federated learning that keeps data with its owner.")
    commands = top.add_subparsers(dest="command", required=True)
    worker = commands.add_parser("worker", help="run a worker").add_subparsers(dest="action", required=True)
    p = worker.add_parser("serve", help="serve a worker (a data owner, or an aggregator) over gRPC")
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
    p.add_argument("--max-metric-numel", type=int,
                   help="largest value that may leave as a metric (default 1: scalars; 0: none)")
    p.add_argument("--min-contributors", type=int,
                   help="owners an aggregate must combine before it may leave (default 2)")
    p.set_defaults(run=serve)
    experiment.add_commands(commands)
    # listed for --help; `main` hands its arguments to fedsecure.transport.certs
    commands.add_parser("certs", help="make a CA and certificates for a test federation")
    return top


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["certs"]:
        return certs.main(argv[1:])
    args = parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
