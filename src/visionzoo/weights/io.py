"""Safe loading and saving of state dicts (PyTorch checkpoints and safetensors).

Checkpoints are read with `torch.load(weights_only=True)`: tensors and plain
containers only, never arbitrary pickled objects, so a file cannot run code on load.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..fileutil import atomic_path

SAFETENSORS_SUFFIXES = (".safetensors",)


def is_safetensors(path: Path) -> bool:
    if path.suffix in SAFETENSORS_SUFFIXES:
        return True
    # safetensors files start with an 8-byte little-endian header length, then '{'
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and not zipfile.is_zipfile(path)


def load_file(path: str | os.PathLike) -> object:
    """Read a checkpoint file (tensors and plain containers) without running any code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}; check the path")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); download or save it again")
    if is_safetensors(path):
        from safetensors.torch import load_file as load_safetensors

        try:
            return load_safetensors(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"checkpoint {path} is not a valid safetensors file ({e}); "
                                  f"save it again") from None
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # files in the legacy (pre-zip) format cannot be memory-mapped
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"checkpoint {path} contains Python objects that would run code when loaded; refused. "
            f"Load it once in a trusted session and re-save `model.state_dict()` (or safetensors) "
            f"[{str(e).splitlines()[0]}]") from None
    except Exception as e:  # noqa: BLE001 - any failure to parse means a bad file
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"checkpoint {path} cannot be read ({reason}); "
                              f"it may be truncated or not a PyTorch file: download or save it again") from None


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint and return its flat {name: tensor} state dict.

    Common wrappers (`{"state_dict": ...}`, `{"model": ...}`) are unwrapped.
    """
    obj = load_file(path)
    obj = unwrap_state_dict(obj)
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"checkpoint {path} holds no state dict (found {type(obj).__name__}); "
                              f"save `model.state_dict()` instead")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"checkpoint {path} is not a flat state dict: {bad[0]!r} is a "
                              f"{type(obj[bad[0]]).__name__}, not a tensor")
    return dict(obj)


WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module", "state_dict_ema", "model_ema")


def unwrap_state_dict(obj: object) -> object:
    """The state dict inside training checkpoints ({"state_dict": ...}, {"model": ...})."""
    while isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    return obj


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike,
                    metadata: Mapping[str, str] | None = None) -> Path:
    """Write a state dict atomically: safetensors for `.safetensors`, else torch.save."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        if path.suffix in SAFETENSORS_SUFFIXES:
            from safetensors.torch import save_file

            save_file(tensors, str(tmp), metadata=dict(metadata) if metadata else None)
        else:
            torch.save(tensors, tmp)
    return path
