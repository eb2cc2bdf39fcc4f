"""``spawn``: torch.multiprocessing.spawn for the tests' gloo workers, ending each worker with
``os._exit(0)`` once its function has returned.

Why: with torch 2.14.1 a worker that has finished, saved its results and destroyed its process
group sometimes aborts while the interpreter shuts down ('terminate called without an active
exception', SIGABRT from a thread still joinable at exit; 2 of 30 and 3 of 40 runs on a 2-core
AVX-512 machine), and spawn reports the finished run as failed. A worker that raises still fails
the test with its exception; only the shutdown after success is skipped.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable

import torch.multiprocessing as mp


def _run_then_exit(rank: int, worker: Callable[..., None], *args: Any) -> None:
    worker(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(worker: Callable[..., None], args: tuple = (), nprocs: int = 2,
          join: bool = True) -> None:
    """``mp.spawn(worker, args, nprocs, join)`` with the exit above."""
    mp.spawn(_run_then_exit, args=(worker, *args), nprocs=nprocs, join=join)
