"""A Ray of the run's own on this machine, started with only the processes a simulation uses.

``ray.init`` on one machine starts, besides the GCS, the raylet and an idle worker per CPU (which
become the actors), five Python processes of 49-63 MB each: the autoscaler's monitor, the log
monitor, the dashboard process (also with ``include_dashboard=False``: it then runs only Ray's
usage statistics), the dashboard agent and the runtime environment agent. A simulation uses the
GCS, the raylet and the workers; `start_local_ray` starts nothing else:

- the monitor, the log monitor and the dashboard process: not started (`LEAN`, `_no_api_server`);
- the two agents, which the raylet itself starts and waits for (each reports its ports in a
  file of the session's directory): a shell stands in for each (`without_agents`), reports
  those ports as not in use, as the dashboard agent itself does without its optional modules,
  and ends with the raylet.

What goes with them: Ray's dashboard, metrics, job, log and state APIs, the actors' output in this
terminal (it stays in ``/tmp/ray/session_latest/logs/worker-*``), and ``runtime_env``: without
its agent, a raylet asked for one exits. The actors get their environment from the raylet's
instead (``env``). A run that needs any of these starts Ray itself (``ray start --head``) and
joins it with ``[workers] address``, where nothing here applies.

In `benchmarks/vs_flower`'s Ray mode the agents were about 110 MB of the process tree's peak
(one-off: 56 and 54 MB of PSS on this project's 2-core machine, Ray 2.55.1).
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import threading
from collections.abc import Mapping, Sequence
from typing import Any

log = logging.getLogger(__name__)

LEAN = {"no_monitor": True, "include_log_monitor": False}
"""Settings of Ray's node parameters for a local Ray: no autoscaler's monitor (a one-machine Ray
has nothing to scale), no log monitor (which copies every actor's output to this terminal)."""

AGENTS = {
    "dashboard": ("METRICS_AGENT_PORT_NAME", "METRICS_EXPORT_PORT_NAME", "DASHBOARD_AGENT_LISTEN_PORT_NAME"),
    "runtime_env": ("RUNTIME_ENV_AGENT_PORT_NAME",),
}
"""Ray's two agents by the flag that gives the raylet each one's command (``--dashboard_agent_command``)
and the names, in ``ray._raylet``, of the ports each reports: the raylet waits for a file
``<name>_<node id>`` in the session's directory for each, holding the port (-1: not in use)."""

NOT_IN_USE = "-1"
AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"

_starting = threading.Lock()


def start_local_ray(ray: Any, cpus: int, env: Mapping[str, str] | None = None) -> None:
    """``ray.init`` of a local Ray of ``cpus`` CPUs with only the processes a simulation uses (the
    module's docstring), ``env`` added to the raylet's environment, which the workers it starts
    inherit. A Ray whose raylet does not start with the stand-ins starts again with its agents
    (and ``env``); one whose internals lack what this needs starts as ``ray.init`` alone would, its
    workers with Ray's environment."""
    # "local": a Ray of this run's own even where RAY_ADDRESS names a cluster (joined with `address`)
    options = {"address": "local", "num_cpus": cpus, "include_dashboard": False, "log_to_driver": False,
               "logging_level": logging.WARNING}
    try:
        from ray import _raylet
        from ray._private import node, parameter, services

        services.start_ray_process  # noqa: B018  (what the stand-ins and env go through)
    except (ImportError, AttributeError):
        ray.init(**options)
        return
    names = {port: getattr(_raylet, port, None) for ports in AGENTS.values() for port in ports}
    known = os.name == "posix" and all(isinstance(name, str) for name in names.values())
    with _starting, _Patches(parameter, node, services, names if known else None, dict(env or {})) as patches:
        try:
            ray.init(**options)
        except TypeError:  # a Ray without the parameters of LEAN
            patches.plain_parameters()
            ray.init(**options)
        except Exception as exc:
            if not patches.stood_in:
                raise
            log.warning("a local Ray with stand-ins for its agents did not start (%s); starting it with them", exc)
            ray.shutdown()  # first: a driver still connected would end this process once its GCS is gone
            patches.stop_started()
            patches.names = None
            ray.init(**options)


class _Patches:
    """While a local Ray starts: Ray's node parameters with `LEAN`, its node class without the
    dashboard process, its raylet's command with the agents' stand-ins (while ``names``, the port
    files' names, are given) and ``env``, and Ray's notice of token authentication filtered; the
    processes Ray started, and whether a raylet started with the stand-ins (``stood_in``)."""

    def __init__(self, parameter: Any, node: Any, services: Any, names: Mapping[str, Any] | None,
                 env: dict[str, str]) -> None:
        self.parameter, self.node, self.services = parameter, node, services
        self.params, self.api_server = parameter.RayParams, getattr(node.Node, "start_api_server", None)
        self.start_process = services.start_ray_process
        self.names, self.env = names, env
        self.started: list[Any] = []
        self.stood_in = False

    def __enter__(self) -> _Patches:
        plain = self.params

        class Lean(plain):  # type: ignore[misc, valid-type]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **{**LEAN, **kwargs})

        logging.getLogger(AUTH_LOGGER).addFilter(_token_notice)
        setattr(self.parameter, "RayParams", Lean)  # noqa: B010  (Ray's attributes, for this call)
        setattr(self.services, "start_ray_process", self._start)  # noqa: B010
        if self.api_server is not None:
            setattr(self.node.Node, "start_api_server", _no_api_server)  # noqa: B010
        return self

    def _start(self, command: list[str], process_type: str, *args: Any, **kwargs: Any) -> Any:
        """``services.start_ray_process``, with the raylet's command and environment changed."""
        if process_type == "raylet":
            lean = None if self.names is None else without_agents(command, self.names)
            self.stood_in = self.stood_in or lean is not None
            command = lean or command
            kwargs["env_updates"] = {**(kwargs.get("env_updates") or {}), **self.env}
        info = self.start_process(command, process_type, *args, **kwargs)
        self.started.append(info)
        return info

    def plain_parameters(self) -> None:
        setattr(self.parameter, "RayParams", self.params)  # noqa: B010

    def stop_started(self) -> None:
        """Stop the processes Ray started so far (a start that failed leaves its GCS running)."""
        for info in self.started:
            process = getattr(info, "process", None)
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
        self.started = []

    def __exit__(self, *exc: object) -> None:
        self.plain_parameters()
        setattr(self.services, "start_ray_process", self.start_process)  # noqa: B010
        if self.api_server is not None:
            setattr(self.node.Node, "start_api_server", self.api_server)  # noqa: B010
        logging.getLogger(AUTH_LOGGER).removeFilter(_token_notice)


def without_agents(command: Sequence[str], names: Mapping[str, str]) -> list[str] | None:
    """The raylet's command line with a shell in place of each of `AGENTS`: it writes each of the
    agent's port files (``names``: Ray's file name for each port) with `NOT_IN_USE`, as a whole
    (to a temporary name, then renamed), and lives as long as its parent, the raylet. None where
    the command lacks a flag this needs (a Ray that starts its agents otherwise)."""
    flags = dict(arg[2:].split("=", 1) for arg in command if arg.startswith("--") and "=" in arg)
    session, node = flags.get("session_dir"), flags.get("node_id")
    if not session or not node or any(f"{agent}_agent_command" not in flags for agent in AGENTS):
        return None
    stand_ins = {}
    for agent, ports in AGENTS.items():
        steps = []
        for port in ports:
            path = shlex.quote(os.path.join(session, f"{names[port]}_{node}"))
            steps.append(f"echo {NOT_IN_USE} > {path}.new && mv {path}.new {path}")
        script = " && ".join(steps) + " && while kill -0 $PPID 2>/dev/null; do sleep 1; done"
        # quoted as Ray quotes the agents' own commands for the raylet
        stand_ins[f"--{agent}_agent_command="] = subprocess.list2cmdline(["/bin/sh", "-c", script])
    out = []
    for arg in command:
        flag = next((f for f in stand_ins if arg.startswith(f)), None)
        out.append(arg if flag is None else flag + stand_ins[flag])
    return out


def _token_notice(record: logging.LogRecord) -> bool:
    """Whether to show a record of `AUTH_LOGGER` while a local Ray starts: not Ray's notice that a
    new local cluster turns token authentication on, its default (this Ray is the run's own, on
    loopback, and stops with it); its warning that authentication is off still shows."""
    return not record.getMessage().startswith("Token authentication is enabled")


def _no_api_server(self: Any, **options: Any) -> None:
    """In place of ``Node.start_api_server`` while a local Ray starts: no dashboard process. With
    ``include_dashboard=False`` Ray still starts one, which runs only its usage-statistics module
    (``--modules-to-load=UsageStatsHead``); nothing of a simulation asks it anything."""
