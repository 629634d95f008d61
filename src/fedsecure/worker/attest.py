"""Attestations: what a worker vouches for about a contribution it made.

A model owner decides what every contributor to an aggregate submits. If it could make all but
one contributor submit something it knows (an untrained copy, a copy labelled without being
changed, zeros), "aggregate minus the known part" would be the one owner's update. So under a
training-only policy a contribution counts only as a worker's *own* training (`Fit`) or
evaluation (`Evaluate`) of a model, and the worker attests to which model and which
configuration: the digest of the reference model it started from (architecture and every weight)
and the digest of the configuration. An aggregator (and, in pairwise secure aggregation, every
client through the signed consistency round) accepts an aggregate only if all contributions carry
one and the same attestation: the same round's model, trained the same way, on each owner's data.

The round number is not part of it: the model owner chooses it, so it would prove nothing; the
model digest names the round's model.

What remains is what no worker can see: a model owner that trains the same model on a colluding
or invented owner whose data it knows (a Sybil), or retrains one owner with the same seed.
Differential privacy bounds those (docs/privacy.md).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import blake3
import torch
from torch import nn

from fedsecure.errors import ProtocolError
from fedsecure.worker.modules import describe, state_tensors

KINDS = ("fit", "evaluate")


@dataclass(frozen=True, slots=True)
class Attestation:
    """``kind`` of work done on the worker's own data, on the model with digest ``model``,
    under the configuration with digest ``config``."""

    kind: str
    model: bytes
    config: bytes

    def to_wire(self) -> list[Any]:
        return [self.kind, self.model, self.config]

    @classmethod
    def from_wire(cls, raw: Any) -> Attestation | None:
        """None for an empty list (no attestation)."""
        if raw == [] or raw is None:
            return None
        if (
            not isinstance(raw, list | tuple)
            or len(raw) != 3
            or raw[0] not in KINDS
            or not all(isinstance(x, bytes) and len(x) == 32 for x in raw[1:])
        ):
            raise ProtocolError("malformed attestation: [kind, 32-byte model digest, 32-byte config digest]")
        return cls(raw[0], bytes(raw[1]), bytes(raw[2]))

    def digest(self) -> bytes:
        """32 bytes that stand for the whole attestation (what secure aggregation signs)."""
        return hashlib.sha256(b"fedsecure-attestation\0" + self.kind.encode() + self.model + self.config).digest()


def wire(attestation: Attestation | None) -> list[Any]:
    return [] if attestation is None else attestation.to_wire()


def model_digest(module: nn.Module) -> bytes:
    """BLAKE3 (32 bytes) of the architecture and of every weight's dtype, shape and bytes.

    BLAKE3, not SHA-256 as every other digest here: every data owner hashes the whole model it is
    sent, every round, and this is the one digest whose input is large. `benchmarks/model_transfer.py`
    measures both on McMahan et al.'s CNN (6.7 MB of weights)."""
    h = blake3.blake3(b"fedsecure-model\0")
    h.update(json.dumps(describe(module), sort_keys=True, separators=(",", ":")).encode())
    with torch.no_grad():
        for name, t in state_tensors(module):
            h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
            if t.numel():  # the bytes in place, not a copy of them
                h.update(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))  # type: ignore[arg-type]
    return h.digest()


def config_digest(config: Any) -> bytes:
    """SHA-256 of a configuration (plain values, as they arrived), keys sorted."""
    try:
        text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"a configuration must be plain values: {exc}") from None
    return hashlib.sha256(b"fedsecure-config\0" + text.encode()).digest()
