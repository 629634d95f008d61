"""A federation in three commands, as a user runs it: ``fedsecure federation init``, the workers
served from the files it wrote (``fedsecure worker serve --config``, from another directory), and
``fedsecure run`` against them; the refusals of init, of the worker file and of ``fedsecure certs``;
and docs/federation.md checked against the worker file's fields."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import numpy as np
import pytest

from fedsecure.cli import main
from fedsecure.cli.worker import WorkerFile
from fedsecure.data import load_digits
from fedsecure.experiment.federation import toml_text

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def fedsecure(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedsecure", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=ENV)


def _free_ports(count: int) -> int:
    """A base port with ``count`` free ports from it on (tests beside this one bind ports too)."""
    for _ in range(100):
        base = random.randint(20000, 60000)
        with contextlib.ExitStack() as stack:
            try:
                for port in range(base, base + count):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return base
    raise RuntimeError("no free ports")


@contextlib.contextmanager
def serving(configs: list[str], cwd: Path) -> Iterator[list[str]]:
    """``fedsecure worker serve --config C`` for each config, until each says where it listens."""
    procs = [subprocess.Popen([sys.executable, "-m", "fedsecure", "worker", "serve", "--config", c], cwd=cwd,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
             for c in configs]
    try:
        banners: list[str] = []
        for proc in procs:
            line: list[str] = []
            reader = threading.Thread(target=lambda p=proc, out=line: out.append(p.stdout.readline()), daemon=True)
            reader.start()
            reader.join(120)
            assert line and "listening on" in line[0], (line, proc.poll())
            banners.append(line[0])
        yield banners
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            assert proc.stdout is not None
            proc.stdout.close()


def test_three_commands_train_a_federation(tmp_path: Path) -> None:
    owners = ["bob", "alice", "carol"]
    base = _free_ports(len(owners) + 1)
    done = fedsecure("federation", "init", "fed", "--owners", ",".join(owners), "--data", "digits",
                     "--base-port", str(base), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    fed = tmp_path / "fed"
    for name in owners:
        assert f"fedsecure worker serve --config fed/{name}.toml" in done.stdout
        with np.load(fed / f"{name}.npz") as share:
            assert sorted(share.files) == ["x", "x_test", "y", "y_test"]
    assert "fedsecure worker serve --config fed/secure_worker.toml" in done.stdout
    assert "fedsecure run fed/run.toml" in done.stdout
    assert {p.name for p in (fed / "certs").iterdir()} == {
        f"{n}.{ext}" for n in [*owners, "secure_worker", "owner", "ca"] for ext in ("pem", "key")}
    assert all(p.stat().st_mode & 0o077 == 0 for p in fed.glob("*.*"))  # private data: its owner's only
    run = tomllib.loads((fed / "run.toml").read_text())
    assert run["workers"]["remote"] == [{"id": n, "address": f"127.0.0.1:{base + i}"} for i, n in enumerate(owners)]
    assert run["workers"]["aggregator_address"] == f"127.0.0.1:{base + len(owners)}"

    elsewhere = tmp_path / "elsewhere"  # paths in a worker file are the file's, not the working directory's
    elsewhere.mkdir()
    with serving([f"../fed/{n}.toml" for n in [*owners, "secure_worker"]], elsewhere) as banners:
        assert "serving #x, #x_test, #y, #y_test" in banners[0]
        assert "strict aggregator" in banners[-1]
        ran = fedsecure("run", "../fed/run.toml", "--rounds", "2", "--quiet", cwd=elsewhere)
    assert ran.returncode == 0, ran.stderr
    rows = json.loads((elsewhere / "runs" / "fed" / "history.json").read_text())["rounds"]
    assert [r["workers"] for r in rows] == [len(owners)] * 2
    assert rows[-1]["central_accuracy"] > 0.5  # ten classes: chance is 0.1
    assert rows[-1]["federated_accuracy"] > 0.5  # the owners' held-out parts, evaluated where they are


def test_a_token_federation_from_a_file_agrees_on_its_tokens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With --token every worker knows the model owner's token and the aggregator each owner's; with
    data from a file the model owner gets the test set, and the owners the rest of its rows."""
    digits = load_digits()
    np.savez(tmp_path / "mine.npz", x=digits.x_train.numpy(), y=digits.y_train.numpy())
    monkeypatch.chdir(tmp_path)
    assert main(["federation", "init", "fed", "--owners", "dora,eve", "--data", "mine.npz", "--token",
                 "--partition", "dirichlet", "--alpha", "1.0", "--aggregator", "hub"]) == 0
    fed = tmp_path / "fed"
    assert not (fed / "certs").exists()
    files = {name: tomllib.loads((fed / f"{name}.toml").read_text()) for name in ("dora", "eve", "hub")}
    run = tomllib.loads((fed / "run.toml").read_text())
    assert run["data"]["dataset"] == "owner_test.npz" and "tls_dir" not in run["workers"]
    assert all(f["clients"] == {"owner": run["workers"]["token"]} for f in files.values())
    assert files["hub"]["peers"] == {n: {"token": files[n]["token"]} for n in ("dora", "eve")}
    assert files["hub"]["policy"] == {"strict": True}
    assert all(files[n]["trust"] == ["hub"] and files[n]["peers"] == {"hub": {"address": "127.0.0.1:7003"}}
               for n in ("dora", "eve"))
    assert len({run["workers"]["token"], *(f["token"] for f in files.values())}) == 4  # each its own
    held = 0
    for name in ("dora", "eve", "owner_test"):
        with np.load(fed / f"{name}.npz") as arrays:
            held += len(arrays["y_test"]) + (len(arrays["y"]) if "y" in arrays else 0)
    assert held == len(digits.y_train)  # every row of the file once: owners' shares and the test set


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code not in (0, None)
    return str(exit_.value.code) if isinstance(exit_.value.code, str) else capsys.readouterr().err


