"""Content fingerprints (sha256) of checkpoint files and evaluated data.

Results and training checkpoints record what produced them by content, not by path: a mixer
retrained into the same ``last.pt`` or a test set whose labels changed must not pass for the old
one. Hashing a 2 GB published checkpoint takes seconds, so a file's digest is cached by
(path, size, mtime, inode) in ``fingerprints.json`` under the cache folder
(``$ADAPTIVE_SMOOTHING_CACHE_DIR``, else ``$XDG_CACHE_HOME/adaptive_smoothing``, else
``~/.cache/adaptive_smoothing``); replacing a file changes at least its mtime or inode, so a
stale digest is never used. A cache that cannot be read or written only costs the rehash.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Optional, Union

import torch

from adaptive_smoothing.persist import write_text_atomic

logger = logging.getLogger(__name__)

CACHE_ENV = "ADAPTIVE_SMOOTHING_CACHE_DIR"
CACHE_FILE = "fingerprints.json"
_CHUNK = 1 << 20


def cache_dir() -> Path:
    """Where the digest cache lives (see the module docstring)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "adaptive_smoothing"


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, data: dict) -> None:
    try:
        write_text_atomic(path, json.dumps(data, sort_keys=True))
    except OSError as err:
        logger.debug("cannot write the fingerprint cache %s: %s", path, err)


def file_sha256(path: Union[str, os.PathLike]) -> str:
    """sha256 of the file's bytes, from the cache when its size, mtime and inode are unchanged."""
    path = Path(path).resolve()
    stat = path.stat()
    key = str(path)
    stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
    cache_path = cache_dir() / CACHE_FILE
    cache = _read_cache(cache_path)
    entry = cache.get(key)
    if isinstance(entry, dict) and entry.get("stamp") == stamp and "sha256" in entry:
        return str(entry["sha256"])
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    value = digest.hexdigest()
    cache = _read_cache(cache_path)  # another process may have added entries meanwhile
    cache[key] = {"stamp": stamp, "sha256": value}
    _write_cache(cache_path, cache)
    return value


def optional_file_sha256(path: Optional[Union[str, os.PathLike]]) -> Optional[str]:
    """:func:`file_sha256`, or None for no path / a path that is not a file."""
    if path is None or not Path(path).is_file():
        return None
    return file_sha256(path)


def tensors_sha256(*tensors: torch.Tensor) -> str:
    """sha256 of the tensors' dtypes, shapes and values (e.g. the evaluated images and labels)."""
    digest = hashlib.sha256()
    for tensor in tensors:
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
