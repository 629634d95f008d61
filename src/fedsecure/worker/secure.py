"""A data owner's side of secure aggregation: its trained model leaves only masked.

The model owner drives the rounds of `fedsecure.aggregate.SecAggClient` (Bonawitz et al. 2017)
with `SecAgg` messages, one per phase, and runs the server's side itself: it learns the sum of
the surviving owners' updates and nothing else. This module keeps one client state per model
owner and session, computes the update from two stored models (the trained one and the global
one it started from), weighted by the owner's own sample count, and hands only the protocol's
outputs back: public keys, encrypted shares, the masked update, and the shares the protocol
allows (an honest client never reveals both secrets of one peer; `SecAggClient` refuses).

A worker given a `SecAggIdentity` by its own operator (``WorkerCore(secagg_identity=...)``,
``VirtualWorker(..., secagg_identity=...)``) plays only the active-adversary variant of the
protocol (Bonawitz et al. 2017, section 4): its client id is the one the federation's PKI gives
it, it signs its keys, checks everyone else's, and answers the extra "consistency" phase; it
reveals shares only with the signatures of at least ``threshold`` survivors on the survivor set
it signed. The verification keys in the identity must come from the federation's PKI through the
worker's operator, never from the model owner the check protects against.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fedsecure.aggregate import Message, SecAggClient, SigningIdentity
from fedsecure.errors import (
    PermissionDenied,
    ProtocolError,
    SecAggInputError,
    SecureAggregationError,
    ShareRevealRefused,
)
from fedsecure.worker.modules import describe, state_tensors

MAX_SESSIONS = 8  # per model owner: enough for rounds that overlap, too few to exhaust memory
PHASES = ("advertise", "share", "mask", "consistency", "unmask")


@dataclass(frozen=True)
class SecAggIdentity:
    """This worker's place in the federation's PKI: its client id there, and its signing identity
    (its long-term Ed25519 key and every member's verification key, given out of band)."""

    client_id: int
    identity: SigningIdentity

    def __post_init__(self) -> None:
        if not isinstance(self.identity, SigningIdentity):
            raise SecAggInputError("identity must be a fedsecure.aggregate.SigningIdentity")
        if type(self.client_id) is not int or not self.identity.owns(self.client_id):
            raise SecAggInputError(f"the PKI's verification key for client {self.client_id!r} is not this identity's")


def update_vector(
    trained: nn.Module, reference: nn.Module, weight: int | None, privacy: dict[str, Any] | None = None
) -> np.ndarray:
    """trained - reference over the floating tensors, flattened; times ``weight`` with the weight
    appended when weighted (so that the sum gives sum w_k u_k and sum w_k).

    ``privacy``: ``clip_norm`` scales the update to at most that L2 norm, then ``noise_std`` adds
    Gaussian noise drawn from a generator seeded by the operating system (DP-FedAvg with the noise
    split among the workers: n noises of std z*S/sqrt(n) sum to one of z*S)."""
    if describe(trained) != describe(reference):
        raise ProtocolError("the trained model and the reference have different architectures")
    pairs = [(a, b) for (_, a), (_, b) in zip(state_tensors(trained), state_tensors(reference), strict=True)
             if a.is_floating_point()]
    with torch.no_grad():
        flat = torch.cat([(a.double() - b.double()).reshape(-1) for a, b in pairs])
        clip, noise = _privacy(privacy or {}, weighted=weight is not None)
        if clip is not None:
            norm = float(torch.linalg.vector_norm(flat))
            if norm > clip:
                flat = flat * (clip / norm)
        if noise > 0:
            generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "big") >> 1)
            flat = flat + torch.normal(0.0, noise, flat.shape, generator=generator, dtype=flat.dtype)
    vector = flat.numpy()
    if weight is None:
        return vector
    return np.concatenate([vector * float(weight), [float(weight)]])


def _privacy(privacy: dict[str, Any], *, weighted: bool) -> tuple[float | None, float]:
    if set(privacy) - {"clip_norm", "noise_std"}:
        raise ProtocolError(f"privacy settings are clip_norm and noise_std, got {sorted(privacy)}")
    clip, noise = privacy.get("clip_norm"), privacy.get("noise_std", 0.0)
    if clip is not None and (not isinstance(clip, int | float) or not 0 < clip < float("inf")):
        raise ProtocolError(f"clip_norm must be a positive number, got {clip!r}")
    if not isinstance(noise, int | float) or not 0 <= noise < float("inf"):
        raise ProtocolError(f"noise_std must be a number >= 0, got {noise!r}")
    if noise and (clip is None or weighted):
        raise ProtocolError("noise needs clip_norm and the unweighted mean: otherwise it bounds nothing")
    return (None if clip is None else float(clip)), float(noise)


class SecureSessions:
    """One `SecAggClient` per (model owner, session), dropped when its round ends or fails."""

    def __init__(self, identity: SecAggIdentity | None = None) -> None:
        self._clients: dict[tuple[str | None, str], SecAggClient] = {}
        self.identity = identity

    def step(
        self,
        caller: str | None,
        session: str,
        phase: str,
        client_id: int,
        payload: Any,
        update: Callable[[], np.ndarray],
    ) -> bytes:
        if phase not in PHASES:
            raise ProtocolError(f"unknown secure aggregation phase {phase!r}; phases are {', '.join(PHASES)}")
        if not isinstance(payload, bytes):
            raise ProtocolError("a secure aggregation payload must be bytes")
        key = (caller, session)
        if phase == "advertise":
            if key in self._clients:
                raise ProtocolError(f"secure aggregation session {session!r} exists already: use a fresh one")
            if sum(1 for owner, _ in self._clients if owner == caller) >= MAX_SESSIONS:
                raise ProtocolError(f"at most {MAX_SESSIONS} secure aggregation sessions may be open at once")
            mine = self.identity
            if mine is not None and client_id != mine.client_id:
                raise ProtocolError(f"this worker is client {mine.client_id} in the federation's PKI, not {client_id}")
            self._clients[key] = SecAggClient(client_id=client_id, identity=None if mine is None else mine.identity)
        client = self._clients.get(key)
        if client is None:
            raise ProtocolError(f"no secure aggregation session {session!r} here (it ended or never began)")
        if client.id != client_id:
            raise ProtocolError(f"session {session!r} belongs to client {client.id}, not {client_id}")
        try:
            out: Message
            if phase == "advertise":
                out = client.advertise_keys(payload)
            elif phase == "share":
                out = client.share_keys(payload)
            elif phase == "mask":
                out = client.masked_input(payload, update())
            elif phase == "consistency":
                out = client.sign_survivors(payload)
            else:
                out = client.unmask(payload)
                del self._clients[key]  # the round is over for this client
            return out.encode()
        except ShareRevealRefused as exc:
            self._clients.pop(key, None)  # a failed round cannot be resumed
            raise PermissionDenied(str(exc), rule="secure-aggregation") from exc
        except (SecureAggregationError, ProtocolError) as exc:
            self._clients.pop(key, None)
            if isinstance(exc, ProtocolError):
                raise
            raise ProtocolError(f"secure aggregation: {exc}") from exc
