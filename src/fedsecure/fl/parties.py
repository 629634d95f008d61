"""Who and what a run starts with, checked before anything is sent: the model's description and
the parties (workers, aggregator, share holders) for the chosen secure-aggregation mode."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from fedsecure.fl.strategy import ConfigurationError
from fedsecure.worker.client import WorkerClient
from fedsecure.worker.modules import describe


def sendable(model: nn.Module) -> dict[str, Any]:
    """The description workers build ``model`` from; an error that says what to use when there is none."""
    spec = describe(model)
    if spec is None:
        raise ConfigurationError(
            f"{type(model).__name__} uses parts outside the workers' allow-list: the engine "
            "sends models as an architecture built from allow-listed layers, for example an "
            "nn.Sequential of Conv2d, ReLU, MaxPool2d, Flatten and Linear, or as a custom module "
            "whose forward torch.fx traces into allow-listed operations (see docs/models.md)"
        )
    return spec


def check_parties(workers: Sequence[WorkerClient], aggregator: WorkerClient | None, secure_aggregation: str,
                   share_holders: Sequence[WorkerClient]) -> WorkerClient | None:
    """Who takes part, checked; the aggregator (with shares, the first holder when none is given)."""
    if secure_aggregation not in ("trusted", "pairwise", "shares"):
        raise ConfigurationError(
            f"secure_aggregation must be 'trusted' (the aggregator sees updates), 'pairwise' (no one "
            f"does) or 'shares' (share holders that do not collude see only shares), got {secure_aggregation!r}"
        )
    ids = [w.id for w in workers]
    if len(set(ids)) != len(ids):
        raise ConfigurationError(f"worker ids must be distinct, got {ids}")
    holders = [h.id for h in share_holders]
    if secure_aggregation == "shares":
        if len(holders) < 2 or len(set(holders)) != len(holders):
            raise ConfigurationError(
                f"secure_aggregation='shares' needs two or more distinct share_holders, got {holders}"
            )
        if set(holders) & set(ids):
            raise ConfigurationError(f"share holders {sorted(set(holders) & set(ids))} cannot also be training workers")
        aggregator = aggregator or share_holders[0]  # federated evaluation's small sums go there
    elif holders:
        raise ConfigurationError("share_holders are used by secure_aggregation='shares' only")
    if aggregator is None and secure_aggregation != "pairwise":
        raise ConfigurationError("an aggregator is needed, unless secure_aggregation='pairwise'")
    if aggregator is not None and aggregator.id in ids:
        raise ConfigurationError(f"the aggregator {aggregator.id!r} cannot also be a training worker")
    if not workers:
        raise ConfigurationError("federated training needs at least one worker")
    return aggregator
