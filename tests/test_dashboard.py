"""The live dashboard, served by the real command over real run directories: one written the way
a run writes it (status.json and history.json, replaced atomically after each round) and one made
by a real short run. Its JSON API and event stream over HTTP, then the page in headless Chromium."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
FEDSECURE = REPO / ".venv" / "bin" / "fedsecure"
CHROMIUM = Path("/usr/bin/chromium")
WRITTEN = "study/secure-dp"


def _write_json(path: Path, data: Any) -> None:
    """As a run writes its files: a whole new file, then an atomic rename over the old one."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _row(n: int) -> dict[str, Any]:
    chosen = [f"owner-{(n + i) % 6}" for i in range(4)]
    failed = chosen[-1] if n % 3 == 0 else None
    finished = [w for w in chosen if w != failed]
    return {
        "round": n, "workers": len(finished), "examples": 120 * len(finished),
        "train_loss": round(2.0 / (n + 1), 4), "central_loss": round(2.2 / (n + 1), 4),
        "central_accuracy": round(0.30 + 0.06 * n, 4), "federated_loss": round(2.3 / (n + 1), 4),
        "federated_accuracy": round(0.28 + 0.06 * n, 4), "dp_epsilon": round(0.7 * n, 3),
        "train_seconds": 1.6, "transfer_seconds": 0.3, "aggregate_seconds": 0.2, "evaluate_seconds": 0.4,
        "fit_seconds": 2.1, "round_seconds": 2.5, "chosen": chosen, "finished": finished,
        "failures": [f"{failed} (fit): deadline exceeded after 30 s"] if failed else [],
        "secure_survivors": len(finished), "secure_dropouts": [failed] if failed else [],
    }


def _status(folder: Path, completed: int, **changes: Any) -> None:
    now = time.time()
    status = {"format": 1, "name": folder.name, "state": "running", "message": None, "round": completed + 1,
              "rounds": 10, "completed": completed, "phase": "fit", "workers_total": 4, "workers_done": 1,
              "started": now - 30 * completed, "updated": now, "eta_seconds": 30.0 * (10 - completed),
              "pid": os.getpid(), "privacy": {"epsilon_limit": 8.0, "delta": 1e-5}, "checkpoint": "checkpoint"}
    _write_json(folder / "status.json", {**status, **changes})


def _rounds(folder: Path) -> list[dict[str, Any]]:
    return json.loads((folder / "history.json").read_text())["rounds"]


def _append_round(folder: Path) -> dict[str, Any]:
    rows = _rounds(folder)
    row = _row(rows[-1]["round"] + 1)
    _write_json(folder / "history.json", {"rounds": [*rows, row]})
    _status(folder, row["round"])
    return row


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    written = root / WRITTEN
    written.mkdir(parents=True)
    _write_json(written / "history.json", {"rounds": [_row(n) for n in range(1, 5)]})
    _status(written, 4)
    deep = root / "a" / "b" / "c" / "d"  # four levels down: not looked at
    deep.mkdir(parents=True)
    _write_json(deep / "history.json", {"rounds": []})
    subprocess.run([str(FEDSECURE), "run", "examples/digits.toml", "--rounds", "2", "--output",
                    str(root / "digits"), "--quiet", "--overwrite"], cwd=REPO, check=True, timeout=180)
    return root


@pytest.fixture(scope="module")
def server(root: Path) -> Iterator[str]:
    proc = subprocess.Popen([str(FEDSECURE), "dashboard", str(root), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"http://127\.0\.0\.1:\d+/", line)
    assert match, f"no URL in {line!r}; stderr: {proc.stderr.read() if proc.poll() is not None else ''}"
    yield match.group(0)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=15) == 0, proc.stderr.read()


def _get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _run_url(base: str, run_id: str) -> str:
    return f"{base}api/run?{urllib.parse.urlencode({'id': run_id})}"


