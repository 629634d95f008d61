"""The IDX file format of MNIST and Fashion-MNIST: a reader that checks everything, and a writer.

Format (LeCun, Cortes and Burges, "The MNIST database", http://yann.lecun.com/exdb/mnist/,
section "File formats"): two zero bytes; one byte naming the element type; one byte giving the
number of dimensions ``d``; ``d`` big-endian unsigned 32-bit sizes; then the elements, big-endian,
in C order. Files are often gzip-compressed; the reader sniffs the gzip magic number, so
``name`` and ``name.gz`` read the same.

The reader streams: it reads the header first, checks the declared size against ``max_bytes``
before allocating anything, then reads exactly that many bytes into one buffer for
``numpy.frombuffer`` (no per-element Python code), and refuses trailing bytes. A truncated or
corrupt file raises `DatasetError`, never a bare ``EOFError``/``zlib.error``/``ValueError``.
"""

from __future__ import annotations

import gzip
import io
import os
import struct
import zlib

import numpy as np

from fedsecure.errors import DatasetError, DatasetNotFound

# Element type codes of the format, with their big-endian numpy dtypes.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES: dict[str, int] = {dtype.str[1:]: code for code, dtype in IDX_DTYPES.items()}
# Largest element payload the reader accepts unless told otherwise (Fashion-MNIST's is 47 MB).
MAX_IDX_BYTES = 2**31
_GZIP_MAGIC = b"\x1f\x8b"
_FIX = (
    "re-download or reinstall the file (for Fashion-MNIST: apt-get install --reinstall dataset-fashion-mnist)"
)

PathLike = str | os.PathLike[str]


def read_idx(path: PathLike, *, max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """Read an IDX file (plain or gzip-compressed) into a native-endian numpy array."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as raw:
            if raw.read(2) == _GZIP_MAGIC:
                raw.seek(0)
                with gzip.GzipFile(fileobj=raw, mode="rb") as unzipped:
                    return _read_stream(unzipped, source=source, max_bytes=max_bytes)
            raw.seek(0)
            return _read_stream(raw, source=source, max_bytes=max_bytes)
    except FileNotFoundError as error:
        raise DatasetNotFound(f"{source}: no such file; check the path") from error
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise DatasetError(f"{source}: corrupt or truncated gzip data ({error}); {_FIX}") from error


def parse_idx(data: bytes, *, source: str = "<bytes>", max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """Parse the bytes of an uncompressed IDX file."""
    return _read_stream(io.BytesIO(data), source=source, max_bytes=max_bytes)


def write_idx(path: PathLike, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file, gzip-compressed when ``path`` ends in ``.gz``.

    The gzip header carries no time stamp or file name, so equal arrays give equal files.
    """
    array = np.asarray(array)
    code = _CODES.get(array.dtype.str[1:])
    if code is None:
        supported = ", ".join(str(dtype.newbyteorder("=")) for dtype in IDX_DTYPES.values())
        raise DatasetError(f"IDX cannot store dtype {array.dtype}; convert the array to one of {supported}")
    if not 1 <= array.ndim <= 255 or any(size >= 2**32 for size in array.shape):
        raise DatasetError(f"IDX stores 1 to 255 dimensions of < 2**32 each, not shape {array.shape}")
    header = struct.pack(f">HBB{array.ndim}I", 0, code, array.ndim, *array.shape)
    payload = np.ascontiguousarray(array, dtype=IDX_DTYPES[code]).tobytes()
    target = os.fspath(path)
    with open(target, "wb") as raw:
        if target.endswith(".gz"):
            with gzip.GzipFile(fileobj=raw, mode="wb", filename="", mtime=0) as zipped:
                zipped.write(header + payload)
        else:
            raw.write(header + payload)


def _read_stream(stream: io.BufferedIOBase, *, source: str, max_bytes: int) -> np.ndarray:
    zero, code, ndim = struct.unpack(">HBB", _read_exact(stream, 4, source=source, what="magic number"))
    if zero != 0:
        raise DatasetError(
            f"{source}: not an IDX file (the magic number starts {zero:#06x}, not 0x0000); "
            f"pass the path of an IDX file such as train-images-idx3-ubyte[.gz], or {_FIX}"
        )
    if code not in IDX_DTYPES:
        known = ", ".join(f"{c:#04x}" for c in IDX_DTYPES)
        raise DatasetError(f"{source}: unknown IDX element type {code:#04x} (known: {known}); {_FIX}")
    if ndim == 0:
        raise DatasetError(f"{source}: the IDX header declares 0 dimensions; {_FIX}")
    shape = struct.unpack(f">{ndim}I", _read_exact(stream, 4 * ndim, source=source, what="dimensions"))
    dtype = IDX_DTYPES[code]
    size = int(np.prod(shape, dtype=object)) * dtype.itemsize  # Python ints: no overflow
    if size > max_bytes:
        raise DatasetError(
            f"{source}: the header declares shape {shape} ({size} bytes), more than max_bytes={max_bytes}; "
            "pass a larger max_bytes if the file really is that large, otherwise the file is corrupt"
        )
    buffer = _read_exact(stream, size, source=source, what=f"{dtype.newbyteorder('=')} data of shape {shape}")
    extra = len(stream.read(1))
    if extra:
        raise DatasetError(
            f"{source}: bytes follow the {size} bytes of data that the header declares (shape {shape}); "
            f"the file is corrupt or not IDX; {_FIX}"
        )
    array = np.frombuffer(buffer, dtype=dtype).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=False)


def _read_exact(stream: io.BufferedIOBase, size: int, *, source: str, what: str) -> bytearray:
    """Exactly ``size`` bytes into one writable buffer, read in as few chunks as the stream allows."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    done = 0
    while done < size:
        count = stream.readinto(view[done:])
        if not count:
            raise DatasetError(
                f"{source}: truncated: the file ends after {done} of the {size} bytes of its {what}; {_FIX}"
            )
        done += count
    return buffer
