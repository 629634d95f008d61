"""The dashboard's web application (Starlette): the page, its static files, a JSON API, and one
server-sent event stream that pushes a run again whenever its files change.

Routes:
    GET /                      the page
    GET /static/...            its scripts, styles and the vendored chart library
    GET /api/runs              the runs under the root, one summary each
    GET /api/run?id=ID         one run: its summary, status and every round
    GET /api/events?run=ID...  event stream: ``runs`` (the list, when it changes) and ``run`` (one
                               of the named runs, when its files change), each data a JSON object
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from fedsecure.dashboard.runs import RunNotFound, RunStore

STATIC = Path(__file__).parent / "static"
WATCH_SECONDS = 0.5
KEEPALIVE_SECONDS = 15.0
_NO_CACHE = {"Cache-Control": "no-store"}


def _event(kind: str, data: Any) -> str:
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'), allow_nan=False)}\n\n"


def create_app(root: Path, *, stopping: threading.Event | None = None) -> Starlette:
    """The application serving the runs under ``root`` (an existing directory, resolved).

    ``stopping``, once set, ends the event streams, so that a server can shut down at once.
    """
    store = RunStore(root)
    stop = stopping or threading.Event()
    lock = asyncio.Lock()  # one reader of the store at a time: its cache is shared

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers=_NO_CACHE)

    async def runs(request: Request) -> Response:
        async with lock:
            summaries = store.summaries()
        return JSONResponse({"root": str(root), "runs": summaries}, headers=_NO_CACHE)

    async def run(request: Request) -> Response:
        run_id = request.query_params.get("id")
        if run_id is None:
            return JSONResponse({"error": "give the run as ?id=ID (the ids /api/runs lists)"}, status_code=400)
        try:
            async with lock:
                data = store.run(run_id)
        except RunNotFound as exc:
            return JSONResponse({"error": str(exc)}, status_code=404)
        return JSONResponse(data, headers=_NO_CACHE)

    async def events(request: Request) -> Response:
        wanted = request.query_params.getlist("run")
        return StreamingResponse(_stream(store, lock, wanted, stop), media_type="text/event-stream",
                                 headers={**_NO_CACHE, "X-Accel-Buffering": "no"})

    return Starlette(routes=[
        Route("/", index),
        Route("/api/runs", runs),
        Route("/api/run", run),
        Route("/api/events", events),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ])


async def _stream(store: RunStore, lock: asyncio.Lock, wanted: list[str],
                  stop: threading.Event) -> AsyncIterator[str]:
    """The event stream: everything once, then what changed, checked every half second."""
    sent_list: Any = None
    sent: dict[str, Any] = {}
    quiet = 0.0
    yield "retry: 2000\n\n"
    while not stop.is_set():
        async with lock:
            summaries = store.summaries()
            current = {}
            for run_id in wanted:
                try:
                    current[run_id] = store.run(run_id)
                except RunNotFound as exc:
                    current[run_id] = {"id": run_id, "error": str(exc)}
        if summaries != sent_list:
            sent_list = summaries
            quiet = 0.0
            yield _event("runs", {"root": str(store.root), "runs": summaries})
        for run_id, data in current.items():
            if data != sent.get(run_id):
                sent[run_id] = data
                quiet = 0.0
                yield _event("run", data)
        if quiet >= KEEPALIVE_SECONDS:
            quiet = 0.0
            yield ": keep-alive\n\n"
        await asyncio.sleep(WATCH_SECONDS)
        quiet += WATCH_SECONDS
