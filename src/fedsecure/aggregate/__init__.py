"""Layer 5, aggregate: the fixed functions an aggregator applies, and secure aggregation, so that
no single party sees an individual update.

- ``rules`` / ``robust``: the mean, clipping and noise, and robust rules (median, trimmed mean,
  Krum, Multi-Krum, norm-bounded mean), pure functions over the workers' updates;
- ``fixedpoint``: floats into the ring Z_(2^bits), with the overflow and error bounds;
- ``shamir``: t-of-n secret sharing of seeds and keys;
- ``secagg`` / ``secagg_server``: pairwise masking with dropout recovery (Bonawitz et al. 2017,
  SecAgg+ neighbourhoods of Bell et al. 2020), sans-I/O client and server;
- ``identity``: long-term signing keys and the PKI for the active-adversary variant (signed
  keys and the consistency check of Bonawitz et al. 2017);
- ``shares``: additive secret sharing across several non-colluding aggregators.

This layer imports only ``fedsecure.errors`` and ``fedsecure.wire``.
"""

from fedsecure.aggregate.fixedpoint import FixedPointCodec
from fedsecure.aggregate.identity import SigningIdentity, generate_federation
from fedsecure.aggregate.messages import (
    AdvertiseKeys,
    ConsistencyCheck,
    EncryptedShares,
    KeyBroadcast,
    MaskedInput,
    Message,
    RoundSetup,
    ShareBundle,
    SignedAdvertiseKeys,
    SignedKeyBroadcast,
    SignedUnmaskRequest,
    SurvivorSignature,
    UnmaskRequest,
    UnmaskShares,
    decode_message,
)
from fedsecure.aggregate.secagg import AggregateResult, Phase, SecAggClient
from fedsecure.aggregate.secagg_server import SecAggServer
from fedsecure.aggregate.shares import AdditiveShares, FixedPrecision, fix_precision

__all__ = [
    "AdditiveShares",
    "AdvertiseKeys",
    "AggregateResult",
    "ConsistencyCheck",
    "EncryptedShares",
    "FixedPointCodec",
    "FixedPrecision",
    "KeyBroadcast",
    "MaskedInput",
    "Message",
    "Phase",
    "RoundSetup",
    "SecAggClient",
    "SecAggServer",
    "ShareBundle",
    "SignedAdvertiseKeys",
    "SignedKeyBroadcast",
    "SignedUnmaskRequest",
    "SigningIdentity",
    "SurvivorSignature",
    "UnmaskRequest",
    "UnmaskShares",
    "decode_message",
    "fix_precision",
    "generate_federation",
]
