"""Time a command alone and beside a busy process, under several thread policies (issue 10
item 2; adaptive_smoothing/tools/busy.py); appends one record to --json.

    python3 scripts/benchmark_busy.py --json out.json -- python3 run.py --eval --config ...
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import click

from adaptive_smoothing.cli.errors import one_line_errors
from adaptive_smoothing.tools.busy import NEIGHBOURS, POLICIES, time_policies
from adaptive_smoothing.tools.speed import append_record, machine_info


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
    rows = time_policies(command, chosen, [n for n in neighbours.split(",") if n],
                         repeats=repeats)
    append_record(json_path, {"label": label, "mode": "beside_busy", "command": list(command),
                              "machine": machine_info(__import__("torch").device("cpu")),
                              "rows": rows})


if __name__ == "__main__":
    main()
