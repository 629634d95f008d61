"""A federation in one directory, ready to serve: ``fedsecure federation init DIR --owners ...``.

`plan` cuts the owners' shares of a data set with the simulation's own code (`Experiment.partitions`
and `owners.shares_of`, so each owner holds what it would hold in ``local`` or ``processes`` mode)
and lays out every file as tables; `write` puts them in the directory:

- ``certs/``: a CA and a certificate per party (mutual TLS), or nothing when tokens are used;
- ``NAME.npz``: owner NAME's private data, tagged ``x``, ``y`` (and ``x_test``, ``y_test``, held out
  for federated evaluation);
- ``NAME.toml``: each worker's ``fedsecure worker serve --config`` file (paths in it are relative
  to its directory);
- ``run.toml``: the model owner's experiment in ``remote`` mode, and for a data set read from a
  file ``owner_test.npz``, the test set the model owner evaluates on.

The model owner is known to the workers by `MODEL_OWNER`, the certificate name remote mode presents.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedsecure.experiment.config import DEFAULT_AGGREGATOR, Experiment, parse
from fedsecure.experiment.owners import MODEL_OWNER, shares_of
from fedsecure.fl import ConfigurationError
from fedsecure.transport.certs import CA, DEFAULT_HOSTS, check_name, write_federation

CERTS = "certs"
EXPERIMENT_FILE = "run.toml"
OWNER_TEST = "owner_test.npz"
BUILT_IN = ("digits", "fashion_mnist", "fashion-mnist")
# What the model owner trains with unless run.toml is edited (the digits example's settings).
_TRAINING: dict[str, dict[str, Any]] = {
    "model": {"name": "mlp", "hidden": 64},
    "training": {"epochs": 2, "batch_size": 16, "optimizer": "SGD", "lr": 0.05, "momentum": 0.9},
}
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True, slots=True, kw_only=True)
class FederationSpec:
    """What ``federation init`` was asked for; checked when made."""

    owners: tuple[str, ...]
    data: str = "digits"
    partition: str = "iid"
    alpha: float | None = None
    classes_per_worker: int | None = None
    test_fraction: float = 0.2
    seed: int = 0
    rounds: int = 10
    aggregator: str = DEFAULT_AGGREGATOR
    host: str = "127.0.0.1"
    base_port: int = 7001
    tls: bool = True

    def __post_init__(self) -> None:
        check_parties(self.owners, self.aggregator)
        last = self.base_port + len(self.owners)
        if self.base_port < 1 or last > 65535:
            raise ConfigurationError(f"--base-port {self.base_port} leaves no room for {len(self.owners) + 1} "
                                     "ports (owner i gets base + i, the aggregator the next): pick 1 to "
                                     f"{65535 - len(self.owners)}")
        if not self.data.endswith((".npz", ".csv")) and self.data not in BUILT_IN:
            raise ConfigurationError(f"--data {self.data!r} is neither a built-in data set ({', '.join(BUILT_IN[:2])}) "
                                     "nor a .npz or .csv file")
        needs = {"dirichlet": ("alpha", "--alpha 0.5"), "quantity": ("alpha", "--alpha 0.5"),
                 "shards": ("classes_per_worker", "--classes-per-worker 2")}.get(self.partition)
        if needs is not None and getattr(self, needs[0]) is None:
            raise ConfigurationError(f"--partition {self.partition} needs {needs[1].split()[0]} (for example {needs[1]})")
        if not self.tls and not _loopback(self.host):
            raise ConfigurationError(f"--token sends tokens in the clear: serving {self.host} needs --tls "
                                     "(the default), or --host 127.0.0.1 for a trial on this machine")

    @property
    def from_file(self) -> bool:
        return self.data not in BUILT_IN

    def address(self, index: int) -> str:
        """Where party ``index`` listens: owners first, in order, then the aggregator."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.base_port + index}"


def check_parties(owners: Sequence[str], aggregator: str) -> None:
    """Refuse names that cannot be parties, or whose files or certificates would collide."""
    if len(owners) < 2:
        raise ConfigurationError(f"a federation needs at least two data owners (--owners a,b,...), got {list(owners)}: "
                                 "the aggregator releases only means over two or more")
    for name in (*owners, aggregator):
        try:
            check_name(name)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
    folded = [name.casefold() for name in owners]
    repeated = sorted({name for name, low in zip(owners, folded, strict=True) if folded.count(low) > 1})
    if repeated:
        raise ConfigurationError(f"owner names must differ (also in case: they name files): {repeated}")
    if aggregator.casefold() in folded:
        raise ConfigurationError(f"{aggregator!r} is the aggregator's name (--aggregator): give the owner another")
    taken = {MODEL_OWNER: "the model owner's name", CA: "the CA's file name (certs/ca.pem)",
             Path(EXPERIMENT_FILE).stem: f"taken by the model owner's {EXPERIMENT_FILE}",
             Path(OWNER_TEST).stem: f"taken by the model owner's {OWNER_TEST}"}
    for name in (*owners, aggregator):
        if name.casefold() in taken:
            raise ConfigurationError(f"{name!r} cannot be a party's name here: it is {taken[name.casefold()]}")


