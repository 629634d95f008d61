"""``fedsecure certs DIR --party NAME ...``: the certificates of a test federation, made by
`fedsecure.transport.certs.write_federation`, and a report of what was written where."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from fedsecure.transport.certs import (
    CA,
    DEFAULT_CA_NAME,
    DEFAULT_DAYS,
    DEFAULT_HOSTS,
    SECAGG_KEY,
    Paths,
    write_federation,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedsecure certs",
        description=(
            "Make the TLS certificates of a test federation: a CA (ca.pem, ca.key) and, for each "
            "party, NAME.key and NAME.pem with common name NAME, which is how workers recognise "
            "who is calling. Give each party its own NAME.key, NAME.pem and ca.pem; keep ca.key."
        ),
        epilog=(
            "example: fedsecure certs ./certs --party owner --party bob --party alice "
            "--party secure_worker --host localhost --host 127.0.0.1"
        ),
    )
    parser.add_argument("directory", help="where to write the files (created with mode 0700)")
    parser.add_argument(
        "--party",
        dest="parties",
        action="append",
        required=True,
        metavar="NAME",
        help="a party's name (letters, digits, '-', '_', '.'; at most 64); repeat for each party",
    )
    parser.add_argument(
        "--host",
        dest="hosts",
        action="append",
        metavar="H",
        help=f"a DNS name or IP address the parties are reached under; repeatable (default: {' '.join(DEFAULT_HOSTS)})",
    )
    parser.add_argument(
        "--days", type=int, default=DEFAULT_DAYS, help="validity in days (default: %(default)s)"
    )
    parser.add_argument(
        "--ca-name", default=DEFAULT_CA_NAME, help="the CA's common name (default: %(default)r)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing files in DIRECTORY")
    parser.add_argument(
        "--secagg", action="append", default=[], metavar="NAME",
        help="a party (a data owner) that signs in secure aggregation against a malicious server: writes "
        "NAME.secagg.key and the shared public secagg.json; repeatable",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``fedsecure certs``: write a federation's certificates and say what was written."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.directory:  # Path("") is the working directory: say so rather than write there
        parser.error("the directory is empty: name one (. for the working directory)")
    directory = Path(args.directory)
    hosts = args.hosts or list(DEFAULT_HOSTS)
    try:
        paths = write_federation(
            directory,
            args.parties,
            hosts=hosts,
            days=args.days,
            ca_name=args.ca_name,
            overwrite=args.overwrite,
            secagg=args.secagg,
        )
    except (ValueError, OSError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 1
    except OverflowError:  # the expiry date is past the calendar's end
        print(f"{parser.prog}: error: --days {args.days} ends after the year 9999, past what a certificate "
              "can say: give fewer days", file=sys.stderr)
        return 1
    _report(paths, hosts=hosts, days=args.days)
    if args.secagg:
        print(f"secure aggregation keys for {', '.join(args.secagg)}: NAME{SECAGG_KEY} each, and "
              f"{directory / 'secagg.json'} for everyone (public)")
    return 0


def _report(paths: Mapping[str, Paths], *, hosts: Sequence[str], days: int) -> None:
    width = max(len(name) for name in paths)
    for name, party in paths.items():
        note = "  (the CA: keep its key; give every party the certificate)" if name == CA else ""
        print(f"{name:<{width}}  {party.cert}  {party.key}{note}")
    print(f"valid for {days} days; servers reachable as {', '.join(hosts)}")


if __name__ == "__main__":
    raise SystemExit(main())
