"""What a run shows while it goes: a progress display, log records and a status file.

On a terminal one line is redrawn in place (round, phase, workers done, the last metrics, the time
left); in a log file each round gets one line. Every event (a round ended, a worker failed, the run
stopped) is also a record of the ``fedsecure.progress`` logger, for ``--log-file`` and for programs
that configure `logging`; a terminal handler skips those records, since the display shows them.
With ``status_file``, the run's state (round, phase, workers done, ETA, running or ended and why) is
rewritten as JSON at every step, atomically: ``fedsecure dashboard`` reads it.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from fedsecure.fl.history import replace_file

log = logging.getLogger("fedsecure.progress")
log.addHandler(logging.NullHandler())  # the display shows these records; a program's logging may take them too

_SHOWN = ("train_loss", "central_loss", "central_accuracy", "federated_accuracy", "dp_epsilon", "local_epsilon")
STATUS_FORMAT = 1
STATUS_EVERY = 0.25  # seconds between status writes within a phase


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    def __init__(self, *, enabled: bool = True, stream: TextIO | None = None, status_file: Path | None = None,
                 name: str = "", info: dict[str, Any] | None = None) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.live = enabled and self.stream.isatty()
        self._lock = threading.Lock()
        self.rounds, self.round, self.phase, self.total, self.done, self.completed = 0, 0, "", 0, 0, 0
        self.started = self.round_started = time.perf_counter()
        self.durations: list[float] = []
        self.last = ""
        self.status_file, self.status = status_file, {"format": STATUS_FORMAT, "name": name, **(info or {})}
        self.status |= {"state": "running", "message": None, "pid": os.getpid(), "started": time.time()}
        self._saved = 0.0

    def start(self, rounds: int, completed: int) -> None:
        self.rounds, self.completed, self.started = rounds, completed, time.perf_counter()
        if completed:
            self._event(f"resuming after round {completed} of {rounds}")
        self._save()

    def start_phase(self, server_round: int, phase: str, workers: int) -> None:
        with self._lock:
            if server_round != self.round:
                self.round_started = time.perf_counter()
            self.round, self.phase, self.total, self.done = server_round, phase, workers, 0
            self._saved = 0.0  # a new phase is always written
        self._draw()

    def worker_done(self) -> None:
        with self._lock:
            self.done += 1
        self._draw()

    def worker_failed(self, worker: str, phase: str, error: str) -> None:
        """A worker's failure, named with its reason on the display and in the log (the round goes on)."""
        self._event(f"round {self.round}: worker {worker} failed in {phase}: {error}", logging.WARNING)

    def eta(self) -> float | None:
        """Seconds until the last round ends: the median of recent rounds' times for each round left."""
        if not self.durations or not self.rounds:
            return None
        per_round = statistics.median(self.durations[-5:])
        in_progress = self.round > self.completed
        left = self.rounds - self.completed - in_progress
        current = max(per_round - (time.perf_counter() - self.round_started), 0.0) if in_progress else 0.0
        return left * per_round + current

    def _eta_text(self) -> str:
        eta = self.eta()
        return "" if eta is None else f"  ETA {duration(eta)}"

    def _bar(self) -> str:
        width = 20
        filled = width * self.done // max(self.total, 1)
        return "[" + "#" * filled + "." * (width - filled) + "]"

    def _draw(self) -> None:
        if self.live:
            workers = f"{self.done}/{self.total} workers" if self.total else ""
            line = f"round {self.round}/{self.rounds} {self.phase:8s} {self._bar()} {workers}{self._eta_text()}  {self.last}"
            self._write("\r" + line[:160].ljust(100))
        self._save(every=STATUS_EVERY)

    def end_round(self, row: dict[str, Any]) -> None:
        self.last = "  ".join(f"{k} {row[k]:.4g}" for k in _SHOWN if isinstance(row.get(k), float))
        self.completed = row["round"]
        self.durations.append(row["round_seconds"])
        elapsed = time.perf_counter() - self.started
        line = f"round {row['round']}/{self.rounds}  {self.last}  ({row['round_seconds']:.2f} s, {elapsed:.1f} s in all"
        line += (f", ETA {duration(self.eta() or 0)})" if self.completed < self.rounds else ")")
        if row.get("failures"):
            line += f"  {len(row['failures'])} failed: {', '.join(f.split(' ', 1)[0] for f in row['failures'])}"
        self._event(line)

    def note(self, text: str, level: int = logging.INFO) -> None:
        self._event(text, level)

    def finish(self, state: str, message: str | None = None) -> None:
        """The run ended: ``finished``, ``stopped`` (by the strategy), ``failed`` or ``interrupted``."""
        self.status |= {"state": state, "message": message}
        self.phase = ""
        self._save()

    def clear_line(self) -> None:
        """Erase the live line, so that other output starts on a clean line."""
        if self.live:
            self._write("\r" + " " * 100 + "\r")

    def _event(self, text: str, level: int = logging.INFO) -> None:
        log.log(level, text)
        if self.enabled:
            self._write(("\r" + text.ljust(100) + "\n") if self.live else text + "\n")
        self._save()

    def _save(self, every: float = 0.0) -> None:
        """Rewrite the status file; for a worker done (``every`` > 0), at most every ``every`` seconds:
        a round of thousands of owners would otherwise write it thousands of times."""
        if self.status_file is None or time.monotonic() - self._saved < every:
            return
        self._saved = time.monotonic()
        eta = self.eta()
        self.status |= {"round": self.round, "rounds": self.rounds, "completed": self.completed, "phase": self.phase,
                        "workers_total": self.total, "workers_done": self.done, "updated": time.time(),
                        "eta_seconds": None if eta is None else round(eta, 1)}
        with self._lock:
            replace_file(self.status_file, json.dumps(self.status, indent=1) + "\n")

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()
