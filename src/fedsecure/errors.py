"""Typed exceptions, named after the rule that was broken.

Errors are split by who is at fault (as in h11): the caller misused the API
(`FedsecureError` subclasses that are also `ValueError`/`PermissionError`/...), or a
peer sent something it should not have (`ProtocolError`).
"""

from __future__ import annotations


class FedsecureError(Exception):
    """Base class of every error fedsecure raises on purpose."""


class PermissionDenied(FedsecureError, PermissionError):
    """A worker refused to release or move a value; the message names the rule.

    The value stays where it was: a refusal loses nothing.
    """

    def __init__(self, message: str, *, rule: str) -> None:
        super().__init__(message)
        self.rule = rule


class OperationNotAllowed(FedsecureError, RuntimeError):
    """The operation is not on the worker's allow-list (or not supported on pointers).

    Not a TypeError on purpose: torch turns a TypeError raised inside a binary
    operator into NotImplemented, which would hide this message.
    """

    def __init__(self, message: str, *, op: str) -> None:
        super().__init__(message)
        self.op = op


class WorkerMismatch(FedsecureError, ValueError):
    """Operands live on different workers (or one is local and one remote)."""


class ObjectNotFound(FedsecureError, KeyError):
    """A worker holds no object under the given id (freed, moved, or never sent)."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want a sentence
        return str(self.args[0]) if self.args else ""


class WorkerUnavailable(FedsecureError, ConnectionError):
    """A worker could not be reached within the deadline."""


class ProtocolError(FedsecureError, ValueError):
    """A message could not be decoded or violates the protocol (the peer's fault)."""


class RemoteError(FedsecureError, RuntimeError):
    """An allowed operation failed on the worker (for example a shape mismatch).

    ``op`` names the operation and ``worker`` the worker it ran on.
    """

    def __init__(self, message: str, *, op: str, worker: str) -> None:
        super().__init__(message)
        self.op = op
        self.worker = worker


class DatasetError(FedsecureError, ValueError):
    """A data set could not be read or is inconsistent (corrupt file, shape or dtype mismatch)."""


class DatasetNotFound(DatasetError, FileNotFoundError):
    """The files of a data set are not where they were looked for; the message says how to get them."""


class PartitionError(FedsecureError, ValueError):
    """A partitioner's arguments cannot be satisfied (too many workers, classes or samples asked for)."""


class SecureAggregationError(FedsecureError):
    """Secure aggregation stopped; the message names the rule and how to go on. ``failures``: the
    workers that failed in the protocol before it stopped (`fedsecure.fl.Failure` values), which
    explain an abort such as too few survivors."""

    failures: tuple[object, ...] = ()


class SecAggInputError(SecureAggregationError, ValueError):
    """Bad arguments to secure aggregation: a configuration that cannot work or would not be
    secure, or an update that cannot be encoded."""


class FixedPointOverflow(SecAggInputError):
    """A sum of fixed-point values could wrap around the ring, so its decoding would be wrong."""


class ShareReconstructionError(SecureAggregationError, ValueError):
    """Secret shares could not be combined: too few, duplicated, inconsistent or of different secrets."""


class TooFewSurvivors(SecureAggregationError, RuntimeError):
    """Fewer clients than the threshold are left; the round is aborted and nothing is revealed."""


class ShareRevealRefused(SecureAggregationError, PermissionError):
    """An honest client refused to reveal a share that, together with others, would unmask one input."""


class SecAggProtocolError(SecureAggregationError, ProtocolError):
    """A secure-aggregation message was rejected: tampered, replayed, out of phase or malformed."""


class SignatureRejected(SecAggProtocolError):
    """With signing identities (the active-adversary protocol), a public key arrived with a missing
    or invalid signature, or under an id the PKI does not know: a substituted key; the client aborts."""


class ConsistencyCheckFailed(SecAggProtocolError):
    """The consistency check found the server telling clients different survivor sets, or too few
    valid signatures on this client's set; the client aborts and reveals nothing."""
