"""Values on the wire: msgpack with a handful of extension types.

Plain values (None, bool, int, float, str, bytes, lists, string-keyed maps) are
msgpack's own (and msgpack's own timestamp extension, which no operation
accepts). Everything else that may cross a trust boundary has an explicit
extension type below, so decoding builds only these types and never runs code. Tensors travel as dtype, shape and their raw
bytes (no Python lists, no pickle).
"""

from __future__ import annotations

import struct
import threading
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
_MAX_DIMS = 32
_ID = struct.Struct(">Q")


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


def tensor_to_wire(tensor: torch.Tensor) -> msgpack.ExtType:
    t = tensor.detach().resolve_conj().resolve_neg()
    if t.layout != torch.strided:
        raise TypeError(f"only dense tensors can be sent, not {t.layout}")
    if t.device.type != "cpu":
        t = t.cpu()
    header = msgpack.packb([dtype_name(t.dtype), list(t.shape)])
    flat = t.contiguous().reshape(-1)
    raw = memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else b""  # type: ignore[arg-type]
    # one copy of the tensor's bytes (join reads the memoryview in place)
    return msgpack.ExtType(EXT_TENSOR, b"".join((_ID.pack(len(header)), header, raw)))


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
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_DIMS
        or not all(type(d) is int and 0 <= d < 2**62 for d in shape)
    ):
        raise ProtocolError(f"malformed tensor shape {shape!r}")
    raw = memoryview(data)[_ID.size + hlen :]  # no copy until the tensor's own
    numel = 1
    for d in shape:
        numel *= d
    itemsize = torch.empty((), dtype=dtype).element_size()
    if numel * itemsize != len(raw):
        raise ProtocolError(
            f"tensor of shape {shape} and dtype {dtype_s} needs {numel * itemsize} bytes, "
            f"got {len(raw)}"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)


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


_packers = threading.local()


def _nested(value: Any) -> bytes:
    # The thread's packer is busy with the enclosing value: a fresh one, then.
    return msgpack.packb(value, default=_default, strict_types=True, use_bin_type=True)  # type: ignore[no-any-return]


def encode(value: Any) -> bytes:
    """Encode a value built from plain values and the extension types above."""
    packer = getattr(_packers, "packer", None)
    if packer is None:  # one per thread: a Packer is not thread-safe, and costly to make
        packer = _packers.packer = msgpack.Packer(
            default=_default, strict_types=True, use_bin_type=True
        )
    try:
        return packer.pack(value)  # type: ignore[no-any-return]
    except BaseException:
        packer.reset()
        raise


def decode(data: bytes | bytearray | memoryview) -> Any:
    """Decode bytes from a peer; anything malformed raises `ProtocolError`."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError(f"expected bytes, got {type(data).__name__}")
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
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
