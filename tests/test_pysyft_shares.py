"""Shared values with PySyft 0.2.9's meanings: ``crypto_provider=``, ``.get()`` of a pointer to a shared
value (fetches it, decrypts nothing) against ``.get()`` of a shared value (reconstructs), the dtype
that ``float_precision()`` returns, and reprs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

import fedsecure as sy
from fedsecure.aggregate.shares import fix_precision as pure_fix_precision
from fedsecure.errors import SecAggInputError
from fedsecure.pointer.shared import SharedTensorPointer
from fedsecure.wire import messages as m


@pytest.fixture
def fed() -> sy.Federation:
    sy.TorchHook(torch)
    return sy.Federation()


@pytest.fixture
def crew(fed: sy.Federation) -> tuple[sy.VirtualWorker, ...]:
    """bob and alice hold shares, james is the crypto provider, carol holds values to share."""
    return tuple(sy.VirtualWorker(id=n, federation=fed) for n in ("bob", "alice", "james", "carol"))


class Transcript:
    """Every request a set of workers receives from the model owner, decoded, and the reply bytes."""

    def __init__(self, workers: tuple[sy.VirtualWorker, ...]) -> None:
        self.requests: list[tuple[str, object]] = []
        self.workers = workers
        for w in workers:
            inner = w._transport

            def spy(data: bytes, inner=inner, name=w.id) -> bytes:  # type: ignore[no-untyped-def]
                self.requests.append((name, m.decode_request(data)))
                return inner(data)

            w._transport = spy

    def received(self) -> int:
        return sum(w.bytes_received for w in self.workers)


def messages(requests: list[tuple[str, object]]) -> Iterator[object]:
    """The requests, with batches opened."""
    for _, msg in requests:
        if isinstance(msg, m.Batch):
            yield from (m.decode_request(part) for part in msg.requests)
        else:
            yield msg


# -- 1. crypto_provider ----------------------------------------------------------------------


def test_the_crypto_provider_is_kept_and_sums_need_nothing_from_it(fed, crew) -> None:
    bob, alice, james, carol = crew
    x, y = torch.tensor([0.25, -1.5, 3.0]), torch.tensor([1.0, 2.0, -0.75])
    xs = x.fix_precision().share(bob, alice, crypto_provider=james)
    ys = y.send(carol).fix_precision().share(bob, alice, crypto_provider=james).get()
    assert xs.crypto_provider is james and ys.crypto_provider is james
    total = (xs + ys) - 2 * xs + xs * 3
    assert total.crypto_provider is james
    torch.testing.assert_close(total.get().float_precision(), x + y + x, atol=6 * 2**-16, rtol=0)
    summed = sy.SharedTensor.sum([x.fix_precision().share(bob, alice, crypto_provider=james),
                                  y.fix_precision().share(bob, alice, crypto_provider=james)])
    torch.testing.assert_close(summed.float_precision(), x + y, atol=2 * 2**-16, rtol=0)
    assert james.bytes_sent == 0 and fed.cores["james"].objects == {}  # never asked for anything


@pytest.mark.parametrize("provider", ["james", 3, torch.ones(1)])
def test_a_crypto_provider_that_is_not_a_worker_is_a_type_error(fed, crew, provider) -> None:
    bob, alice, _, carol = crew
    with pytest.raises(TypeError, match="crypto_provider must be a worker"):
        torch.ones(2).fix_precision().share(bob, alice, crypto_provider=provider)
    ptr = torch.ones(2).send(carol)
    with pytest.raises(TypeError, match="crypto_provider must be a worker"):
        ptr.fix_precision().share(bob, alice, crypto_provider=provider)
    assert fed.cores["bob"].objects == {} and fed.cores["alice"].objects == {}  # refused before any share left


def test_a_crypto_provider_holds_no_share(fed, crew) -> None:
    bob, alice, _, _ = crew
    with pytest.raises(SecAggInputError, match="'bob' also holds a share"):
        torch.ones(2).fix_precision().share(bob, alice, crypto_provider=bob)
    with pytest.raises(SecAggInputError, match="sharing among workers"):
        torch.ones(2).fix_precision().share(2, crypto_provider=bob)


def test_values_with_different_crypto_providers_do_not_combine(fed, crew) -> None:
    bob, alice, james, carol = crew
    a = torch.ones(2).fix_precision().share(bob, alice, crypto_provider=james)
    b = torch.ones(2).fix_precision().share(bob, alice, crypto_provider=carol)
    with pytest.raises(sy.WorkerMismatch, match="same crypto_provider"):
        a + b
    c = torch.ones(2).fix_precision().share(bob, alice)  # none named: combines, keeps james
    assert (a + c).crypto_provider is james


def test_a_sum_refuses_different_crypto_providers_wherever_they_stand(fed, crew) -> None:
    bob, alice, james, carol = crew
    plain = torch.ones(2).fix_precision().share(bob, alice)
    a = torch.ones(2).fix_precision().share(bob, alice, crypto_provider=james)
    b = torch.ones(2).fix_precision().share(bob, alice, crypto_provider=carol)
    with pytest.raises(sy.WorkerMismatch, match="same crypto_provider"):
        sy.SharedTensor.sum([plain, a, b])  # the first names none: the other two still disagree


@pytest.mark.parametrize("other", ["shared", 0.5, torch.tensor([2.0, 2.0]), True])
def test_multiplication_beyond_public_ints_is_refused_with_the_way_on(fed, crew, other) -> None:
    bob, alice, james, _ = crew
    xs = torch.tensor([1.0, 2.0]).fix_precision().share(bob, alice, crypto_provider=james)
    factor = torch.ones(2).fix_precision().share(bob, alice, crypto_provider=james) if other == "shared" else other
    for call in (lambda: xs * factor, lambda: factor * xs):
        with pytest.raises(sy.OperationNotAllowed, match="Beaver triples") as info:
            call()
        text = str(info.value)
        assert "not built yet" in text and "sum" in text and "before encoding" in text
    with pytest.raises(sy.OperationNotAllowed, match="after decoding"):
        xs / 2


# -- 2. .get() of a pointer to a shared value, and of a shared value ---------------------------


def test_sharing_a_pointer_gives_a_pointer_whose_get_decrypts_nothing(fed, crew) -> None:
    bob, alice, james, carol = crew
    value = torch.tensor([[0.5, -2.0], [7.25, 1e-3]])
    encrypted = value.send(carol).fix_precision().share(bob, alice, crypto_provider=james)
    assert isinstance(encrypted, SharedTensorPointer) and encrypted.location is carol
    share_ids = {n: set(fed.cores[n].objects) for n in ("bob", "alice")}
    assert all(len(ids) == 1 for ids in share_ids.values())
    transcript = Transcript(crew)
    before = transcript.received()

    shared = encrypted.get()

    assert isinstance(shared, sy.SharedTensor) and [w.id for w in shared.holders] == ["bob", "alice"]
    assert not any(isinstance(msg, m.Get) for msg in messages(transcript.requests))  # no share was fetched
    assert transcript.received() - before < 200  # a few bytes at most: no share value came back
    for name, ids in share_ids.items():  # the shares are still on their holders
        assert set(fed.cores[name].objects) == ids
    assert {s.id_at_location for s in shared.shares} == share_ids["bob"] | share_ids["alice"]
    with pytest.raises(sy.ObjectNotFound, match="earlier .get()"):
        encrypted.get()
    # only the shared value's own get() puts it together: one Get per holder
    transcript.requests.clear()
    torch.testing.assert_close(shared.get().float_precision(), value, atol=2**-16, rtol=0)
    assert sorted(n for n, msg in transcript.requests if any(isinstance(x, m.Get) for x in messages([(n, msg)]))) \
        == ["alice", "bob"]


@pytest.mark.parametrize("use", [
    lambda p: p + p, lambda p: p - 1, lambda p: 2 * p, lambda p: p.float_precision(), lambda p: p.shares,
    lambda p: sy.SharedTensor.sum([p, p]), lambda p: torch.ones(2).fix_precision().share(*p.holders),
])
def test_a_pointer_to_a_shared_value_asks_for_get_first(fed, crew, use) -> None:
    bob, alice, _, carol = crew
    encrypted = torch.ones(2).send(carol).fix_precision().share(bob, alice)
    with pytest.raises(sy.OperationNotAllowed, match=r"call \.get\(\) first"):
        use(encrypted)
    shared = torch.ones(2).fix_precision().share(bob, alice)
    with pytest.raises(sy.OperationNotAllowed, match=r"\.get\(\)"):
        shared + encrypted
    assert isinstance(encrypted.get(), sy.SharedTensor)  # still usable the right way


def test_sharing_a_local_value_gives_the_shared_value_itself(fed, crew) -> None:
    bob, alice, james, _ = crew
    xs = torch.tensor([1.0, -1.0]).fix_precision().share(bob, alice, crypto_provider=james)
    assert isinstance(xs, sy.SharedTensor)
    assert isinstance(sy.fix_precision(torch.ones(1)).share(bob, alice), sy.SharedTensor)  # without the hook too


def test_the_sum_of_two_owners_values_reconstructs_to_their_float32_sum(fed, crew) -> None:
    """Each owner's value is split where it lives; the model owner fetches the two shared values
    (no decryption), adds them share by share, and only the sum is put together."""
    bob, alice, james, _ = crew
    generator = torch.Generator().manual_seed(4)
    bobs, alices = torch.randn(5, 3, generator=generator), torch.randn(5, 3, generator=generator)
    encrypted = [v.send(w).fix_precision().share(bob, alice, crypto_provider=james).get()
                 for v, w in ((bobs, bob), (alices, alice))]
    fixed = (encrypted[0] + encrypted[1]).get()
    total = fixed.float_precision()
    assert total.dtype == torch.float32
    torch.testing.assert_close(total, bobs + alices, atol=2 * 2**-16, rtol=0)
    torch.testing.assert_close(total / 2, (bobs + alices) / 2, atol=2**-16, rtol=0)
    again = fixed.share(bob, alice)  # a reconstructed value shares again, as in PySyft
    torch.testing.assert_close(again.float_precision(), total, atol=2**-16, rtol=0)


# -- 3. float_precision() returns the dtype that was encoded -----------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_the_encoded_dtype_comes_back(fed, crew, dtype) -> None:
    bob, alice, _, carol = crew
    x = torch.tensor([0.5, -1.25, 3.0], dtype=dtype)
    assert x.fix_precision().float_precision().dtype == dtype
    assert pure_fix_precision(x).share(3).float_precision().dtype == dtype
    assert x.fix_precision().share(bob, alice).float_precision().dtype == dtype
    assert x.send(carol).fix_precision().share(bob, alice).get().get().float_precision().dtype == dtype
    remote = x.send(carol).fix_precision().float_precision()
    assert isinstance(remote, sy.PointerTensor) and remote.location is carol
    assert remote.get().dtype == dtype
    torch.testing.assert_close(x.fix_precision().float_precision(), x)


def test_integers_decode_to_float64(fed, crew) -> None:
    bob, alice, _, _ = crew
    assert torch.tensor([1, 2]).fix_precision().float_precision().dtype == torch.float64
    assert torch.tensor([1, 2]).fix_precision().share(bob, alice).float_precision().tolist() == [1.0, 2.0]


def test_float32_with_float64_follows_torch_promotion(fed, crew) -> None:
    bob, alice, _, carol = crew
    single, double = torch.tensor([0.5, 1.0]), torch.tensor([0.25, -2.0], dtype=torch.float64)
    expected = (single + double).dtype
    assert expected == torch.float64
    assert (single.fix_precision() + double.fix_precision()).float_precision().dtype == expected
    a = single.fix_precision().share(bob, alice)
    b = double.send(carol).fix_precision().share(bob, alice).get()
    assert (a + b).float_precision().dtype == expected and (a - b).get().float_precision().dtype == expected
    c, d = single.fix_precision().share(bob, alice), double.fix_precision().share(bob, alice)
    assert sy.SharedTensor.sum([c, d]).float_precision().dtype == expected
    # public values: as for tensors, a Python number or a 0-dim tensor keeps the dtype
    e = single.fix_precision().share(bob, alice)
    assert (e + 1.5).get().float_precision().dtype == torch.float32
    assert (e + torch.tensor(1.5, dtype=torch.float64)).float_precision().dtype == torch.float32
    f = single.fix_precision().share(bob, alice)
    assert (f + double).float_precision().dtype == torch.float64


def test_an_encrypted_average_sets_into_float32_parameters(fed, crew) -> None:
    """Part 10's cleanup: ``param.set_(average)`` needs the average in the parameter's dtype."""
    bob, alice, james, _ = crew
    torch.manual_seed(0)
    models = [nn.Linear(3, 2), nn.Linear(3, 2)]
    expected = [(a.detach() + b.detach()) / 2 for a, b in zip(*(m.parameters() for m in models), strict=True)]
    for model, worker in zip(models, (bob, alice), strict=True):
        model.send(worker)
    params = [list(models[0].parameters()), list(models[1].parameters())]
    averages = []
    for i in range(len(params[0])):
        spdz = [params[k][i].copy().fix_precision().share(bob, alice, crypto_provider=james).get() for k in (0, 1)]
        averages.append((spdz[0] + spdz[1]).get().float_precision() / 2)
    for model in models:
        model.get()
    with torch.no_grad():
        for param, average in zip(params[0], averages, strict=True):
            param.set_(average)
    for param, value in zip(models[0].parameters(), expected, strict=True):
        assert param.dtype == torch.float32
        torch.testing.assert_close(param.detach(), value, atol=2**-16, rtol=0)


def test_the_pure_fixed_point_shares_locally_only(fed, crew) -> None:
    bob, alice, _, _ = crew
    with pytest.raises(SecAggInputError, match=r"fedsecure.fix_precision\(x\)"):
        pure_fix_precision(torch.ones(2)).share(bob)  # type: ignore[arg-type]


def test_a_public_value_that_would_change_the_shape_is_refused(fed, crew) -> None:
    bob, alice, _, carol = crew
    xs = torch.ones(3).fix_precision().share(bob, alice)
    with pytest.raises(SecAggInputError, match="broadcasts"):
        xs + torch.ones(2, 3)
    with pytest.raises(sy.WorkerMismatch, match="share it"):
        xs + torch.ones(3).send(carol)


# -- 4. reprs -----------------------------------------------------------------------------------


def test_reprs_say_what_and_where(fed, crew) -> None:
    bob, alice, james, carol = crew
    xs = torch.ones(2, 3).fix_precision().share(bob, alice, crypto_provider=james)
    text = repr(xs)
    for part in ("shape=(2, 3)", "torch.float32", "frac_bits=16", "['bob', 'alice']", "crypto_provider='james'"):
        assert part in text, text
    encrypted = torch.ones(4).send(carol).fix_precision().share(bob, alice, crypto_provider=james)
    text = repr(encrypted)
    for part in ("@carol", "['bob', 'alice']", "shape=(4,)", "crypto_provider='james'", ".get()"):
        assert part in text, text
    encrypted.get()
    assert "gone" in repr(encrypted)
    assert "torch.float32" in repr(torch.ones(1).fix_precision())
