"""A progress display over rounds and workers, on standard error.

On a terminal one line is redrawn in place (round, phase, workers done, the last metrics); in a log
file each round gets one line. No dependency: a bar needs twenty lines, not a package.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, TextIO

_SHOWN = ("train_loss", "central_loss", "central_accuracy", "federated_accuracy", "dp_epsilon", "local_epsilon")


class Progress:
    def __init__(self, *, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.live = enabled and self.stream.isatty()
        self._lock = threading.Lock()
        self.rounds, self.round, self.phase, self.total, self.done = 0, 0, "", 0, 0
        self.started = time.perf_counter()
        self.last = ""

    def start(self, rounds: int, completed: int) -> None:
        self.rounds, self.started = rounds, time.perf_counter()
        if self.enabled and completed:
            self._write(f"resuming after round {completed} of {rounds}\n")

    def start_phase(self, server_round: int, phase: str, workers: int) -> None:
        with self._lock:
            self.round, self.phase, self.total, self.done = server_round, phase, workers, 0
        self._draw()

    def worker_done(self) -> None:
        with self._lock:
            self.done += 1
        self._draw()

    def _bar(self) -> str:
        width = 20
        filled = width * self.done // max(self.total, 1)
        return "[" + "#" * filled + "." * (width - filled) + "]"

    def _draw(self) -> None:
        if self.live:
            line = f"round {self.round}/{self.rounds} {self.phase:8s} {self._bar()} {self.done}/{self.total} workers  {self.last}"
            self._write("\r" + line[:160].ljust(100))

    def end_round(self, row: dict[str, Any]) -> None:
        self.last = "  ".join(f"{k} {row[k]:.4g}" for k in _SHOWN if isinstance(row.get(k), float))
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.started
        line = f"round {row['round']}/{self.rounds}  {self.last}  ({row['round_seconds']:.2f} s, {elapsed:.1f} s in all)"
        if row.get("failures"):
            line += f"  {len(row['failures'])} failed"
        self._write(("\r" + line.ljust(100) + "\n") if self.live else line + "\n")

    def note(self, text: str) -> None:
        if self.enabled:
            self._write(("\n" if self.live else "") + text + "\n")

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()
