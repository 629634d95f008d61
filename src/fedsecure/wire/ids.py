"""Object ids: the names under which a worker holds objects, chosen by whoever asks it to make one.

An id is 64 random bits: unguessable, so holding an id is the capability to use the object.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Iterator

_ids: Iterator[tuple[int, ...]] = iter(())


def new_id() -> int:
    """A fresh object id, drawn from the OS's cryptographic source 512 at a time (one system call
    each time, not one per id)."""
    global _ids
    try:
        return next(_ids)[0]
    except StopIteration:
        _ids = struct.iter_unpack(">Q", secrets.token_bytes(8 * 512))
        return next(_ids)[0]
