"""Content fingerprints: the digest cache never serves a replaced file's old digest."""
from __future__ import annotations

import hashlib
import os

import torch

from adaptive_smoothing import fingerprint


def test_replaced_file_gets_a_new_digest_not_the_cached_one(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"a" * 1000)
    first = fingerprint.file_sha256(path)
    assert first == hashlib.sha256(b"a" * 1000).hexdigest()
    # Retrained and saved at the same path, same size (save_checkpoint writes and renames).
    tmp = tmp_path / "tmp"
    tmp.write_bytes(b"b" * 1000)
    os.replace(tmp, path)
    assert fingerprint.file_sha256(path) == hashlib.sha256(b"b" * 1000).hexdigest()


def test_digest_is_cached_by_size_mtime_and_inode(tmp_path):
    path = tmp_path / "big.pt"
    path.write_bytes(b"x" * 100)
    digest = fingerprint.file_sha256(path)
    stat = path.stat()
    # Same size, inode and mtime: the cache answers (here observably, since the bytes changed).
    with open(path, "r+b") as handle:
        handle.write(b"y")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert fingerprint.file_sha256(path) == digest
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert fingerprint.file_sha256(path) != digest


def test_tensor_fingerprint_sees_a_single_changed_label():
    x, y = torch.rand(4, 3, 2, 2), torch.tensor([1, 2, 3, 4])
    assert fingerprint.tensors_sha256(x, y) == fingerprint.tensors_sha256(x.clone(), y.clone())
    assert fingerprint.tensors_sha256(x, y) != fingerprint.tensors_sha256(
        x, torch.tensor([1, 2, 3, 5]))
