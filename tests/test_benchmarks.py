"""The benchmarks run (quickly) and write what they promise; their numbers are not checked here."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from fedsecure.experiment.config import load as load_experiment

ROOT = Path(__file__).resolve().parents[1]


def run_quick(script: str, tmp_path: Path, *extra: str) -> tuple[str, dict[str, Any]]:
    """Run ``benchmarks/SCRIPT --quick``; its printed table and the JSON it wrote."""
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(out), *extra],
        capture_output=True, text=True, timeout=300, check=True,
    )
    return proc.stdout, json.loads(out.read_text())


def test_pointer_overhead_benchmark_runs(tmp_path: Path) -> None:
    table, result = run_quick("pointer_overhead.py", tmp_path)
    assert "train step, SGD" in table
    cases = {row["case"]: row for row in result["rows"]}
    step = cases["train step, SGD"]
    assert step["same_loss"] is True  # remote training computes what local training does
    assert step["remote_us"] > 0 and step["local_us"] > 0 and step["round_trips"] <= step["messages"]
    assert result["profile"]


def test_model_transfer_benchmark_runs(tmp_path: Path) -> None:
    table, result = run_quick("model_transfer.py", tmp_path)
    assert "cnn_mcmahan" in table
    for row in result["rows"].values():
        assert row["same_values"] is True  # the model came back as it left
        assert row["build_ms"] > 0 and row["round_trip_beside_ms"] > 0 and row["round_trip_inside_ms"] > 0
        assert all(row[k] > 0 for k in ("build_random_ms", "receive_ms", "digest_sha256_ms", "digest_blake3_ms"))
        assert row["meta_build_ms"] > 0 and row["meta_copy_ms"] > 0
        assert row["fold_parts_ms"] > 0 and row["fold_float64_ms"] > 0 and row["close_ms"] > 0
        assert row["fold_relative_difference"] < 1e-6  # float32 parts: the mean to float32's rounding


def test_process_floor_benchmark_runs(tmp_path: Path) -> None:
    table, result = run_quick("process_floor.py", tmp_path)
    assert "| first fit |" in table
    rows = result["rows"]
    assert rows["torch"]["pss"] > rows["numpy"]["pss"] > 0
    # training imports no compiler stack; torch.optim and a meta pass, which a worker avoids, do
    assert not rows["second fit"]["dynamo"] and not rows["second fit"]["sympy"]
    assert rows["torch.optim and meta"]["dynamo"] and rows["torch.optim and meta"]["sympy"]


def test_device_benchmark_runs_and_skips_a_missing_gpu(tmp_path: Path) -> None:
    table, result = run_quick("device.py", tmp_path)
    assert "| cpu |" in table and result["results"]["cpu"]["accuracy"]
    if not result["machine"]["gpu"]:
        assert result["results"]["cuda"] == {"skipped": "no CUDA GPU"}


def test_device_benchmark_compares_the_layouts(tmp_path: Path) -> None:
    table, result = run_quick("device.py", tmp_path, "--layouts")
    assert "channels-last / contiguous, fit phase" in table
    assert sorted(r["layout"] for r in result["results"].values()) == ["channels-last", "contiguous"]
    table, result = run_quick("device.py", tmp_path, "--by-rows")
    rows = result["results"]
    assert [r["rows"] for r in rows.values()] == [6, 16, 32, 64, 128, 256]
    assert all(r["ms"]["contiguous"] > 0 and r["ms"]["channels-last"] > 0 for r in rows.values())


def test_batched_clients_benchmark_trains_what_the_workers_loop_trains(tmp_path: Path) -> None:
    table, result = run_quick("batched_clients.py", tmp_path, "--devices", "cpu,cuda")
    assert "together / one after another" in table
    (row,) = [r for r in result["rows"] if r["device"] == "cpu"]
    assert row["owners"] == 8 and row["serial_s"] > 0 and row["batched_s"] > 0
    assert row["steps_max"] >= 2  # an owner of several steps: the others wait for it, unchanged
    assert row["largest_relative_difference"] < 1e-5  # the batched pass computes the same models
    if not any(r["device"].startswith("cuda") for r in result["rows"]):
        assert result["skipped"] == ["cuda"]


def test_memory_benchmark_runs_the_cli_and_the_cross_device_case(tmp_path: Path) -> None:
    table, result = run_quick("memory.py", tmp_path, "--cases", "run,cross-device")
    assert "| fedsecure run |" in table and "cross-device, mlp" in table
    assert sorted(result["run"]) == ["local", "processes"]
    assert result["run"]["processes"]["processes"] >= 2  # the model owner and its host processes
    assert all(r["rounds"] == 2 and r["peak_mb"] >= r["median_mb"] > 0 for r in result["run"].values())
    assert result["cross_device"]["objects_left_on_owners"] == 0


def test_memory_benchmark_runs_the_cross_device_example_in_each_mode(tmp_path: Path) -> None:
    table, result = run_quick("memory.py", tmp_path, "--cases", "cross-device-run", "--run-modes", "local,processes")
    assert "| cross-device example |" in table
    runs = result["cross_device_run"]
    assert sorted(runs) == ["local", "processes"] and runs["processes"]["processes"] >= 3  # owner, zygote, hosts
    for r in runs.values():
        assert r["rounds"] == 2 and r["central_accuracy"] is not None and r["peak_mb"] > 0
        assert 0 < r["train_seconds"] < r["fit_seconds"] and r["transfer_seconds"] > 0


def test_cross_device_comparison_runs_fedsecure_on_the_example(tmp_path: Path) -> None:
    table, result = run_quick("vs_flower/cross_device.py", tmp_path, "--systems", "fedsecure")  # no Flower venv
    assert "| fedsecure |" in table and result["workload"]["owners"] == 300
    (run,) = result["runs"]["fedsecure"]
    assert [r["round"] for r in run["rounds"]] == [1, 2] and run["median_fit_s"] > 0 and run["accuracy"] is not None
    assert run["max_processes"] == 1 and run["stray_processes"] == 0


def test_flowers_cross_device_data_is_fedsecures_partition(tmp_path: Path) -> None:
    """The directory Flower's clients read holds, for each owner, the rows fedsecure's run gives it."""
    sys.path.insert(0, str(ROOT / "benchmarks" / "vs_flower"))
    try:
        spec = importlib.util.spec_from_file_location("cross_device_bench", ROOT / "benchmarks" / "vs_flower" / "cross_device.py")
        assert spec is not None and spec.loader is not None
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        import workload
    finally:
        sys.path.remove(str(ROOT / "benchmarks" / "vs_flower"))
    bench.prepare(tmp_path / "d", owners=300, digits=True)
    data = workload.CrossDevice(str(tmp_path / "d"))
    exp = load_experiment(ROOT / "examples" / "fashion_mnist_cross_device.toml",
                          {"data.dataset": "digits", "data.workers": 300})
    digits = exp.dataset()
    parts = exp.partitions(digits)
    assert data.owners == 300 and data.image_size == 8
    for c in (0, 7, 299):
        x, y = data.owner(c)
        assert torch.equal(x, digits.x_train[torch.from_numpy(parts[c])])
        assert torch.equal(y, digits.y_train[torch.from_numpy(parts[c])])


def test_transport_benchmark_runs(tmp_path: Path) -> None:
    table, result = run_quick("transport.py", tmp_path)
    assert "raw TCP" in table
    assert all(row["same_values"] for row in result["transfers"])
    assert all(p["correct"] for p in result["pipeline"])
    b = result["broadcast"]  # the same tensor to 6 workers of one server, twice: 4 sends a round named
    assert "named (kept frames)" in table and b["same_values"] and b["named_sends"] == 4 * b["rounds"]


def test_secure_aggregation_benchmark_runs(tmp_path: Path) -> None:
    table, result = run_quick("secure_aggregation.py", tmp_path, "--no-flower")  # no venv, no install
    assert "srv/plain" in table and "Flower skipped" in table
    assert {row["mode"] for row in result["rows"]} == {"secagg", "secagg+"}
    assert all(row["correct"] and row["expansion"] > 1 for row in result["rows"])


def test_fl_scale_benchmark_runs(tmp_path: Path) -> None:
    table, result = run_quick("fl_scale.py", tmp_path)
    assert "peak memory" in table
    assert result["workers"] == 100 and result["rounds"][0]["workers"] == 100
    assert result["objects_left"] == [0] * len(result["objects_left"])  # nothing left on any worker


def test_niid_bench_runs(tmp_path: Path) -> None:
    table, result = run_quick("niid_bench.py", tmp_path)
    assert "| dir0.5 |" in table and "| c3 |" in table
    assert [r["partition"] for r in result["rows"]] == ["dir0.5", "iid", "c2", "c3"]
    assert all(len(r["accuracy"]) == 2 for r in result["rows"])


def test_vs_flower_harness_runs(tmp_path: Path) -> None:
    """The harness of benchmarks/vs_flower on the plain loop only: no Flower is installed for this."""
    table, result = run_quick("vs_flower/run.py", tmp_path, "--systems", "plain")
    assert "median s per round" in table
    plain = result["summary"]["systems"]["plain"]
    assert plain["available"] is True
    assert len(plain["accuracy"]) == 1 and 0 <= plain["accuracy"][0] <= 1
    assert plain["median_round_s"] > 0 and plain["memory"]["peak_rss_mb"] > 0
    workload = result["workload"]
    assert sum(workload["client_sizes"]) == workload["train_images"] and workload["clients"] == 10
    # where the tree's memory was at its peak, process by process, each named by what it runs
    memory = result["runs"]["plain"][0]["memory"]
    assert [p["program"] for p in memory["pss_at_peak"]] == ["plain_loop.py"] and memory["pss_at_peak"][0]["pss_mb"] > 0
    assert f"PSS at the peak ({memory['pss_peak_when']}): plain_loop.py " in table


def test_vs_flower_names_each_process_by_what_it_runs() -> None:
    spec = importlib.util.spec_from_file_location("vs_flower_run", ROOT / "benchmarks" / "vs_flower" / "run.py")
    assert spec is not None and spec.loader is not None
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    program = harness.program
    assert program(["/venv/bin/python", "-u", "/site-packages/ray/dashboard/agent.py", "--x=1", ""]) == "agent.py"
    assert program(["/venv/bin/python3.11", "-c", "from fedsecure.experiment.host import main; main()"]) == "python -c"
    assert program(["/site-packages/ray/core/src/ray/gcs/gcs_server", "--log_dir=/tmp"]) == "gcs_server"
    assert program(["ray::OwnerHost", "", ""]) == "ray::OwnerHost"
    assert program([""]) == program([]) == "?"


def test_additive_shares_benchmark_runs(tmp_path: Path) -> None:
    table, result = run_quick("additive_shares.py", tmp_path)
    assert "shares/trusted" in table
    (row,) = result["rows"]
    assert row["shares"]["correct"] is True and row["shares"]["expansion"] == pytest.approx(4.0, rel=0.05)


def test_secagg_consistency_benchmark_runs(tmp_path: Path) -> None:
    table, result = run_quick("secagg_consistency.py", tmp_path)
    assert "checked" in table
    assert result["checked"]["bytes_sent"] > result["plain"]["bytes_sent"] > 0


def test_dp_sgd_digits_benchmark_runs(tmp_path: Path) -> None:
    pytest.importorskip("opacus")
    table, result = run_quick("dp_sgd_digits.py", tmp_path)
    assert "DP-SGD, z = 1.0" in table
    plain, private = result["rows"]
    assert plain["rounds"][-1]["epsilon"] is None and private["rounds"][-1]["epsilon"] > 0


def test_noninterference_benchmark_runs(tmp_path: Path) -> None:
    table, result = run_quick("noninterference.py", tmp_path)
    assert "divergent programs: 0" in table
    assert result["programs"] == 200 and result["divergent_programs"] == 0 and result["steps"] > 0
