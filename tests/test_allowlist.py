"""The allow-list: documented, current, and free of anything that reaches outside tensors."""

from __future__ import annotations

from pathlib import Path

from fedsecure.worker.allowlist import ALLOWED, markdown

DOC = Path(__file__).resolve().parents[1] / "docs" / "allowlist.md"

NEVER = {
    "torch.load", "torch.save", "torch.from_file", "Tensor.numpy", "Tensor.untyped_storage",
    "Tensor.data_ptr", "Tensor.set_", "Tensor.register_hook", "Tensor.retain_grad",
    "torch.empty", "torch.empty_like", "Tensor.__reduce_ex__", "Tensor.__setstate__",
    "Tensor.storage", "Tensor.tolist_", "Tensor.resize_", "Tensor.share_memory_",
}


def test_dangerous_operations_are_not_allowed() -> None:
    assert not NEVER & set(ALLOWED)


def test_every_entry_is_a_torch_callable() -> None:
    for name, fn in ALLOWED.items():
        assert callable(fn), name
        assert name.split(".")[0] in {"Tensor", "torch", "F"}


def test_the_documented_table_is_current() -> None:
    assert DOC.read_text() == markdown(), "run `make docs` to regenerate docs/allowlist.md"
