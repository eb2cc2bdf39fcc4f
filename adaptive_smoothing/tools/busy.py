"""How much a busy neighbour process slows a command, under several thread policies
(``scripts/benchmark_busy.py``; issue 10 item 2, docs/RESULTS.md): the command's wall time alone
and beside a busy process, per policy.
"""
from __future__ import annotations

import logging
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Optional, Sequence

logger = logging.getLogger(__name__)

__all__ = ["NEIGHBOURS", "POLICIES", "time_beside_busy", "time_policies"]

# name -> environment changes; 'package default' = what the package does unasked
# (threads = the cores, OMP_WAIT_POLICY=PASSIVE).
POLICIES = {
    "package default (cores, PASSIVE)": {},
    "cores, OMP_WAIT_POLICY=ACTIVE": {"OMP_WAIT_POLICY": "ACTIVE"},
    "1 thread": {"OMP_NUM_THREADS": "1"},
    # libgomp spins this many times before sleeping (about 100 spins per microsecond); PASSIVE
    # alone means 0, OpenMP's own default 300000 (about 3 ms), ACTIVE about 5 minutes.
    "cores, PASSIVE, GOMP_SPINCOUNT=30000": {"GOMP_SPINCOUNT": "30000"},
    "cores, PASSIVE, GOMP_SPINCOUNT=300000 (OpenMP's default spin)": {"GOMP_SPINCOUNT": "300000"},
}


# A busy neighbour process for time_beside_busy: 'python' keeps one core busy; 'torch' is another
# ML job (matrix products on torch's default threads, default OpenMP policy: it does not import
# this package).
NEIGHBOURS = {
    "python": "while True:\n    pass\n",
    "torch": "import torch\na = torch.randn(1024, 1024)\nwhile True:\n    a @ a\n",
}


def time_beside_busy(command: list[str], *, neighbour: Optional[str] = None,
                     env: Optional[dict[str, str]] = None, cwd: Optional[str] = None,
                     settle_s: float = 2.0) -> dict[str, Any]:
    """Wall time of ``command`` alone (``neighbour`` None) or while a busy ``neighbour`` process
    (a key of NEIGHBOURS) runs beside it; the neighbour is stopped afterwards."""
    if neighbour is not None and neighbour not in NEIGHBOURS:
        raise ValueError(f"unknown neighbour {neighbour!r}; expected one of {sorted(NEIGHBOURS)}")
    busy = None
    if neighbour is not None:
        busy = subprocess.Popen([sys.executable, "-c", NEIGHBOURS[neighbour]],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(settle_s)  # let it import torch and start working
    try:
        start = time.perf_counter()
        done = subprocess.run(command, env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        seconds = time.perf_counter() - start
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): "
                           f"{done.stderr[-1000:]}")
    return {"command": command, "neighbour": neighbour, "seconds": seconds}


def time_policies(command: Sequence[str], policies: Sequence[str], neighbours: Sequence[str], *,
                  repeats: int = 1) -> list[dict[str, Any]]:
    """One row per (policy, neighbour): the median wall time of ``repeats`` runs of
    ``command`` under the policy (a key of POLICIES), alone first, then beside each neighbour,
    and its slowdown against alone."""
    base_env = {k: v for k, v in os.environ.items()
                if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY",
                             "GOMP_SPINCOUNT")}
    rows = []
    # One untimed run first: the first run of a command reads its files from disk and fills the
    # checkpoint-fingerprint cache, which would count against whichever setting came first.
    time_beside_busy(list(command), env=base_env)
    for policy in policies:
        env = dict(base_env, **POLICIES[policy])
        alone = None
        for neighbour in [None, *neighbours]:
            runs = [time_beside_busy(list(command), neighbour=neighbour, env=env)["seconds"]
                    for _ in range(repeats)]
            seconds = statistics.median(runs)
            alone = seconds if neighbour is None else alone
            row = {"policy": policy, "env": POLICIES[policy], "neighbour": neighbour,
                   "seconds": seconds, "runs": runs,
                   "slowdown_vs_alone": seconds / alone if alone else None}
            logger.info("%s, neighbour %s: %.1f s (%.2fx alone)", policy, neighbour, seconds,
                        row["slowdown_vs_alone"] or 1.0)
            rows.append(row)
    return rows
