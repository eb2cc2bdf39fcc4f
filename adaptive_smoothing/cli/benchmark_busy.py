"""Time a command alone and beside a busy process, under several thread policies (issue 10
item 2); appends one record to --json.

    adaptive-smoothing-benchmark-busy --json out.json -- python3 run.py --eval --config ...
"""
from __future__ import annotations

import logging
import os
import statistics
from pathlib import Path
from typing import Optional

import click

from adaptive_smoothing.cli.errors import one_line_errors
from adaptive_smoothing.speed import (NEIGHBOURS, append_record, machine_info,
                                      time_beside_busy)

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


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("command", nargs=-1, required=True)
@click.option("--json", "json_path", type=click.Path(path_type=Path), required=True)
@click.option("--label", default="beside_busy")
@click.option("--repeats", type=click.IntRange(min=1), default=1,
              help="Runs per (policy, neighbour); the median is kept.")
@click.option("--neighbours", default="python,torch",
              help=f"Comma-separated busy neighbours out of {sorted(NEIGHBOURS)}.")
@click.option("--policies", default=",".join(str(i) for i in range(len(POLICIES))),
              help="Comma-separated indices into: " + "; ".join(
                  f"{i}: {name}" for i, name in enumerate(POLICIES)))
@one_line_errors
def main(command: tuple[str, ...], json_path: Path, label: str, repeats: int, neighbours: str,
         policies: Optional[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    names = list(POLICIES)
    chosen = [names[int(i)] for i in policies.split(",") if i.strip()]
    base_env = {k: v for k, v in os.environ.items()
                if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY",
                             "GOMP_SPINCOUNT")}
    rows = []
    # One untimed run first: the first run of a command reads its files from disk and fills the
    # checkpoint-fingerprint cache, which would count against whichever setting came first.
    time_beside_busy(list(command), env=base_env)
    for policy in chosen:
        env = dict(base_env, **POLICIES[policy])
        alone = None
        for neighbour in [None] + [n for n in neighbours.split(",") if n]:
            runs = [time_beside_busy(list(command), neighbour=neighbour, env=env)["seconds"]
                    for _ in range(repeats)]
            seconds = statistics.median(runs)
            alone = seconds if neighbour is None else alone
            row = {"policy": policy, "env": POLICIES[policy], "neighbour": neighbour,
                   "seconds": seconds, "runs": runs,
                   "slowdown_vs_alone": seconds / alone if alone else None}
            logging.info("%s, neighbour %s: %.1f s (%.2fx alone)", policy, neighbour, seconds,
                         row["slowdown_vs_alone"] or 1.0)
            rows.append(row)
    append_record(json_path, {"label": label, "mode": "beside_busy", "command": list(command),
                              "machine": machine_info(__import__("torch").device("cpu")),
                              "rows": rows})


if __name__ == "__main__":
    main()
