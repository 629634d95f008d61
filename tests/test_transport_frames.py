"""Tensors beside messages: the framed encoding (`codec.Framed`) and the stream format
(`transport.frames`) that carries it, without a network."""

from __future__ import annotations

import msgpack
import pytest
import torch

from fedsecure.errors import ProtocolError
from fedsecure.transport import frames
from fedsecure.wire import codec
from fedsecure.wire import messages as m

BIG = codec.FRAME_MIN // 4  # float32 elements in the smallest framed tensor


def test_large_tensors_travel_beside_the_body_small_ones_inside() -> None:
    big, small = torch.randn(BIG), torch.arange(6.0).view(2, 3)
    value = [big, (small, big.view(-1, 4)), {"x": big.double()}]
    data = codec.encode(value, framed=True)
    assert isinstance(data, codec.Framed) and len(data.frames) == 3
    assert len(data) < 200  # the body holds references, not bytes
    assert data.frames[0].data_ptr() == big.data_ptr()  # the tensor's own storage: no copy
    out = codec.decode(data)
    assert torch.equal(out[0], big) and torch.equal(out[1][0], small)
    assert out[1][1].shape == (BIG // 4, 4) and out[2]["x"].dtype == torch.float64


def test_without_framing_nothing_changes() -> None:
    data = codec.encode([torch.randn(BIG)])
    assert type(data) is bytes
    assert type(codec.encode([torch.ones(3)], framed=True)) is bytes  # nothing large: plain bytes


def test_a_framed_request_rides_in_a_batch() -> None:
    put = m.encode_request(m.Put(7, torch.randn(BIG), False, False, []), framed=True)
    batch = m.encode_request(m.Batch([m.encode_request(m.Count()), put]), framed=True)
    assert isinstance(batch, codec.Framed) and len(batch.frames) == 1
    with codec.incoming(batch.frames):  # as a server decodes a batch's parts, later
        outer = m.decode_request(batch)
        inner = m.decode_request(outer.requests[1])  # type: ignore[attr-defined]
    assert torch.equal(inner.value, put.frames[0])  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "index, frames_given, match",
    [(0, None, "has none"), (1, [torch.ones(1)], "does not carry"), (2**63, [torch.ones(1)], "does not carry")],
)
def test_bad_frame_references_are_protocol_errors(index: int, frames_given: list | None, match: str) -> None:
    data = msgpack.packb([msgpack.ExtType(codec.EXT_FRAME, index.to_bytes(8, "big"))])
    with pytest.raises(ProtocolError, match=match):
        if frames_given is None:
            codec.decode(data)
        else:
            with codec.incoming(frames_given):
                codec.decode(data)


def test_a_frame_is_taken_once() -> None:
    ref = msgpack.ExtType(codec.EXT_FRAME, (0).to_bytes(8, "big"))
    with codec.incoming([torch.ones(2)]), pytest.raises(ProtocolError, match="twice"):
        codec.decode(msgpack.packb([ref, ref]))


def roundtrip(message: bytes, worker: str = "bob", limit: int = 1 << 30) -> tuple[str, bytes]:
    head, views = frames.outgoing(worker, message)
    messages = frames.chunks(head, views)
    name, rest = frames.split_head(next(messages))
    announced, body = frames.read_manifest(rest, limit=limit, what="the request")
    received = frames.receive(announced, messages)
    assert next(messages, None) is None
    return name, frames.body_and_frames(body, received)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.bool, torch.complex64, torch.int64])
