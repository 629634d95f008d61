"""How pointers show themselves: ``repr`` in a console, a small table in a notebook."""

from __future__ import annotations

import html as _html
from typing import Any

from torch._C import DisableTorchFunctionSubclass

from fedsecure.worker.client import description_of, tags_of


def text(ptr: Any) -> str:
    with DisableTorchFunctionSubclass():
        shape, dtype = tuple(ptr.shape), ptr.dtype
    private = f", private to {ptr._fs_owners}" if ptr._fs_owners else ""
    tags = f", tags={sorted(tags_of(ptr))}" if tags_of(ptr) else ""
    description = description_of(ptr)
    if description:
        short = description if len(description) <= 60 else description[:57] + "..."
        tags += f", description={short!r}"
    state = "" if ptr._fs.live else " (gone)"
    return (
        f"PointerTensor(@{ptr._fs.worker.id}:{ptr._fs.id:#018x}, shape={shape}, "
        f"dtype={dtype}{private}{tags}){state}"
    )


def html(ptr: Any) -> str:
    with DisableTorchFunctionSubclass():
        spec = {"location": ptr._fs.worker.id + ("" if ptr._fs.live else " (gone)"),
                "id at location": f"{ptr._fs.id:#018x}", "shape": str(tuple(ptr.shape)),
                "dtype": str(ptr.dtype), "tags": " ".join(sorted(tags_of(ptr))) or "none",
                "description": description_of(ptr) or "none",
                "private to": ", ".join(ptr._fs_owners) or "nobody: the model owner may get() it"}
    cells = "".join(f"<tr><th>{k}</th><td>{_html.escape(v)}</td></tr>" for k, v in spec.items())
    return f"<b>PointerTensor</b> (owner: me)<table>{cells}</table>"
