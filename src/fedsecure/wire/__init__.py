"""Layer 1: the messages between parties and their encoding (msgpack, never pickle)."""

from fedsecure.wire.codec import Ref, decode, encode, tensor_from_wire, tensor_to_wire
from fedsecure.wire.messages import (
    Reply,
    Request,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
)

__all__ = [
    "Ref",
    "Reply",
    "Request",
    "decode",
    "decode_reply",
    "decode_request",
    "encode",
    "encode_reply",
    "encode_request",
    "tensor_from_wire",
    "tensor_to_wire",
]