@dataclass(frozen=True, slots=True)
class Plan:
    """Every file of the federation, as data: `write` puts it on disk."""

    spec: FederationSpec
    workers: dict[str, dict[str, Any]]  # worker id -> its config file's tables
    experiment: dict[str, Any]  # run.toml's tables
    shares: dict[str, dict[str, np.ndarray]]  # file name -> arrays (owners' data, the model owner's test set)
    summary: str = ""


def plan(spec: FederationSpec, name: str) -> Plan:
    """The federation ``spec`` asks for; ``name`` names its experiment. Reads and partitions the data."""
    tables: dict[str, Any] = {"experiment": {"seed": spec.seed}, "data": _cut(spec)}
    exp = parse(tables, "fedsecure federation init", Path.cwd())
    data = exp.dataset()
    parts = exp.partitions(data)
    shares = {f"{owner}.npz": {tag: t.numpy() for tag, t in shares_of(exp, data, parts, i).items()}
              for i, owner in enumerate(spec.owners)}
    if spec.from_file:
        shares[OWNER_TEST] = _test_set(exp, data.x_test.numpy(), data.y_test.numpy(), data.num_classes)
    parties = [*spec.owners, MODEL_OWNER, spec.aggregator]
    tokens = {} if spec.tls else {p: secrets.token_urlsafe(32) for p in parties}
    workers = {owner: _owner_file(spec, i, tokens) for i, owner in enumerate(spec.owners)}
    workers[spec.aggregator] = _aggregator_file(spec, tokens)
    experiment = _experiment_file(spec, name, tokens)
    parse(experiment, EXPERIMENT_FILE)  # what `fedsecure run` will read must be a valid experiment
    sizes = ", ".join(f"{o} {len(p)}" for o, p in zip(spec.owners, parts, strict=True))
    summary = f"{data.name}: {len(data.y_train)} training samples by {spec.partition} ({sizes}), {len(data.y_test)} to test"
    return Plan(spec, workers, experiment, shares, summary)


def _cut(spec: FederationSpec) -> dict[str, Any]:
    """The [data] section that cuts the owners' shares, as a simulation of this federation would."""
    cut: dict[str, Any] = {"dataset": spec.data, "workers": len(spec.owners), "partition": spec.partition,
                           "test_fraction": spec.test_fraction}
    if spec.alpha is not None:
        cut["alpha"] = spec.alpha
    if spec.classes_per_worker is not None:
        cut["classes_per_worker"] = spec.classes_per_worker
    return cut


def _test_set(exp: Experiment, x: np.ndarray, y: np.ndarray, classes: int) -> dict[str, np.ndarray]:
    """The model owner's file: its test set, also under x_train/y_train, which the experiment reader
    requires (a remote run trains nothing there: it reads only the input shape and the classes)."""
    if len(y) == 0 or int(y.max()) + 1 != classes:
        raise ConfigurationError(f"{exp.config.data.dataset}: the test set holds no sample of the last class "
                                 f"({classes - 1}), so the model owner could not tell the number of classes: "
                                 "give the file more samples of it, or an x_test/y_test that has them")
    return {"x_train": x, "y_train": y, "x_test": x, "y_test": y}


def _credentials(spec: FederationSpec, party: str, tokens: Mapping[str, str]) -> dict[str, Any]:
    return {"tls_dir": CERTS} if spec.tls else {"token": tokens[party]}


def _owner_file(spec: FederationSpec, index: int, tokens: Mapping[str, str]) -> dict[str, Any]:
    owner = spec.owners[index]
    port = spec.base_port + index
    return {
        "id": owner, "host": spec.host, "port": port, **_credentials(spec, owner, tokens),
        "data": f"{owner}.npz", "trust": [spec.aggregator],
        "clients": {MODEL_OWNER: tokens.get(MODEL_OWNER, "")},
        "peers": {spec.aggregator: {"address": spec.address(len(spec.owners))}},
        "policy": {"mode": "training"},
    }


def _aggregator_file(spec: FederationSpec, tokens: Mapping[str, str]) -> dict[str, Any]:
    accepted = {o: ({} if spec.tls else {"token": tokens[o]}) for o in spec.owners}
    return {
        "id": spec.aggregator, "host": spec.host, "port": spec.base_port + len(spec.owners),
        **_credentials(spec, spec.aggregator, tokens),
        "clients": {MODEL_OWNER: tokens.get(MODEL_OWNER, "")},
        "peers": accepted, "policy": {"strict": True},
    }