def test_the_runs_list_finds_runs_up_to_three_levels_down(server: str) -> None:
    status, body = _get(server + "api/runs")
    assert status == 200
    runs = {run["id"]: run for run in body["runs"]}
    assert set(runs) == {"digits", WRITTEN}
    assert runs["digits"]["state"] == "finished" and runs["digits"]["completed"] == 2
    assert runs[WRITTEN]["state"] == "running" and runs[WRITTEN]["rounds_total"] == 10


def test_one_run_is_what_its_files_hold(server: str, root: Path) -> None:
    status, body = _get(_run_url(server, "digits"))
    assert status == 200
    assert body["rounds"] == _rounds(root / "digits")
    assert body["status"]["name"] == "digits" and body["status"]["state"] == "finished"
    assert body["last"]["central_accuracy"] == _rounds(root / "digits")[-1]["central_accuracy"]


def test_run_ids_cannot_leave_the_directory(server: str, root: Path) -> None:
    outside = root.parent / "outside"
    outside.mkdir(exist_ok=True)
    _write_json(outside / "history.json", {"rounds": [{"round": 1, "secret": "outside the root"}]})
    for run_id in ["../outside", f"../{root.parent.name}/outside", "digits/../../outside", str(outside),
                   "study/../../outside", "digits/checkpoint", "..", "a/b/c/d", "digits\\..\\..\\outside"]:
        status, body = _get(_run_url(server, run_id))
        assert status == 404, (run_id, body)
        assert "secret" not in json.dumps(body)
    conn = http.client.HTTPConnection(urllib.parse.urlsplit(server).netloc, timeout=10)
    conn.request("GET", "/static/..%2f..%2f..%2fdashboard%2fruns.py")
    assert conn.getresponse().status == 404
    conn.close()


def test_a_running_status_left_behind_by_a_dead_process_shows_stopped(server: str, root: Path) -> None:
    folder = root / "crashed"
    folder.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_json(folder / "history.json", {"rounds": [_row(1)]})
    _status(folder, 1, pid=dead.pid, updated=time.time() - 600)
    try:
        status, body = _get(_run_url(server, "crashed"))
        assert status == 200 and body["state"] == "stopped" and body["status"]["state"] == "running"
    finally:
        shutil.rmtree(folder)


def _events(server: str, run_id: str) -> tuple[http.client.HTTPConnection, Iterator[tuple[str, Any]]]:
    conn = http.client.HTTPConnection(urllib.parse.urlsplit(server).netloc, timeout=10)
    conn.request("GET", f"/api/events?{urllib.parse.urlencode({'run': run_id})}")
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("content-type", "").startswith("text/event-stream")

    def read() -> Iterator[tuple[str, Any]]:
        kind = ""
        for raw in response:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                kind = line[len("event: "):]
            elif line.startswith("data: "):
                yield kind, json.loads(line[len("data: "):])

    return conn, read()


def test_the_event_stream_pushes_an_appended_round(server: str, root: Path) -> None:
    folder = root / WRITTEN
    conn, events = _events(server, WRITTEN)
    try:
        first = next(data for kind, data in events if kind == "run")
        assert first["rounds"] == _rounds(folder)
        row = _append_round(folder)
        update = next(data for kind, data in events if kind == "run")
        assert update["rounds"][-1] == row and update["status"]["completed"] == row["round"]
    finally:
        conn.close()


def test_bad_input_says_how_to_fix_it(tmp_path: Path) -> None:
    missing = subprocess.run([str(FEDSECURE), "dashboard", str(tmp_path / "nope")], capture_output=True, text=True,
                             timeout=60)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    code = ("import sys; sys.modules['starlette'] = None; from fedsecure.cli.main import main; "
            f"sys.exit(main(['dashboard', {str(tmp_path)!r}, '--port', '0']))")
    no_starlette = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert no_starlette.returncode == 2
    assert "pip install 'fedsecure[dashboard]'" in no_starlette.stderr


