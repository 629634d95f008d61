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

The cohort check. The model owner decides what every contributor masks; were all inputs but one
known to it (an untrained copy of the model, a training with learning rate 0, clients it made
up), the sum would give it the one owner's update. So the worker passes, on every phase, the
digest of its attestation that the update is its own `Fit` of exactly the reference model
(`fedsecure.worker.attest`; None when it is not), and whether its owner requires one (a
training-only owner's data). The client signs that digest with its keys, and aborts unless every
other client of the round signed the same one (`SecAggClient`). A round that needs an
attestation refuses (``PermissionDenied``, rule "cohort"):

- without one: the update is not this worker's own training of the round's model;
- without a ``SecAggIdentity``: in the unsigned protocol the model owner can invent the other
  clients, so no cohort can be checked;
- when the attestation changes between phases: the update masked must be the one advertised;
- when another client's signed attestation differs from this one.

Where none is required (an owner whose policy is not training-only) the worker still signs its
attestation, or 32 zero bytes for none, and the same equality holds: every signed round is one
cohort, all attesting the same training or all attesting none.
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
from fedsecure.aggregate.secagg import CohortMismatch
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
        self._attested: dict[tuple[str | None, str], bytes | None] = {}  # each session's attestation
        self.identity = identity

    def step(
        self,
        caller: str | None,
        session: str,
        phase: str,
        client_id: int,
        payload: Any,
        update: Callable[[], np.ndarray],
        *,
        attestation: bytes | None = None,
        required: bool = False,
    ) -> bytes:
        """One phase of ``session``. ``attestation``: the digest of this worker's attestation that
        the update is its own training of exactly the reference model (None if it is not);
        ``required``: the update derives from data whose owner allows only attested training."""
        if phase not in PHASES:
            raise ProtocolError(f"unknown secure aggregation phase {phase!r}; phases are {', '.join(PHASES)}")
        if not isinstance(payload, bytes):
            raise ProtocolError("a secure aggregation payload must be bytes")
        if attestation is not None and (not isinstance(attestation, bytes) or len(attestation) != 32):
            raise ProtocolError("an attestation digest is 32 bytes")
        key = (caller, session)
        if phase == "advertise":
            self._open(key, client_id, attestation)
        client = self._session(key, client_id, attestation, required)
        return self._advance(key, client, phase, payload, update)

    def _open(self, key: tuple[str | None, str], client_id: int, attestation: bytes | None) -> None:
        """A new session: a fresh client, as this worker's PKI identity where it has one."""
        caller, session = key
        if key in self._clients:
            raise ProtocolError(f"secure aggregation session {session!r} exists already: use a fresh one")
        if sum(1 for owner, _ in self._clients if owner == caller) >= MAX_SESSIONS:
            raise ProtocolError(f"at most {MAX_SESSIONS} secure aggregation sessions may be open at once")
        mine = self.identity
        if mine is not None and client_id != mine.client_id:
            raise ProtocolError(f"this worker is client {mine.client_id} in the federation's PKI, not {client_id}")
        self._clients[key] = SecAggClient(client_id=client_id, identity=None if mine is None else mine.identity,
                                          attestation=None if mine is None else attestation)
        self._attested[key] = attestation

    def _session(
        self, key: tuple[str | None, str], client_id: int, attestation: bytes | None, required: bool
    ) -> SecAggClient:
        """The session's client, if it is ``client_id``'s and its update is still the one advertised."""
        session = key[1]
        client = self._clients.get(key)
        if client is None:
            raise ProtocolError(f"no secure aggregation session {session!r} here (it ended or never began)")
        if client.id != client_id:
            raise ProtocolError(f"session {session!r} belongs to client {client.id}, not {client_id}")
        if self._attested[key] != attestation:
            self._end(key)
            raise PermissionDenied(
                f"the update of secure aggregation session {session!r} is no longer the one advertised: its "
                "attestation changed (the model was modified or trained again), so the round ends here",
                rule="cohort",
            )
        if required:  # on every phase: the update's labels decide, and they may have grown
            self._require_cohort(key, attestation)
        return client

    def _advance(
        self, key: tuple[str | None, str], client: SecAggClient, phase: str, payload: bytes,
        update: Callable[[], np.ndarray],
    ) -> bytes:
        """Run ``phase`` on the client; a round that fails ends here, and cannot be resumed."""
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
                self._end(key)  # the round is over for this client
            return out.encode()
        except ShareRevealRefused as exc:
            self._end(key)
            raise PermissionDenied(str(exc), rule="secure-aggregation") from exc
        except CohortMismatch as exc:
            self._end(key)
            raise PermissionDenied(str(exc), rule="cohort") from exc
        except (SecureAggregationError, ProtocolError) as exc:
            self._end(key)
            if isinstance(exc, ProtocolError):
                raise
            raise ProtocolError(f"secure aggregation: {exc}") from exc

    def _end(self, key: tuple[str | None, str]) -> None:
        self._clients.pop(key, None)
        self._attested.pop(key, None)

    def _require_cohort(self, key: tuple[str | None, str], attestation: bytes | None) -> None:
        """Refuse, ending the session, unless the cohort of the round can be checked."""
        problem = None
        if attestation is None:
            problem = PermissionDenied(
                "this update derives from data whose owner allows only training on it: it may be masked only "
                "as this worker's own Fit of the round's reference model (the module trained by Fit from "
                "exactly that model, unmodified since), which it is not. Otherwise the model owner could "
                "choose what the other clients submit and subtract it from the sum",
                rule="cohort",
            )
        elif self.identity is None:
            problem = PermissionDenied(
                "this update derives from data whose owner allows only training on it, and secure aggregation "
                "without the federation's signing keys cannot tell that the other clients trained the same "
                "model the same way (the model owner could invent them all): serve this worker with "
                "--secagg-key/--secagg-pki from `fedsecure certs --secagg`, and run the rounds with "
                "SecureSettings(consistency_check=True, client_ids=...)",
                rule="cohort",
            )
        if problem is not None:
            self._end(key)
            raise problem
