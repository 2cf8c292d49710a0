"""Files a run writes: atomically (a crash never leaves a partial file under the final name), with the
user's umask, owned by one run at a time (`exclusive`); content digests.

An output is owned through a lock file next to it (`.NAME.lock`), locked with `fcntl` and holding
the owner's pid, host, command and start time. The kernel releases the lock when its process
ends, however it ends, so a lock file whose lock is free is stale: the next run takes it over
(and removes the temporary files the dead run left, `.NAME.*.part`). A second run on a locked
output is refused with an `OutputBusyError` naming the running one, or waits for it (`wait=True`).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import logging
import os
import shlex
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import OutputBusyError

log = logging.getLogger("visionzoo")
_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask (read from /proc where the kernel offers it; else set and restored)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def apply_umask(path: str | os.PathLike, mode: int | None = None) -> None:
    """Give a file or folder made by `tempfile` (0600 / 0700) the permissions a plain `open` or
    `mkdir` would have given it: 0666 (folders 0777) less the umask."""
    if mode is None:
        mode = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, mode & ~current_umask())


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `final`; on success rename it to `final` (atomic on
    POSIX) with the permissions the umask gives new files, on error delete it. Readers see
    the old file or the complete new one."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            apply_umask(tmp_path)
        os.replace(tmp_path, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def leftovers(final: str | os.PathLike) -> list[Path]:
    """The temporary files and folders a killed writer of `final` left next to it: `atomic_path`'s
    `.NAME.*.part`, a bundle's `.NAME.*.part/` and `.NAME.old-*/`."""
    final = Path(final)
    name = glob.escape(final.name)
    found = [*final.parent.glob(f".{name}.*.part"), *final.parent.glob(f".{name}.old-*")]
    return sorted(p for p in found if p.name != f".{final.name}.lock")


def remove_leftovers(final: str | os.PathLike) -> list[Path]:
    """Delete `leftovers(final)`; only safe while holding `exclusive(final)` (no live writer then)."""
    removed = []
    for p in leftovers(final):
        with contextlib.suppress(FileNotFoundError):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
    if removed:
        log.info("removed %d temporary file(s) of an interrupted run: %s", len(removed), removed[0])
    return removed


# -- one run per output -------------------------------------------------------------------------

@dataclass(frozen=True)
class LockOwner:
    """Who holds an output's lock, as its lock file records it."""

    pid: int
    host: str
    command: str
    started: str

    def describe(self) -> str:
        where = "" if self.host == socket.gethostname() else f" on {self.host}"
        return f"pid {self.pid}{where}, started {self.started}: {self.command}"

    @classmethod
    def me(cls) -> LockOwner:
        argv = [os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python", *sys.argv[1:]]
        return cls(os.getpid(), socket.gethostname(), shlex.join(argv)[:500],
                   time.strftime("%Y-%m-%d %H:%M:%S"))

    @classmethod
    def read(cls, fd: int) -> LockOwner | None:
        try:
            record = json.loads(os.pread(fd, 4096, 0))
            return cls(int(record["pid"]), str(record["host"]), str(record["command"]), str(record["started"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None


_GUARDS: dict[str, threading.RLock] = {}  # lock file -> the guard of the threads of this process
_DEPTH: dict[str, int] = {}  # lock file -> how many nested `exclusive` blocks of its owning thread
_GUARDS_LOCK = threading.Lock()


def lock_path(target: str | os.PathLike) -> Path:
    target = Path(target).expanduser()
    return target.parent / f".{target.name}.lock"


@contextlib.contextmanager
def exclusive(target: str | os.PathLike, *, wait: bool = False) -> Iterator[Path]:
    """Own `target` (a file or folder a run writes) until the block ends: a concurrent run on the
    same target gets an `OutputBusyError` naming this one, or with `wait=True` blocks until this
    one ends. A lock left by a process that died is taken over, and the temporary files it left
    are removed. Re-entrant within a thread (a task that locks its output can call another).

    Yields the lock file (`.NAME.lock` next to `target`; removed when the block ends). Do not
    open that file otherwise in the owning process: closing any descriptor of it would release
    the process's lock (POSIX record locks belong to the process, not to the descriptor)."""
    path = lock_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(path)
    with _GUARDS_LOCK:
        guard = _GUARDS.setdefault(key, threading.RLock())
    # threads of one process share its record locks: they take turns on this guard instead
    if not guard.acquire(blocking=wait):
        raise OutputBusyError(f"{target} is being written by another thread of this process; wait for it to "
                              f"finish or choose another output")
    try:
        depth = _DEPTH.get(key, 0)
        _DEPTH[key] = depth + 1
        try:
            if depth:
                yield path
            else:
                with _locked_file(path, Path(target), wait):
                    yield path
        finally:
            _DEPTH[key] = depth
    finally:
        guard.release()


@contextlib.contextmanager
def _locked_file(path: Path, target: Path, wait: bool) -> Iterator[None]:
    fd = _acquire(path, target, wait)
    try:
        previous = LockOwner.read(fd)
        if previous is not None and (previous.pid, previous.host) != (os.getpid(), socket.gethostname()):
            log.warning("%s: taking over the lock of a run that is no longer running (%s)", target,
                        previous.describe())
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(asdict(LockOwner.me())).encode(), 0)
        remove_leftovers(target)
        yield
    finally:
        # removed while still locked: a run waiting on this file finds it gone and starts over
        with contextlib.suppress(OSError):
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                path.unlink()
        os.close(fd)  # releases the lock


def _acquire(path: Path, target: Path, wait: bool) -> int:
    """An open, locked descriptor of the lock file at `path` (the file there now, not one that a
    finishing run has just removed)."""
    announced = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            try:
                _lock(fd, blocking=False)
            except BlockingIOError:
                owner = LockOwner.read(fd)
                running = owner.describe() if owner else "starting"
                if not wait:
                    raise OutputBusyError(f"{target} is being written by another visionzoo run ({running}); wait "
                                          f"for it to finish, pass --wait (wait=True), or choose another "
                                          f"output") from None
                if not announced:
                    log.warning("%s is being written by another run (%s); waiting for it to finish", target,
                                running)
                    announced = True
                _lock(fd, blocking=True)
            try:
                if os.path.samestat(os.fstat(fd), os.stat(path)):
                    return fd
            except FileNotFoundError:
                pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # locked a file that its owner removed on finishing: lock the new one


def _lock(fd: int, *, blocking: bool) -> None:
    """An exclusive POSIX record lock: held per process (forked workers do not inherit it) and
    released by the kernel when the process ends. Raises BlockingIOError when another holds it."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EAGAIN):
            raise BlockingIOError(e.errno, "locked") from None
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    # a file system without locks: trust the record, whose process may still be running
    while _owner_alive(fd):
        if not blocking:
            raise BlockingIOError(errno.EAGAIN, "locked")
        time.sleep(0.5)


def _owner_alive(fd: int) -> bool:
    owner = LockOwner.read(fd)
    if owner is None or owner.host != socket.gethostname() or owner.pid == os.getpid():
        return False
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        pass
    return True


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
