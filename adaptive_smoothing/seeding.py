"""Seeds of the training runs' random streams: one generator per (seed, purpose, position).

Every random choice of a training run (data order, augmentation, attack draws, buffer shuffle)
comes from a generator seeded by ``(seed, purpose, epoch or iteration, rank)``, so a run needs no
random state besides its position to continue exactly where it stopped, and no stream depends on
how many draws another one made.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["PURPOSES", "derive_seed", "stream"]

# The numbers shape every recorded run's random draws: never renumber, only append.
PURPOSES = {"main": 1, "extra": 2, "augment": 3, "attack": 4, "buffer": 5, "validate": 6,
            "attack_iterations": 7, "detection_fixed": 8, "detection_adaptive": 9,
            "pre_attacked": 10, "pa_augment": 11}


def derive_seed(seed: int, purpose: str, *indices: int) -> int:
    """A 63-bit seed for ``purpose`` at ``indices``, independent of every other (seed, purpose,
    indices) combination (numpy's SeedSequence hashing)."""
    words = [seed % 2**32, seed // 2**32 % 2**32, PURPOSES[purpose], *indices]
    return int(np.random.SeedSequence(words).generate_state(2, dtype=np.uint32).astype(
        np.uint64) @ np.array([1, 2**32], dtype=np.uint64)) & (2**63 - 1)


def stream(seed: int, purpose: str, *indices: int) -> torch.Generator:
    """A CPU generator seeded with ``derive_seed(seed, purpose, *indices)``.

    On the CPU on every device: draws are made there and moved, so a GPU run draws what a CPU
    run of the same seed draws.
    """
    return torch.Generator().manual_seed(derive_seed(seed, purpose, *indices))
