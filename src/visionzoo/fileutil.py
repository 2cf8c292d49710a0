"""Writing files so that a crash never leaves a partial file under the final name; content digests."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `final`; on success rename it to `final` (atomic on
    POSIX), on error delete it. Readers see the old file or the complete new one."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The SHA-256 (hex) of a file's bytes, read in chunks (any size, little memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def json_digest(value: object, length: int | None = None) -> str:
    """SHA-256 (hex, optionally truncated) of `value` as canonical JSON: keys of caches and runs."""
    digest = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
    return digest[:length] if length else digest


def weights_fingerprint(net: torch.nn.Module) -> str:
    """A digest of every parameter and buffer (names, dtypes, shapes, values): an in-memory model
    can have changed since a cached result was made, even under the same name."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in net.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()
