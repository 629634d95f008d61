"""PySyft 0.2's sandbox: ``sy.create_sandbox(globals())`` and ``sy.PrivateGridNetwork``."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from sklearn.datasets import load_diabetes, load_iris

import fedsecure as sy

WORKERS = ["bob", "theo", "jason", "alice", "andy", "jon"]
SETS = ["diabetes", "breast_cancer", "digits", "iris", "wine", "linnerud"]


@pytest.fixture(scope="module")
def sandbox() -> dict[str, Any]:
    space: dict[str, Any] = {}
    sy.create_sandbox(space, verbose=False)
    return space


def test_the_namespace_gets_hook_workers_and_grid(sandbox: dict[str, Any]) -> None:
    assert isinstance(sandbox["hook"], sy.TorchHook)
    assert [w.id for w in sandbox["workers"]] == WORKERS
    for name in WORKERS:
        assert isinstance(sandbox[name], sy.VirtualWorker) and sandbox[name].id == name
    assert sandbox["workers"] == [sandbox[name] for name in WORKERS]
    assert isinstance(sandbox["grid"], sy.PrivateGridNetwork) and sandbox["grid"].workers == sandbox["workers"]


@pytest.mark.parametrize("name", SETS)
def test_every_worker_holds_a_tagged_part_of_every_set(sandbox: dict[str, Any], name: str) -> None:
    rows = []
    for worker in sandbox["workers"]:
        (data,) = worker.search([f"#{name}", "#data"])
        (target,) = worker.search([f"#{name}", "#target"])
        assert data.dtype == torch.float32 and data.shape[0] == target.shape[0] > 0
        regression = name in ("diabetes", "linnerud")
        assert target.dtype == (torch.float32 if regression else torch.int64)
        assert data.tags == {f"#{name}", "#data", "#regression" if regression else "#classification"}
        assert "scikit-learn" in (data.description or "") and "part" in (target.description or "")
        assert data.owners == [], "the sandbox's data is the model owner's own"
        rows.append(data.shape[0])
    assert max(rows) - min(rows) <= 1


def test_the_parts_are_consecutive_rows_of_the_set(sandbox: dict[str, Any]) -> None:
    x, y = load_diabetes(return_X_y=True)
    parts = sandbox["grid"].search("#diabetes", "#data")
    targets = sandbox["grid"].search("#diabetes", "#target")
    assert list(parts) == WORKERS and list(targets) == WORKERS
    got_x = torch.cat([parts[w][0].get() for w in WORKERS])
    got_y = torch.cat([targets[w][0].get() for w in WORKERS])
    assert torch.equal(got_x, torch.tensor(x, dtype=torch.float32))
    assert torch.equal(got_y, torch.tensor(y, dtype=torch.float32))
    _, iris_y = load_iris(return_X_y=True)
    iris = sandbox["grid"].search("#iris", "#target")
    assert torch.equal(torch.cat([iris[w][0].get() for w in WORKERS]), torch.tensor(iris_y))


def test_grid_search_keeps_only_workers_with_matches(sandbox: dict[str, Any]) -> None:
    bob, grid = sandbox["bob"], sandbox["grid"]
    kept = torch.ones(2).tag("#only-bob").describe("a tensor of the test").send(bob)
    found = grid.search("#only-bob")
    assert list(found) == ["bob"] and len(found["bob"]) == 1 and found["bob"][0].tags == {"#only-bob"}
    assert grid.search("#only-bob", "#diabetes") == {}
    assert list(grid.search("#wine", "#classification")) == WORKERS
    assert kept.location is bob
    assert "6 workers" in repr(grid) and "bob" in repr(grid)


def test_grid_checks_its_arguments() -> None:
    bob = sy.VirtualWorker(id="bob", federation=sy.Federation())
    with pytest.raises(TypeError, match="workers"):
        sy.PrivateGridNetwork(bob, "alice")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="once"):
        sy.PrivateGridNetwork(bob, bob)
    with pytest.raises(TypeError, match="at least one"):
        sy.PrivateGridNetwork(bob).search()


def test_rerunning_makes_fresh_workers_and_no_data_when_asked(capsys: pytest.CaptureFixture[str]) -> None:
    space: dict[str, Any] = {}
    sy.create_sandbox(space, verbose=False)
    first = space["bob"]
    mine = torch.ones(1).tag("#first-run").send(first)
    sy.create_sandbox(space, download_data=False)
    out = capsys.readouterr().out
    assert "bob" in out and "Done" in out and "diabetes" not in out
    assert space["bob"] is not first and space["bob"].search("#first-run") == []
    assert space["grid"].search("#diabetes") == {} and space["bob"].object_count() == 0
    assert len(first.search("#first-run")) == 1 and mine.location is first, "the old workers are untouched"


def test_verbose_output_names_the_data_and_why_not_boston(capsys: pytest.CaptureFixture[str]) -> None:
    sy.create_sandbox({})
    out = capsys.readouterr().out
    assert "Boston" in out and "#diabetes" in out and "get() reads it back" in out


def test_a_namespace_is_required() -> None:
    with pytest.raises(TypeError, match="globals"):
        sy.create_sandbox(None)  # type: ignore[arg-type]
