"""Turning the paths a user gives (files, folders, globs) into a list of image files."""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

from .images import IMAGE_EXTENSIONS


@dataclass(frozen=True)
class Failure:
    """An input that could not be used, and why."""

    path: str
    reason: str


def expand_inputs(items: list[str | os.PathLike]) -> tuple[list[Path], list[Failure]]:
    """Files, folders (recursively, image extensions only) and glob patterns -> files.

    Returns the files in a stable order (folders sorted) and the inputs that matched
    nothing. A file named explicitly is used whatever its extension.
    """
    files: list[Path] = []
    failures: list[Failure] = []
    seen: set[Path] = set()

    def add(p: Path) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            files.append(p)

    for item in items:
        text = os.fspath(item)
        path = Path(text).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                failures.append(Failure(text, "folder holds no image files (" +
                                        ", ".join(sorted(IMAGE_EXTENSIONS)) + ")"))
            for p in found:
                add(p)
        elif path.is_file():
            add(path)
        elif glob.has_magic(text):
            matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(text), recursive=True))
            matches = [m for m in matches if m.is_file()]
            if not matches:
                failures.append(Failure(text, "pattern matches no files"))
            for p in matches:
                add(p)
        else:
            failures.append(Failure(text, "no such file or directory; check the path"))
    return files, failures
