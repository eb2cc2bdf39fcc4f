"""Shared test fixtures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# One intra-op thread: the test models are tiny, and with two threads on a two-core machine that
# runs anything else, OpenMP's spin-waiting makes them 10-40x slower.
torch.set_num_threads(1)
# The same for the CLIs the tests run (runtime.configure_threads reads it) and their subprocesses.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _fingerprint_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep the checkpoint-digest cache of the tests out of the user's ~/.cache."""
    import os

    os.environ["ADAPTIVE_SMOOTHING_CACHE_DIR"] = str(tmp_path_factory.mktemp("fingerprints"))


@pytest.fixture
def shared_cifar10() -> Path:
    """The offline CIFAR-10 copy (../shared/data/cifar10), skipped where absent."""
    path = SHARED_DATA / "cifar10"
    if not (path / "test.npz").exists():
        pytest.skip(f"offline CIFAR-10 not found at {path}")
    return path