def test_serve_in_background_serves_one_directory_until_stopped(root: Path) -> None:
    from fedsecure.dashboard import serve_in_background

    dashboard = serve_in_background(root / "digits", "127.0.0.1", 0)
    try:
        status, body = _get(dashboard.url + "api/runs")
        assert status == 200 and [run["id"] for run in body["runs"]] == ["."]
        conn, events = _events(dashboard.url, ".")
        assert next(data for kind, data in events if kind == "run")["status"]["name"] == "digits"
    finally:
        dashboard.stop()
    conn.close()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(dashboard.url + "api/runs", timeout=5)


def _browser() -> Any:
    reason = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "playwright is not installed (pip install playwright)"
    if reason is None and not CHROMIUM.exists():
        reason = f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    if reason is not None:
        if os.environ.get("FEDSECURE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"FEDSECURE_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    return sync_playwright


def test_the_page_shows_a_run_and_follows_it_live(server: str, root: Path, tmp_path: Path) -> None:
    sync_playwright = _browser()
    from playwright.sync_api import expect

    folder = root / WRITTEN
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"], headless=True)
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(server)
        page.locator(f'[data-testid=run-item][data-run-id="{WRITTEN}"]').click()
        card = page.locator(f'[data-testid=run-card][data-run-id="{WRITTEN}"]')
        last = _rounds(folder)[-1]
        expect(card.get_by_test_id("last-round")).to_have_text(str(last["round"]))
        expect(card.get_by_test_id("central-accuracy")).to_have_text(f"{last['central_accuracy'] * 100:.2f}%")
        expect(card.get_by_test_id("epsilon")).to_have_text(f"{last['dp_epsilon']:.3f}")

        requests: list[str] = []
        page.on("request", lambda request: requests.append(request.url))
        row = _append_round(folder)
        expect(card.get_by_test_id("last-round")).to_have_text(str(row["round"]), timeout=10_000)
        expect(card.get_by_test_id("central-accuracy")).to_have_text(f"{row['central_accuracy'] * 100:.2f}%")
        expect(page.locator(f'[data-testid=workers-table] tr[data-round="{row["round"]}"]')).to_contain_text(
            row["chosen"][0])
        assert requests == [], f"the page fetched more than its event stream: {requests}"

        page.locator('[data-testid=run-item][data-run-id="digits"] input').click()
        digits = page.locator('[data-testid=run-card][data-run-id="digits"]')
        accuracy = _rounds(root / "digits")[-1]["central_accuracy"]
        expect(digits.get_by_test_id("central-accuracy")).to_have_text(f"{accuracy * 100:.2f}%")
        expect(page.get_by_test_id("run-card")).to_have_count(2)
        page.get_by_test_id("worker-tabs").get_by_role("button", name=folder.name).click()
        expect(page.get_by_test_id("failures").filter(has_text="deadline exceeded").first).to_be_visible()
        page.wait_for_timeout(300)  # let the charts settle before the picture
        page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
        if os.environ.get("FEDSECURE_SCREENSHOT"):
            shutil.copy(tmp_path / "dashboard.png", REPO / "docs" / "dashboard.png")
        browser.close()
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
    assert not errors, errors


def test_a_dashboard_beside_one_run_opens_it(root: Path) -> None:
    sync_playwright = _browser()
    from playwright.sync_api import expect

    from fedsecure.dashboard import serve_in_background

    last = _rounds(root / "digits")[-1]
    with serve_in_background(root / "digits", "127.0.0.1", 0) as dashboard, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"], headless=True)
        page = browser.new_page()
        page.goto(dashboard.url)
        card = page.locator('[data-testid=run-card][data-run-id="."]')
        expect(card.get_by_test_id("state")).to_have_text("finished")
        expect(card.get_by_test_id("federated-accuracy")).to_have_text(f"{last['federated_accuracy'] * 100:.2f}%")
        expect(page.locator("#chart-accuracy")).to_be_visible()
        browser.close()
