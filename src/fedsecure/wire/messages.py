"""The worker protocol's messages, in one namespace: requests (`fedsecure.wire.requests`),
replies and errors (`fedsecure.wire.replies`), and the limits of their fields
(`fedsecure.wire.fields`).

Code that speaks the protocol writes ``from fedsecure.wire import messages as m`` and
``m.encode_request(m.Get(object_id))``. A request is ``[kind, release, *fields]``, a reply
``[0, value]`` or ``[1, error_kind, message, detail]`` (msgpack, `fedsecure.wire.codec`);
decoding checks every field before a worker sees it, so a hostile message fails with
`ProtocolError` and never reaches an executor.
"""

from __future__ import annotations

from fedsecure.wire.fields import (
    MAX_TERMS,
    MAX_TEXT,
)
from fedsecure.wire.replies import (
    ERROR_KINDS,
    Reply,
    decode_reply,
    encode_reply,
    error_reply,
    reply_value,
)
from fedsecure.wire.requests import (
    REQUESTS,
    Aggregate,
    AggregateModules,
    AggregateShares,
    AggregateUpdates,
    Batch,
    Call,
    CallModule,
    CloseSum,
    CopyModule,
    Count,
    Deliver,
    DeliverModule,
    DeliverShare,
    Evaluate,
    Fit,
    FoldModule,
    Get,
    GetModule,
    MakeOptimizer,
    Move,
    MoveModule,
    OptimizerCall,
    Owners,
    Put,
    PutModule,
    PutRef,
    Request,
    Search,
    SecAgg,
    Share,
    decode_request,
    encode_request,
)

__all__ = [
    "Aggregate",
    "AggregateModules",
    "AggregateShares",
    "AggregateUpdates",
    "Batch",
    "Call",
    "CallModule",
    "CloseSum",
    "CopyModule",
    "Count",
    "Deliver",
    "DeliverModule",
    "DeliverShare",
    "ERROR_KINDS",
    "Evaluate",
    "Fit",
    "FoldModule",
    "Get",
    "GetModule",
    "MAX_TERMS",
    "MAX_TEXT",
    "MakeOptimizer",
    "Move",
    "MoveModule",
    "OptimizerCall",
    "Owners",
    "Put",
    "PutModule",
    "PutRef",
    "REQUESTS",
    "Reply",
    "Request",
    "Search",
    "SecAgg",
    "Share",
    "decode_reply",
    "decode_request",
    "encode_reply",
    "encode_request",
    "error_reply",
    "reply_value",
]
