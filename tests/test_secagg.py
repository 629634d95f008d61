"""Secure aggregation: exact sums under every dropout pattern, refusals, hostile messages, uniform masks."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedsecure.aggregate import (
    AdvertiseKeys,
    AggregateResult,
    KeyBroadcast,
    MaskedInput,
    Phase,
    SecAggClient,
    SecAggServer,
    ShareBundle,
    UnmaskRequest,
    decode_message,
)
from fedsecure.aggregate.masks import MaskStream, harary_neighbours
from fedsecure.errors import SecAggInputError, SecAggProtocolError, ShareRevealRefused, TooFewSurvivors
from secagg_rounds import run_round

PHASES = [Phase.ADVERTISE_KEYS, Phase.SHARE_KEYS, Phase.MASKED_INPUT, Phase.UNMASKING]


def expected(inputs: Mapping[int, np.ndarray], result: AggregateResult, bound: float = 1.0) -> np.ndarray:
    return sum(np.clip(inputs[u].astype(np.float64), -bound, bound) for u in result.survivors)  # type: ignore[return-value]


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 7), data=st.data())
def test_decoded_sum_matches_the_plain_sum(n: int, data: st.DataObject) -> None:
    rows = {u: data.draw(hnp.arrays(np.float32, 9, elements=st.floats(-1, 1, width=32))) for u in range(1, n + 1)}
    result = run_round(rows, threshold=n // 2 + 1)
    assert result.survivors == tuple(rows) and result.dropped == ()
    assert np.abs(result.total - expected(rows, result)).max() <= result.max_error


# every way that at most n - t = 2 of 5 clients drop, each in any phase: 1 + 5*4 + 10*16 patterns
PATTERNS = [
    dict(zip(who, when, strict=True))
    for k in range(3)
    for who in itertools.combinations(range(1, 6), k)
    for when in itertools.product(PHASES, repeat=k)
]


def test_every_dropout_pattern_of_up_to_n_minus_t_clients_gives_the_survivors_sum() -> None:
    rng = np.random.default_rng(7)
    inputs = {u: rng.uniform(-1, 1, 16).astype(np.float32) for u in range(1, 6)}
    for drop in PATTERNS:
        result = run_round(inputs, threshold=3, drop=drop)
        sent_input = {u for u in inputs if drop.get(u) in (None, Phase.UNMASKING)}
        assert set(result.survivors) == sent_input, drop
        assert np.abs(result.total - expected(inputs, result)).max() <= result.max_error, drop


@pytest.mark.parametrize("phase", PHASES)
def test_fewer_than_t_survivors_abort_and_reveal_nothing(phase: Phase) -> None:
    inputs = {u: np.full(4, 0.5, np.float32) for u in range(1, 6)}
    with pytest.raises(TooFewSurvivors, match="nothing is revealed"):
        run_round(inputs, threshold=3, drop={1: phase, 2: phase, 3: phase})


def test_an_honest_client_reveals_nothing_to_too_few_survivors() -> None:
    server, clients, bundles = setup_round(5, threshold=3)
    for u in (1, 2, 3):
        server.receive(clients[u].masked_input(bundles[u], np.zeros(8)))
    lie = UnmaskRequest(server.round_id, (1, 2), (3, 4, 5))  # the server claims two survivors
    with pytest.raises(TooFewSurvivors, match="reveals nothing"):
        clients[1].unmask(lie)


@pytest.mark.parametrize("degree", [2, 4, 6])
def test_secagg_plus_neighbourhoods_recover_dropouts(degree: int) -> None:
    rng = np.random.default_rng(degree)
    inputs = {u: rng.uniform(-1, 1, 32).astype(np.float32) for u in range(1, 15)}
    threshold = degree // 2 + 1
    result = run_round(inputs, threshold=threshold, degree=degree, drop={3: Phase.MASKED_INPUT})
    assert 3 in result.dropped
    assert np.abs(result.total - expected(inputs, result)).max() <= result.max_error
    graph = harary_neighbours(list(inputs), degree=degree, seed=b"s")
    assert all(len(vs) == degree and all(u in graph[v] for v in vs) for u, vs in graph.items())


def test_torch_updates_and_64_bit_rings_work() -> None:
    ids = [1, 2, 3]
    server = SecAggServer(clients=ids, threshold=2, vector_size=5, bound=4.0, bits=64)
    clients = {u: SecAggClient(client_id=u) for u in ids}
    for u in ids:
        server.receive(clients[u].advertise_keys(server.setup))
    b = server.end_advertise_keys()
    for u in ids:
        server.receive(clients[u].share_keys(b))
    bundles = server.end_share_keys()
    for u in ids:
        server.receive(clients[u].masked_input(bundles[u], torch.arange(5.0) * u))
    req = server.end_masked_input()
    for u in ids:
        server.receive(clients[u].unmask(req))
    clipped = sum(np.clip(np.arange(5.0) * u, -4, 4) for u in ids)
    assert np.allclose(server.end_unmasking().total, clipped, atol=1e-12)


# -- what the server sees ------------------------------------------------------------------


def chi_square_limit(dof: int, z: float = 4.75) -> float:
    """Wilson-Hilferty: the chi-square quantile with tail probability about 1e-6 (z = 4.75)."""
    a = 2 / (9 * dof)
    return dof * (1 - a + z * math.sqrt(a)) ** 3


@pytest.mark.parametrize("update", ["zeros", "ones", "ramp"])
def test_a_masked_input_looks_uniform(update: str) -> None:
    d = 1 << 16
    x = {"zeros": np.zeros(d), "ones": np.ones(d), "ramp": np.linspace(-1, 1, d)}[update]
    server, clients, bundles = setup_round(3, threshold=2)
    masked = clients[1].masked_input(bundles[1], x)
    raw = np.frombuffer(masked.data, np.uint8)
    counts = np.bincount(raw, minlength=256)
    chi2 = (((counts - raw.size / 256) ** 2) / (raw.size / 256)).sum()
    assert chi2 < chi_square_limit(255)  # about 377
    words = masked.vector(np.uint32)
    ones = (words[:, None] >> np.arange(32, dtype=np.uint32) & 1).sum(axis=0)
    assert np.all(np.abs(ones - d / 2) < 5 * math.sqrt(d / 4))  # every bit position fair
    # the same test sees through the unmasked encoding at once
    plain = np.bincount(server.codec.encode(x).view(np.uint8), minlength=256)
    assert (((plain - raw.size / 256) ** 2) / (raw.size / 256)).sum() > chi_square_limit(255)


def test_the_prg_is_deterministic_per_key_and_differs_across_keys() -> None:
    a, b = MaskStream(size=1000, dtype=np.uint32), MaskStream(size=1000, dtype=np.uint32)
    assert np.array_equal(a.expand(b"k" * 16), b.expand(b"k" * 16).copy())
    assert not np.array_equal(a.expand(b"k" * 16).copy(), b.expand(b"j" * 16))


# -- refusals and hostile messages -------------------------------------------------------


def setup_round(n: int, *, threshold: int) -> tuple[SecAggServer, dict[int, SecAggClient], dict[int, ShareBundle]]:
    ids = list(range(1, n + 1))
    server = SecAggServer(clients=ids, threshold=threshold, vector_size=1 << 16 if n == 3 else 8, bound=1.0)
    clients = {u: SecAggClient(client_id=u) for u in ids}
    for u in ids:
        server.receive(clients[u].advertise_keys(server.setup))
    b = server.end_advertise_keys()
    for u in ids:
        server.receive(clients[u].share_keys(b))
    return server, clients, server.end_share_keys()


def masked_round(n: int = 5) -> tuple[SecAggServer, dict[int, SecAggClient]]:
    server, clients, bundles = setup_round(n, threshold=3)
    for u in clients:
        server.receive(clients[u].masked_input(bundles[u], np.zeros(8)))
    return server, clients


@pytest.mark.parametrize(
    ("survivors", "dropped"),
    [((1, 2, 3, 4, 5), (4,)), ((1, 2, 3, 4), (1, 5)), ((2, 3, 4, 5), (1,))],
    ids=["client in both lists", "this client listed as dropped", "this client dropped"],
)
def test_an_honest_client_refuses_to_reveal_both_shares_of_a_client(survivors: tuple, dropped: tuple) -> None:
    server, clients = masked_round()
    with pytest.raises(ShareRevealRefused, match="both the self-mask share and the key share"):
        clients[1].unmask(UnmaskRequest(server.round_id, survivors, dropped))


def test_a_second_request_that_flips_a_survivor_to_dropped_is_refused() -> None:
    server, clients = masked_round()
    clients[1].unmask(UnmaskRequest(server.round_id, (1, 2, 3, 4, 5), ()))
    with pytest.raises(ShareRevealRefused):
        clients[1].unmask(UnmaskRequest(server.round_id, (1, 2, 3, 4), (5,)))
    with pytest.raises(SecAggProtocolError, match="in phase done"):  # a plain replay
        clients[1].unmask(UnmaskRequest(server.round_id, (1, 2, 3, 4, 5), ()))


def test_tampered_shares_are_rejected_before_any_input_is_sent() -> None:
    server, clients, bundles = setup_round(4, threshold=3)
    sender, ct = bundles[1].ciphertexts[0]
    bad = ShareBundle(server.round_id, 1, ((sender, ct[:-1] + bytes([ct[-1] ^ 1])), *bundles[1].ciphertexts[1:]))
    with pytest.raises(SecAggProtocolError, match=f"shares from client {sender} failed authentication"):
        clients[1].masked_input(bad, np.zeros(8))
    stolen = ShareBundle(server.round_id, 2, tuple((v, ct) for v, ct in bundles[1].ciphertexts if v != 2))
    with pytest.raises(SecAggProtocolError, match="failed authentication: altered, or not meant for client 2"):
        clients[2].masked_input(stolen, np.zeros(8))


def test_server_rejects_replayed_late_and_out_of_phase_messages() -> None:
    ids = [1, 2, 3]
    server = SecAggServer(clients=ids, threshold=2, vector_size=4, bound=1.0)
    clients = {u: SecAggClient(client_id=u) for u in ids}
    first = clients[1].advertise_keys(server.setup)
    server.receive(first)
    with pytest.raises(SecAggProtocolError, match="client 1 sent a second AdvertiseKeys: a replay"):
        server.receive(first.encode())
    other = SecAggServer(clients=ids, threshold=2, vector_size=4, bound=1.0)
    with pytest.raises(SecAggProtocolError, match="another round"):
        server.receive(SecAggClient(client_id=2).advertise_keys(other.setup))
    with pytest.raises(SecAggProtocolError, match="not accepted in phase advertise-keys"):
        server.receive(MaskedInput(server.round_id, 2, bytes(16)))
    with pytest.raises(SecAggProtocolError, match="client 9 takes no part"):
        server.receive(AdvertiseKeys(server.round_id, 9, b"a" * 32, b"b" * 32))
    with pytest.raises(SecAggInputError, match="phase advertise-keys, not share-keys"):
        server.end_share_keys()
    for u in (2, 3):
        server.receive(clients[u].advertise_keys(server.setup))
    broadcast = server.end_advertise_keys()
    with pytest.raises(SecAggProtocolError, match="not accepted in phase share-keys"):
        server.receive(first)
    clients[1].share_keys(broadcast)
    with pytest.raises(SecAggProtocolError, match="got KeyBroadcast in phase masked-input"):
        clients[1].share_keys(broadcast.encode())


def test_clients_reject_lying_key_broadcasts_and_insecure_setups() -> None:
    server = SecAggServer(clients=[1, 2, 3], threshold=2, vector_size=4, bound=1.0)
    clients = {u: SecAggClient(client_id=u) for u in (1, 2, 3)}
    adverts = [clients[u].advertise_keys(server.setup) for u in (1, 2, 3)]
    swapped = KeyBroadcast(server.round_id, tuple((a.sender, a.mask_key, a.cipher_key) for a in adverts))
    with pytest.raises(SecAggProtocolError, match="misstates client 1's own keys"):
        clients[1].share_keys(swapped)
    weak = server.setup.__class__(server.round_id, (1, 2, 3, 4), 2, 4, server.setup.codec, None)
    with pytest.raises(SecAggProtocolError, match="refuses the round: threshold 2 must be more than half"):
        SecAggClient(client_id=1).advertise_keys(weak)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threshold": 2}, "more than half of the 5 holders"),
        ({"threshold": 6}, "use 3..5"),
        ({"degree": 3, "threshold": 3}, "even number"),
        ({"clients": [1, 1, 2, 3, 4]}, "distinct"),
        ({"bound": 1e12}, "beyond the 32-bit ring"),
    ],
)
def test_server_refuses_unworkable_or_insecure_rounds(kwargs: dict, message: str) -> None:
    args = {"clients": [1, 2, 3, 4, 5], "threshold": 3, "vector_size": 4, "bound": 1.0} | kwargs
    with pytest.raises(SecAggInputError, match=message):
        SecAggServer(**args)


@pytest.mark.parametrize("data", [b"", b"\x93\x01\x02\x03", b"\x92\xa4nope\x01", b"\x91\xadsecagg/setup"])
def test_malformed_bytes_are_protocol_errors(data: bytes) -> None:
    with pytest.raises(SecAggProtocolError):
        decode_message(data)


def test_every_message_round_trips_through_bytes() -> None:
    server, clients, bundles = setup_round(4, threshold=3)
    msgs = [server.setup, bundles[2], clients[3].masked_input(bundles[3], np.zeros(8))]
    for m in msgs:
        back = decode_message(m.encode())
        assert type(back) is type(m) and back.encode() == m.encode()
