"""Getting a published weights file onto disk, safely: download, verify, cache, lock.

- **Cache**: torch's hub cache, `$TORCH_HOME/hub/checkpoints/<file>` (see `hub.cache_dir`),
  so files torchvision already downloaded are reused.
- **Download**: streamed to a temporary file next to the target and renamed only once
  complete and verified against the SHA-256 prefix of the record, so a crash, a dropped
  connection or wrong content never leaves a file under the final name.
- **Retries**: transient failures (HTTP 5xx/408/429, dropped or refused connections,
  stalls) are retried with exponential backoff; a server that sends nothing for
  `timeout` seconds counts as stalled.
- **Lock**: one `fcntl.flock` lock file per target (`.<file>.lock`), so concurrent
  processes (DDP ranks, parallel jobs) download once and all get the file.
- **Verification of cached files**: hashing a multi-GB file on every load would cost
  seconds, so a file is hashed once and the result remembered in a small sidecar
  (`.<file>.sha256`) keyed by the file's size, mtime and inode; a file that changes
  (replaced, truncated, rewritten) is hashed again. A cached file with the wrong hash is
  never loaded: it is downloaded again (or, offline, reported).
- **Offline and mirrors**: `VISIONZOO_OFFLINE=1` never touches the network and says
  which file to put where; `VISIONZOO_MIRROR=<base URL>` fetches `<base>/<file name>`
  instead of the published URL (also `file:///dir`).
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import logging
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from ..errors import WeightsUnavailableError
from ..fileutil import atomic_path

log = logging.getLogger("visionzoo")

CHUNK = 1 << 20
ENV_OFFLINE = "VISIONZOO_OFFLINE"
ENV_MIRROR = "VISIONZOO_MIRROR"
ENV_TIMEOUT = "VISIONZOO_DOWNLOAD_TIMEOUT"  # seconds without data before a download counts as stalled
ENV_RETRIES = "VISIONZOO_DOWNLOAD_RETRIES"  # extra attempts after a transient failure
DEFAULT_TIMEOUT = 30.0
DEFAULT_RETRIES = 3
BACKOFF = 1.0  # seconds before the first retry; doubles each time
_TRUE = ("1", "true", "yes", "on")


class DownloadError(WeightsUnavailableError):
    """A download that failed for good (after retries, or a permanent HTTP error)."""


class IntegrityError(WeightsUnavailableError):
    """A file whose SHA-256 does not start with the published prefix."""


class _Transient(Exception):
    """A failure worth retrying; `reason` is the one-line cause."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# -- settings ------------------------------------------------------------------------------
def is_offline() -> bool:
    """True when `VISIONZOO_OFFLINE` is set (the CLI's `--offline` sets it)."""
    return os.environ.get(ENV_OFFLINE, "").strip().lower() in _TRUE


def mirror_url(url: str | None, file_name: str) -> str | None:
    """`<VISIONZOO_MIRROR>/<file_name>` when a mirror is configured, else `url`."""
    base = os.environ.get(ENV_MIRROR, "").strip()
    if not base:
        return url
    if "://" not in base:  # a plain directory (NFS share, USB disk)
        base = Path(base).expanduser().resolve().as_uri()
    return f"{base.rstrip('/')}/{file_name}"


def _env_number(name: str, default: float, kind=float):
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise WeightsUnavailableError(f"{name}={raw!r} is not a number; set it to e.g. {default}") from None
    if value < 0:
        raise WeightsUnavailableError(f"{name}={raw!r} must be >= 0")
    return value


def default_timeout() -> float:
    return _env_number(ENV_TIMEOUT, DEFAULT_TIMEOUT)


def default_retries() -> int:
    return _env_number(ENV_RETRIES, DEFAULT_RETRIES, int)


