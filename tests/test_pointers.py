"""Pointer tensors as a model owner uses them: send, get, move, ops, lifetime."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

import fedsecure as sy


def test_send_get_roundtrip_removes_the_remote_copy(bob: sy.VirtualWorker) -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    ptr = x.send(bob)
    assert isinstance(ptr, sy.PointerTensor)
    assert ptr.location is bob and isinstance(ptr.id_at_location, int)
    assert ptr.shape == x.shape and ptr.dtype == x.dtype
    assert bob.object_count() == 1
    assert torch.equal(ptr.get(), x)
    assert bob.object_count() == 0


def test_repr_names_the_worker_and_the_spec(bob: sy.VirtualWorker) -> None:
    ptr = torch.zeros(3, 2).send(bob)
    text = repr(ptr)
    assert "@bob:" in text and "(3, 2)" in text and "float32" in text
    assert f"{ptr}" == text  # format() never fetches the value


def test_get_keeps_requires_grad_and_dtype(bob: sy.VirtualWorker) -> None:
    ptr = torch.ones(2, requires_grad=True).send(bob)
    assert ptr.requires_grad
    value = ptr.get()
    assert value.requires_grad
    assert torch.arange(3).send(bob).get().dtype == torch.int64


def test_move_goes_straight_between_workers(
    bob: sy.VirtualWorker, alice: sy.VirtualWorker, federation: sy.Federation
) -> None:
    big = torch.randn(1_000_000)
    ptr = big.send(bob)
    before_bob, before_alice = bob.bytes_sent + bob.bytes_received, alice.bytes_sent + alice.bytes_received
    moved = ptr.move(alice)
    owner_bytes = (bob.bytes_sent + bob.bytes_received - before_bob) + (
        alice.bytes_sent + alice.bytes_received - before_alice
    )
    assert moved is ptr and ptr.location is alice
    assert owner_bytes < 1_000, "the model owner's connections carried the tensor"
    assert federation.link_bytes[("bob", "alice")] >= big.numel() * 4
    assert bob.object_count() == 0 and alice.object_count() == 1
    assert torch.equal(ptr.get(), big)


def test_pointer_to_pointer(bob: sy.VirtualWorker, alice: sy.VirtualWorker) -> None:
    x = torch.tensor([1.0, 2.0])
    inner = x.send(bob)
    outer = inner.send(alice)
    assert outer.location is alice and inner.location is bob
    assert alice.object_count() == 1
    back = outer.get()
    assert back is inner
    assert torch.equal(back.get(), x)
    chained = torch.ones(1).send(bob).send(alice) + 1  # runs on bob; alice points to the result
    assert chained.location is alice and torch.equal(chained.get().get(), torch.tensor([2.0]))


def test_dropping_the_last_pointer_frees_the_object(bob: sy.VirtualWorker) -> None:
    ptr = torch.ones(3).send(bob)
    y = ptr * 2
    assert bob.object_count() == 2
    del ptr, y
    gc.collect()
    assert bob.object_count() == 0


def test_arithmetic_and_comparisons_run_remotely(bob: sy.VirtualWorker) -> None:
    a, b = torch.randn(3, 3), torch.randn(3, 3)
    pa, pb = a.send(bob), b.send(bob)
    cases = {
        "add": (pa + pb, a + b),
        "radd": (2 + pa, 2 + a),
        "sub": (pa - pb, a - b),
        "rsub": (1 - pa, 1 - a),
        "mul": (pa * pb, a * b),
        "div": (pa / 2, a / 2),
        "rdiv": (1 / (pb.abs() + 1), 1 / (b.abs() + 1)),
        "pow": (pa**2, a**2),
        "neg": (-pa, -a),
        "matmul": (pa @ pb, a @ b),
        "mm": (pa.mm(pb), a.mm(b)),
        "torch.matmul": (torch.matmul(pa, pb), torch.matmul(a, b)),
        "gt": (pa > pb, a > b),
        "eq": (pa == pa, a == a),
        "sum": (pa.sum(), a.sum()),
        "mean_dim": (pa.mean(dim=0), a.mean(dim=0)),
        "torch.exp": (torch.exp(pa), torch.exp(a)),
        "F.relu": (F.relu(pa), F.relu(a)),
        "F.softmax": (F.softmax(pa, dim=1), F.softmax(a, dim=1)),
        "index": (pa[1], a[1]),
        "slice": (pa[:, 1:], a[:, 1:]),
        "view": (pa.view(9), a.view(9)),
        "transpose": (pa.t(), a.t()),
        "stack": (torch.stack([pa, pb]), torch.stack([a, b])),
        "where": (torch.where(pa > 0, pa, pb), torch.where(a > 0, a, b)),
    }
    for name, (remote, local) in cases.items():
        assert isinstance(remote, sy.PointerTensor), name
        assert remote.shape == local.shape, name
        assert torch.allclose(remote.get(), local), name


def test_in_place_ops_keep_the_pointer(bob: sy.VirtualWorker) -> None:
    x = torch.ones(4)
    ptr = x.send(bob)
    same = ptr.add_(1)
    assert same is ptr
    ptr.sub_(0.5)
    ptr *= 4
    ptr[0] = 10.0
    assert torch.equal(ptr.get(), torch.tensor([10.0, 6.0, 6.0, 6.0]))


def test_multi_output_ops(bob: sy.VirtualWorker) -> None:
    x = torch.tensor([[1.0, 5.0], [3.0, 2.0]])
    values, indices = x.send(bob).max(dim=1)
    assert torch.equal(values.get(), torch.tensor([5.0, 3.0]))
    assert torch.equal(indices.get(), torch.tensor([1, 0]))
    parts = x.send(bob).split(1)
    assert len(parts) == 2 and torch.equal(parts[1].get(), x[1:])


def test_backward_keeps_gradients_remote(bob: sy.VirtualWorker) -> None:
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    pw = w.send(bob)
    px = torch.tensor([3.0, 4.0]).send(bob)
    loss = (pw * px).sum()
    loss.backward()
    grad = pw.grad
    assert isinstance(grad, sy.PointerTensor) and grad.location is bob
    assert torch.equal(grad.get(), torch.tensor([3.0, 4.0]))
    assert isinstance(pw.data, sy.PointerTensor)
    pw.grad = None
    assert pw.grad is None


def test_operands_on_two_workers_name_both(bob: sy.VirtualWorker, alice: sy.VirtualWorker) -> None:
    a, b = torch.ones(2).send(bob), torch.ones(2).send(alice)
    with pytest.raises(sy.WorkerMismatch, match="'bob'.*'alice'"):
        _ = a + b
    with pytest.raises(sy.WorkerMismatch, match="local tensor"):
        _ = a + torch.ones(2)


@pytest.mark.parametrize(
    "attempt, op",
    [
        (lambda p: p.numpy(), "numpy"),
        (lambda p: p.untyped_storage(), "untyped_storage"),
        (lambda p: torch.empty_like(p), "empty_like"),
        (lambda p: p.register_hook(print), "register_hook"),
        (lambda p: p.set_(torch.ones(2)), "set_"),
    ],
)
def test_operations_off_the_allow_list_are_refused(bob: sy.VirtualWorker, attempt, op) -> None:  # type: ignore[no-untyped-def]
    ptr = torch.ones(2).send(bob)
    with pytest.raises(sy.OperationNotAllowed, match=op) as info:
        attempt(ptr)
    assert op in info.value.op


def test_pickling_a_pointer_is_refused(bob: sy.VirtualWorker, tmp_path) -> None:  # type: ignore[no-untyped-def]
    ptr = torch.ones(2).send(bob)
    with pytest.raises(TypeError, match="cannot be pickled"):
        torch.save(ptr, tmp_path / "x.pt")


def test_remote_errors_name_the_op_and_worker(bob: sy.VirtualWorker) -> None:
    a, b = torch.ones(2, 3).send(bob), torch.ones(2, 3).send(bob)
    with pytest.raises(sy.RemoteError, match="Tensor.mm failed on 'bob'") as info:
        a.mm(b)
    assert info.value.worker == "bob" and info.value.op == "Tensor.mm"


def test_a_fetched_pointer_cannot_be_used(bob: sy.VirtualWorker) -> None:
    ptr = torch.ones(2).send(bob)
    ptr.get()
    with pytest.raises(sy.OperationNotAllowed, match="fetched"):
        ptr + 1
    assert "(gone)" in repr(ptr)


def test_send_without_the_hook_methods(bob: sy.VirtualWorker) -> None:
    ptr = sy.send(torch.ones(2), bob)
    assert torch.equal(sy.get(ptr), torch.ones(2))


def test_in_place_ops_do_not_wait_and_their_errors_surface_next(bob: sy.VirtualWorker) -> None:
    ptr = torch.ones(3).send(bob)
    sent = bob.bytes_received
    ptr.add_(1)
    ptr.mul_(2)
    assert bob.bytes_received == sent  # no round trip yet
    assert torch.equal(ptr.copy().get(), torch.full((3,), 4.0))  # ran, in order, before the copy
    ptr.add_(torch.ones(2).send(bob))  # wrong shape: noticed by the worker, later
    with pytest.raises(sy.RemoteError, match="Tensor.add_, sent earlier without waiting"):
        ptr.sum().get()
    assert torch.equal(ptr.get(), torch.full((3,), 4.0))  # nothing after the failure ran twice


def test_a_large_tensor_between_workers_in_one_process_is_always_the_receivers_own_copy(bob, alice, federation) -> None:
    src = torch.arange(100_000, dtype=torch.float32)  # 400 KB: it travels beside the message, not in it
    p = src.send(bob)
    (entry,) = [e for e in bob.core.objects.values() if isinstance(e.obj, torch.Tensor) and e.obj.numel() == 100_000]
    assert entry.obj.untyped_storage().data_ptr() != src.untyped_storage().data_ptr()
    src.zero_()
    before = federation.link_bytes.get(("bob", "alice"), 0)
    p.move(alice)
    assert federation.link_bytes[("bob", "alice")] - before >= src.nbytes, "the frame's bytes are counted"
    (held,) = [e.obj for e in alice.core.objects.values() if isinstance(e.obj, torch.Tensor) and e.obj.numel() == 100_000]
    back = p.get()
    assert torch.equal(back, torch.arange(100_000, dtype=torch.float32))
    assert back.untyped_storage().data_ptr() != held.untyped_storage().data_ptr(), "the reply is the caller's own copy"
    assert alice.object_count() == 0


def test_a_frame_that_is_not_a_plain_cpu_tensor_is_refused(bob) -> None:
    from fedsecure.wire import codec
    from fedsecure.wire import messages as m

    data = m.encode_request(m.Put(1, torch.zeros(100_000), False, False, [], ""), framed=True)
    assert type(data) is codec.Framed
    forged = codec.Framed(bytes(data), [torch.zeros(100_000).to_sparse()])
    with pytest.raises(sy.ProtocolError, match="plain dense CPU tensor"):
        bob.federation.call("bob", forged, bob._owner)
