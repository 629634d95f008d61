"""The ``fedsecure`` command: ``run`` trains as an experiment file says, ``plot`` draws its
history, ``worker serve`` runs a worker as a server (`fedsecure.cli.worker`), ``federation init``
writes a federation of them (`fedsecure.cli.federation`), ``certs`` makes the certificates of a
test federation (`fedsecure.cli.certs`)."""

from __future__ import annotations

import argparse
import sys

from fedsecure.cli import dashboard, experiment, federation, worker


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="fedsecure", description="Federated learning that keeps data with its owner.")
    commands = top.add_subparsers(dest="command", required=True)
    worker.add_commands(commands.add_parser("worker", help="run a worker").add_subparsers(dest="action", required=True))
    experiment.add_commands(commands)
    dashboard.add_commands(commands)
    federation.add_commands(commands.add_parser("federation", help="set up a federation of worker servers")
                            .add_subparsers(dest="action", required=True))
    # listed for --help; `main` hands its arguments to fedsecure.cli.certs
    commands.add_parser("certs", help="make a CA and certificates for a test federation")
    return top


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["certs"]:
        from fedsecure.cli import certs  # here: ``python -m fedsecure.cli.certs`` finds it not yet imported

        return certs.main(argv[1:])
    args = parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