# -- the cached file -------------------------------------------------------------------------
def ensure_file(url: str | None, dest: Path, sha256_prefix: str | None, *, name: str | None = None,
                progress: bool = True, timeout: float | None = None, retries: int | None = None,
                reverify: bool = False) -> tuple[Path, str]:
    """Make sure a verified copy of the file is at `dest`; returns `(dest, how)` with `how`
    one of "cached" or "downloaded".

    `name` is what the file is (e.g. `resnet50.IMAGENET1K_V2`), for messages.
    `reverify` hashes a cached file even if its sidecar says it was verified.
    """
    dest = Path(dest)
    what = name or dest.name
    source = mirror_url(url, dest.name)
    if dest.is_file() and _cached_ok(dest, sha256_prefix, force=reverify, offline=is_offline()):
        return dest, "cached"
    if is_offline():
        hint = (f" (published at {url})" if url else "")
        raise WeightsUnavailableError(
            f"offline ({ENV_OFFLINE}=1) and weights {what} are not in the cache: put {dest.name}{hint} "
            f"in {dest.parent}, e.g. after `visionzoo download {what}` on a machine with network")
    if not source:
        raise WeightsUnavailableError(f"weights {what} have no download URL; put {dest.name} in {dest.parent}")
    with file_lock(dest, what):
        # another process may have downloaded it while we waited for the lock
        if dest.is_file() and _cached_ok(dest, sha256_prefix, force=False, offline=False, quiet=True):
            return dest, "cached"
        download(source, dest, sha256_prefix, progress=progress, timeout=timeout, retries=retries)
    return dest, "downloaded"


def _cached_ok(path: Path, prefix: str | None, *, force: bool, offline: bool, quiet: bool = False) -> bool:
    """Whether the cached file has the right hash; a corrupt one is reported (and kept out of
    use) here. Offline, a corrupt file is an error since it cannot be replaced."""
    if not prefix:
        return True
    try:
        actual = file_sha256(path, use_sidecar=not force)
    except OSError as e:  # vanished or unreadable: treat as absent
        log.warning("cannot read cached %s (%s); fetching it again", path, e)
        return False
    if actual.startswith(prefix):
        return True
    message = (f"cached {path} is corrupt: SHA-256 starts with {actual[:len(prefix)]}, expected {prefix}")
    if offline:
        raise IntegrityError(f"{message}; offline ({ENV_OFFLINE}=1) it cannot be downloaded again: "
                             f"replace it with a good copy")
    if not quiet:
        log.warning("%s; downloading it again", message)
    return False


def _sidecar(path: Path) -> Path:
    return path.with_name(f".{path.name}.sha256")


