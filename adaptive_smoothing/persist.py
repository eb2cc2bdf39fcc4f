"""Crash-safe result files: atomic writes and per-batch result stores.

A crash, Ctrl-C or full disk leaves the previous file (or none) under a path, never a
half-written one; a run that is killed and restarted reuses every batch it finished. A full
disk raises :class:`DiskFullError`, one line naming the folder, the file and the space it needs;
the temporary files a killed run left behind (``.NAME.PID.TOKEN.tmp``) are removed by the next
write of the same file and by :func:`remove_stale_temporaries` (called when a run takes its
output folder).
"""
from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import BinaryIO, Callable, Generic, Optional, TypeVar, Union

from adaptive_smoothing.errors import UserError

logger = logging.getLogger(__name__)

T = TypeVar("T")
PathLike = Union[str, "os.PathLike[str]"]

# errno values that mean "no room to write": a full filesystem, or the user's quota.
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
# write_atomic's temporary names: .NAME.PID.TOKEN.tmp
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


class DiskFullError(UserError, OSError):
    """A write found no space left (ENOSPC / EDQUOT). The message names the folder, the file and
    the space needed; the files already there are intact (every write is atomic)."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno 28]" prefix
        return str(self.strerror)


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` is an OSError meaning the disk (or the quota) is full."""
    return isinstance(err, OSError) and err.errno in _NO_SPACE


def format_bytes(n: Optional[float]) -> str:
    """1234567 -> '1.2 MB' (None -> 'an unknown amount')."""
    if n is None:
        return "an unknown amount"
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def disk_full_message(folder: Path, what: str, needed: Optional[int] = None) -> str:
    """The one-line report of a full disk: folder, file, space needed and free."""
    try:
        free: Optional[int] = shutil.disk_usage(folder).free
    except OSError:
        free = None
    need = f"needs {format_bytes(needed)}" if needed is not None else "needs more space"
    return (f"No space left on device in {folder.absolute()} while writing {what} ({need}, "
            f"{format_bytes(free)} free); free some space there or choose another output "
            "folder, then rerun: the files already written there are intact")


def write_atomic(path: PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write`` on a temporary file beside ``path``, fsync it and rename it over ``path``.

    The rename is atomic on POSIX. The temporary name carries the process id and a random
    token, so torchrun's processes writing into one folder never share one; it is removed when
    ``write`` fails. A full disk raises :class:`DiskFullError` (the previous file, if any,
    stays whole). Stale temporaries of the same file from a killed process are removed first.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(path.parent, lambda name: name == path.name)
        with open(tmp, "xb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if is_disk_full(err) and not isinstance(err, DiskFullError):
            raise DiskFullError(err.errno, disk_full_message(  # type: ignore[union-attr]
                path.parent, path.name, _size_of(write))) from err
        raise
    _fsync_directory(path.parent)
    return path


class _CountingSink:
    """A file that only counts what is written to it: how much space a write needs."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def _size_of(write: Callable[[BinaryIO], object]) -> Optional[int]:
    # The disk filled up part-way, so what was written says little; serialising again into a
    # counter gives the whole size (None if ``write`` needs a real file).
    sink = _CountingSink()
    try:
        write(sink)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 -- only an estimate for the message
        return None
    return sink.size


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process, or a number we cannot test: keep its file
    return True


def _remove_stale(directory: Path, name_matches: Callable[[str], bool]) -> list[Path]:
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if (match is None or not name_matches(match.group("name"))
                or _process_alive(int(match.group("pid")))):
            continue
        try:
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            pass  # best effort: a leftover is harmless, a crash over it is not
    return removed


def remove_stale_temporaries(directory: PathLike, recursive: bool = True) -> list[Path]:
    """Remove the temporary files of :func:`write_atomic` in ``directory`` (and its subfolders)
    whose writing process no longer runs: what a killed run left behind. Returns them."""
    directory = Path(directory)
    folders = [directory]
    if recursive:
        folders += [p for p in directory.rglob("*") if p.is_dir() and not p.is_symlink()]
    removed = [p for folder in folders for p in _remove_stale(folder, lambda name: True)]
    if removed:
        logger.info("removed %d temporary file(s) left by a killed run in %s (e.g. %s)",
                    len(removed), directory, removed[0].name)
    return removed


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
