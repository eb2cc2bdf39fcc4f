"""Evaluation under torch.distributed (what torchrun starts): two CPU processes over gloo share
the batches and rank 0 reports the same numbers as a single process."""
from __future__ import annotations

import json
import socket

import pytest
import torch
import torch.distributed as dist

from adaptive_smoothing.evaluation import evaluate
from spawn import spawn
from synthetic import synthetic_data, tiny_composite
from test_evaluation import _settings

pytestmark = pytest.mark.distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, state_path: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        composite = tiny_composite(mixer=True, alpha_bias=0.2, alpha_scale=0.75)
        composite.load_state_dict(torch.load(state_path, weights_only=True))
        x, y = synthetic_data(40, seed=7)
        evaluate(composite, x, y, _settings(attacks_to_run=("apgd-ce",), batch_size=8), out,
                 device=torch.device("cpu"))
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one(tmp_path):
    composite = tiny_composite(mixer=True, alpha_bias=0.2, alpha_scale=0.75)
    torch.save(composite.state_dict(), tmp_path / "composite.pt")
    x, y = synthetic_data(40, seed=7)
    single = evaluate(composite, x, y, _settings(attacks_to_run=("apgd-ce",), batch_size=8),
                      tmp_path / "single", device=torch.device("cpu"))

    spawn(_worker, args=(2, _free_port(), str(tmp_path / "composite.pt"),
                            tmp_path / "multi"), nprocs=2, join=True)
    multi = json.loads((tmp_path / "multi" / "results.json").read_text())
    assert multi == json.loads(json.dumps(single))
    # Five batches of 8 were split between the two processes, each written once.
    assert sorted(p.name for p in (tmp_path / "multi" / "batches").glob("0*.json")) == [
        f"{i:05d}.json" for i in range(5)]