def file_sha256(path: Path, use_sidecar: bool = True) -> str:
    """The file's SHA-256 (hex), from its sidecar when the file has not changed since it was
    hashed, else computed (and remembered)."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        key = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
        if use_sidecar:
            with contextlib.suppress(OSError, ValueError, TypeError):
                saved = json.loads(_sidecar(path).read_text())
                if {k: saved.get(k) for k in key} == key and isinstance(saved.get("sha256"), str):
                    return saved["sha256"]
        if st.st_size > (256 << 20):
            log.info("verifying %s (%.0f MiB) once; the result is remembered", path, st.st_size / 2**20)
        digest = hashlib.sha256()
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    actual = digest.hexdigest()
    _remember(path, actual, key)
    return actual


def _remember(path: Path, sha256: str, key: dict | None = None) -> None:
    if key is None:
        st = path.stat()
        key = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
    try:
        with atomic_path(_sidecar(path)) as tmp:
            tmp.write_text(json.dumps({**key, "sha256": sha256}))
    except OSError as e:  # a read-only cache still works, it just hashes again next time
        log.debug("cannot write %s: %s", _sidecar(path), e)


# -- locking ---------------------------------------------------------------------------------
@contextlib.contextmanager
def file_lock(target: Path, what: str | None = None) -> Iterator[None]:
    """An exclusive inter-process lock on `target` (a `.<name>.lock` file next to it).

    Lock files are left in place: deleting them would let two processes lock different
    files of the same name. Without `fcntl` (Windows) there is no lock: the atomic rename
    still keeps the file whole, processes may just download it twice.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.with_name(f".{target.name}.lock")
    with open(lock_path, "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("waiting for another process to finish downloading %s", what or target.name)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# -- downloading -----------------------------------------------------------------------------
def download(url: str, dest: Path, sha256_prefix: str | None = None, *, progress: bool = True,
             timeout: float | None = None, retries: int | None = None, backoff: float | None = None) -> Path:
    """Stream `url` to `dest` (atomically, verified), retrying transient failures.

    Call it under `file_lock(dest)` when other processes may fetch the same file.
    """
    dest = Path(dest)
    timeout = default_timeout() if timeout is None else timeout
    retries = default_retries() if retries is None else retries
    backoff = BACKOFF if backoff is None else backoff
    attempts = retries + 1
    for attempt in range(1, attempts + 1):
        try:
            _download_once(url, dest, sha256_prefix, progress, timeout)
            return dest
        except _Transient as e:
            if attempt == attempts:
                raise DownloadError(
                    f"cannot download {url}: {e.reason} ({attempts} attempt{'s' if attempts > 1 else ''}); "
                    f"try again later, set {ENV_MIRROR} to a reachable copy, or put {dest.name} in "
                    f"{dest.parent} (e.g. from `visionzoo download` on another machine)") from None
            delay = backoff * 2 ** (attempt - 1)
            log.warning("download of %s failed (%s); retrying in %.1f s (attempt %d of %d)",
                        url, e.reason, delay, attempt + 1, attempts)
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


_TRANSIENT_HTTP = {408, 425, 429}


def _download_once(url: str, dest: Path, prefix: str | None, progress: bool, timeout: float) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": "visionzoo"})
    log.info("downloading %s to %s", url, dest)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp, atomic_path(dest) as tmp:
            total = _content_length(resp)
            digest = hashlib.sha256()
            received = 0
            with open(tmp, "wb") as f, _progress_bar(progress, dest.name, total) as advance:
                while chunk := resp.read(CHUNK):
                    f.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    advance(len(chunk))
            if total is not None and received != total:
                raise _Transient(f"connection closed after {received} of {total} bytes")
            actual = digest.hexdigest()
            if prefix and not actual.startswith(prefix):
                raise IntegrityError(
                    f"download of {url} is corrupt: SHA-256 starts with {actual[:len(prefix)]}, expected "
                    f"{prefix}; the server sent other content (a proxy error page, a changed file): "
                    f"try again, or fetch the file by hand into {dest.parent}")
    except urllib.error.HTTPError as e:
        if e.code >= 500 or e.code in _TRANSIENT_HTTP:
            raise _Transient(f"HTTP {e.code} {e.reason}") from None
        raise DownloadError(f"cannot download {url}: HTTP {e.code} {e.reason}; check the URL"
                            f"{' and ' + ENV_MIRROR if os.environ.get(ENV_MIRROR) else ''}") from None
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, (TimeoutError, socket.timeout)):
            raise _Transient(f"no response within {timeout:g} s (timeout)") from None
        if isinstance(reason, socket.gaierror):  # no DNS: no network, retrying will not help
            raise DownloadError(
                f"cannot download {url}: host not found ({reason}); without network set {ENV_OFFLINE}=1 "
                f"and put {dest.name} in {dest.parent}, or set {ENV_MIRROR}") from None
        if isinstance(reason, FileNotFoundError):  # file:// mirror without the file
            raise DownloadError(f"cannot download {url}: no such file; put {dest.name} in the mirror") from None
        raise _Transient(str(reason)) from None
    except TimeoutError:
        raise _Transient(f"stalled: no data for {timeout:g} s (timeout; raise {ENV_TIMEOUT} for slow links)"
                         ) from None
    except (http.client.IncompleteRead, http.client.RemoteDisconnected, ConnectionError) as e:
        raise _Transient(f"connection lost ({type(e).__name__})") from None
    except http.client.HTTPException as e:
        raise _Transient(f"bad HTTP response ({type(e).__name__}: {e})") from None
    except OSError as e:  # writing the file: disk full, permissions
        raise DownloadError(f"cannot download {url} to {dest}: {e}") from None
    _remember(dest, actual)


def _content_length(resp) -> int | None:
    value = resp.headers.get("Content-Length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


@contextlib.contextmanager
def _progress_bar(enabled: bool, label: str, total: int | None):
    """Yields `advance(n)`; a rich progress bar on stderr when enabled."""
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(f"downloading {label}", total=total)
        yield lambda n: bar.advance(task, n)
