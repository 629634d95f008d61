"""The simulated data owners: their names, and the private data each holds.

Both the one-process run (`fedsecure.experiment.workers`) and the simulation hosts
(`fedsecure.experiment.host`) give owner ``i`` the same share, so that both train on the same data.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fedsecure.data import Dataset
from fedsecure.experiment.config import Experiment

MODEL_OWNER = "owner"  # the name the model owner presents to workers (remote mode: certs/owner.pem)


def owner_id(index: int) -> str:
    return f"worker-{index:03d}"


def _split(x: torch.Tensor, y: torch.Tensor, fraction: float, seed: int) -> dict[str, torch.Tensor]:
    """The training part and the held-out part (``fraction`` of the rows, at least one) of a share;
    an owner of one row keeps it for training and holds out none (cross-device owners hold a few)."""
    if fraction <= 0:
        return {"x": x, "y": y}
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))
    cut = min(max(1, int(round(len(y) * fraction))), len(y) - 1)
    test, train = order[:cut], order[cut:]
    return {"x": x[train], "y": y[train], "x_test": x[test], "y_test": y[test]}


def shares_of(exp: Experiment, data: Dataset, parts: Sequence[np.ndarray], i: int) -> dict[str, torch.Tensor]:
    """Owner ``i``'s private data, by tag: its training share, and its held-out part if any."""
    rows = torch.from_numpy(np.asarray(parts[i], dtype=np.int64))
    return _split(data.x_train[rows], data.y_train[rows], exp.config.data.test_fraction, exp.seed + i)
