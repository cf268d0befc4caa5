"""Where a run's files live: a local directory, or any fsspec URL (gs://bucket/run, memory://run,
file:///abs/run). The trainer writes its config, logs, metrics and checkpoints, and reads them
back to resume, through these functions only, so a run on a preemptible TPU VM can keep everything
in a bucket that outlives the VM's disk.

Reads, listings and removals go through fsspec for both (its local filesystem for plain paths;
Google Cloud Storage needs gcsfs: `pip install -e ".[gcs]"`). Writes differ. A local file is
written to a temporary file, fsynced and renamed over the target. An object store has neither
rename nor append, so a file is written whole to a temporary object next
to the target and then moved over it (GCS replaces an object whole: a reader sees the old one or
the new one, never a torn one), and an appended log is rewritten whole on each flush (train.log
and metrics.jsonl stay well under a megabyte over a full run).

    from storage import join, atomic_write
    atomic_write(join("gs://bucket/run", "checkpoint", "last_checkpoint.pt"), lambda f: torch.save(obj, f))
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


class StorageError(OSError):
    """An output location that cannot be used: an unknown URL scheme, or its package missing."""


def is_url(path: str | Path) -> bool:
    """True for `scheme://...` locations; plain paths are written through the OS."""
    return "://" in str(path)


def _filesystem(path: str | Path) -> tuple[Any, str]:
    """fsspec's filesystem for a URL or a plain path (its local filesystem), and the path within it."""
    import fsspec

    url = str(path)
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as error:  # gs:// without gcsfs, s3:// without s3fs
        raise StorageError(f"{url}: {error} (for gs://: pip install -e \".[gcs]\")") from None
    except ValueError as error:  # an unknown protocol
        raise StorageError(f"{url}: {error}") from None


def join(base: str | Path, *names: str) -> str:
    """`base/name/...`; a URL keeps its `scheme://` (pathlib would fold the double slash)."""
    if is_url(base):
        return posixpath.join(str(base).rstrip("/"), *names)
    return str(Path(base, *names))


def name(path: str | Path) -> str:
    """The last component of a path or URL."""
    return posixpath.basename(str(path).rstrip("/")) if is_url(path) else Path(path).name


def isfile(path: str | Path) -> bool:
    fs, inner = _filesystem(path)
    return fs.isfile(inner)


def isdir(path: str | Path) -> bool:
    fs, inner = _filesystem(path)
    return fs.isdir(inner)


def makedirs(path: str | Path) -> None:
    """Create a directory and its parents; on object stores (no directories) this may do nothing."""
    fs, inner = _filesystem(path)
    fs.makedirs(inner, exist_ok=True)


def remove(path: str | Path) -> None:
    fs, inner = _filesystem(path)
    fs.rm(inner)


def list_names(directory: str | Path, pattern: str) -> list[str]:
    """The names (not paths) in `directory` matching the glob `pattern`, sorted; [] without the directory."""
    fs, inner = _filesystem(directory)
    if not fs.isdir(inner):
        return []
    names = (posixpath.basename(entry.rstrip("/")) for entry in fs.ls(inner, detail=False))
    return sorted(entry for entry in names if fnmatch.fnmatchcase(entry, pattern))


def open_read(path: str | Path) -> IO[bytes]:
    """A binary file object to read (seekable: torch.load reads checkpoints from it)."""
    fs, inner = _filesystem(path)
    return fs.open(inner, "rb")


def read_text(path: str | Path) -> str:
    with open_read(path) as handle:
        return handle.read().decode()


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call `write(file)` on a temporary file next to `path`, then replace `path` with it.

    A crash or a signal at any point leaves either the old file or the new one, never a torn one,
    and no temporary file once the exception has passed through here. The file gets the mode the
    process's umask gives a new file (0644 under umask 022), as open() would; mkstemp's is 0600.
    """
    if is_url(path):
        _atomic_write_url(str(path), write)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def _umask() -> int:
    """The process's umask; reading it means setting it, so it is set straight back."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write_url(url: str, write: Callable[[IO[bytes]], None]) -> None:
    fs, inner = _filesystem(url)
    parent, base = posixpath.split(inner)
    tmp = posixpath.join(parent, f".{base}.{uuid.uuid4().hex}.tmp")
    fs.makedirs(parent, exist_ok=True)
    try:
        with fs.open(tmp, "wb") as handle:  # the object exists only once this closes
            write(handle)
        fs.mv(tmp, inner)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode()))


class AppendFile:
    """A text file that grows by lines and keeps what an earlier run wrote (a resumed run appends).

    Locally it is a file in append mode. At a URL the whole text is kept here and rewritten
    atomically on each flush, since object stores cannot append.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = path
        if is_url(path):
            self._handle = None
            self._text = read_text(path) if isfile(path) else ""
        else:
            self._handle = open(path, "a")

    def write(self, text: str) -> None:
        if self._handle is not None:
            self._handle.write(text)
        else:
            self._text += text

    def flush(self) -> None:
        if self._handle is not None:
            self._handle.flush()
        else:
            write_text(self.path, self._text)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
