"""Per-epoch checkpoints of a training run, written atomically, read without running code.

A run folder holds:
    checkpoint.pt       after every epoch: model, optimizer, scheduler, RNG states, epoch,
                        history, best epoch so far, configuration and class names
                        and the weights of the best epoch so far (by validation accuracy)
    features.pt         linear strategy: the cached features (computed once, reused on resume)
    history.json        the per-epoch metrics, for reading while the run goes on
    bundle/             the result, when the run is done
"""
from __future__ import annotations

import json
import pickle
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from ..errors import TrainingError
from ..fileutil import atomic_path

CHECKPOINT = "checkpoint.pt"
FEATURES = "features.pt"
HISTORY = "history.json"
CHECKPOINT_VERSION = 1


@dataclass
class RunState:
    """What the loop carries from epoch to epoch (and a checkpoint restores)."""

    epoch: int = 0  # epochs completed
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None
    best_acc: float = -1.0
    best_loss: float = float("inf")
    stopped_early: bool = False


def rng_states() -> dict[str, Any]:
    """The RNG states, as types `torch.load(weights_only=True)` accepts."""
    # the legacy (default) form: a tuple, not a dict
    np_state = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    states = {"torch": torch.get_rng_state(), "python": random.getstate(),
              "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                        int(np_state[3]), float(np_state[4])]}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(_tuples(states["python"]))
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_checkpoint(run_dir: Path, *, model: torch.nn.Module, optimizer, scheduler, state: RunState,
                    best_model: dict[str, torch.Tensor] | None, meta: dict[str, Any]) -> None:
    """One file with everything, so that what it says is always consistent (the best weights
    match the best epoch it names)."""
    payload = {
        "version": CHECKPOINT_VERSION, "epoch": state.epoch, "model": model.state_dict(), "best_model": best_model,
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_states(),
        "state": {"history": state.history, "best_epoch": state.best_epoch, "best_acc": state.best_acc,
                  "best_loss": state.best_loss, "stopped_early": state.stopped_early},
        "meta": meta,
    }
    with atomic_path(run_dir / CHECKPOINT) as tmp:
        torch.save(payload, tmp)
    with atomic_path(run_dir / HISTORY) as tmp:
        tmp.write_text(json.dumps(state.history, indent=1) + "\n")


def load_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The last checkpoint of the run in `run_dir`, or None when there is none."""
    path = run_dir / CHECKPOINT
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise TrainingError(f"{path} cannot be read ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                            f"delete it to start the run again") from None
    if not isinstance(payload, dict) or payload.get("version") != CHECKPOINT_VERSION:
        raise TrainingError(f"{path} is not a visionzoo checkpoint of this version; delete it to start again")
    return payload


def restore(payload: dict[str, Any], *, model: torch.nn.Module, optimizer, scheduler) -> RunState:
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    set_rng_states(payload["rng"])
    s = payload["state"]
    return RunState(epoch=int(payload["epoch"]), history=list(s["history"]), best_epoch=s["best_epoch"],
                    best_acc=float(s["best_acc"]), best_loss=float(s["best_loss"]),
                    stopped_early=bool(s["stopped_early"]))
