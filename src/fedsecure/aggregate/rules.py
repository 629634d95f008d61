"""Aggregation rules: pure functions from the workers' updates to the one value an aggregator releases.

An update is a worker's model minus the global model, flattened to one float tensor. Every rule
takes ``updates`` (a list of n such tensors of the same length) and ``weights`` (n sample counts)
and returns one tensor of that length. `apply` runs a rule as `fedsecure.fl.AggregationRule`
describes it: clip each update's L2 norm, combine by the rule, add Gaussian noise to the sum.
Nothing here does I/O or knows about workers; the aggregator (fedsecure.worker) calls `apply`.

Clipping and noise follow DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private
Recurrent Language Models"): each update is scaled to norm at most S, and noise of standard
deviation z * S is added to the sum of the n clipped updates before dividing by n.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from fedsecure.errors import ProtocolError

Rule = Callable[..., torch.Tensor]


def weighted_mean(updates: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i u_i / sum_i w_i, accumulated in float64, one update at a time."""
    total = float(sum(weights))
    if total <= 0:
        raise ProtocolError("the weights of a mean must add up to more than 0")
    out = torch.zeros(updates[0].shape, dtype=torch.float64)
    for w, u in zip(weights, updates, strict=True):
        out.add_(u, alpha=float(w) / total)
    return out


def clip_by_norm(update: torch.Tensor, bound: float) -> torch.Tensor:
    """``update`` scaled down to L2 norm ``bound`` if it is longer (a new tensor)."""
    norm = float(torch.linalg.vector_norm(update.double()))
    return update * (bound / norm) if norm > bound else update.clone()


# name -> rule(updates, weights, **options); robust rules register here (see robust.py).
RULES: dict[str, Rule] = {"mean": weighted_mean}


def apply(
    rule: Mapping[str, Any], updates: Sequence[torch.Tensor], weights: Sequence[float], *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Run ``rule`` (`AggregationRule.to_wire()`'s dictionary, as received) on ``updates``."""
    name = rule.get("name")
    fn = RULES.get(name) if isinstance(name, str) else None
    if fn is None:
        raise ProtocolError(f"unknown aggregation rule {name!r}; known: {', '.join(sorted(RULES))}")
    if not updates:
        raise ProtocolError("nothing to aggregate")
    clip = rule.get("clip_norm")
    if clip is not None:
        updates = [clip_by_norm(u, float(clip)) for u in updates]
    weights = list(weights) if rule.get("weighted", True) else [1.0] * len(updates)
    options = dict(rule.get("options") or {})
    try:
        out = fn(updates, weights, **options)
    except TypeError as exc:
        raise ProtocolError(f"bad options {sorted(options)} for rule {name!r}: {exc}") from None
    z = float(rule.get("noise_multiplier") or 0.0)
    if z > 0:
        if clip is None:
            raise ProtocolError("noise needs clip_norm")
        std = z * float(clip) / len(updates)  # noise z*S on the sum, then divided by n
        out = out + torch.normal(0.0, std, out.shape, generator=generator, dtype=out.dtype)
    return out
