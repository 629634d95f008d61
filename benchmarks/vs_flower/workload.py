"""The one workload all three systems run: the model, local training, averaging and evaluation.

Needs only torch and numpy, so that fedsecure's environment and Flower's own virtual environment
import the same file (Flower's side imports it by path). Nothing here knows about any framework.

The model is the CNN of McMahan et al. 2017 ("Communication-Efficient Learning of Deep Networks
from Decentralized Data", AISTATS, section 3): two 5x5 convolutions with 32 and 64 channels, each
followed by 2x2 max pooling, a fully connected layer of 512 units with ReLU and a softmax output.
The paper does not give the padding; we use padding 2 ("same"), the variant of the TensorFlow
Federated and LEAF reimplementations, so a 28x28 image gives 64 x 7 x 7 = 3136 features before the
512-unit layer (1,663,370 parameters). The 8x8 digits of the quick smoke run give 64 x 2 x 2.

Seeds: the global model is initialised from ``torch.manual_seed(seed)``; client ``c`` shuffles its
data in round ``r`` (1-based) with a generator seeded ``client_seed(seed, r, c)``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

EPOCHS = 1
BATCH_SIZE = 32
LR = 0.01
MOMENTUM = 0.9
EVAL_BATCH = 500


def cnn(image_size: int = 28, num_classes: int = 10) -> nn.Sequential:
    """McMahan et al.'s CNN for ``image_size`` x ``image_size`` grey images (a multiple of 4)."""
    side = image_size // 4
    return nn.Sequential(
        nn.Conv2d(1, 32, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * side * side, 512),
        nn.ReLU(),
        nn.Linear(512, num_classes),
    )


def initial_model(image_size: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return cnn(image_size)


def client_seed(seed: int, server_round: int, client: int) -> int:
    return seed * 1_000_003 + server_round * 1_000 + client


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    shuffle_seed: int,
    epochs: int = EPOCHS,
    batch_size: int = BATCH_SIZE,
    lr: float = LR,
    momentum: float = MOMENTUM,
) -> float:
    """E epochs of minibatch SGD with momentum on (x, y), a seeded shuffle per epoch; the mean loss."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    gen = torch.Generator().manual_seed(shuffle_seed)
    total, batches = 0.0, 0
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), batch_size):
            idx = order[start : start + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            total += loss.item()
            batches += 1
    return total / max(batches, 1)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on (x, y)."""
    model.eval()
    loss, correct = 0.0, 0
    for start in range(0, len(y), EVAL_BATCH):
        out = model(x[start : start + EVAL_BATCH])
        yb = y[start : start + EVAL_BATCH]
        loss += float(nn.functional.cross_entropy(out, yb, reduction="sum"))
        correct += int((out.argmax(1) == yb).sum())
    return loss / len(y), correct / len(y)


def weighted_average(states: Sequence[dict[str, torch.Tensor]], weights: Sequence[int]) -> dict[str, torch.Tensor]:
    """The sample-weighted mean of state dicts (FedAvg's aggregation)."""
    total = float(sum(weights))
    out = {}
    for key in states[0]:
        acc = torch.zeros_like(states[0][key], dtype=torch.float64)
        for state, w in zip(states, weights, strict=True):
            acc.add_(state[key].to(torch.float64), alpha=w / total)
        out[key] = acc.to(states[0][key].dtype)
    return out


class Data:
    """The prepared data file (one ``.npz``, written by run.py): each client's arrays and the test set.

    ``client(c)`` reads only that client's arrays (members of an uncompressed ``.npz`` load one by one).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        with np.load(path) as f:
            self.num_clients = int(f["num_clients"])
            self.image_size = int(f["image_size"])
            self.seed = int(f["seed"])
            self.sizes = [int(n) for n in f["client_sizes"]]

    def client(self, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        with np.load(self.path) as f:
            return torch.from_numpy(f[f"x_{c}"]), torch.from_numpy(f[f"y_{c}"])

    def test(self) -> tuple[torch.Tensor, torch.Tensor]:
        with np.load(self.path) as f:
            return torch.from_numpy(f["x_test"]), torch.from_numpy(f["y_test"])


class CrossDevice:
    """The prepared data directory of the cross-device comparison (cross_device.py writes it): the
    whole training set, each owner's rows of it, and the test set, as ``.npy`` files mapped from
    disk (``mmap_mode="r"``), so that every process reads one owner's rows without loading the rest.

    ``rows.npy`` holds the owners' row indices one owner after the other, ``offsets.npy`` where
    each owner's start (``owners + 1`` values)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.owners, self.image_size, self.seed = (int(v) for v in np.load(f"{path}/meta.npy"))  # in that order
        self.offsets = np.load(f"{path}/offsets.npy", mmap_mode="r")
        self.rows = np.load(f"{path}/rows.npy", mmap_mode="r")
        self.x = np.load(f"{path}/x_train.npy", mmap_mode="r")
        self.y = np.load(f"{path}/y_train.npy", mmap_mode="r")

    def owner(self, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.asarray(self.rows[self.offsets[c] : self.offsets[c + 1]])
        return torch.from_numpy(self.x[rows]), torch.from_numpy(self.y[rows])

    def test(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.from_numpy(np.load(f"{self.path}/x_test.npy")),
                torch.from_numpy(np.load(f"{self.path}/y_test.npy")))


@functools.lru_cache(maxsize=2)
def cross_device(path: str) -> CrossDevice:
    """The `CrossDevice` directory ``path``, mapped once per process (a Flower actor's every call)."""
    return CrossDevice(path)


def round_record(server_round: int, start: float, end: float, loss: float, accuracy: float, **extra: Any) -> dict[str, Any]:
    """One round as every system reports it: its wall-clock span (``time.time()``) and central metrics."""
    return {
        "round": server_round,
        "start": start,
        "end": end,
        "seconds": end - start,
        "test_loss": loss,
        "test_accuracy": accuracy,
        **extra,
    }
