"""persist.py: atomic writes keep the previous file whole, and a per-batch store hands back
exactly what a finished batch saved (the resume of evaluation and robustbench's AutoAttack)."""
from __future__ import annotations

import json

import pytest
import torch

from adaptive_smoothing.persist import BatchStore, write_atomic, write_text_atomic


def test_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path) -> None:
    path = tmp_path / "results.json"
    write_text_atomic(path, '{"n": 1}')

    def half_then_full_disk(file) -> None:
        file.write(b'{"n": 2, "trunc')
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomic(path, half_then_full_disk)
    assert json.loads(path.read_text()) == {"n": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_batch_store_returns_none_until_a_batch_is_saved_then_its_value(tmp_path) -> None:
    store = BatchStore(tmp_path / "batches", ".pt", write=torch.save,
                       read=lambda path: torch.load(path, weights_only=True))
    assert store.load(3) is None
    part = {"x_adv": torch.arange(6.0).view(2, 3), "y_adv": torch.tensor([4, 7])}
    assert store.save(3, part) == tmp_path / "batches" / "00003.pt"
    again = BatchStore(tmp_path / "batches", ".pt", write=torch.save,
                       read=lambda path: torch.load(path, weights_only=True))  # a restarted run
    loaded = again.load(3)
    assert torch.equal(loaded["x_adv"], part["x_adv"]) and torch.equal(loaded["y_adv"],
                                                                       part["y_adv"])
    assert again.load(2) is None
