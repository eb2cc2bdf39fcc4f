"""Run one sub-check of the prepared device check (scripts/gpu_check.sh) into OUT/NAME.json, or
summarize the records there. See adaptive_smoothing/tools/gpu_check.py."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import click
import yaml

from adaptive_smoothing.cli.errors import one_line_errors
from adaptive_smoothing.cli.options import parse_set_items, speed_options
from adaptive_smoothing.tools.gpu_check import CHECKS, CheckOptions, run_check, summarize
from adaptive_smoothing.runtime import configure_threads


def _numbers(text: str, kind: type) -> tuple:
    try:
        return tuple(kind(eval_fraction(part)) for part in text.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}") from None


def eval_fraction(text: str) -> float:
    if text.strip() == "auto":
        return 0.0  # CheckOptions: calibrated
    num, _, den = text.strip().partition("/")
    return float(num) / float(den) if den else float(num)


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.argument("check", type=click.Choice(sorted(CHECKS) + ["summary"]))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Folder of the JSON records.")
@click.option("--name", default=None, help="Record name (default: the check's name).")
@click.option("--config", default="configs/cifar10_edm.yaml")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key (YAML value).")
@click.option("--device", default="auto")
@speed_options(precision="bf16", channels_last=True, compile=False,
               compile_help="torch.compile the composite.")
@click.option("--batch-sizes", default="128,256,512,1024")
@click.option("--iters", type=click.IntRange(min=1), default=5)
@click.option("--warmup", type=click.IntRange(min=0), default=2)
@click.option("--n-examples", type=click.IntRange(min=1), default=256)
@click.option("--attack-iters", type=click.IntRange(min=1), default=50)
@click.option("--eps", default="auto,8/255",
              help="Comma-separated Linf radii; 'auto': the radius where about half the points "
                   "stay robust in fp32.")
@click.option("--expect", default="", help="summary: comma-separated record names expected.")
@one_line_errors
def main(check: str, out_dir: Path, name: Optional[str], config: str, overrides: tuple[str, ...],
         device: str, precision: str, channels_last: bool, compile_model: bool,
         batch_sizes: str, iters: int, warmup: int, n_examples: int, attack_iters: int,
         eps: str, threads: Optional[int], expect: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if check == "summary":
        result = summarize(out_dir, [n for n in expect.split(",") if n])
        click.echo(yaml.safe_dump(result, sort_keys=False))
        return
    configure_threads(threads)
    options = CheckOptions(config=config, overrides=tuple(parse_set_items(overrides).items()),
                           device=device,
                           precision=precision, channels_last=channels_last,
                           compile=compile_model, batch_sizes=_numbers(batch_sizes, int),
                           iters=iters, warmup=warmup, n_examples=n_examples,
                           attack_iters=attack_iters, eps=_numbers(eps, float))
    record = run_check(check, name or check, out_dir, options)
    sys.exit(0 if record["ok"] else 1)


if __name__ == "__main__":
    main()
