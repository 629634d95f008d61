"""One secure aggregation round over the wire, for the tests: every message goes through bytes."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedsecure.aggregate import (
    AggregateResult,
    ConsistencyCheck,
    Phase,
    SecAggClient,
    SecAggServer,
    generate_federation,
)

# the phases in protocol order; the consistency check runs only in checked rounds
ORDER = [Phase.ADVERTISE_KEYS, Phase.SHARE_KEYS, Phase.MASKED_INPUT, Phase.CONSISTENCY_CHECK, Phase.UNMASKING]


def run_round(
    inputs: Mapping[int, np.ndarray],
    *,
    threshold: int,
    drop: Mapping[int, Phase] | None = None,
    degree: int | None = None,
    bound: float = 1.0,
    checked: bool = False,
) -> AggregateResult:
    """One round; ``drop[u]`` is the phase u goes silent in. ``checked``: with signing identities
    and the consistency check (Bonawitz et al. 2017, section 4)."""
    drop = drop or {}
    ids = sorted(inputs)
    size = next(iter(inputs.values())).size
    pki = generate_federation(ids) if checked else {}
    server = SecAggServer(clients=ids, threshold=threshold, vector_size=size, bound=bound, degree=degree,
                          consistency_check=checked)
    clients = {u: SecAggClient(client_id=u, identity=pki.get(u)) for u in ids}

    def alive(phase: Phase) -> list[int]:
        return [u for u in ids if drop.get(u) not in ORDER[: ORDER.index(phase) + 1]]

    setup = server.setup.encode()
    for u in alive(Phase.ADVERTISE_KEYS):
        server.receive(clients[u].advertise_keys(setup).encode())
    broadcast = server.end_advertise_keys().encode()
    for u in alive(Phase.SHARE_KEYS):
        server.receive(clients[u].share_keys(broadcast).encode())
    bundles = server.end_share_keys()
    for u in alive(Phase.MASKED_INPUT):
        server.receive(clients[u].masked_input(bundles[u].encode(), inputs[u]).encode())
    request = server.end_masked_input()
    if checked:
        assert isinstance(request, ConsistencyCheck)
        for u in alive(Phase.CONSISTENCY_CHECK):
            server.receive(clients[u].sign_survivors(request.encode()).encode())
        request = server.end_consistency_check()
    for u in alive(Phase.UNMASKING):
        server.receive(clients[u].unmask(request.encode()).encode())
    return server.end_unmasking()
