from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import fedsecure as sy

sy.TorchHook(torch)


@pytest.fixture
def federation() -> sy.Federation:
    return sy.Federation()


@pytest.fixture
def make_worker(federation: sy.Federation) -> Callable[..., sy.VirtualWorker]:
    """Workers in a federation of their own, so tests never share state."""

    def make(id: str, **kwargs: Any) -> sy.VirtualWorker:
        return sy.VirtualWorker(id=id, federation=federation, **kwargs)

    return make


@pytest.fixture
def bob(make_worker: Callable[..., sy.VirtualWorker]) -> sy.VirtualWorker:
    return make_worker("bob")


@pytest.fixture
def alice(make_worker: Callable[..., sy.VirtualWorker]) -> sy.VirtualWorker:
    return make_worker("alice")


@pytest.fixture
def secure_worker(make_worker: Callable[..., sy.VirtualWorker]) -> sy.VirtualWorker:
    return make_worker("secure_worker")
