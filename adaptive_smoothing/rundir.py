"""Output folders: created with a clear error, and held by one run at a time.

Two runs writing one folder interleave their logs, race on the same temporary files and mix
their results. :class:`RunLock` holds an exclusive ``flock`` on ``OUTPUT_DIR/.lock`` for the
run's life; the kernel drops it when the process ends, so a crash or ``kill -9`` never leaves a
stale lock behind. The file also names the holder's pid, for the error the second run gets.
"""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Optional, Type, Union

from adaptive_smoothing.errors import UserError
from adaptive_smoothing.persist import remove_stale_temporaries

LOCK_FILE = ".lock"


class RunDirError(UserError, RuntimeError):
    """The output folder cannot be created or written, or another run holds it."""


def prepare_output_dir(path: Union[str, os.PathLike], what: str = "output folder") -> Path:
    """Create ``path`` (with parents) and check that it is writable, or raise RunDirError."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise RunDirError(f"{what} {path}: cannot be created, a file is in the way "
                          f"({_blocking_file(path)}); choose another --output-dir") from None
    except OSError as err:
        raise RunDirError(f"{what} {path}: cannot be created ({err.strerror or err}); choose "
                          "another --output-dir") from None
    if not path.is_dir():
        raise RunDirError(f"{what} {path}: is not a folder; choose another --output-dir")
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise RunDirError(f"{what} {path}: is not writable ({err.strerror or err}); choose "
                          "another --output-dir") from None
    return path


def _blocking_file(path: Path) -> Path:
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            return parent
    return path


class RunLock:
    """Exclusive lock on an output folder (a context manager; created by :meth:`acquire`)."""

    def __init__(self, directory: Union[str, os.PathLike]) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        import fcntl

        prepare_output_dir(self.directory)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise RunDirError(f"{self.path}: cannot lock ({err.strerror or err})") from None
            raise RunDirError(
                f"{self.directory} is in use by another run (pid {self._holder()}, lock file "
                f"{self.path}); wait for it to finish or choose another --output-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self._fd = fd
        # Holding the lock, this run owns the folder: temporaries of a killed run are garbage.
        remove_stale_temporaries(self.directory)
        return self

    def _holder(self) -> str:
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def release(self) -> None:
        if self._fd is not None:
            # The file stays: deleting it would let a third run lock a new inode while a second
            # one still waits on the old.
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire() if self._fd is None else self

    def __exit__(self, exc_type: Optional[Type[BaseException]],
                 exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        self.release()
