"""Turning the paths a user gives into a list of image files.

An input is one of:
  - a file (used whatever its extension);
  - a folder, searched recursively for image extensions (hidden entries skipped);
  - a glob pattern (`photos/**/*.jpg`; `**` spans folders);
  - `@LIST`: a text file listing inputs, one per line (files, folders or globs; blank
    lines and lines starting with `#` ignored; relative paths are relative to the list
    file's folder);
  - a `.csv` file with a `path` column (a labelled dataset, see `datasets.py`): the
    images it lists, relative to the CSV's folder.
"""
from __future__ import annotations

import csv
import glob
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .images import IMAGE_EXTENSIONS


@dataclass(frozen=True)
class Failure:
    """An input that could not be used, and why."""

    path: str
    reason: str


def expand_inputs(items: Iterable[str | os.PathLike] | str | os.PathLike) -> tuple[list[Path], list[Failure]]:
    """Files, folders, globs, `@LIST` files and CSV datasets -> image files.

    Returns the files in a stable order (folders and glob matches sorted, duplicates
    dropped) and the inputs that matched nothing. A file named explicitly (in the
    arguments, a list or a CSV) is used whatever its extension, so that a non-image
    is reported rather than skipped.
    """
    if isinstance(items, (str, os.PathLike)):
        items = [items]
    files: list[Path] = []
    failures: list[Failure] = []
    seen: set[Path] = set()

    def add(p: Path) -> None:
        key = Path(os.path.abspath(p))
        if key not in seen:
            seen.add(key)
            files.append(p)

    def expand(text: str, base: Path | None, from_list: bool) -> None:
        path = Path(text).expanduser()
        if base is not None and not path.is_absolute():
            path = base / path
            text = os.fspath(path)
        if text.startswith("@") and not from_list and not path.exists():
            _expand_list(Path(text[1:]).expanduser(), expand, failures)
        elif path.is_dir():
            found = sorted(find_images(path))
            if not found:
                failures.append(Failure(text, "folder holds no image files (" +
                                        ", ".join(sorted(IMAGE_EXTENSIONS)) + ")"))
            for p in found:
                add(p)
        elif path.is_file() and path.suffix.lower() == ".csv" and not from_list:
            _expand_csv(path, add, failures)
        elif path.is_file():
            add(path)
        elif glob.has_magic(text):
            matches = [Path(m) for m in sorted(glob.glob(text, recursive=True))]
            matches = [m for m in matches if m.is_file()]
            if not matches:
                failures.append(Failure(text, "pattern matches no files"))
            for p in matches:
                add(p)
        else:
            failures.append(Failure(text, "no such file or directory; check the path"))

    for item in items:
        expand(os.path.expanduser(os.fspath(item)), None, False)
    return files, failures


def find_images(folder: Path) -> Iterable[Path]:
    """Image files below `folder` at any depth (unsorted), skipping hidden files and folders."""
    for root, dirs, names in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # .git, .ipynb_checkpoints, ...
        for name in names:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                yield Path(root) / name


def _expand_list(list_file: Path, expand, failures: list[Failure]) -> None:
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        failures.append(Failure(f"@{list_file}", "list file not found; check the path after '@'"))
        return
    except (OSError, UnicodeDecodeError) as e:
        failures.append(Failure(f"@{list_file}", f"cannot read the list file ({e})"))
        return
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            expand(line, list_file.parent, True)


def _expand_csv(csv_file: Path, add, failures: list[Failure]) -> None:
    try:
        rows = read_csv_samples(csv_file, require_label=False)
    except InputError as e:
        failures.append(Failure(str(csv_file), str(e)))
        return
    for path, _ in rows:
        if path.is_file():
            add(path)
        else:
            failures.append(Failure(str(path), f"no such file (listed in {csv_file.name}); check the path"))


def read_csv_samples(csv_file: str | os.PathLike, *, root: str | os.PathLike | None = None,
                     require_label: bool = True) -> list[tuple[Path, str | None]]:
    """The `(path, label)` rows of a CSV with a header naming `path` (and `label`) columns."""
    csv_file = Path(csv_file).expanduser()
    base = Path(root).expanduser() if root is not None else csv_file.parent
    try:
        with open(csv_file, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheet exports add a BOM
            reader = csv.DictReader(f)
            columns = {(name or "").strip().lower(): name for name in (reader.fieldnames or [])}
            wanted = ("path", "label") if require_label else ("path",)
            missing = [c for c in wanted if c not in columns]
            if missing:
                raise InputError(f"{csv_file}: no {' or '.join(repr(c) for c in missing)} column; the first row "
                                 f"must be a header such as 'path,label'")
            rows = []
            for line, row in enumerate(reader, start=2):
                path = (row.get(columns["path"]) or "").strip()
                label = (row.get(columns["label"]) or "").strip() if "label" in columns else None
                if not path:
                    raise InputError(f"{csv_file}, line {line}: empty path")
                if require_label and not label:
                    raise InputError(f"{csv_file}, line {line}: empty label for {path}")
                p = Path(path).expanduser()
                rows.append((p if p.is_absolute() else base / p, label))
    except FileNotFoundError:
        raise InputError(f"{csv_file}: no such file; check the path") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"{csv_file}: cannot read the CSV ({e})") from None
    if not rows:
        raise InputError(f"{csv_file}: no rows below the header")
    return rows
