"""Layer 7: a live web dashboard over runs, read from their output directories alone.

``fedsecure dashboard runs/`` serves it (`serve`); a run can serve it beside its training with
`serve_in_background`. The files' contract (history.json, status.json) is in docs/dashboard.md;
starlette and uvicorn come with ``pip install 'fedsecure[dashboard]'``.
"""

from fedsecure.dashboard.launch import DEFAULT_HOST, DEFAULT_PORT, serve, serve_in_background
from fedsecure.dashboard.runs import RunNotFound, RunStore, find_runs

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "RunNotFound", "RunStore", "find_runs", "serve", "serve_in_background"]
