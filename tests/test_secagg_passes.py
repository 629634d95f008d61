"""The single-pass paths of secure aggregation compute exactly what the plain ones do.

Masks added block by block equal the AES-CTR keystream made in one piece; the blockwise
fixed-point encoding equals clip, scale and round over the whole vector; a masked input
encoded with one copy is byte for byte msgpack's encoding, and read back as a view only when
it is laid out that way (anything else takes the general, checking path).
"""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedsecure.aggregate import MaskedInput, decode_message, fixedpoint, masks
from fedsecure.aggregate.fixedpoint import FixedPointCodec
from fedsecure.aggregate.masks import MaskStream
from fedsecure.aggregate.messages import Message
from fedsecure.errors import SecAggInputError, SecAggProtocolError
from fedsecure.wire import codec

ROUND = bytes(range(16))


def keystream(key: bytes, size: int, dtype: type[np.unsignedinteger]) -> np.ndarray:  # type: ignore[type-arg]
    nbytes = size * np.dtype(dtype).itemsize
    raw = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(nbytes))
    return np.frombuffer(raw, dtype)


@pytest.mark.parametrize("way", ["ctr", "gcm", None])  # None: the faster one here
@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
@pytest.mark.parametrize("blocks", [0, 1, 2.5, 7.25])  # whole blocks and a shorter last one
def test_masks_applied_in_blocks_are_the_whole_keystream(
    dtype: type, blocks: float, way: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(masks, "KEYSTREAM", way)
    step = masks.BLOCK_BYTES // np.dtype(dtype).itemsize
    size = max(1, int(blocks * step)) + (3 if blocks else 0)
    rng = np.random.default_rng(5)
    keyed = [(bytes(rng.integers(0, 256, 16, dtype=np.uint8)), sign) for sign in (1, -1, -1, 1, 1)]
    acc = rng.integers(0, np.iinfo(dtype).max, size, dtype=dtype, endpoint=True)
    want = acc.copy()
    for key, sign in keyed:
        want = want + keystream(key, size, dtype) if sign > 0 else want - keystream(key, size, dtype)
    MaskStream(size=size, dtype=dtype).apply(acc, keyed)
    assert np.array_equal(acc, want)
    stream = MaskStream(size=size, dtype=dtype)
    assert np.array_equal(stream.expand(keyed[0][0]), keystream(keyed[0][0], size, dtype))
    assert np.array_equal(stream.expand(keyed[1][0]), keystream(keyed[1][0], size, dtype))  # reused buffer


@pytest.mark.parametrize("nbytes", [8, 16, 32, 48, 4088, 4096, 4104, masks.BLOCK_BYTES + 8])
def test_the_gcm_made_stream_is_the_ctr_stream_at_every_length(nbytes: int, monkeypatch: pytest.MonkeyPatch) -> None:
    key = bytes(range(100, 116))
    size = nbytes // 8
    want = keystream(key, size, np.uint64)
    for way in ("gcm", "ctr"):
        monkeypatch.setattr(masks, "KEYSTREAM", way)
        assert np.array_equal(MaskStream(size=size, dtype=np.uint64).expand(key), want), way


def test_masks_go_only_into_a_matching_writable_array() -> None:
    stream = MaskStream(size=10, dtype=np.uint32)
    for bad in (np.zeros(10, np.uint64), np.zeros(11, np.uint32), np.zeros(20, np.uint32)[::2]):
        with pytest.raises(SecAggInputError):
            stream.apply(bad, [(bytes(16), 1)])
    frozen = np.zeros(10, np.uint32)
    frozen.flags.writeable = False
    with pytest.raises(SecAggInputError):
        stream.apply(frozen, [(bytes(16), 1)])
    acc = np.arange(10, dtype=np.uint32)
    stream.apply(acc, [])
    assert np.array_equal(acc, np.arange(10))


def reference_encode(c: FixedPointCodec, x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) if c.frac_bits > 100 else x
    ftype = x.dtype.type
    q = np.rint(np.clip(x, -ftype(c.bound), ftype(c.bound)) * ftype(c.scale))
    return q.astype(fixedpoint.RINGS[c.bits][1]).view(c.dtype)


@pytest.mark.parametrize(("bits", "summands", "bound"), [(32, 100, 1.0), (32, 3, 2.7), (64, 10, 1.0), (64, 2, 1e-35)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_blockwise_encoding_is_the_whole_vector_encoding(bits: int, summands: int, bound: float, dtype: type) -> None:
    c = FixedPointCodec(summands=summands, bound=bound, bits=bits)
    size = 2 * fixedpoint._ENCODE_BLOCK + 17
    rng = np.random.default_rng(bits + summands)
    x = (rng.standard_normal(size) * bound * 2).astype(dtype)
    x[:6] = [0.5 * bound, -0.5 * bound, 3e30, -3e30, bound, -bound]  # ties, beyond the bound both ways
    assert np.array_equal(c.encode(x), reference_encode(c, x))
    out = np.full(size, 7, c.dtype)
    assert c.encode(x, out=out) is out and np.array_equal(out, reference_encode(c, x))
    with pytest.raises(SecAggInputError):
        c.encode(x, out=np.empty(size - 1, c.dtype))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_entries_are_refused_in_any_block(bad: float) -> None:
    c = FixedPointCodec(summands=10, bound=1.0)
    x = np.zeros(3 * fixedpoint._ENCODE_BLOCK, np.float32)
    x[-1] = bad
    with pytest.raises(SecAggInputError, match="NaN or infinite"):
        c.encode(x)


@pytest.mark.parametrize("nbytes", [0, 4, 252, 256, 65532, 65536, 400_000])  # bin 8, 16 and 32
@pytest.mark.parametrize("sender", [1, 127, 128, 255, 256, 65535, 65536, (1 << 32) - 1])
def test_masked_input_encodes_as_msgpack_does_and_reads_back_as_a_view(nbytes: int, sender: int) -> None:
    data = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8)
    msg = MaskedInput(ROUND, sender, memoryview(data))
    wire = msg.encode()
    assert type(wire) is bytes
    assert wire == Message.encode(msg) == codec.encode([MaskedInput.KIND, ROUND, sender, data.tobytes()])
    back = decode_message(wire)
    assert isinstance(back, MaskedInput) and (back.round_id, back.sender) == (ROUND, sender)
    assert isinstance(back.data, memoryview) and back.data.obj is wire  # a view of the message, no copy
    assert bytes(back.data) == data.tobytes() and back.encode() == wire
    for other in (bytearray(wire), memoryview(wire)):  # mutable or borrowed buffers: copied, as before
        again = decode_message(other)
        assert isinstance(again, MaskedInput) and isinstance(again.data, bytes) and again.data == data.tobytes()


def test_masked_input_of_a_non_byte_view_encodes_its_bytes() -> None:
    words = np.arange(1000, dtype=np.uint32)
    msg = MaskedInput(ROUND, 9, memoryview(words))  # a view of 4-byte items
    assert msg.encode() == codec.encode([MaskedInput.KIND, ROUND, 9, words.tobytes()])


def test_masked_inputs_laid_out_otherwise_take_the_checking_path() -> None:
    wire = MaskedInput(ROUND, 3, b"\x01\x02\x03\x04").encode()
    for bad in (wire[:-1], wire + b"\x00", wire[:40], wire.replace(b"\xc4\x04", b"\xc4\x05")):
        with pytest.raises(SecAggProtocolError):
            decode_message(bad)
    zero_sender = codec.encode([MaskedInput.KIND, ROUND, 0, b"\x01"])
    with pytest.raises(SecAggProtocolError, match="client id"):
        decode_message(zero_sender)
    short_round = codec.encode([MaskedInput.KIND, ROUND[:15], 3, b"\x01"])
    with pytest.raises(SecAggProtocolError, match="16 bytes"):
        decode_message(short_round)
    # a valid message in another (non-canonical) msgpack layout still reads, through the general path
    signed_sender = wire.replace(b"\x03\xc4\x04", b"\xd0\x03\xc4\x04")
    back = decode_message(signed_sender)
    assert isinstance(back, MaskedInput) and back.sender == 3 and back.data == b"\x01\x02\x03\x04"
