"""Experiments from a TOML file: ``fedsecure run examples/digits.toml``.

A file has the sections below; every key is optional except where noted, and an unknown key or a
value of the wrong type is an error (a typo must not silently fall back to a default). Each
section is a frozen dataclass below, whose fields are its keys with their one default (None:
the library's own default, or off); `load` reads a file into an `Experiment` once, and the rest
of the run reads typed fields. Only ``[workers]`` says where workers run: the same experiment
runs in one process, in worker processes, or on remote servers.

Paths: a relative path written in a file starts at that file's directory, wherever the command
runs (data sets, output, tensorboard, certificates); a path given on the command line (``--output``,
``--set data.dataset=...``) starts at the working directory, as a shell user expects.

    [experiment]  name, rounds, seed, output (a directory: history.json, history.csv, status.json,
                  checkpoint/; default runs/NAME in the working directory), tensorboard (a log
                  directory; needs the tensorboard package), evaluate_every (rounds between
                  evaluations, default 1; the last round is always evaluated)
    [data]        dataset ("digits", "fashion_mnist", or a .npz / .csv path), path, subset,
                  workers, partition ("iid", "dirichlet", "shards", "quantity"), alpha,
                  classes_per_worker, min_size (dirichlet, quantity: samples each worker holds at
                  least; default 10), floor (quantity: every worker gets min_size samples first and
                  only the rest is split by Dirichlet(alpha), for thousands of workers), test_fraction
                  (held out on each worker for federated evaluation)
    [model]       name ("mlp", "cnn_niid", "cnn_mcmahan"), hidden (mlp), dropout (before the output layer)
    [strategy]    name (fedavg, fedprox, fedavgm, fedadam, fedyogi, fedadagrad), fraction_fit,
                  min_fit_workers, fraction_evaluate, and the strategy's own settings
                  (proximal_mu, server_learning_rate, server_momentum, beta_1, beta_2, tau)
    [training]    epochs, batch_size, optimizer, lr, momentum, weight_decay, nesterov, loss, max_steps;
                  local DP-SGD on every worker: dp_sgd_noise_multiplier and dp_sgd_max_grad_norm (both
                  required to turn it on), dp_sgd_delta (default 1e-5); workers need fedsecure[dp-sgd]
    [aggregation] rule ("mean", "median", "trimmed_mean", "krum", "multi_krum", "norm_bounded_mean"),
                  clip_norm, and the rule's options (trim, byzantine, keep, quantile);
                  secure ("trusted": the aggregator sees the updates; "pairwise": no one does, the
                  model owner learns only their sum; "shares": additive shares among share holders
                  that must not collude), and for "pairwise": bound (largest absolute value of an
                  update's coordinate), threshold (survivors needed), degree (SecAgg+ neighbours),
                  bits (32 or 64), consistency_check (signed keys and the consistency-check round
                  against a malicious model owner); for "shares": frac_bits (fixed point, default 24)
    [privacy]     DP-FedAvg around the strategy: noise_multiplier, clip_norm (both required), delta,
                  accountant ("rdp" or "pld"), budget_epsilon, adaptive_clipping, target_quantile
    [workers]     mode ("local", "processes", "ray" or "remote"), aggregator, strict, parallelism,
                  work_deadline (seconds a worker may take to train in a round; default 3600),
                  device (where simulated owners train: "cpu" (default), "auto", "cuda", "cuda:N",
                  "mps"; a served worker's own --device says it for remote owners);
                  for "processes" (simulation hosts on this machine): processes, threads (torch threads
                  per process, default 1; in "ray" mode per actor, default num_cpus // concurrency);
                  for "processes" and "ray": concurrency (owners each host trains at a time, each
                  in a thread of one process; default 1);
                  for "ray" (simulation hosts in Ray actors; needs fedsecure[ray]): address ("auto" or
                  a cluster's address joins it; default: a local Ray for the run), actors (default:
                  as many as the free CPUs allow), num_cpus and num_gpus (per actor; torch threads
                  per actor: num_cpus // concurrency, at least 1), ship_data
                  (true: the shares reach the actors through Ray's object store, for a data set
                  that only this machine can read);
                  for "remote": token or tls_dir, and [[workers.remote]] tables (id, address),
                  plus [workers.aggregator_address]; for secure = "shares": share_holders (ids,
                  default [aggregator, aggregator + "_2"]), and in remote mode
                  [workers.share_holder_addresses] (id = address); with consistency_check in remote
                  mode: secagg_pki (the federation's secagg.json, from `fedsecure certs --secagg`)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch

from fedsecure.data import Dataset, load_csv, load_digits, load_fashion_mnist, load_npz, partition
from fedsecure.experiment.tables import from_table, read_toml, set_dotted, to_table
from fedsecure.fl import DPSGD, STRATEGIES, AggregationRule, ConfigurationError, LocalTraining, Strategy
from fedsecure.fl.secure import SecureSettings
from fedsecure.privacy import DPFedAvg
from fedsecure.worker.device import DeviceError
from fedsecure.worker.device import check_name as check_device_name

SecureMode = Literal["trusted", "pairwise", "shares"]
WorkersMode = Literal["local", "processes", "ray", "remote"]
DEFAULT_AGGREGATOR = "secure_worker"


def _given(section: Any, names: tuple[str, ...]) -> dict[str, Any]:
    """The fields among ``names`` that the file set (not None)."""
    return {n: getattr(section, n) for n in names if getattr(section, n) is not None}


@dataclass(frozen=True, slots=True, kw_only=True)
class ExperimentSection:
    name: str | None = None  # default: the file's stem
    rounds: int = 10
    seed: int = 0
    output: str | None = None  # default: runs/NAME
    tensorboard: str | None = None
    evaluate_every: int = 1  # rounds between evaluations; the last round is always evaluated

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigurationError(f"[experiment] rounds must be >= 1, got {self.rounds}")
        if self.evaluate_every < 1:
            raise ConfigurationError(f"[experiment] evaluate_every must be >= 1 (rounds between evaluations), "
                                     f"got {self.evaluate_every}")


@dataclass(frozen=True, slots=True, kw_only=True)
class DataSection:
    dataset: str = "digits"
    path: str | None = None
    subset: int | None = None
    workers: int = 10
    partition: str = "iid"
    alpha: float | None = None
    classes_per_worker: int | None = None
    min_size: int | None = None
    floor: bool | None = None
    test_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.dataset not in ("digits", "fashion_mnist", "fashion-mnist") and not self.dataset.endswith((".npz", ".csv")):
            raise ConfigurationError(
                f"[data] dataset {self.dataset!r} is not 'digits', 'fashion_mnist' or a .npz/.csv file"
            )
        if not 0 <= self.test_fraction < 1:
            raise ConfigurationError(f"[data] test_fraction must be in [0, 1), got {self.test_fraction}")


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSection:
    name: str = "mlp"
    hidden: int | None = None
    dropout: float | None = None

    def options(self) -> dict[str, Any]:
        return _given(self, ("hidden", "dropout"))


@dataclass(frozen=True, slots=True, kw_only=True)
class StrategySection:
    name: str = "fedavg"
    fraction_fit: float | None = None
    min_fit_workers: int | None = None
    fraction_evaluate: float | None = None
    proximal_mu: float | None = None
    server_learning_rate: float | None = None
    server_momentum: float | None = None
    beta_1: float | None = None
    beta_2: float | None = None
    tau: float | None = None

    def options(self) -> dict[str, Any]:
        """The strategy's own settings that the file set."""
        return _given(self, tuple(f.name for f in fields(self) if f.name != "name"))


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainingSection:
    epochs: int | None = None
    batch_size: int | None = None
    optimizer: str | None = None
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    nesterov: bool | None = None
    loss: str | None = None
    max_steps: int | None = None
    dp_sgd_noise_multiplier: float | None = None
    dp_sgd_max_grad_norm: float | None = None
    dp_sgd_delta: float | None = None

    def __post_init__(self) -> None:
        dp = (self.dp_sgd_noise_multiplier, self.dp_sgd_max_grad_norm, self.dp_sgd_delta)
        if any(v is not None for v in dp) and None in dp[:2]:
            raise ConfigurationError("[training] local DP-SGD needs both dp_sgd_noise_multiplier and "
                                     "dp_sgd_max_grad_norm (dp_sgd_delta is optional)")

    def local_training(self) -> LocalTraining:
        dp_sgd = None
        if self.dp_sgd_noise_multiplier is not None and self.dp_sgd_max_grad_norm is not None:
            delta = {} if self.dp_sgd_delta is None else {"delta": self.dp_sgd_delta}
            dp_sgd = DPSGD(noise_multiplier=self.dp_sgd_noise_multiplier, max_grad_norm=self.dp_sgd_max_grad_norm,
                           **delta)
        plain = _given(self, ("epochs", "batch_size", "optimizer", "lr", "loss", "max_steps"))
        return LocalTraining(**plain, optimizer_args=_given(self, ("momentum", "weight_decay", "nesterov")),
                             dp_sgd=dp_sgd)


