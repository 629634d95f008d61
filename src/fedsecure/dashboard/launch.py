"""Starting the dashboard: `serve` in the foreground (the ``fedsecure dashboard`` command) or
`serve_in_background` beside a run. starlette and uvicorn are optional, so they are imported here,
when a dashboard is asked for, and their absence is reported with the install command."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, TextIO

from fedsecure.dashboard.runs import check_root
from fedsecure.fl import ConfigurationError

if TYPE_CHECKING:
    from fedsecure.dashboard.server import Dashboard

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8050


def _dashboard(directory: str | os.PathLike[str], host: str, port: int) -> Dashboard:
    root = check_root(directory)
    try:
        from fedsecure.dashboard.server import Dashboard
    except ImportError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing not in ("starlette", "uvicorn", "anyio", "h11"):
            raise
        raise ConfigurationError(f"the dashboard needs {missing}, which is not installed: "
                                 f"pip install 'fedsecure[dashboard]'") from exc
    return Dashboard(root, host, port)


def serve(directory: str | os.PathLike[str], host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          *, out: TextIO | None = None) -> None:
    """Serve the dashboard over the runs under ``directory`` until interrupted; prints its URL."""
    dashboard = _dashboard(directory, host, port)
    out = out or sys.stdout
    if dashboard.public:
        print(f"warning: the dashboard has no login and is bound to {host}: anyone who can reach this "
              f"machine sees the runs. Bind to 127.0.0.1 and use SSH port forwarding instead "
              f"(docs/dashboard.md).", file=sys.stderr, flush=True)
    print(f"fedsecure dashboard: {dashboard.root} at {dashboard.url} (Ctrl-C to stop)", file=out, flush=True)
    dashboard.run()


def serve_in_background(directory: str | os.PathLike[str], host: str = DEFAULT_HOST,
                        port: int = DEFAULT_PORT) -> Dashboard:
    """Serve the dashboard over ``directory`` (which must exist) in a daemon thread.

    Returns the running `Dashboard`: ``.url`` is its address, ``.stop()`` ends it (it is also a
    context manager). Bad input raises `ConfigurationError` before anything starts.
    """
    dashboard = _dashboard(directory, host, port)
    dashboard.start()
    return dashboard
