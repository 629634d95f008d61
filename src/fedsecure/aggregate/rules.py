"""Aggregation rules: pure functions from the workers' updates to the one value an aggregator releases.

An update is a worker's model minus the global model, flattened to one float tensor. Every rule
takes ``updates`` (a list of n such tensors of the same length) and ``weights`` (n sample counts)
and returns one tensor of that length. `apply` runs a rule as `fedsecure.fl.AggregationRule`
describes it: clip each update's L2 norm, combine by the rule, add Gaussian noise to the sum.
Nothing here does I/O or knows about workers; the aggregator (fedsecure.worker) calls `apply`.

Clipping and noise follow DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private
Recurrent Language Models"): each update is scaled to norm at most S, and noise of standard
deviation z * S is added to the sum of the n clipped updates before dividing by n.

Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive Clipping")
moves S towards a quantile of the update norms, which needs one more value from the aggregator: the
fraction of updates that were not clipped, released with its own Gaussian noise. `release` returns
it in ``metrics`` under `UNCLIPPED_FRACTION` when the rule's options ask for it (see `release`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedsecure.aggregate.robust import ROBUST_RULES
from fedsecure.errors import ProtocolError

Rule = Callable[..., torch.Tensor]


def weighted_mean(updates: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i u_i / sum_i w_i, accumulated in float64, one update at a time."""
    return weighted_sum(updates, normalized(weights))


def normalized(weights: Sequence[float]) -> list[float]:
    """w_i / sum_j w_j: the weights of a mean."""
    total = float(sum(weights))
    if total <= 0:
        raise ProtocolError("the weights of a mean must add up to more than 0")
    return [float(w) / total for w in weights]


def weighted_sum(
    values: Sequence[torch.Tensor], weights: Sequence[float], *, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """sum_i w_i v_i, accumulated in ``dtype`` one value at a time, so it streams: a mean is this
    sum with `normalized` weights. On the first value's device."""
    out = torch.zeros_like(values[0], dtype=dtype)
    for w, v in zip(weights, values, strict=True):
        out.add_(v, alpha=w)
    return out


def mean_from_sums(total: torch.Tensor, weight: float) -> torch.Tensor:
    """sum_i w_i u_i / sum_i w_i from its two sums, as secure aggregation learns them (``weight``
    the sum of the weights, or the count of an unweighted mean)."""
    if not math.isfinite(weight) or weight <= 0:
        raise ProtocolError("the summed sample counts are not positive: the round cannot be averaged")
    return total / weight


def clip_by_norm(update: torch.Tensor, bound: float) -> torch.Tensor:
    """``update`` scaled down to L2 norm ``bound`` if it is longer (a new tensor)."""
    return _clip(update, bound)[0]


def _clip(update: torch.Tensor, bound: float) -> tuple[torch.Tensor, bool]:
    norm = float(torch.linalg.vector_norm(update.double()))
    return (update * (bound / norm), True) if norm > bound else (update.clone(), False)


# name -> rule(updates, weights, **options): the one registry of rules (robust ones from robust.py).
RULES: dict[str, Rule] = {"mean": weighted_mean, **ROBUST_RULES}

UNCLIPPED_FRACTION = "unclipped_fraction"
"""The metric under which `release` reports the noisy fraction of updates that were not clipped."""

# Options that `release` reads itself instead of passing them to the rule.
REPORT_UNCLIPPED = "report_unclipped"
UNCLIPPED_STDDEV = "unclipped_stddev"


@dataclass(frozen=True, slots=True)
class Release:
    """What the aggregator releases: the aggregate, and the metrics the rule asked for."""

    aggregate: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


def _check_updates(updates: Sequence[torch.Tensor]) -> None:
    if not updates:
        raise ProtocolError("nothing to aggregate")
    shape = updates[0].shape
    for i, u in enumerate(updates):
        if not isinstance(u, torch.Tensor) or not u.is_floating_point():
            raise ProtocolError(
                f"update {i} is not a floating-point tensor; send model deltas as float tensors"
            )
        if u.shape != shape:
            raise ProtocolError(
                f"update {i} has shape {tuple(u.shape)}, update 0 has {tuple(shape)}: every update must be "
                "the same model's flattened delta"
            )
        if not bool(torch.isfinite(u).all()):
            raise ProtocolError(
                f"update {i} holds NaN or infinite values; leave that worker out of the round"
            )


def apply(
    rule: Mapping[str, Any],
    updates: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Run ``rule`` (`AggregationRule.to_wire()`'s dictionary, as received) on ``updates``."""
    return release(rule, updates, weights, generator=generator).aggregate


def release(
    rule: Mapping[str, Any],
    updates: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    generator: torch.Generator | None = None,
) -> Release:
    """`apply`, plus the metrics the aggregator must release beside the aggregate.

    With ``clip_norm`` set and the options ``report_unclipped=1`` and ``unclipped_stddev=sigma_b``,
    ``metrics[UNCLIPPED_FRACTION]`` is Andrew et al.'s noisy fraction of unclipped updates:
    1/2 + (sum_i (b_i - 1/2) + N(0, sigma_b^2)) / n, with b_i = 1 when update i's norm is at most
    clip_norm. Centring b_i makes one worker's sensitivity 1/2, which the privacy accounting of
    `fedsecure.privacy.DPFedAvg` assumes.
    """
    name = rule.get("name")
    fn = RULES.get(name) if isinstance(name, str) else None
    if fn is None:
        raise ProtocolError(f"unknown aggregation rule {name!r}; known: {', '.join(sorted(RULES))}")
    _check_updates(updates)
    options = dict(rule.get("options") or {})
    report = bool(options.pop(REPORT_UNCLIPPED, 0.0))
    sigma_b = float(options.pop(UNCLIPPED_STDDEV, 0.0))
    clip = rule.get("clip_norm")
    if report and clip is None:
        raise ProtocolError(
            f"{REPORT_UNCLIPPED} counts updates clipped to clip_norm: the rule needs a clip_norm"
        )
    if sigma_b < 0:
        raise ProtocolError(f"{UNCLIPPED_STDDEV} is a standard deviation and must be >= 0, got {sigma_b!r}")
    unclipped = 0
    if clip is not None:
        pairs = [_clip(u, float(clip)) for u in updates]
        updates = [u for u, _ in pairs]
        unclipped = sum(not was_clipped for _, was_clipped in pairs)
    weights = list(weights) if rule.get("weighted", True) else [1.0] * len(updates)
    try:
        out = fn(updates, weights, **options)
    except TypeError as exc:
        raise ProtocolError(f"bad options {sorted(options)} for rule {name!r}: {exc}") from None
    n = len(updates)
    z = float(rule.get("noise_multiplier") or 0.0)
    if z > 0:
        if clip is None:
            raise ProtocolError("noise needs clip_norm")
        std = z * float(clip) / n  # noise z*S on the sum, then divided by n
        out = out + torch.normal(0.0, std, out.shape, generator=generator, dtype=out.dtype)
    metrics: dict[str, float] = {}
    if report:
        noise = (
            float(torch.normal(0.0, sigma_b, (1,), generator=generator, dtype=torch.float64))
            if sigma_b > 0
            else 0.0
        )
        metrics[UNCLIPPED_FRACTION] = 0.5 + ((unclipped - n / 2) + noise) / n
    return Release(aggregate=out, metrics=metrics)
