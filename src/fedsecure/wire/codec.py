"""Values on the wire: msgpack with a handful of extension types.

Plain values (None, bool, int, float, str, bytes, lists, string-keyed maps) are
msgpack's own (and msgpack's own timestamp extension, which no operation
accepts). Everything else that may cross a trust boundary has an explicit
extension type below, so decoding builds only these types and never runs code. Tensors travel as dtype, shape and their raw
bytes (no Python lists, no pickle).

A transport that can carry bytes beside a message asks for a *framed* encoding
(``encode(value, framed=True)``): tensors of at least `FRAME_MIN` bytes then stay out of
the msgpack body, which refers to them by index, and the result is a `Framed` message
that lists them. The transport sends their bytes straight from tensor storage and, on
arrival, writes them straight into new tensors of the announced dtype and shape; the
body is decoded inside ``incoming(tensors)``, which resolves each reference once.
"""

from __future__ import annotations

import contextlib
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgpack
import torch

from fedsecure.errors import ProtocolError

EXT_REF = 1
EXT_TUPLE = 2
EXT_SLICE = 3
EXT_ELLIPSIS = 4
EXT_DTYPE = 5
EXT_TENSOR = 6
EXT_MEMORY_FORMAT = 7
EXT_DEVICE = 8
EXT_FRAME = 9  # a tensor carried beside the message: the body holds its index only

# Every dtype a tensor may have on the wire, by a stable name.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
    "complex64": torch.complex64,
    "complex128": torch.complex128,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

MEMORY_FORMATS: dict[str, torch.memory_format] = {
    "preserve_format": torch.preserve_format,
    "contiguous_format": torch.contiguous_format,
    "channels_last": torch.channels_last,
}
MEMORY_FORMAT_NAMES = {v: k for k, v in MEMORY_FORMATS.items()}

# Largest single message a decoder accepts (the transport may set its own, lower).
MAX_MESSAGE_BYTES = 1 << 36
# Extension values nest (a tuple in a tuple); each level re-enters the C unpacker, so the
# depth is capped well below what the C stack of any thread can take.
MAX_EXT_DEPTH = 32
_depth = threading.local()
MAX_DIMS = 32
_ID = struct.Struct(">Q")
# Tensors this large travel beside a framed message; smaller ones cost less inline.
FRAME_MIN = 64 << 10


class Framed(bytes):
    """A msgpack message whose large tensors travel beside it.

    The bytes are the body; ``frames`` are the tensors the body refers to by index, in
    order (flat or shaped, contiguous, on the CPU). A bytes subclass, so that code which
    passes messages along (`WorkerCore.handle`, a client's transport) needs no change.
    """

    frames: list[torch.Tensor]

    def __new__(cls, body: bytes | memoryview, frames: list[torch.Tensor]) -> Framed:
        message = super().__new__(cls, body)
        message.frames = frames
        return message


def message_size(data: bytes) -> int:
    """Bytes on the wire: the body, and the frames of a `Framed` message."""
    return len(data) + sum(t.nbytes for t in getattr(data, "frames", ()))


@dataclass(frozen=True, slots=True)
class Ref:
    """An object id on the worker that receives the message."""

    id: int


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise TypeError(f"dtype {dtype} cannot travel between workers") from None


def parse_dtype(name: object) -> torch.dtype:
    if not isinstance(name, str) or name not in DTYPES:
        raise ProtocolError(f"unknown dtype {name!r}")
    return DTYPES[name]


