"""What a round's record says beside its metrics: which workers took part, DP-SGD's epsilon, and
where the time went (training on the workers, transfers, aggregation).

Workers train in parallel, so the time each spends adds up to more than the round took. `RoundClock`
sums, over the round's workers, the seconds spent in training requests and in transfers (the global
model sent, the trained model moved), and the seconds the aggregation took; `split` then divides the
fit phase's wall time: aggregation as measured, the rest in proportion to training and transfers.
The three parts add up to ``fit_seconds``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

PARTS = ("train", "transfer", "aggregate")


class _Reported(Protocol):
    @property
    def epsilon(self) -> float | None: ...


def epsilon_of(reply: Mapping[str, Any]) -> float | None:
    """A worker's local DP-SGD epsilon from its Fit reply (absent without DP-SGD)."""
    value = reply.get("epsilon")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def local_epsilon(trained: Sequence[_Reported]) -> dict[str, float]:
    """``local_epsilon``: the largest DP-SGD epsilon this round's workers reported (each a running
    total over the rounds that worker trained for this model owner)."""
    spent = [t.epsilon for t in trained if t.epsilon is not None]
    return {"local_epsilon": max(spent)} if spent else {}


def who(chosen: Sequence[str], finished: Sequence[str], secure: bool) -> dict[str, Any]:
    """The round's workers: those chosen to train and those whose update was aggregated; in a
    secure round, the survivors and the dropouts of the secure sum."""
    row: dict[str, Any] = {"chosen": sorted(chosen), "finished": sorted(finished)}
    if secure:
        row |= {"secure_survivors": len(finished), "secure_dropouts": sorted(set(chosen) - set(finished))}
    return row


class RoundClock:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds = dict.fromkeys(PARTS, 0.0)

    def reset(self) -> None:
        with self._lock:
            self.seconds = dict.fromkeys(PARTS, 0.0)

    @contextmanager
    def timed(self, part: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - started
            with self._lock:
                self.seconds[part] += spent

    def split(self, fit_seconds: float) -> dict[str, float]:
        """``train_seconds``, ``transfer_seconds`` and ``aggregate_seconds``, adding up to ``fit_seconds``."""
        with self._lock:
            train, transfer, aggregate = (self.seconds[p] for p in PARTS)
        aggregate = min(aggregate, fit_seconds)
        rest = fit_seconds - aggregate
        share = train / (train + transfer) if train + transfer > 0 else 1.0
        return {"train_seconds": rest * share, "transfer_seconds": rest * (1 - share), "aggregate_seconds": aggregate}
