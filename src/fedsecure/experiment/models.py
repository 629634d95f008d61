"""Models that experiments name in their config: `nn.Sequential`s of allow-listed layers.

- ``mlp``: Flatten, then ``hidden`` units with ReLU, then the classes.
- ``cnn_niid``: the small CNN of NIID-Bench (Li et al. 2022, "Federated Learning on Non-IID Data
  Silos: An Experimental Study"): conv 6 (5x5) - max pool - conv 16 (5x5) - max pool - 120 - 84 - classes.
- ``cnn_mcmahan``: the CNN of McMahan et al. 2017 for 28x28 images: two 5x5 convolutions of 32 and
  64 channels (padding 2), each followed by 2x2 max pooling, 512 ReLU units, the classes
  (1,663,370 parameters for 10 classes, as the paper reports).

Each takes ``dropout``, a probability: with one above 0, a `nn.Dropout` layer before the output
layer (workers draw its masks from the training seed: a seeded run is the same in every mode).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from fedsecure.fl import ConfigurationError


def _output(features: int, classes: int, dropout: float) -> list[nn.Module]:
    """The output layer, after a dropout layer where ``dropout`` > 0."""
    if not (isinstance(dropout, int | float) and not isinstance(dropout, bool) and 0 <= dropout < 1):
        raise ConfigurationError(f"[model] dropout is the probability of dropping a unit, in [0, 1); got {dropout!r}")
    return [*([nn.Dropout(float(dropout))] if dropout else []), nn.Linear(features, classes)]


def mlp(shape: tuple[int, ...], classes: int, *, hidden: int = 64, dropout: float = 0.0) -> nn.Module:
    inputs = 1
    for d in shape:
        inputs *= d
    return nn.Sequential(nn.Flatten(), nn.Linear(inputs, hidden), nn.ReLU(), *_output(hidden, classes, dropout))


def _image(shape: tuple[int, ...], name: str) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise ConfigurationError(f"model {name!r} takes images (channels, height, width), the data has samples of shape {shape}")
    return shape[0], shape[1], shape[2]


def cnn_niid(shape: tuple[int, ...], classes: int, *, dropout: float = 0.0) -> nn.Module:
    channels, h, w = _image(shape, "cnn_niid")
    side_h, side_w = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
    if side_h < 1 or side_w < 1:
        raise ConfigurationError(f"cnn_niid needs images of at least 16x16, got {h}x{w}; use model 'mlp'")
    return nn.Sequential(
        nn.Conv2d(channels, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * side_h * side_w, 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(),
        *_output(84, classes, dropout),
    )  # fmt: skip


def cnn_mcmahan(shape: tuple[int, ...], classes: int, *, dropout: float = 0.0) -> nn.Module:
    channels, h, w = _image(shape, "cnn_mcmahan")
    if h % 4 or w % 4:
        raise ConfigurationError(f"cnn_mcmahan needs image sides divisible by 4, got {h}x{w}")
    return nn.Sequential(
        nn.Conv2d(channels, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * (h // 4) * (w // 4), 512), nn.ReLU(),
        *_output(512, classes, dropout),
    )  # fmt: skip


MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": mlp, "cnn_niid": cnn_niid, "cnn_mcmahan": cnn_mcmahan}


def build_model(name: str, shape: tuple[int, ...], classes: int, **options: Any) -> nn.Module:
    if name not in MODELS:
        raise ConfigurationError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    try:
        return MODELS[name](shape, classes, **options)
    except TypeError as exc:
        raise ConfigurationError(f"model {name!r} does not take {sorted(options)}: {exc}") from None
