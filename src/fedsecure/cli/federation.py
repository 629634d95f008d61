"""``fedsecure federation init DIR --owners bob,alice,carol``: a federation ready to serve.

Writes the certificates, each owner's share of the data, each worker's ``--config`` file and the
model owner's experiment (`fedsecure.experiment.federation`), checks every worker file against the
schema ``fedsecure worker serve`` reads (`fedsecure.cli.worker.WorkerFile`), and prints the three
commands that start the owners, the aggregator and the run.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

from fedsecure.cli.worker import WorkerFile
from fedsecure.errors import FedsecureError
from fedsecure.experiment import federation
from fedsecure.experiment.config import DEFAULT_AGGREGATOR
from fedsecure.experiment.tables import from_table

PARTITIONS = ("iid", "dirichlet", "shards", "quantity")


def _owners(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(","))
    if any(not name for name in names):
        raise argparse.ArgumentTypeError(f"--owners takes names separated by commas (bob,alice,carol), got {text!r}")
    return names


def init(args: argparse.Namespace) -> int:
    directory = Path(args.directory)
    try:
        spec = federation.FederationSpec(
            owners=args.owners, data=args.data, partition=args.partition, alpha=args.alpha,
            classes_per_worker=args.classes_per_worker, test_fraction=args.test_fraction, seed=args.seed,
            rounds=args.rounds, aggregator=args.aggregator, host=args.host, base_port=args.base_port,
            tls=not args.token,
        )
        federation.claim(directory, force=args.force)  # before the data is read: refuse early
        plan = federation.plan(spec, directory.resolve().name or "federation")
        for worker, tables in plan.workers.items():
            from_table(WorkerFile, tables, f"{worker}.toml")  # the files `worker serve` will read
        federation.write(plan, directory, force=args.force)
    except (FedsecureError, ValueError, OSError) as exc:
        raise SystemExit(f"fedsecure federation init: {exc}") from None
    _report(plan, directory)
    return 0


def _report(plan: federation.Plan, directory: Path) -> None:
    spec = plan.spec
    def config(name: str) -> str:
        return shlex.quote(str(directory / f"{name}.toml"))

    how = "mutual TLS (certificates in certs/)" if spec.tls else "tokens (in the .toml files: keep them private)"
    print(f"wrote a federation of {len(spec.owners)} data owners ({', '.join(spec.owners)}) and the aggregator "
          f"{spec.aggregator} into {directory}, over {how}")
    print(plan.summary)
    print("next, each in its own terminal (or on its own machine, with its files):")
    print("1. every data owner's worker:")
    for owner in spec.owners:
        print(f"     fedsecure worker serve --config {config(owner)}")
    print("2. the aggregator:")
    print(f"     fedsecure worker serve --config {config(spec.aggregator)}")
    print("3. the model owner, once they listen:")
    print(f"     fedsecure run {shlex.quote(str(directory / federation.EXPERIMENT_FILE))}")


def add_commands(commands: Any) -> None:
    p = commands.add_parser(
        "init", help="write a federation into a directory: certificates, data shares, worker and experiment files",
        description="Write a federation ready to serve: each owner's share of a data set, each worker's "
        "--config file, the certificates (or tokens) and the model owner's experiment, then print the "
        "commands that start it.",
    )
    p.add_argument("directory", help="where to write the files (created with mode 0700)")
    p.add_argument("--owners", required=True, type=_owners, metavar="A,B,...",
                   help="the data owners' names, separated by commas (at least two)")
    p.add_argument("--data", default="digits",
                   help="digits (built in, the default), fashion_mnist, or a .npz or .csv file to share out")
    p.add_argument("--partition", choices=PARTITIONS, default="iid", help="how the training set is cut (default iid)")
    p.add_argument("--alpha", type=float, help="Dirichlet concentration for dirichlet and quantity (small: skewed)")
    p.add_argument("--classes-per-worker", type=int, help="classes each owner holds, for shards")
    p.add_argument("--test-fraction", type=float, default=0.2,
                   help="part of each owner's share held out for federated evaluation (default 0.2; 0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the partition and the run (default 0)")
    p.add_argument("--rounds", type=int, default=10, help="rounds in run.toml (default 10)")
    p.add_argument("--aggregator", default=DEFAULT_AGGREGATOR,
                   help=f"the aggregator's name (default {DEFAULT_AGGREGATOR})")
    p.add_argument("--host", default="127.0.0.1", help="the address every worker listens on (default 127.0.0.1)")
    p.add_argument("--base-port", type=int, default=7001,
                   help="owner i listens on BASE + i, the aggregator on the next port (default 7001)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--tls", dest="token", action="store_false",
                      help="mutual TLS with certificates written to DIR/certs (the default)")
    mode.add_argument("--token", action="store_true",
                      help="random tokens instead of certificates (loopback only: tokens travel in the clear)")
    p.add_argument("--force", action="store_true", help="write into a directory that is not empty")
    p.set_defaults(run=init, token=False)
