"""The record of a run: one row of metrics per round, saved as JSON and CSV."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any


class History:
    """Per-round metrics (``round``, ``train_loss``, ``central_accuracy``, ``epsilon``, timings, ...).

    ``history[k]`` is round k's row; ``history.series("central_accuracy")`` one metric over rounds.
    """

    def __init__(self, rows: list[dict[str, Any]] | None = None) -> None:
        self.rows: list[dict[str, Any]] = list(rows or [])

    def add(self, row: Mapping[str, Any]) -> None:
        self.rows.append(dict(row))

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def __getitem__(self, server_round: int) -> dict[str, Any]:
        for row in self.rows:
            if row.get("round") == server_round:
                return row
        raise KeyError(f"no round {server_round} in this history (it has {len(self.rows)} rounds)")

    def series(self, name: str) -> list[tuple[int, float]]:
        return [(row["round"], row[name]) for row in self.rows if row.get(name) is not None]

    @property
    def last(self) -> dict[str, Any]:
        return self.rows[-1] if self.rows else {}

    def columns(self) -> list[str]:
        names: dict[str, None] = {}
        for row in self.rows:
            names.update(dict.fromkeys(k for k, v in row.items() if not isinstance(v, list | dict)))
        return list(names)

    def to_json(self, path: str | Path) -> None:
        replace_file(Path(path), json.dumps({"rounds": self.rows}, indent=1, default=_plain) + "\n")

    def to_csv(self, path: str | Path) -> None:
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=self.columns(), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.rows)
        replace_file(Path(path), text.getvalue())

    @classmethod
    def from_json(cls, path: str | Path) -> History:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read a history from {path}: {exc}") from exc
        if not isinstance(data, dict) or not isinstance(data.get("rounds"), list):
            raise ValueError(f"{path} is not a fedsecure history (no 'rounds' list)")
        return cls(data["rounds"])

    def __repr__(self) -> str:
        if not self.rows:
            return "History(no rounds)"
        last = {k: v for k, v in self.last.items() if isinstance(v, int | float)}
        shown = ", ".join(f"{k}={_short(v)}" for k, v in last.items())
        return f"History({len(self.rows)} rounds; last: {shown})"


def replace_file(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` in one rename: a reader (``fedsecure dashboard``) sees the old
    file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text, newline="" if path.suffix == ".csv" else None)
    os.replace(tmp, path)


def _short(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) and math.isfinite(value) else str(value)


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot save {type(value).__name__} in a history")
