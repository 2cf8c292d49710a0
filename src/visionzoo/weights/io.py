"""Safe loading and saving of state dicts (PyTorch checkpoints and safetensors).

Checkpoints are read with `torch.load(weights_only=True)`: tensors and plain
containers only, never arbitrary pickled objects, so a file cannot run code on load.
Both formats are memory-mapped: tensors are views of the file's pages, read when first
touched, so loading costs no second copy of the weights (see `weights/lean.py`;
safetensors tensors that are not 64-byte aligned are read into aligned memory instead,
see `safetensors_file.py`).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..fileutil import atomic_path
from . import safetensors_file

SAFETENSORS_SUFFIXES = (".safetensors",)
FORMAT_SAFETENSORS = "safetensors"
FORMAT_TORCH_ZIP = "torch zip"  # torch.save's format since PyTorch 1.6 (memory-mappable)
FORMAT_TORCH_LEGACY = "torch legacy pickle"  # older torch.save files and raw pickles
FORMAT_UNKNOWN = "unknown"
# Harmless classes found in training checkpoints (timm's train.py saves its argparse
# arguments): allowed by the weights-only unpickler, which builds them without running code.
SAFE_GLOBALS = (argparse.Namespace,)


def checkpoint_format(path: str | os.PathLike) -> str:
    """The file's format, from its first bytes: safetensors, torch zip or legacy pickle."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(9)
    if zipfile.is_zipfile(path):
        return FORMAT_TORCH_ZIP
    if len(head) == 9 and head[8:9] == b"{":
        return FORMAT_SAFETENSORS
    if head[:1] == b"\x80":  # pickle protocol 2+ opcode
        return FORMAT_TORCH_LEGACY
    return FORMAT_SAFETENSORS if path.suffix in SAFETENSORS_SUFFIXES else FORMAT_UNKNOWN


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
        try:
            return safetensors_file.read(path)[0]
        except (safetensors_file.SafetensorsError, OSError, RuntimeError, MemoryError) as e:
            raise CheckpointError(f"checkpoint {path} is not a valid safetensors file ({e}); "
                                  f"save it again") from None
    allow = getattr(torch.serialization, "safe_globals", None)
    try:
        with allow(list(SAFE_GLOBALS)) if allow else contextlib.nullcontext():
            if checkpoint_format(path) != FORMAT_TORCH_ZIP:
                # files in the legacy (pre-zip) format cannot be memory-mapped
                return torch.load(path, map_location="cpu", weights_only=True)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"checkpoint {path} contains Python objects that would run code when loaded; refused. "
            f"Load it once in a trusted session and re-save `model.state_dict()` (or safetensors) "
            f"[{str(e).splitlines()[0]}]") from None
    except Exception as e:  # noqa: BLE001 - any failure to parse means a bad file
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"checkpoint {path} cannot be read ({reason}); "
                              f"it may be truncated or not a PyTorch file: download or save it again") from None


@dataclass(frozen=True)
class Checkpoint:
    """A state dict read from a file, with how it was stored."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    format: str  # one of the FORMAT_* names
    wrapper: tuple[str, ...] = ()  # keys unwrapped to reach the state dict, outermost first


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint: its flat {name: tensor} state dict, format and wrapper keys.

    Common wrappers (`{"state_dict": ...}` from Lightning and timm's training script,
    `{"model": ...}`) are unwrapped.
    """
    path = Path(path)
    obj = load_file(path)
    obj, wrapper = _unwrap(obj)
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"checkpoint {path} holds no state dict (found {type(obj).__name__}); "
                              f"save `model.state_dict()` instead")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"checkpoint {path} is not a flat state dict: {bad[0]!r} is a "
                              f"{type(obj[bad[0]]).__name__}, not a tensor")
    return Checkpoint(path, dict(obj), checkpoint_format(path), wrapper)


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint and return its flat {name: tensor} state dict (see `read_checkpoint`)."""
    return read_checkpoint(path).state_dict


WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module", "state_dict_ema", "model_ema")


def _unwrap(obj: object) -> tuple[object, tuple[str, ...]]:
    path: list[str] = []
    while isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        key = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        obj = obj[key]
        path.append(key)
    return obj, tuple(path)


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike,
                    metadata: Mapping[str, str] | None = None) -> Path:
    """Write a state dict atomically: safetensors for `.safetensors`, else torch.save."""
    path = Path(path)
    tensors = {k: _standalone(v) for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        if path.suffix in SAFETENSORS_SUFFIXES:
            safetensors_file.write(tensors, tmp, metadata)
        else:
            torch.save(tensors, tmp)
    return path


def _standalone(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor owning exactly its storage. Tensors loaded from a mapped
    file can be views of one shared storage (safetensors), which safetensors refuses to
    save and torch.save would write whole."""
    t = t.detach().cpu().contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size() or t.storage_offset():
        t = t.clone()
    return t