def sendable(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as it travels: detached, dense, on the CPU, contiguous (a copy only where
    it is not already). Raises `TypeError` for a tensor that cannot travel, so a caller can
    check before it gives anything up."""
    t = tensor.detach().resolve_conj().resolve_neg()
    if t.layout != torch.strided:
        raise TypeError(f"only dense tensors can be sent, not {t.layout}")
    dtype_name(t.dtype)
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous()


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    if tensor.numel() == 0:
        return memoryview(b"")
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


def tensor_to_wire(tensor: torch.Tensor) -> msgpack.ExtType:
    t = sendable(tensor)
    frames: list[torch.Tensor] | None = getattr(_sink, "frames", None)
    if frames is not None and t.nbytes >= FRAME_MIN:
        frames.append(t)
        return msgpack.ExtType(EXT_FRAME, _ID.pack(len(frames) - 1))
    header = msgpack.packb([dtype_name(t.dtype), list(t.shape)])
    # one copy of the tensor's bytes (join reads the memoryview in place)
    return msgpack.ExtType(EXT_TENSOR, b"".join((_ID.pack(len(header)), header, tensor_bytes(t))))


def check_shape(shape: Any) -> int:
    """The element count of a shape from a peer; `ProtocolError` if it is not one."""
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(type(d) is int and 0 <= d < 2**62 for d in shape)
    ):
        raise ProtocolError(f"malformed tensor shape {shape!r}")
    numel = 1
    for d in shape:
        numel *= d
    return numel


def itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize


def tensor_from_wire(data: bytes) -> torch.Tensor:
    if len(data) < _ID.size:
        raise ProtocolError("truncated tensor header")
    (hlen,) = _ID.unpack_from(data)
    if hlen > len(data) - _ID.size:
        raise ProtocolError("truncated tensor header")
    try:
        dtype_s, shape = msgpack.unpackb(data[_ID.size : _ID.size + hlen])
    except Exception as exc:
        raise ProtocolError(f"malformed tensor header: {exc}") from exc
    dtype = parse_dtype(dtype_s)
    numel = check_shape(shape)
    raw = memoryview(data)[_ID.size + hlen :]  # no copy until the tensor's own
    if numel * itemsize(dtype) != len(raw):
        raise ProtocolError(
            f"tensor of shape {shape} and dtype {dtype_s} needs {numel * itemsize(dtype)} bytes, "
            f"got {len(raw)}"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)


def _frame(data: bytes) -> torch.Tensor:
    frames: list[torch.Tensor | None] | None = getattr(_source, "frames", None)
    if frames is None:
        raise ProtocolError("a reference to a tensor frame in a message that has none")
    index = _ID.unpack(data)[0] if len(data) == _ID.size else len(frames)
    if index >= len(frames):
        raise ProtocolError("a reference to a tensor frame that the message does not carry")
    tensor = frames[index]
    if tensor is None:  # two objects sharing one frame would share memory
        raise ProtocolError(f"tensor frame {index} is referred to twice")
    frames[index] = None
    return tensor


def own_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A frame handed over within one process, as its receiver keeps it: a copy that shares no
    memory with the sender's tensor (a plain dense CPU tensor, or `ProtocolError`)."""
    return borrowed(tensor).clone(memory_format=torch.contiguous_format)


def borrowed(tensor: torch.Tensor) -> torch.Tensor:
    """A frame handed over within one process, to be read during the request only: the sender's
    tensor itself, detached (a plain dense CPU tensor, or `ProtocolError`)."""
    if type(tensor) is not torch.Tensor or tensor.layout != torch.strided or tensor.device.type != "cpu":
        raise ProtocolError("a tensor frame must be a plain dense CPU tensor")
    return tensor.detach()


@contextlib.contextmanager
def incoming(frames: list[torch.Tensor]) -> Iterator[None]:
    """Decode the messages within this block against ``frames``, the tensors that came
    beside them; each frame can be taken once (a request's batched parts included)."""
    previous = getattr(_source, "frames", None)
    _source.frames = list(frames)
    try:
        yield
    finally:
        _source.frames = previous


def _default(obj: Any) -> Any:
    if isinstance(obj, Ref):
        return msgpack.ExtType(EXT_REF, _ID.pack(obj.id))
    if isinstance(obj, tuple):  # torch.Size included
        return msgpack.ExtType(EXT_TUPLE, _nested(list(obj)))
    if isinstance(obj, torch.Tensor):
        return tensor_to_wire(obj)
    if isinstance(obj, slice):
        return msgpack.ExtType(EXT_SLICE, _nested([obj.start, obj.stop, obj.step]))
    if obj is Ellipsis:
        return msgpack.ExtType(EXT_ELLIPSIS, b"")
    if isinstance(obj, torch.dtype):
        return msgpack.ExtType(EXT_DTYPE, dtype_name(obj).encode())
    if isinstance(obj, torch.memory_format):
        return msgpack.ExtType(EXT_MEMORY_FORMAT, MEMORY_FORMAT_NAMES[obj].encode())
    if isinstance(obj, torch.device):
        return msgpack.ExtType(EXT_DEVICE, str(obj).encode())
    if isinstance(obj, Framed):  # a framed request inside a batch
        return _nest_framed(obj)
    # strict_types sends subclasses here: bool before int, since bool is an int
    if isinstance(obj, bool):
        return bool(obj)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    raise TypeError(f"a value of type {type(obj).__name__} cannot be sent to a worker")


def _ext_hook(code: int, data: bytes) -> Any:
    depth = getattr(_depth, "value", 0)
    if depth >= MAX_EXT_DEPTH:
        raise ProtocolError(f"values nested deeper than {MAX_EXT_DEPTH} levels")
    _depth.value = depth + 1
    try:
        return _ext_value(code, data)
    finally:
        _depth.value = depth


def _ext_value(code: int, data: bytes) -> Any:
    if code == EXT_REF:
        if len(data) != _ID.size:
            raise ProtocolError("malformed object reference")
        return Ref(_ID.unpack(data)[0])
    if code == EXT_TUPLE:
        items = decode(data)
        if not isinstance(items, list):
            raise ProtocolError("malformed tuple")
        return tuple(items)
    if code == EXT_SLICE:
        parts = decode(data)
        if (
            not isinstance(parts, list)
            or len(parts) != 3
            or not all(p is None or type(p) is int for p in parts)
        ):
            raise ProtocolError("malformed slice")
        return slice(*parts)
    if code == EXT_ELLIPSIS:
        return Ellipsis
    if code == EXT_DTYPE:
        return parse_dtype(data.decode("utf-8", "replace"))
    if code == EXT_TENSOR:
        return tensor_from_wire(data)
    if code == EXT_FRAME:
        return _frame(data)
    if code == EXT_MEMORY_FORMAT:
        name = data.decode("utf-8", "replace")
        if name not in MEMORY_FORMATS:
            raise ProtocolError(f"unknown memory format {name!r}")
        return MEMORY_FORMATS[name]
    if code == EXT_DEVICE:
        name = data.decode("utf-8", "replace")
        if name != "cpu" and not (name.startswith("cuda") and len(name) <= 10):
            raise ProtocolError(f"unknown device {name!r}")
        return torch.device(name)
    raise ProtocolError(f"unknown extension type {code}")


def _nest_framed(message: Framed) -> bytes:
    frames: list[torch.Tensor] | None = getattr(_sink, "frames", None)
    if message.frames:
        # Its references are indexes into its own frames: they stay right only as the
        # first frames of the enclosing message.
        if frames is None or frames:
            raise TypeError("a framed message nests only in a framed one, before any other frame")
        frames.extend(message.frames)
    return bytes(message)


_packers = threading.local()
_sink = threading.local()  # .frames: where a framed encoding puts its large tensors
_source = threading.local()  # .frames: the tensors that came beside the messages being decoded


def _nested(value: Any) -> bytes:
    # The thread's packer is busy with the enclosing value: a fresh one, then.
    return msgpack.packb(value, default=_default, strict_types=True, use_bin_type=True)  # type: ignore[no-any-return]


def encode(value: Any, *, framed: bool = False) -> bytes:
    """Encode a value built from plain values and the extension types above.

    ``framed``: large tensors travel beside the body; the result is then a `Framed`
    message where it has any.
    """
    packer = getattr(_packers, "packer", None)
    if packer is None:  # one per thread: a Packer is not thread-safe, and costly to make
        packer = _packers.packer = msgpack.Packer(
            default=_default, strict_types=True, use_bin_type=True
        )
    previous = getattr(_sink, "frames", None)
    if not framed and previous is None:  # the common case: nothing beside the body
        try:
            return packer.pack(value)  # type: ignore[no-any-return]
        except BaseException:
            packer.reset()
            raise
    _sink.frames = [] if framed else None
    try:
        body: bytes = packer.pack(value)
        frames = _sink.frames
    except BaseException:
        packer.reset()
        raise
    finally:
        _sink.frames = previous
    return Framed(body, frames) if frames else body


def decode(data: bytes | bytearray | memoryview) -> Any:
    """Decode bytes from a peer; anything malformed raises `ProtocolError`.

    A `Framed` message is decoded against its own frames.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError(f"expected bytes, got {type(data).__name__}")
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    if type(data) is Framed:
        with incoming(data.frames):
            return _unpack(data)
    return _unpack(data)


def _unpack(data: bytes | bytearray | memoryview) -> Any:
    try:
        return msgpack.unpackb(
            data,
            ext_hook=_ext_hook,
            raw=False,
            strict_map_key=True,
            use_list=True,
        )
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"malformed message: {type(exc).__name__}: {exc}") from exc
