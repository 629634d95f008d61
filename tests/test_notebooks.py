"""The tutorial notebooks in notebooks/ run top to bottom, are stored clean, and their training trains.

Each notebook runs in a fresh Jupyter kernel started by the interpreter running these tests (a
kernel spec of our own, so a ``python`` elsewhere on PATH is never picked up), with the repository
root as its working directory. A failing cell fails the test with its source and its error.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from jupyter_core.utils import run_sync
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
CELL_TIMEOUT_S = 60

EXPECTED = [
    "01_pointers_and_workers.ipynb",
    "02_federated_learning.ipynb",
    "03_remote_execution.ipynb",
    "04_model_averaging.ipynb",
    "05_federated_data_loader.ipynb",
    "06_plans.ipynb",
    "07_secure_aggregation.ipynb",
]
# The notebooks that train keep a ``losses`` dict, {section: [loss, ...]}, in their namespace.
TRAINING = {
    "02_federated_learning.ipynb",
    "04_model_averaging.ipynb",
    "05_federated_data_loader.ipynb",
    "07_secure_aggregation.ipynb",
}
LOSSES_MARK = "losses as JSON: "
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture(scope="module")
def kernel_specs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A kernel spec directory whose "python3" kernel is this very interpreter."""
    root = tmp_path_factory.mktemp("kernels")
    spec = root / "python3"
    spec.mkdir()
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "Python 3 (tests)", "language": "python"})
    )
    return root


def run_notebook(nb: nbformat.NotebookNode, specs: Path, name: str) -> nbformat.NotebookNode:
    """Execute ``nb`` in place; on a failing cell, fail the test with that cell's source and error."""
    km = AsyncKernelManager(
        kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(specs)])
    )
    client = NotebookClient(
        nb, km=km, kernel_name="python3", timeout=CELL_TIMEOUT_S, resources={"metadata": {"path": str(REPO)}}
    )
    env = {**os.environ, "PYDEVD_DISABLE_FILE_VALIDATION": "1"}  # quiets ipykernel's debugger warning
    failure = None
    try:
        client.execute(env=env)
    except (CellExecutionError, CellTimeoutError) as err:
        failed = [
            i
            for i, c in enumerate(nb.cells)
            if any(o.get("output_type") == "error" for o in c.get("outputs", []))
        ]
        where = f"cell {failed[0]}" if failed else "a cell"  # a timeout leaves no error output
        failure = f"{name}: {where} failed\n{ANSI.sub('', str(err))}"
    finally:
        if run_sync(km.is_alive)():
            run_sync(km.shutdown_kernel)(now=True)
    if failure is not None:  # outside the except block, so the report is not chained to nbclient's
        pytest.fail(failure, pytrace=False)
    return nb


def stream_text(nb: nbformat.NotebookNode) -> Iterator[str]:
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == "stdout":
                yield out["text"]


def test_the_expected_notebooks_exist() -> None:
    present = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert present == EXPECTED, f"notebooks/ holds {present}, expected {EXPECTED}"


def test_the_kernel_runs_this_interpreter(kernel_specs: Path) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(
            "import os, sys\nprint(sys.executable)\nprint(sys.prefix)\nprint(os.getcwd())"
        )
    ]
    out = "".join(stream_text(run_notebook(nb, kernel_specs, "interpreter check"))).splitlines()
    assert out == [sys.executable, sys.prefix, str(REPO)]


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_is_stored_without_outputs(name: str) -> None:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    dirty = [
        i
        for i, c in enumerate(nb.cells)
        if c.cell_type == "code" and (c.outputs or c.execution_count is not None)
    ]
    assert not dirty, (
        f"{name}: cells {dirty} hold outputs; clear them before committing (Kernel > Restart & Clear)"
    )


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_runs(name: str, kernel_specs: Path) -> None:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    if name in TRAINING:  # read the losses back out of the kernel once every cell has run
        nb.cells.append(
            nbformat.v4.new_code_cell(
                f"import json as _json\nprint({LOSSES_MARK!r} + _json.dumps({{k: [float(v) for v in vs] "
                "for k, vs in losses.items()}))"
            )
        )
    run_notebook(nb, kernel_specs, name)
    if name not in TRAINING:
        return
    line = next(ln for text in stream_text(nb) for ln in text.splitlines() if ln.startswith(LOSSES_MARK))
    losses = json.loads(line[len(LOSSES_MARK) :])
    assert losses, f"{name} records no losses"
    for section, values in losses.items():
        assert len(values) >= 2, f"{name}: section {section!r} recorded {len(values)} losses"
        assert values[-1] < values[0], f"{name}: the loss of {section!r} did not fall: {values}"