def _experiment_file(spec: FederationSpec, name: str, tokens: Mapping[str, str]) -> dict[str, Any]:
    workers: dict[str, Any] = {
        "mode": "remote", "aggregator": spec.aggregator, "aggregator_address": spec.address(len(spec.owners)),
    }
    workers |= {"tls_dir": CERTS} if spec.tls else {"token": tokens[MODEL_OWNER]}
    workers["remote"] = [{"id": o, "address": spec.address(i)} for i, o in enumerate(spec.owners)]
    return {
        "experiment": {"name": name, "rounds": spec.rounds, "seed": spec.seed},
        "data": {"dataset": OWNER_TEST if spec.from_file else spec.data},
        **_TRAINING,
        "strategy": {"name": "fedavg", "fraction_evaluate": 1.0 if spec.test_fraction > 0 else 0.0},
        "workers": workers,
    }


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- writing -------------------------------------------------------------------------------------


def claim(directory: Path, *, force: bool) -> None:
    """Refuse a directory that holds anything, unless ``force``."""
    if directory.exists() and not directory.is_dir():
        raise ConfigurationError(f"{directory} is a file: give a directory for the federation")
    if directory.is_dir() and any(directory.iterdir()) and not force:
        raise ConfigurationError(f"{directory} is not empty: pass --force to write the federation into it "
                                 "(its files of the same names are replaced), or choose a new directory")


def write(p: Plan, directory: Path, *, force: bool) -> list[Path]:
    """Write the federation ``p`` into ``directory`` (made with mode 0700); returns the files written.
    Keys, tokens and data are readable by their owner only."""
    claim(directory, force=force)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    written: list[Path] = []
    if p.spec.tls:
        hosts = list(dict.fromkeys([p.spec.host, *DEFAULT_HOSTS]))
        parties = [*p.spec.owners, p.spec.aggregator, MODEL_OWNER]
        certs = write_federation(directory / CERTS, parties, hosts=hosts, overwrite=force)
        written += [path for pair in certs.values() for path in (pair.cert, pair.key)]
    for file, arrays in p.shares.items():
        with _private(directory / file) as out:
            np.savez(out, **arrays)  # type: ignore[arg-type]  # the stubs fear a key named allow_pickle
        written.append(directory / file)
    secret = "" if p.spec.tls else "; holds tokens: keep it private"
    for worker, tables in p.workers.items():
        header = f"fedsecure worker serve --config {worker}.toml (paths are relative to this file){secret}"
        written.append(_write_toml(directory / f"{worker}.toml", tables, header))
    header = (f"the model owner's experiment: fedsecure run {EXPERIMENT_FILE} (paths relative to this file){secret}"
              f"\nowners' shares: {p.summary}; seed {p.spec.seed}, test_fraction {p.spec.test_fraction} held out on each")
    written.append(_write_toml(directory / EXPERIMENT_FILE, p.experiment, header))
    return written


def _private(path: Path) -> Any:
    """``path`` opened for writing, created or truncated, readable by its owner only."""
    if path.is_symlink():
        path.unlink()  # replace a link instead of writing through it
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "wb")


def _write_toml(path: Path, tables: Mapping[str, Any], header: str) -> Path:
    with _private(path) as out:
        out.write(toml_text(tables, header).encode())
    return path


def toml_text(tables: Mapping[str, Any], header: str = "") -> str:
    """TOML for plain tables of strings, numbers, booleans, arrays of them, sub-tables and arrays of
    tables (what `fedsecure.experiment.tables.read_toml` reads back unchanged)."""
    lines = [f"# {line}" for line in header.splitlines()]
    _table(lines, [], tables)
    return "\n".join(lines).strip("\n") + "\n"


def _table(lines: list[str], path: list[str], table: Mapping[str, Any]) -> None:
    nested = {k: v for k, v in table.items() if isinstance(v, Mapping)}
    arrays = {k: v for k, v in table.items() if isinstance(v, list) and v and all(isinstance(i, Mapping) for i in v)}
    plain = {k: v for k, v in table.items() if k not in nested and k not in arrays}
    if path and (plain or not (nested or arrays)):
        lines += ["", f"[{'.'.join(map(_key, path))}]"]
    lines += [f"{_key(k)} = {_value(v)}" for k, v in plain.items()]
    for key, sub in nested.items():
        _table(lines, [*path, key], sub)
    for key, items in arrays.items():
        for item in items:
            if any(isinstance(v, Mapping | list) and not _scalars(v) for v in item.values()):
                raise ValueError(f"an array of tables with tables inside ({key}) is not written here")
            lines += ["", f"[[{'.'.join(map(_key, [*path, key]))}]]"]
            lines += [f"{_key(k)} = {_value(v)}" for k, v in item.items()]


def _scalars(value: Any) -> bool:
    return isinstance(value, list) and not any(isinstance(v, Mapping | list) for v in value)


def _key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _string(key)


def _string(text: str) -> str:
    # JSON's escapes are TOML's too (\" \\ \n \t \uXXXX); TOML also wants DEL escaped.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise ValueError(f"cannot write {value!r} as a TOML value")