@dataclass(frozen=True, slots=True, kw_only=True)
class AggregationSection:
    rule: str = "mean"
    clip_norm: float | None = None
    trim: float | None = None
    byzantine: int | None = None
    keep: int | None = None
    quantile: float | None = None
    secure: SecureMode = "trusted"
    bound: float | None = None
    threshold: int | None = None
    degree: int | None = None
    bits: int | None = None
    frac_bits: int | None = None
    consistency_check: bool = False

    def aggregation_rule(self) -> AggregationRule:
        return AggregationRule(name=self.rule, clip_norm=self.clip_norm,
                               options=_given(self, ("trim", "byzantine", "keep", "quantile")))

    def secure_settings(self) -> SecureSettings:
        return SecureSettings(**_given(self, ("bound", "threshold", "degree", "bits", "frac_bits")))


@dataclass(frozen=True, slots=True, kw_only=True)
class PrivacySection:
    noise_multiplier: float
    clip_norm: float
    delta: float | None = None
    accountant: str | None = None
    budget_epsilon: float | None = None
    adaptive_clipping: bool | None = None
    target_quantile: float | None = None

    def wrap(self, strategy: Strategy) -> DPFedAvg:
        return DPFedAvg(strategy, **_given(self, tuple(f.name for f in fields(self))))


