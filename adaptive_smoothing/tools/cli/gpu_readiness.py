"""Checks of what only a GPU run can show, one JSON file per check (tools/readiness.py).

    python3 scripts/gpu_readiness.py --out "$OUT/gpu_readiness"             # on a GPU machine
    python3 scripts/gpu_readiness.py --smoke --device cpu --out /tmp/ready  # tiny, on a CPU
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import click

from adaptive_smoothing.cli.errors import one_line_errors
from adaptive_smoothing.tools.readiness import CHECKS, run_checks
from adaptive_smoothing.runtime import select_device


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Folder for <check>.json.")
@click.option("--checks", default=",".join(CHECKS),
              help="Comma-separated subset of the checks.")
@click.option("--device", default="auto", help="auto, cuda, cuda:N or cpu.")
@click.option("--smoke", is_flag=True, help="Tiny sizes (seconds on a CPU).")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="CIFAR-10 .npz folder (test.npz); noise images without it.")
@one_line_errors
def main(out_dir: Path, checks: str, device: str, smoke: bool, data_dir: Optional[Path]) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    names = [c.strip() for c in checks.split(",") if c.strip()]
    unknown = sorted(set(names) - set(CHECKS))
    if unknown:
        raise click.BadParameter(f"unknown check(s) {unknown}; expected some of "
                                 f"{sorted(CHECKS)}", param_hint="--checks")
    # A device this machine lacks (DeviceError) is one line in one_line_errors.
    results = run_checks(names, out_dir, select_device(device), smoke=smoke, data_dir=data_dir)
    click.echo(json.dumps({name: result["ok"] for name, result in results.items()}))


if __name__ == "__main__":
    main()
