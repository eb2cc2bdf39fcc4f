"""Crash-safe result files: atomic writes and per-batch result stores.

A crash, Ctrl-C or full disk leaves the previous file (or none) under a path, never a
half-written one; a run that is killed and restarted reuses every batch it finished.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable, Generic, Optional, TypeVar, Union

T = TypeVar("T")
PathLike = Union[str, "os.PathLike[str]"]


def write_atomic(path: PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write`` on a temporary file beside ``path``, fsync it and rename it over ``path``.

    The rename is atomic on POSIX. The temporary name carries the process id and a random
    token, so torchrun's processes writing into one folder never share one; it is removed when
    ``write`` fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return path


def write_text_atomic(path: PathLike, text: str) -> Path:
    """``write_atomic`` of ``text`` in UTF-8."""
    return write_atomic(path, lambda file: file.write(text.encode("utf-8")))


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; not every platform/filesystem allows it, hence best effort.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class BatchStore(Generic[T]):
    """The finished batches of a run, one file each: ``directory/{index:05d}{suffix}``.

    ``write(value, file)`` serialises a batch's result, ``read(path)`` reads (and checks) one;
    files are written atomically, so a file that exists is a finished batch.
    """

    def __init__(self, directory: PathLike, suffix: str, *,
                 write: Callable[[T, BinaryIO], object], read: Callable[[Path], T]) -> None:
        self.directory = Path(directory)
        self.suffix = suffix
        self._write = write
        self._read = read

    def path(self, index: int) -> Path:
        return self.directory / f"{index:05d}{self.suffix}"

    def load(self, index: int) -> Optional[T]:
        """Batch ``index``'s result, or None when that batch has not finished."""
        path = self.path(index)
        return self._read(path) if path.exists() else None

    def save(self, index: int, value: T) -> Path:
        return write_atomic(self.path(index), lambda file: self._write(value, file))