@pytest.mark.parametrize(("extra", "message"), [
    (["--owners", "bob,alice", "--data", "mnist"], "--data 'mnist' is neither a built-in data set"),
    (["--owners", "bob,alice,bob"], "owner names must differ"),
    (["--owners", "bob,Bob"], "owner names must differ (also in case"),
    (["--owners", "bob,secure_worker"], "'secure_worker' is the aggregator's name"),
    (["--owners", "bob,hub", "--aggregator", "hub"], "'hub' is the aggregator's name"),
    (["--owners", "bob,../alice"], "invalid party name '../alice'"),
    (["--owners", "bob,.alice"], "must not start with '.'"),
    (["--owners", "bob,owner"], "'owner' cannot be a party's name here: it is the model owner's name"),
    (["--owners", "bob,run"], "run.toml"),
    (["--owners", "bob"], "at least two data owners"),
    (["--owners", "bob,alice", "--partition", "dirichlet"], "--partition dirichlet needs --alpha"),
    (["--owners", "bob,alice", "--token", "--host", "10.1.2.3"], "--token sends tokens in the clear"),
    (["--owners", "bob,alice", "--base-port", "65534"], "leaves no room for 3 ports"),
    (["--owners", "bob,alice", "--data", "absent.npz"], "absent.npz: no such file"),
    (["--owners", "bob,,alice"], "--owners takes names separated by commas"),
])
def test_init_refuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                      extra: list[str], message: str) -> None:
    monkeypatch.chdir(tmp_path)
    assert message in _refused(["federation", "init", "fed", *extra], capsys)
    assert not (tmp_path / "fed").exists()  # nothing written


def test_init_refuses_a_directory_that_is_not_empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fed").mkdir()
    (tmp_path / "fed" / "notes.txt").write_text("mine")
    assert "fed is not empty: pass --force" in _refused(["federation", "init", "fed", "--owners", "a,b"], capsys)
    assert sorted(p.name for p in (tmp_path / "fed").iterdir()) == ["notes.txt"]
    assert main(["federation", "init", "fed", "--owners", "a,b", "--token", "--force"]) == 0
    assert (tmp_path / "fed" / "notes.txt").read_text() == "mine"
    assert {"a.npz", "b.npz", "a.toml", "b.toml", "secure_worker.toml", "run.toml"} <= {
        p.name for p in (tmp_path / "fed").iterdir()}


# --- the worker file ---------------------------------------------------------------------------------


def _serve_refused(config: Path, capsys: pytest.CaptureFixture[str], *flags: str) -> str:
    return _refused(["worker", "serve", "--config", str(config), *flags], capsys)


def test_worker_file_keys_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "w.toml"
    config.write_text('id = "bob"\ntrsut = ["hub"]\n[clients]\nowner = "t"\n')
    assert "unknown key 'trsut'" in _serve_refused(config, capsys)
    config.write_text('id = "bob"\n[clients]\nowner = "t"\n[peers.hub]\nadress = "127.0.0.1:1"\n')
    assert "unknown key 'adress' in [peers.hub]" in _serve_refused(config, capsys)
    config.write_text('id = "bob"\nport = "7001"\n[clients]\nowner = "t"\n')
    assert "port = '7001' has the wrong type (expected int)" in _serve_refused(config, capsys)


