"""Runs as their output directories describe them: found under a root, read, and kept fresh.

A run directory holds ``history.json`` (one row per finished round, replaced atomically after each)
and, while and after the run, ``status.json`` (the round in progress, its phase, an ETA, the privacy
limit). Nothing here trusts those files: a run id is checked to name a directory inside the root, a
file that does not parse leaves the last good reading in place with the error beside it, and what is
sent on is plain JSON (no NaN, which browsers refuse).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsecure.fl import ConfigurationError
from fedsecure.fl.history import History

RUN_FILES = ("history.json", "status.json")
MAX_DEPTH = 3
# A "running" status not updated for this long, whose process is gone, is a run that was stopped.
STALE_SECONDS = 120.0
_SKIPPED = {"checkpoint", "__pycache__", "node_modules"}
_SUMMARY_KEYS = ("central_accuracy", "federated_accuracy", "central_loss", "train_loss", "dp_epsilon")


class RunNotFound(ConfigurationError):
    """A run id that names no run directory under the dashboard's root."""


def check_root(directory: str | os.PathLike[str]) -> Path:
    """The dashboard's root directory, resolved; refused with a clear message if it is not one."""
    root = Path(directory).expanduser()
    if not root.exists():
        raise ConfigurationError(
            f"{directory} does not exist: give the directory a run writes to (its [experiment] output, "
            f"for example runs/) or a folder above it")
    if not root.is_dir():
        raise ConfigurationError(f"{directory} is not a directory: give the folder that holds history.json")
    return root.resolve()


def find_runs(root: Path) -> list[str]:
    """The ids (paths relative to ``root``, ``.`` for the root itself) of the run directories at
    depth 0 to 3 under ``root``; a directory holding history.json or status.json is a run."""
    found: list[str] = []

    def visit(folder: Path, depth: int) -> None:
        if any((folder / name).is_file() for name in RUN_FILES):
            found.append(folder.relative_to(root).as_posix())
        if depth == MAX_DEPTH:
            return
        try:
            children = sorted(folder.iterdir())
        except OSError:
            return
        for child in children:
            if child.name in _SKIPPED or child.name.startswith(".") or not child.is_dir():
                continue
            if child.is_symlink() and not child.resolve().is_relative_to(root):
                continue  # a link out of the root is not served
            visit(child, depth + 1)

    visit(root, 0)
    return found


def run_directory(root: Path, run_id: str) -> Path:
    """The directory of run ``run_id`` under ``root``; anything that could leave the root
    (``..``, an absolute path, a link pointing out) or that names no run is refused."""
    parts = run_id.split("/")
    if run_id != "." and (not run_id or run_id.startswith("/") or "\\" in run_id or "\x00" in run_id
                          or any(part in ("", ".", "..") for part in parts)):
        raise RunNotFound(f"{run_id!r} is not a run id: ids are paths under the dashboard's directory, "
                          f"as /api/runs lists them")
    folder = (root / run_id).resolve()
    if not folder.is_relative_to(root):
        raise RunNotFound(f"{run_id!r} is outside the dashboard's directory")
    if len(folder.relative_to(root).parts) > MAX_DEPTH or not any((folder / n).is_file() for n in RUN_FILES):
        raise RunNotFound(f"no run {run_id!r} under the dashboard's directory (it has no history.json "
                          f"or status.json)")
    return folder


def plain(value: Any) -> Any:
    """``value`` with every non-finite float made None, so that it is valid JSON for a browser."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists but belongs to someone else
        return True
    return True


def effective_state(status: dict[str, Any] | None, now: float | None = None) -> str:
    """The state to show: the status file's, except that a "running" run whose status has not been
    updated for two minutes and whose process is gone was stopped; no status at all is "unknown"."""
    if not status:
        return "unknown"
    state = str(status.get("state") or "unknown")
    updated = status.get("updated")
    now = time.time() if now is None else now
    if (state == "running" and isinstance(updated, int | float) and now - updated > STALE_SECONDS
            and not _alive(status.get("pid"))):
        return "stopped"
    return state


def _signature(folder: Path) -> tuple[tuple[int, int], ...]:
    marks = []
    for name in RUN_FILES:
        try:
            st = (folder / name).stat()
            marks.append((st.st_mtime_ns, st.st_size))
        except OSError:
            marks.append((0, -1))
    return tuple(marks)


@dataclass
class _Reading:
    signature: tuple[tuple[int, int], ...] = ()
    rounds: list[dict[str, Any]] = field(default_factory=list)
    status: dict[str, Any] | None = None
    errors: list[str] = field(default_factory=list)


def _read(folder: Path, last: _Reading) -> _Reading:
    reading = _Reading(signature=_signature(folder), rounds=last.rounds, status=last.status)
    if (folder / "history.json").is_file():
        try:
            reading.rounds = plain([row for row in History.from_json(folder / "history.json")
                                    if isinstance(row, dict)])
        except ValueError as exc:  # kept: the last good rounds, and why the new file was not read
            reading.errors.append(str(exc))
    else:
        reading.rounds = []
    status_path = folder / "status.json"
    if status_path.is_file():
        try:
            status = json.loads(status_path.read_text())
            if not isinstance(status, dict):
                raise ValueError("not a JSON object")
            reading.status = plain(status)
        except (OSError, ValueError) as exc:
            reading.errors.append(f"cannot read {status_path.name}: {exc}")
    else:
        reading.status = None
    return reading


class RunStore:
    """The runs under one root, re-read only when their files' modification times or sizes change."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._readings: dict[str, _Reading] = {}

    def ids(self) -> list[str]:
        return find_runs(self.root)

    def run(self, run_id: str) -> dict[str, Any]:
        """Everything the files of run ``run_id`` hold, with the state to show and a summary."""
        folder = run_directory(self.root, run_id)
        last = self._readings.get(run_id, _Reading())
        reading = last if last.signature == _signature(folder) else _read(folder, last)
        self._readings[run_id] = reading
        return {**plain(self._summary(run_id, folder, reading)), "rounds": reading.rounds,
                "status": reading.status, "errors": reading.errors}

    def summaries(self) -> list[dict[str, Any]]:
        """One line per run: its id, name, state, progress and last metrics (no rounds)."""
        out = []
        for run_id in self.ids():
            try:
                data = self.run(run_id)
            except RunNotFound:  # removed between the scan and the read
                continue
            out.append({k: v for k, v in data.items() if k not in ("rounds", "status")})
        return out

    def _summary(self, run_id: str, folder: Path, reading: _Reading) -> dict[str, Any]:
        status = reading.status or {}
        last = reading.rounds[-1] if reading.rounds else {}
        name = status.get("name") if isinstance(status.get("name"), str) else None
        completed = status.get("completed", len(reading.rounds))
        return {
            "id": run_id,
            "name": name or (folder.name if run_id != "." else folder.name or "run"),
            "state": effective_state(reading.status) if reading.status else
            ("finished" if reading.rounds else "unknown"),
            "completed": completed,
            "rounds_total": status.get("rounds"),
            "updated": max((mark[0] for mark in reading.signature), default=0) / 1e9,
            "last": {k: last[k] for k in _SUMMARY_KEYS if k in last},
        }
