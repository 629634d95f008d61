"""The privacy accountant against Google's dp-accounting library called directly."""

from __future__ import annotations

import json

import dp_accounting as dpa
import pytest

from fedsecure.privacy import Accountant, AccountingError

DELTA = 1e-5


def direct(kind: str, runs: list[tuple[float, float, int]], delta: float = DELTA) -> float:
    library = dpa.rdp.RdpAccountant() if kind == "rdp" else dpa.pld.PLDAccountant()
    for q, z, count in runs:
        library.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), count)
    return float(library.get_epsilon(delta))


@pytest.mark.parametrize(("kind", "published"), [("rdp", 7.90), ("pld", 7.05)])
def test_sampled_gaussian_100_rounds(kind: str, published: float) -> None:
    accountant = Accountant(kind=kind, noise_multiplier=1.0, sampling_rate=0.1, delta=DELTA)  # type: ignore[arg-type]
    accountant.step(rounds=100)
    assert accountant.epsilon() == pytest.approx(published, abs=0.01)
    assert accountant.epsilon() == direct(kind, [(0.1, 1.0, 100)])


def test_rounds_one_at_a_time_are_one_run_of_the_ledger() -> None:
    one_by_one = Accountant(noise_multiplier=1.0, sampling_rate=0.1)
    for _ in range(30):
        one_by_one.step()
    at_once = Accountant(noise_multiplier=1.0, sampling_rate=0.1)
    at_once.step(rounds=30)
    assert one_by_one.history == [(0.1, 1.0, 30)]
    assert one_by_one.epsilon() == at_once.epsilon()


def test_rounds_of_different_rates_compose() -> None:
    accountant = Accountant(kind="rdp", noise_multiplier=1.0, sampling_rate=0.1)
    accountant.step(rounds=20)
    accountant.step(rounds=10, sampling_rate=0.2)
    accountant.step(rounds=5, noise_multiplier=2.0)
    runs = [(0.1, 1.0, 20), (0.2, 1.0, 10), (0.1, 2.0, 5)]
    assert accountant.history == runs
    assert accountant.epsilon() == direct("rdp", runs)
    assert accountant.epsilon() > direct("rdp", runs[:1])


def test_full_participation_is_the_plain_gaussian_mechanism() -> None:
    accountant = Accountant(noise_multiplier=2.0, sampling_rate=1.0)
    accountant.step(rounds=10)
    plain = dpa.rdp.RdpAccountant()
    plain.compose(dpa.GaussianDpEvent(2.0), 10)
    assert accountant.epsilon() == pytest.approx(plain.get_epsilon(DELTA), rel=1e-9)


def test_epsilon_grows_with_rounds_and_starts_at_zero() -> None:
    accountant = Accountant(noise_multiplier=1.0, sampling_rate=0.05)
    epsilons = [accountant.epsilon()]
    for _ in range(3):
        accountant.step(rounds=10)
        epsilons.append(accountant.epsilon())
    assert epsilons[0] == 0.0
    assert epsilons == sorted(epsilons) and len(set(epsilons)) == 4
    assert accountant.epsilon(delta=1e-3) < accountant.epsilon()  # a larger delta buys a smaller epsilon


def test_epsilon_after_projects_without_accounting() -> None:
    accountant = Accountant(noise_multiplier=1.0, sampling_rate=0.1)
    accountant.step(rounds=5)
    projected = accountant.epsilon_after(3)
    assert accountant.rounds == 5
    accountant.step(rounds=3)
    assert accountant.epsilon() == projected


@pytest.mark.parametrize("kind", ["rdp", "pld"])
def test_state_round_trip_through_json(kind: str) -> None:
    first = Accountant(kind=kind, noise_multiplier=1.1, sampling_rate=0.1)  # type: ignore[arg-type]
    first.step(rounds=7)
    first.step(rounds=3, sampling_rate=0.2)
    resumed = Accountant(kind=kind, noise_multiplier=1.1, sampling_rate=0.1)  # type: ignore[arg-type]
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert resumed.history == first.history
    assert resumed.epsilon() == first.epsilon()


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"kind": "pld", "delta": DELTA, "history": []}, "accounted with kind='pld'"),
        ({"kind": "rdp", "delta": 1e-6, "history": []}, "resume with the same settings"),
        ({"kind": "rdp", "delta": DELTA, "history": [[0.1, 1.0]]}, "a ledger entry must be"),
        ({"kind": "rdp", "delta": DELTA, "history": [[1.5, 1.0, 3]]}, "sampling rate is a probability"),
    ],
)
def test_a_checkpoint_from_other_settings_is_refused(state: dict[str, object], message: str) -> None:
    accountant = Accountant(kind="rdp", noise_multiplier=1.0, sampling_rate=0.1)
    with pytest.raises(AccountingError, match=message):
        accountant.load_state_dict(state)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "moments"}, "unknown accountant kind 'moments'"),
        ({"noise_multiplier": 0.0}, "noise multiplier must be > 0"),
        ({"sampling_rate": 0.0}, "sampling rate is a probability in"),
        ({"sampling_rate": 1.5}, "sampling rate is a probability in"),
        ({"delta": 0.0}, "delta must be in"),
    ],
)
def test_bad_settings_say_what_is_wrong(kwargs: dict[str, object], message: str) -> None:
    settings: dict[str, object] = {"noise_multiplier": 1.0, "sampling_rate": 0.1, **kwargs}
    with pytest.raises(AccountingError, match=message):
        Accountant(**settings)  # type: ignore[arg-type]


def test_a_step_needs_a_sampling_rate_and_whole_rounds() -> None:
    accountant = Accountant(noise_multiplier=1.0)
    with pytest.raises(AccountingError, match="no sampling rate"):
        accountant.step()
    with pytest.raises(AccountingError, match="rounds must be a positive integer"):
        accountant.step(rounds=0, sampling_rate=0.1)
    assert accountant.rounds == 0


@pytest.mark.parametrize(("z", "rounds", "documented"), [(1.0, 1, 4.73), (1.0, 10, 19.05), (2.0, 1, 2.17), (2.0, 10, 8.08)])
def test_the_isolation_bound_quoted_in_the_privacy_docs(z: float, rounds: int, documented: float) -> None:
    """docs/privacy.md bounds what a model owner who knows every other contribution (a Sybil) learns of
    one owner's clipped update: one Gaussian mechanism per round, without sampling amplification."""
    accountant = Accountant(noise_multiplier=z, sampling_rate=1.0)
    accountant.step(rounds=rounds)
    assert accountant.epsilon() == pytest.approx(documented, abs=0.005)