def test_paths_in_a_worker_file_are_the_files_and_flags_the_working_directorys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "fed").mkdir()
    config = tmp_path / "fed" / "bob.toml"
    config.write_text('id = "bob"\ndata = "bob.npz"\n[clients]\nowner = "t"\n')
    monkeypatch.chdir(tmp_path)
    assert f"cannot load the data file {tmp_path / 'fed' / 'bob.npz'}:" in _serve_refused(Path("fed/bob.toml"), capsys)
    flagged = _serve_refused(Path("fed/bob.toml"), capsys, "--data", "other.npz")
    assert "cannot load the data file other.npz:" in flagged  # a flag's path is as given
    config.write_text('id = "bob"\ntls_dir = "certs"\n[clients]\nowner = ""\n')
    assert str(tmp_path / "fed" / "certs" / "ca.pem") in _serve_refused(Path("fed/bob.toml"), capsys)
    config.write_text(f'id = "bob"\ndata = "{tmp_path / "abs.npz"}"\n[clients]\nowner = "t"\n')
    assert f"cannot load the data file {tmp_path / 'abs.npz'}:" in _serve_refused(config, capsys)


def _type_name(tp: Any) -> str:
    options = [a for a in get_args(tp) if a is not type(None)] if get_origin(tp) in (Union, type(int | str)) else [tp]
    names = {str: "string", int: "integer", bool: "boolean", float: "float"}
    if len(options) > 1:
        return " or ".join(names[o] for o in options)
    (one,) = options
    if get_origin(one) is tuple:
        return f"array of {names[get_args(one)[0]]}s"
    return names[one]


def _default(f: dataclasses.Field[Any]) -> str:
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
    if value is None or value == {}:
        return "(none)"
    return f"`{toml_text({'v': list(value) if isinstance(value, tuple) else value}).split(' = ', 1)[1].strip()}`"


def _schema(cls: type, prefix: str = "") -> dict[str, tuple[str, str]]:
    """Each key of the worker file: its type and default, as docs/federation.md writes them."""
    rows: dict[str, tuple[str, str]] = {}
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows |= _schema(tp, f"{prefix}{f.name}.")  # type: ignore[arg-type]
        elif get_origin(tp) is Mapping:
            item = get_args(tp)[1]
            if dataclasses.is_dataclass(item):
                rows |= _schema(item, f"{prefix}{f.name}.NAME.")  # type: ignore[arg-type]
            else:
                rows[f"{prefix}{f.name}.NAME"] = (_type_name(item), "(none)")
        else:
            rows[prefix + f.name] = (_type_name(tp), _default(f))
    return rows


def test_the_worker_file_documentation_lists_every_key_with_its_type_and_default() -> None:
    text = (ROOT / "docs" / "federation.md").read_text()
    section = text[text.index("## The worker file"):]
    section = section[:section.index("\n## ", 1)]
    documented = {key: (kind.strip(), default.strip()) for key, kind, default in
                  re.findall(r"^\| `([\w.]+)` \|([^|]+)\|([^|]+)\|[^|]+\|$", section, re.M)}
    assert documented == _schema(WorkerFile)


def test_toml_text_reads_back_unchanged() -> None:
    tables = {"id": 'a "b"\\\n\x7f', "n": 3, "f": 0.05, "on": True, "list": ["x", "y"], "empty": [],
              "clients": {"a.b": "", "c": "t"}, "peers": {"x y": {}, "z": {"address": "h:1"}},
              "workers": {"mode": "remote", "remote": [{"id": "a", "address": "h:2"}, {"id": "b", "address": "h:3"}]}}
    assert tomllib.loads(toml_text(tables, "a header\nin two lines")) == tables


# --- fedsecure certs ---------------------------------------------------------------------------------


def test_certs_refusals_exit_non_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    monkey = str(tmp_path / "c")
    assert main(["certs", monkey, "--party", "bob"]) == 0
    capsys.readouterr()
    refusals = {
        (monkey, "--party", "bob"): "already exists",
        (str(tmp_path / "d"), "--party", "ca"): "cannot be a party's name",
        (str(tmp_path / "d"), "--party", "bob", "--party", "BOB"): "party names must differ",
        (str(tmp_path / "d"), "--party", "bob", "--days", "0"): "days must be a whole number",
        (str(tmp_path / "d"), "--party", "bob", "--days", "99999999"): "ends after the year 9999",
        (str(tmp_path / "d"), "--party", "bob", "--host", "a b"): "invalid host 'a b'",
        (str(tmp_path / "d"), "--party", "bob", "--secagg", "eve"): "not parties",
        (str(tmp_path / "d"), "--party", "bob", "--ca-name", ""): "the CA's common name",
    }
    for argv, message in refusals.items():
        assert main(["certs", *argv]) == 1, argv
        assert message in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
    for argv, message in {("", "--party", "bob"): "the directory is empty",
                          (str(tmp_path / "d"),): "required: --party"}.items():
        with pytest.raises(SystemExit) as exit_:
            main(["certs", *argv])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    done = fedsecure("certs", monkey, "--party", "bob", cwd=tmp_path)  # as a user sees it
    assert done.returncode == 1 and "already exists" in done.stderr and not done.stdout
