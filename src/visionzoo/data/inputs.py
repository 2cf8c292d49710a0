"""Turning the paths a user gives into a list of image (or video) files.

An input is one of:
  - a file (used whatever its extension);
  - a folder, searched recursively for image extensions (hidden entries skipped), or video
    extensions for a video model (`kinds`); a folder that mixes images and videos is refused
    unless the model takes both;
  - a glob pattern (`photos/**/*.jpg`; `**` spans folders);
  - `@LIST`: a text file listing inputs, one per line (files, folders or globs; blank
    lines and lines starting with `#` ignored; relative paths are relative to the list
    file's folder);
  - a `.csv` file with a `path` column (a labelled dataset, see `datasets.py`): the
    images it lists, relative to the CSV's folder.

Folder searches (and `**` in globs) follow symbolic links to folders, each folder once (by
device and inode): a link back to a folder on the way down (a loop, such as `sub/up -> ..`)
is reported as a failure and not entered, and a second link to a folder already searched is
skipped, so that every image is found once and every search ends.
"""
from __future__ import annotations

import csv
import fnmatch
import glob
import logging
import os
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .images import IMAGE_EXTENSIONS
from .video import VIDEO_EXTENSIONS

# the kinds of media file a folder is searched for, by extension
MEDIA_EXTENSIONS = {"image": IMAGE_EXTENSIONS, "video": VIDEO_EXTENSIONS}
ALL_MEDIA = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS

log = logging.getLogger("visionzoo")
FolderKey = tuple[int, int]  # (device, inode): a folder, whatever the links that lead to it


@dataclass(frozen=True)
class Failure:
    """An input that could not be used, and why."""

    path: str
    reason: str


def expand_inputs(items: Iterable[str | os.PathLike] | str | os.PathLike, *,
                  kinds: Iterable[str] = ("image",)) -> tuple[list[Path], list[Failure]]:
    """Files, folders, globs, `@LIST` files and CSV datasets -> image files (or the `kinds` of media
    file the model takes: "image", "video").

    Returns the files in a stable order (folders and glob matches sorted, duplicates
    dropped) and the inputs that matched nothing. A file named explicitly (in the
    arguments, a list or a CSV) is used whatever its extension, so that a non-image
    is reported rather than skipped.
    """
    if isinstance(items, (str, os.PathLike)):
        items = [items]
    kinds = tuple(kinds)
    extensions = frozenset().union(*(MEDIA_EXTENSIONS[k] for k in kinds))
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
            media = sorted(find_images(path, failures, ALL_MEDIA))  # one walk: the model's files and any others
            found = [p for p in media if p.suffix.lower() in extensions]
            _check_other_media(path, kinds, found, [p for p in media if p.suffix.lower() not in extensions])
            if not found:
                failures.append(Failure(text, f"folder holds no {' or '.join(kinds)} files (" +
                                        ", ".join(sorted(extensions)) + ")"))
            for p in found:
                add(p)
        elif path.is_file() and path.suffix.lower() == ".csv" and not from_list:
            _expand_csv(path, add, failures)
        elif path.is_file():
            add(path)
        elif glob.has_magic(text):
            matches = sorted(glob_paths(text, failures))
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


def find_images(folder: Path, loops: list[Failure] | None = None,
                extensions: frozenset[str] = IMAGE_EXTENSIONS) -> Iterator[Path]:
    """Image files (or files with other `extensions`) below `folder` at any depth (unsorted),
    skipping hidden files and folders.

    Symbolic links to folders are followed, each folder once; a link that loops back is not
    entered and becomes a `Failure` in `loops` (logged when `loops` is None)."""
    for entry in _walk(Path(folder), loops):
        if not entry.is_dir() and os.path.splitext(entry.name)[1].lower() in extensions:
            yield Path(entry.path)


