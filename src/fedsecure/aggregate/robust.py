"""Byzantine-robust aggregation rules: the aggregate stays close to the honest updates even when
some workers send whatever they like.

Every rule is a pure function ``rule(updates, weights, **options) -> Tensor`` over flattened
updates, registered by name in `fedsecure.aggregate.rules.RULES`:

- ``"median"``: the coordinate-wise median, and ``"trimmed_mean"``: the coordinate-wise mean after
  cutting the ``trim`` fraction of largest and smallest values of each coordinate. Yin et al. 2018,
  "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates". The median tolerates
  any minority of poisoned updates; the trimmed mean tolerates at most ``floor(trim * n)``.
- ``"krum"`` and ``"multi_krum"``: Blanchard et al. 2017, "Machine Learning with Adversaries:
  Byzantine Tolerant Gradient Descent". Each update is scored by the summed squared distances to
  its n - f - 2 nearest neighbours (f = ``byzantine``); Krum returns the best-scored update,
  Multi-Krum the mean of the ``keep`` (m) best. Needs n > 2f + 2.
- Norm bounding (Sun et al. 2019, "Can You Really Backdoor Federated Learning?") is not a rule but
  `AggregationRule.clip_norm`, which `rules.apply` applies before any rule; ``"norm_bounded_mean"``
  adds the variant for when no good absolute bound is known: every update is clipped to the
  ``quantile`` (default the median) of the update norms of the round.

The robust rules ignore ``weights``: a worker's sample count is its own claim, and a poisoned
worker could claim any count to outweigh the others. Options arrive as floats over the wire, so
integer options accept integral floats (``byzantine=2.0``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from fedsecure.errors import ProtocolError

# Coordinates sorted at once by the coordinate-wise rules: bounds the sort's extra memory to
# n * _CHUNK values, whatever the model's size.
_CHUNK = 1 << 18


def _count(name: str, value: float, rule: str) -> int:
    if isinstance(value, bool) or not float(value).is_integer() or value < 0:
        raise ProtocolError(f"{rule}: {name} must be a whole number >= 0, got {value!r}")
    return int(value)


def _by_coordinate(
    updates: Sequence[torch.Tensor], reduce_sorted: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Stack, sort each coordinate over the workers, reduce; chunk by chunk, in float64."""
    length = updates[0].numel()
    out = torch.empty(length, dtype=torch.float64)
    for start in range(0, length, _CHUNK):
        stop = min(start + _CHUNK, length)
        block = torch.stack([u[start:stop].double() for u in updates])
        out[start:stop] = reduce_sorted(block.sort(dim=0).values)
    return out


def median(updates: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """The coordinate-wise median; for an even number of updates, the mean of the two middle values."""
    n = len(updates)
    low, high = (n - 1) // 2, n // 2
    return _by_coordinate(updates, lambda s: (s[low] + s[high]) / 2)


def trimmed_mean(
    updates: Sequence[torch.Tensor], weights: Sequence[float], *, trim: float = 0.1
) -> torch.Tensor:
    """Per coordinate, drop the ``floor(trim * n)`` largest and as many smallest values, average the rest."""
    n = len(updates)
    if not 0 <= trim < 0.5:
        raise ProtocolError(
            f"trimmed_mean: trim is the fraction cut at each end and must be in [0, 0.5), got {trim!r}; "
            "for a cut of half or more use the median"
        )
    cut = math.floor(trim * n)
    return _by_coordinate(updates, lambda s: s[cut : n - cut].mean(dim=0))


def _krum_scores(updates: Sequence[torch.Tensor], byzantine: float, rule: str) -> torch.Tensor:
    n = len(updates)
    f = _count("byzantine", byzantine, rule)
    if n <= 2 * f + 2:
        raise ProtocolError(
            f"{rule} with byzantine={f} needs more than 2 * {f} + 2 = {2 * f + 2} updates, got {n}: "
            f"lower byzantine to at most {max((n - 3) // 2, 0)} or have more workers per round"
        )
    flat = [u.reshape(-1).double() for u in updates]
    dist = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            d = float(torch.sum((flat[i] - flat[j]) ** 2))
            dist[i, j] = dist[j, i] = d
    # Each row's n - f - 2 smallest distances to the others (its own 0 sorts first: skip it).
    nearest = dist.sort(dim=1).values[:, 1 : n - f - 1]
    return nearest.sum(dim=1)


def _best(scores: torch.Tensor, count: int) -> list[int]:
    # A stable sort: ties go to the lower index, so the result never depends on sort internals.
    return [int(i) for i in torch.sort(scores, stable=True).indices[:count]]


def krum(updates: Sequence[torch.Tensor], weights: Sequence[float], *, byzantine: float = 1) -> torch.Tensor:
    """The update whose n - f - 2 nearest neighbours are closest to it (squared L2)."""
    scores = _krum_scores(updates, byzantine, "krum")
    return updates[_best(scores, 1)[0]].double().clone()


def multi_krum(
    updates: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    byzantine: float = 1,
    keep: float | None = None,
) -> torch.Tensor:
    """The mean of the ``keep`` best-scored updates by Krum's score (default keep = n - f)."""
    n = len(updates)
    scores = _krum_scores(updates, byzantine, "multi_krum")
    m = n - int(byzantine) if keep is None else _count("keep", keep, "multi_krum")
    if not 1 <= m <= n:
        raise ProtocolError(f"multi_krum: keep must be between 1 and the number of updates ({n}), got {m}")
    chosen = _best(scores, m)
    out = torch.zeros(updates[0].shape, dtype=torch.float64)
    for i in chosen:
        out.add_(updates[i].double(), alpha=1.0 / m)
    return out


def norm_bounded_mean(
    updates: Sequence[torch.Tensor], weights: Sequence[float], *, quantile: float = 0.5
) -> torch.Tensor:
    """Every update clipped to the ``quantile`` of this round's update norms, then the plain mean.

    With the median (0.5), fewer than half the workers cannot raise the bound above an honest
    update's norm, so a scaled-up update weighs no more than an honest one.
    """
    if not 0 < quantile <= 1:
        raise ProtocolError(f"norm_bounded_mean: quantile must be in (0, 1], got {quantile!r}")
    norms = torch.tensor([float(torch.linalg.vector_norm(u.double())) for u in updates], dtype=torch.float64)
    # The lower order statistic at the quantile: an actual norm of this round, never interpolated up.
    bound = float(norms.sort().values[math.ceil(quantile * len(updates)) - 1])
    out = torch.zeros(updates[0].shape, dtype=torch.float64)
    for u, norm in zip(updates, norms.tolist(), strict=True):
        scale = bound / norm if norm > bound else 1.0
        out.add_(u.double(), alpha=scale / len(updates))
    return out


ROBUST_RULES = {
    "median": median,
    "trimmed_mean": trimmed_mean,
    "krum": krum,
    "multi_krum": multi_krum,
    "norm_bounded_mean": norm_bounded_mean,
}
"""The robust rules by name; `fedsecure.aggregate.rules.RULES` registers every one of them."""
