"""Experiments from a TOML file: ``fedsecure run examples/digits.toml``.

A file has the sections below; every key is optional except where noted, and an unknown key is an
error (a typo must not silently fall back to a default). Only ``[workers]`` says where workers
run: the same experiment runs in one process, in worker processes, or on remote servers.

    [experiment]  name, rounds, seed, output (a directory: history.json, history.csv, checkpoint/),
                  tensorboard (a log directory; needs the tensorboard package)
    [data]        dataset ("digits", "fashion_mnist", or a .npz / .csv path), path, subset,
                  workers, partition ("iid", "dirichlet", "shards", "quantity"), alpha,
                  classes_per_worker, test_fraction (held out on each worker for federated evaluation)
    [model]       name ("mlp", "cnn_niid", "cnn_mcmahan"), hidden (mlp)
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
    [workers]     mode ("local", "processes" or "remote"), aggregator, strict, parallelism,
                  work_deadline (seconds a worker may take to train in a round; default 3600);
                  for "processes" (simulation hosts on this machine): processes, threads (per process);
                  for "remote": token or tls_dir, and [[workers.remote]] tables (id, address),
                  plus [workers.aggregator_address]; for secure = "shares": share_holders (ids,
                  default [aggregator, aggregator + "_2"]), and in remote mode
                  [workers.share_holder_addresses] (id = address); with consistency_check in remote
                  mode: secagg_pki (the federation's secagg.json, from `fedsecure certs --secagg`)
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsecure.data import Dataset, load_csv, load_digits, load_fashion_mnist, load_npz, partition
from fedsecure.fl.secure import SecureSettings
from fedsecure.fl.strategy import (
    DPSGD,
    STRATEGIES,
    AggregationRule,
    ConfigurationError,
    LocalTraining,
    Strategy,
)

SECTIONS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "experiment": {"name": str, "rounds": int, "seed": int, "output": str, "tensorboard": str},
    "data": {
        "dataset": str, "path": str, "subset": int, "workers": int, "partition": str, "alpha": (int, float),
        "classes_per_worker": int, "test_fraction": (int, float),
    },
    "model": {"name": str, "hidden": int},
    "strategy": {
        "name": str, "fraction_fit": (int, float), "min_fit_workers": int, "fraction_evaluate": (int, float),
        "proximal_mu": (int, float), "server_learning_rate": (int, float), "server_momentum": (int, float),
        "beta_1": (int, float), "beta_2": (int, float), "tau": (int, float),
    },
    "training": {
        "epochs": int, "batch_size": int, "optimizer": str, "lr": (int, float), "momentum": (int, float),
        "weight_decay": (int, float), "nesterov": bool, "loss": str, "max_steps": int,
        "dp_sgd_noise_multiplier": (int, float), "dp_sgd_max_grad_norm": (int, float), "dp_sgd_delta": float,
    },
    "aggregation": {
        "rule": str, "clip_norm": (int, float), "trim": (int, float), "byzantine": int, "keep": int,
        "quantile": (int, float), "secure": str, "bound": (int, float), "threshold": int, "degree": int,
        "bits": int, "frac_bits": int, "consistency_check": bool,
    },
    "privacy": {
        "noise_multiplier": (int, float), "clip_norm": (int, float), "delta": float, "accountant": str,
        "budget_epsilon": (int, float), "adaptive_clipping": bool, "target_quantile": (int, float),
    },
    "workers": {
        "mode": str, "aggregator": str, "strict": bool, "parallelism": int, "processes": int, "threads": int,
        "work_deadline": (int, float),
        "token": str, "tls_dir": str,
        "remote": list, "aggregator_address": str, "share_holders": list, "share_holder_addresses": dict,
        "secagg_pki": str,
    },
}
_OPTIMIZER_ARGS = ("momentum", "weight_decay", "nesterov")
_DP_SGD = {"dp_sgd_noise_multiplier": "noise_multiplier", "dp_sgd_max_grad_norm": "max_grad_norm",
           "dp_sgd_delta": "delta"}


def _check_types(config: Mapping[str, Any], source: str) -> None:
    for section, values in config.items():
        if section not in SECTIONS:
            raise ConfigurationError(f"{source}: unknown section [{section}]; sections are {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigurationError(f"{source}: [{section}] must be a table")
        for key, value in values.items():
            expected = SECTIONS[section].get(key)
            if expected is None:
                known = ", ".join(SECTIONS[section])
                raise ConfigurationError(f"{source}: unknown key {key!r} in [{section}]; known keys: {known}")
            if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
                raise ConfigurationError(
                    f"{source}: [{section}] {key} = {value!r} has the wrong type "
                    f"(expected {getattr(expected, '__name__', 'a number')})"
                )


@dataclass(slots=True)
class Experiment:
    """A parsed experiment file. `load` reads one; `fedsecure.fl.run.run_experiment` runs it."""

    config: dict[str, dict[str, Any]]
    source: str = "<config>"
    base: Path = field(default_factory=Path.cwd)

    def get(self, section: str, key: str, default: Any = None) -> Any:
        return self.config.get(section, {}).get(key, default)

    @property
    def name(self) -> str:
        return str(self.get("experiment", "name", Path(self.source).stem))

    @property
    def rounds(self) -> int:
        rounds = self.get("experiment", "rounds", 10)
        if rounds < 1:
            raise ConfigurationError(f"{self.source}: [experiment] rounds must be >= 1, got {rounds}")
        return int(rounds)

    @property
    def seed(self) -> int:
        return int(self.get("experiment", "seed", 0))

    @property
    def output(self) -> Path:
        out = Path(self.get("experiment", "output", f"runs/{self.name}"))
        return out if out.is_absolute() else Path.cwd() / out

    def path(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.base / p

    # -- parts -----------------------------------------------------------------------

    def dataset(self) -> Dataset:
        name = str(self.get("data", "dataset", "digits"))
        where = self.get("data", "path")
        if name == "digits":
            data = load_digits(seed=self.seed)
        elif name in ("fashion_mnist", "fashion-mnist"):
            data = load_fashion_mnist(None if where is None else self.path(where))
        elif name.endswith(".npz"):
            data = load_npz(str(self.path(name)))
        elif name.endswith(".csv"):
            data = load_csv(str(self.path(name)))
        else:
            raise ConfigurationError(
                f"{self.source}: [data] dataset {name!r} is not 'digits', 'fashion_mnist' or a .npz/.csv file"
            )
        subset = self.get("data", "subset")
        if subset is not None:
            if not 1 <= subset <= len(data.y_train):
                raise ConfigurationError(f"{self.source}: [data] subset must be in [1, {len(data.y_train)}]")
            keep = torch.from_numpy(np.sort(np.random.default_rng(self.seed).permutation(len(data.y_train))[:subset]))
            data = Dataset(name=data.name, x_train=data.x_train[keep], y_train=data.y_train[keep],
                           x_test=data.x_test, y_test=data.y_test, num_classes=data.num_classes,
                           class_names=data.class_names)
        return data

    def partitions(self, data: Dataset) -> list[np.ndarray]:
        scheme = str(self.get("data", "partition", "iid"))
        options = {k: self.get("data", k) for k in ("alpha", "classes_per_worker") if self.get("data", k) is not None}
        workers = int(self.get("data", "workers", 10))
        return partition(data.y_train, workers, scheme=scheme, seed=self.seed, **options)  # type: ignore[arg-type]

    def training(self) -> LocalTraining:
        t = self.config.get("training", {})
        args = {k: t[k] for k in _OPTIMIZER_ARGS if k in t}
        dp = {name: t[key] for key, name in _DP_SGD.items() if key in t}
        plain = {k: v for k, v in t.items() if k not in _OPTIMIZER_ARGS and k not in _DP_SGD}
        dp_sgd = None
        if dp:
            if "noise_multiplier" not in dp or "max_grad_norm" not in dp:
                raise ConfigurationError(
                    f"{self.source}: [training] local DP-SGD needs both dp_sgd_noise_multiplier and "
                    "dp_sgd_max_grad_norm (dp_sgd_delta is optional)"
                )
            dp_sgd = DPSGD(**dp)
        return LocalTraining(**plain, optimizer_args=args, dp_sgd=dp_sgd)

    def rule(self) -> AggregationRule:
        a = {k: v for k, v in self.config.get("aggregation", {}).items()
             if k not in ("secure", "bound", "threshold", "degree", "bits", "frac_bits", "consistency_check")}
        options: dict[str, float] = {k: a.pop(k) for k in ("trim", "byzantine", "keep", "quantile") if k in a}
        return AggregationRule(name=a.get("rule", "mean"), clip_norm=a.get("clip_norm"), options=options)

    def secure(self) -> tuple[str, SecureSettings]:
        a = self.config.get("aggregation", {})
        mode = str(a.get("secure", "trusted"))
        if mode not in ("trusted", "pairwise", "shares"):
            raise ConfigurationError(f"{self.source}: [aggregation] secure must be 'trusted', 'pairwise' or 'shares', "
                                     f"got {mode!r}")
        settings = SecureSettings(bound=float(a.get("bound", 1.0)), threshold=a.get("threshold"),
                                  degree=a.get("degree"), bits=int(a.get("bits", 32)),
                                  frac_bits=int(a.get("frac_bits", 24)))
        if a.get("consistency_check") and mode != "pairwise":
            raise ConfigurationError(f"{self.source}: [aggregation] consistency_check needs secure = 'pairwise'")
        return mode, settings

    @property
    def consistency_check(self) -> bool:
        """Pairwise secure aggregation against a malicious model owner (signed keys, the consistency
        check): the owners' signing identities come from the run in local and processes modes, and
        from each worker's operator in remote mode (``[workers] secagg_pki`` maps names to ids).
        `secure` refuses it with any mode but "pairwise"."""
        return bool(self.get("aggregation", "consistency_check", False))

    def share_holders(self) -> list[str]:
        """The share holders' ids in "shares" mode (default: the aggregator and a second worker)."""
        aggregator = str(self.get("workers", "aggregator", "secure_worker"))
        holders = self.get("workers", "share_holders")
        if self.secure()[0] != "shares":
            if holders is not None:
                raise ConfigurationError(f"{self.source}: [workers] share_holders needs [aggregation] secure = 'shares'")
            return []
        holders = [aggregator, f"{aggregator}_2"] if holders is None else holders
        if len(holders) < 2 or not all(isinstance(h, str) and h for h in holders) or len(set(holders)) != len(holders):
            raise ConfigurationError(f"{self.source}: [workers] share_holders must name two or more distinct "
                                     f"workers, got {holders!r}")
        return list(holders)

    def strategy(self, evaluate_fn: Any = None) -> Strategy:
        s = dict(self.config.get("strategy", {}))
        name = str(s.pop("name", "fedavg")).lower()
        cls = STRATEGIES.get(name)
        if cls is None:
            raise ConfigurationError(f"{self.source}: unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
        try:
            strategy: Strategy = cls(training=self.training(), rule=self.rule(), evaluate_fn=evaluate_fn, **s)
        except TypeError as exc:
            raise ConfigurationError(f"{self.source}: [strategy] {name} does not take these settings: {exc}") from None
        privacy = self.config.get("privacy")
        if privacy:
            from fedsecure.privacy import DPFedAvg

            if "noise_multiplier" not in privacy or "clip_norm" not in privacy:
                raise ConfigurationError(f"{self.source}: [privacy] needs noise_multiplier and clip_norm")
            strategy = DPFedAvg(strategy, **privacy)
        return strategy

    def settings(self) -> dict[str, Any]:
        """What a resumed run must share with the run that wrote the checkpoint (not rounds)."""
        return {k: v for k, v in self.config.items() if k not in ("experiment", "workers")} | {
            "seed": self.seed
        }


def load(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Experiment:
    """Read and check an experiment file; ``overrides`` maps "section.key" to a value."""
    source = str(path)
    try:
        config = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigurationError(f"no experiment file {source}") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigurationError(f"cannot read {source}: {exc}") from None
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        config.setdefault(section, {})[key] = value
    _check_types(config, source)
    return Experiment(config, source, Path(path).resolve().parent)