def _walk(top: Path, loops: list[Failure] | None) -> Iterator[os.DirEntry]:
    """The non-hidden entries below `top`, each folder entered once: the real folders first (so that
    a folder is found under its own path), then the folders that only links lead to."""
    key = _folder_key(top)
    if key is None:
        return
    seen = {key}
    folders: list[tuple[Path, dict[FolderKey, Path]]] = [(top, {key: top})]  # to list, with their ancestors
    links: deque[tuple[os.DirEntry, FolderKey, dict[FolderKey, Path]]] = deque()
    while folders or links:
        if not folders:
            entry, sub, ancestors = links.popleft()
            if sub in ancestors:
                _loop(entry, ancestors[sub], loops)
            elif sub not in seen:  # else: searched already, under another path
                seen.add(sub)
                yield entry
                folders.append((Path(entry.path), {**ancestors, sub: Path(entry.path)}))
            continue
        folder, ancestors = folders.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
        except OSError:  # unreadable or vanished: as os.walk, skip it
            continue
        below = []
        for entry in entries:
            inner = _entry_folder_key(entry)
            if inner is None:
                yield entry
            elif entry.is_symlink():
                links.append((entry, inner, ancestors))
            elif inner not in seen:
                seen.add(inner)
                yield entry
                below.append((Path(entry.path), {**ancestors, inner: Path(entry.path)}))
        folders.extend(reversed(below))


def _folder_key(path: Path) -> FolderKey | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _entry_folder_key(entry: os.DirEntry) -> FolderKey | None:
    """The folder an entry is or links to; None for anything else (or a broken link)."""
    try:
        if not entry.is_dir():
            return None
        st = entry.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _loop(entry: os.DirEntry, ancestor: Path, loops: list[Failure] | None) -> None:
    failure = Failure(entry.path, f"symbolic link loop (it leads back to {ancestor}); not followed")
    if loops is None:
        log.warning("%s: %s", failure.path, failure.reason)
    else:
        loops.append(failure)


def glob_paths(pattern: str, loops: list[Failure] | None = None) -> Iterator[Path]:
    """The files matching a glob `pattern` (`**` spans folders, as `glob.glob(recursive=True)`),
    with `**` following each symbolic link to a folder once, as folder searches do."""
    if "**" not in pattern:
        yield from (Path(m) for m in glob.glob(pattern) if os.path.isfile(m))
        return
    parts = Path(pattern).parts
    fixed = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts))
    found: set[Path] = set()
    looped: list[Failure] = []
    for path in _match(Path(*parts[:fixed]), parts[fixed:], looped):
        if path not in found and path.is_file():
            found.add(path)
            yield path
    for failure in {f.path: f for f in looped}.values():  # a loop met by several `**` walks, once
        if loops is None:
            log.warning("%s: %s", failure.path, failure.reason)
        else:
            loops.append(failure)


def _match(folder: Path, parts: tuple[str, ...], loops: list[Failure]) -> Iterator[Path]:
    """The paths below `folder` that match the pattern components `parts`."""
    if not parts:
        yield folder
        return
    head, rest = parts[0], parts[1:]
    if head == "**":
        # zero folders, then everything below (each folder once, loops reported) matched against the rest
        yield from _match(folder, rest, loops)
        for entry in _walk(folder, loops):
            if not rest:
                yield Path(entry.path)
            elif entry.is_dir():
                yield from _match(Path(entry.path), rest, loops)
        return
    if not glob.has_magic(head):
        yield from _match(folder / head, rest, loops)
        return
    try:
        with os.scandir(folder) as it:
            names = sorted(e.name for e in it)
    except OSError:
        return
    hidden_ok = head.startswith(".")
    for name in fnmatch.filter(names, head):
        if hidden_ok or not name.startswith("."):
            yield from _match(folder / name, rest, loops)


def _check_other_media(folder: Path, kinds: tuple[str, ...], own: list[Path], others: list[Path]) -> None:
    """A folder holding both files the model takes and media of another kind is refused: which ones
    did the user mean? (The message names no model: `predict` reads folders before it opens one.)"""
    if not (own and others):
        return
    kind = next(k for k, ext in MEDIA_EXTENSIONS.items() if others[0].suffix.lower() in ext)
    counts = sorted([(" and ".join(kinds), own), (kind, others)])
    listed = " and ".join(f"{name} files ({len(paths)}, e.g. {paths[0].name})" for name, paths in counts)
    raise InputError(f"{folder} mixes {listed}; a model takes one kind (an image model the images, a video model "
                     f"the videos): put them in separate folders")


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
