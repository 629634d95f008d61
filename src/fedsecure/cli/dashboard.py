"""``fedsecure dashboard DIR`` serves a live web page over the runs found under DIR."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from fedsecure.dashboard import DEFAULT_HOST, DEFAULT_PORT, serve
from fedsecure.errors import FedsecureError


def dashboard(args: argparse.Namespace) -> int:
    try:
        serve(args.directory, args.host, args.port)
    except FedsecureError as exc:
        print(f"fedsecure dashboard: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


def add_commands(commands: Any) -> None:
    p = commands.add_parser("dashboard", help="serve a live web page over the runs in a directory")
    p.add_argument("directory", help="a run's output directory, or a folder above several (e.g. runs/)")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"the address to bind (default {DEFAULT_HOST}: this machine only; see docs/dashboard.md "
                        "for SSH port forwarding)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"the port (default {DEFAULT_PORT}; 0 picks a free one)")
    p.set_defaults(run=dashboard)