def test_frames_arrive_whole_in_new_tensors(dtype: torch.dtype) -> None:
    big = (torch.randn(3 * frames.CHUNK // 4 + 5) * 10).to(dtype).view(-1, 1)  # several chunks, odd end
    message = m.encode_reply(m.Reply({"tensor": big}), framed=True)
    name, received = roundtrip(message, worker="")
    assert name == "" and isinstance(received, codec.Framed)
    out = m.reply_value(received, worker="w")["tensor"]
    assert out.dtype == dtype and torch.equal(out, big) and out.data_ptr() != big.data_ptr()


def test_a_message_without_frames_is_plain_bytes() -> None:
    name, received = roundtrip(b"\x93\x01\x02\x03", worker="worker-\u00e9")
    assert name == "worker-\u00e9" and type(received) is bytes and received == b"\x93\x01\x02\x03"


def head_with(manifest: object, body: bytes = b"\xc0") -> memoryview:
    packed = msgpack.packb(manifest)
    return memoryview(len(packed).to_bytes(4, "big") + packed + body)


@pytest.mark.parametrize(
    "manifest, match",
    [
        ({"a": 1}, "list"),
        ([["float32"]], r"\[dtype, shape\]"),
        ([["float128", [4]]], "unknown dtype"),
        ([["float32", [-1]]], "shape"),
        ([["float32", [2] * 33]], "shape"),
        ([["float32", [0, 5]]], "empty tensor"),
        ([["float32", ["4"]]], "shape"),
    ],
)
def test_malformed_manifests_are_refused(manifest: object, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        frames.read_manifest(head_with(manifest), limit=1 << 20, what="the request")


def test_announced_sizes_are_checked_against_the_maximum_before_anything_is_read() -> None:
    huge = [["float64", [2**40, 2**20]]]  # 2**63 bytes: only a number here
    with pytest.raises(frames.TooLarge, match="exceeds the maximum of 1048576 bytes"):
        frames.read_manifest(head_with(huge), limit=1 << 20, what="the request")
    with pytest.raises(frames.TooLarge):  # many frames, each under the limit
        frames.read_manifest(head_with([["uint8", [1 << 19]]] * 3), limit=1 << 20, what="the request")


@pytest.mark.parametrize("garbage", [b"", b"\x00", b"\x00\x05ab", b"\x00\x01\xff\x00\x00\x00\x00"])
def test_truncated_heads_are_refused(garbage: bytes) -> None:
    with pytest.raises(ProtocolError):
        name, rest = frames.split_head(garbage)
        frames.read_manifest(rest, limit=100, what="the request")


def test_chunks_must_fit_the_announced_frames() -> None:
    announced = [frames.Frame(torch.uint8, (10,), 10)]
    with pytest.raises(ProtocolError, match="past the end"):
        frames.receive(announced, iter([b"x" * 6, b"x" * 6]))
    with pytest.raises(ProtocolError, match="past the end"):
        frames.receive(announced, iter([b""]))
    with pytest.raises(ProtocolError, match="ended 4 bytes into a tensor"):
        frames.receive(announced, iter([b"x" * 6]))


def test_nothing_is_allocated_for_bytes_that_never_come(monkeypatch: pytest.MonkeyPatch) -> None:
    allocated: list[tuple[int, ...]] = []
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda shape, **kw: allocated.append(tuple(shape)) or empty(shape, **kw))
    announced = [frames.Frame(torch.float32, (1 << 28,), 1 << 30)]  # 1 GiB announced
    with pytest.raises(ProtocolError):
        frames.receive(announced, iter([]))
    assert allocated == []


def test_a_requests_kind_is_read_from_its_first_bytes_as_decoding_reads_it() -> None:
    """`peek_kind` decides, before decoding, whether a delivery within one process may read the
    sender's tensors instead of copies (`m.BORROWS_FRAMES`): it must name the kind `decode_request`
    finds, for short and long requests, framed or not, and nothing for bytes that are no request."""
    big = torch.zeros(codec.FRAME_MIN // 4 + 1)
    for msg in (m.Get(7), m.DeliverFold(1, True, {}, [big], [[]], 3, "mo", []), m.MoveFold(1, "agg", 2, False),
                m.Batch([m.encode_request(m.Get(7))] * 3)):
        for framed in (False, True):
            data = m.encode_request(msg, framed=framed)
            assert m.peek_kind(data) == msg.KIND == type(m.decode_request(data)).KIND
    long = msgpack.packb([m.Get.KIND, [], 7, *range(20)])
    assert long[0] == 0xDC and m.peek_kind(long) == m.Get.KIND  # an array of 16 items or more
    for garbage in (b"", b"\x91", msgpack.packb({"kind": 4}), msgpack.packb([300, []]), msgpack.packb("x")):
        assert m.peek_kind(garbage) is None
    assert {m.DeliverFold.KIND} == m.BORROWS_FRAMES and m.DeliverFold.PEER_ONLY