@dataclass(frozen=True, slots=True, kw_only=True)
class RemoteWorker:
    id: str
    address: str


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkersSection:
    mode: WorkersMode = "local"
    aggregator: str = DEFAULT_AGGREGATOR
    strict: bool = True
    parallelism: int | None = None  # default: 1 in local mode, every worker in remote mode
    processes: int | None = None  # default: this machine's cores
    threads: int | None = None  # torch threads per host: processes 1, ray num_cpus // concurrency (at least 1)
    concurrency: int = 1  # processes, ray: owners each host trains at a time, in threads of one process
    work_deadline: float = 3600.0
    token: str | None = None
    tls_dir: str | None = None
    remote: tuple[RemoteWorker, ...] = ()
    aggregator_address: str | None = None
    share_holders: tuple[str, ...] | None = None  # default: (aggregator, aggregator + "_2")
    share_holder_addresses: Mapping[str, str] = field(default_factory=dict)
    secagg_pki: str | None = None
    device: str = "cpu"  # where owners train: "auto", "cpu", "cuda" or "cuda:N"
    address: str | None = None  # ray: "auto" or a Ray address joins a cluster; None starts a local Ray
    actors: int | None = None  # ray: actors hosting the owners (default: as many as the CPUs allow)
    num_cpus: float = 1.0  # ray: CPUs per actor
    num_gpus: float = 0.0  # ray: GPUs per actor
    ship_data: bool = False  # ray: each actor gets its owners' shares through Ray's object store

    def __post_init__(self) -> None:
        try:
            check_device_name(self.device)
        except DeviceError as exc:
            raise ConfigurationError(f"[workers] {exc}") from None
        if self.concurrency != 1 and self.mode not in ("processes", "ray"):
            raise ConfigurationError(f"[workers] concurrency sets how many owners a simulation host trains at a time: it "
                                     f'needs mode = "processes" or "ray", not {self.mode!r} (in local mode, '
                                     "parallelism says how many train at a time)")
        if self.threads is not None and self.mode not in ("processes", "ray"):
            raise ConfigurationError(f"[workers] threads sets a simulation host's torch threads: it needs mode = "
                                     f'"processes" or "ray", not {self.mode!r}')
        if self.ship_data and self.mode != "ray":
            raise ConfigurationError(f'[workers] ship_data sends the shares to Ray actors: it needs mode = "ray", '
                                     f"not {self.mode!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """An experiment file's sections, typed."""

    experiment: ExperimentSection = field(default_factory=ExperimentSection)
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    strategy: StrategySection = field(default_factory=StrategySection)
    training: TrainingSection = field(default_factory=TrainingSection)
    aggregation: AggregationSection = field(default_factory=AggregationSection)
    privacy: PrivacySection | None = None  # DP-FedAvg around the strategy, when present
    workers: WorkersSection = field(default_factory=WorkersSection)


@dataclass(frozen=True, slots=True, kw_only=True)
class SecureAggregation:
    """How the updates are summed, as one checked value: ``mode`` "trusted" (the aggregator sees
    them), "pairwise" (no one does; ``consistency_check`` against a malicious model owner) or
    "shares" (``share_holders``, two or more that must not collude, see their shares only)."""

    mode: SecureMode = "trusted"
    settings: SecureSettings = field(default_factory=SecureSettings)
    consistency_check: bool = False
    share_holders: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in get_args(SecureMode):
            raise ConfigurationError(f"[aggregation] secure must be 'trusted', 'pairwise' or 'shares', got {self.mode!r}")
        if self.consistency_check and self.mode != "pairwise":
            raise ConfigurationError("[aggregation] consistency_check needs secure = 'pairwise'")
        holders = self.share_holders
        if self.mode == "shares" and (len(holders) < 2 or not all(isinstance(h, str) and h for h in holders)
                                      or len(set(holders)) != len(holders)):
            raise ConfigurationError(f"[workers] share_holders must name two or more distinct workers, got {holders!r}")
        if self.mode != "shares" and holders:
            raise ConfigurationError("[workers] share_holders needs [aggregation] secure = 'shares'")

    @classmethod
    def of(cls, config: Config) -> SecureAggregation:
        a, w = config.aggregation, config.workers
        if w.share_holders is not None and a.secure != "shares":
            raise ConfigurationError("[workers] share_holders needs [aggregation] secure = 'shares'")
        default = (w.aggregator, f"{w.aggregator}_2") if a.secure == "shares" else ()
        return cls(mode=a.secure, settings=a.secure_settings(), consistency_check=a.consistency_check,
                   share_holders=default if w.share_holders is None else w.share_holders)

    def for_run(self, client_ids: Mapping[str, int] | None) -> SecureSettings:
        """The engine's settings, with each owner's id in the signing PKI for the consistency check."""
        if client_ids is None:
            return self.settings
        return replace(self.settings, consistency_check=True, client_ids=client_ids)


@dataclass(frozen=True, slots=True)
class Experiment:
    """A checked experiment: `load` reads one from a file, `parse` from tables;
    `fedsecure.experiment.run.run_experiment` runs it. ``base``: where its relative paths start."""

    config: Config = field(default_factory=Config)
    source: str = "<config>"
    base: Path = field(default_factory=Path.cwd)
    secure: SecureAggregation = field(init=False)

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "secure", SecureAggregation.of(self.config))
        except ConfigurationError as exc:
            raise ConfigurationError(f"{self.source}: {exc}") from None

    @property
    def name(self) -> str:
        return self.config.experiment.name or Path(self.source).stem

    @property
    def rounds(self) -> int:
        return self.config.experiment.rounds

    @property
    def seed(self) -> int:
        return self.config.experiment.seed

    @property
    def output(self) -> Path:
        """``[experiment] output`` (relative to the file, like every path in it); without one,
        ``runs/NAME`` in the working directory."""
        given = self.config.experiment.output
        return self.path(given) if given else Path.cwd() / "runs" / self.name

    def path(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.base / p

    def with_sections(self, **sections: Any) -> Experiment:
        """This experiment with some sections replaced (``data=...``), checked again."""
        return Experiment(replace(self.config, **sections), self.source, self.base)

    # -- parts -----------------------------------------------------------------------

    def dataset(self) -> Dataset:
        d = self.config.data
        if d.dataset == "digits":
            data = load_digits(seed=self.seed)
        elif d.dataset in ("fashion_mnist", "fashion-mnist"):
            data = load_fashion_mnist(None if d.path is None else self.path(d.path))
        elif d.dataset.endswith(".npz"):
            data = load_npz(str(self.path(d.dataset)))
        else:
            data = load_csv(str(self.path(d.dataset)))
        if d.subset is not None:
            if not 1 <= d.subset <= len(data.y_train):
                raise ConfigurationError(f"{self.source}: [data] subset must be in [1, {len(data.y_train)}]")
            keep = torch.from_numpy(np.sort(np.random.default_rng(self.seed).permutation(len(data.y_train))[:d.subset]))
            data = Dataset(name=data.name, x_train=data.x_train[keep], y_train=data.y_train[keep],
                           x_test=data.x_test, y_test=data.y_test, num_classes=data.num_classes,
                           class_names=data.class_names)
        return data

    def partitions(self, data: Dataset) -> list[np.ndarray]:
        d = self.config.data
        options = _given(d, ("alpha", "classes_per_worker", "min_size", "floor"))
        parts = partition(data.y_train, d.workers, scheme=d.partition, seed=self.seed, **options)  # type: ignore[arg-type]
        if d.test_fraction > 0:  # each owner holds out at least one row and trains on at least one
            alone = [i for i, part in enumerate(parts) if len(part) < 2]
            if alone:
                raise ConfigurationError(
                    f"{self.source}: [data] test_fraction = {d.test_fraction} holds out a row of every owner, but "
                    f"{len(alone)} of the {len(parts)} owners hold a single sample (the first: owner number {alone[0]}), "
                    "which could not both train and evaluate: set [data] min_size = 2, or test_fraction = 0 (no "
                    "federated evaluation; the model owner's central evaluation stays)")
        return parts

    def training(self) -> LocalTraining:
        return self.config.training.local_training()

    def rule(self) -> AggregationRule:
        return self.config.aggregation.aggregation_rule()

    def strategy(self, evaluate_fn: Callable[..., Any] | None = None) -> Strategy:
        s = self.config.strategy
        name = s.name.lower()
        cls = STRATEGIES.get(name)
        if cls is None:
            raise ConfigurationError(f"{self.source}: unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
        try:
            strategy: Strategy = cls(training=self.training(), rule=self.rule(), evaluate_fn=evaluate_fn, **s.options())
        except TypeError as exc:
            raise ConfigurationError(f"{self.source}: [strategy] {name} does not take these settings: {exc}") from None
        privacy = self.config.privacy
        return strategy if privacy is None else privacy.wrap(strategy)

    def settings(self) -> dict[str, Any]:
        """What a resumed run must share with the run that wrote the checkpoint (not rounds)."""
        return {k: v for k, v in self.tables().items() if k not in ("experiment", "workers")} | {"seed": self.seed}

    def tables(self) -> dict[str, Any]:
        """The experiment as the tables of a file (what `parse` reads back)."""
        return to_table(self.config)  # type: ignore[no-any-return]


def parse(tables: Mapping[str, Any], source: str = "<config>", base: Path | None = None) -> Experiment:
    """An experiment from an experiment file's tables, checked as a file's are."""
    return Experiment(from_table(Config, tables, source), source, Path.cwd() if base is None else base)


# The keys that name files or directories. A relative path in a file starts at the file's
# directory; one given on the command line (--output, --set) at the working directory.
PATH_KEYS = ("experiment.output", "experiment.tensorboard", "data.dataset", "data.path", "workers.tls_dir",
             "workers.secagg_pki")


def _from_cwd(key: str, value: Any) -> Any:
    """A command-line path made absolute, so that it keeps meaning the working directory's."""
    if key not in PATH_KEYS or not isinstance(value, str) or not value:
        return value
    if key == "data.dataset" and not value.endswith((".npz", ".csv")):
        return value  # a built-in data set's name
    return str(Path(value).expanduser().absolute())


def load(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Experiment:
    """Read and check an experiment file; ``overrides`` maps "section.key" to a value (command-line
    paths among them are relative to the working directory)."""
    given = {key: _from_cwd(key, value) for key, value in (overrides or {}).items()}
    tables = set_dotted(read_toml(path), given)
    return parse(tables, str(path), Path(path).resolve().parent)
