"""Checkpoints: the global model and strategy state as safetensors, the rest as JSON.

A checkpoint directory holds ``state.json`` (the round it completed, the history, the strategy's
non-tensor state, the run's settings) and the tensor files that ``state.json`` names. Each round
writes new tensor files first and then replaces ``state.json`` in one atomic rename, so a run
killed at any moment leaves the last complete round's checkpoint intact. safetensors stores
raw tensors with a JSON header: loading one never runs code (no pickle).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedsecure.errors import FedsecureError

STATE = "state.json"
FORMAT = 1


class CheckpointError(FedsecureError, ValueError):
    """A checkpoint cannot be read, or belongs to another experiment."""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    round: int
    parameters: dict[str, torch.Tensor]
    strategy_state: dict[str, Any]
    history: list[dict[str, Any]]
    settings: dict[str, Any]


def _split(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items() if isinstance(v, torch.Tensor)}
    rest = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    return tensors, rest


def save(
    directory: str | Path,
    *,
    server_round: int,
    parameters: dict[str, torch.Tensor],
    strategy_state: dict[str, Any],
    history: list[dict[str, Any]],
    settings: dict[str, Any],
) -> Path:
    """Write round ``server_round``'s checkpoint; return the path of its ``state.json``."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    model_file, strategy_file = f"model-{server_round:05d}.safetensors", f"strategy-{server_round:05d}.safetensors"
    save_file({k: v.detach().contiguous().clone() for k, v in parameters.items()}, str(folder / model_file))
    tensors, rest = _split(strategy_state)
    save_file(tensors, str(folder / strategy_file))
    state = {
        "format": FORMAT,
        "round": server_round,
        "model": model_file,
        "strategy": strategy_file,
        "strategy_state": rest,
        "history": history,
        "settings": settings,
    }
    tmp = folder / f".{STATE}.tmp"
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, folder / STATE)  # the round is saved from here on
    for old in folder.glob("*.safetensors"):
        if old.name not in (model_file, strategy_file):
            old.unlink(missing_ok=True)
    return folder / STATE


def load(directory: str | Path) -> Checkpoint | None:
    """The checkpoint in ``directory``, or None if it has none."""
    folder = Path(directory)
    path = folder / STATE
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
        if state.get("format") != FORMAT:
            raise CheckpointError(f"{path} has format {state.get('format')!r}, this version reads {FORMAT}")
        parameters = load_file(str(folder / state["model"]))
        strategy_state = {**load_file(str(folder / state["strategy"])), **state["strategy_state"]}
        return Checkpoint(
            round=int(state["round"]),
            parameters=parameters,
            strategy_state=strategy_state,
            history=list(state["history"]),
            settings=dict(state["settings"]),
        )
    except (OSError, KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"cannot read the checkpoint in {folder}: {exc}") from exc
