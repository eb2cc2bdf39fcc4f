"""Time a config's composite: attack steps, mixer training iterations or AutoAttack.

    python3 scripts/benchmark.py --config configs/demo.yaml --mode attack --compare
    python3 scripts/benchmark.py --config configs/cifar10_edm.yaml --batch-size 16 --iters 2

The model has random weights when the config's checkpoints are absent. See
adaptive_smoothing/tools/speed.py for what is measured.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import click

from adaptive_smoothing.cli.errors import one_line_errors
from adaptive_smoothing.cli.options import parse_set_items, speed_options
from adaptive_smoothing.config import apply_overrides, load_config
from adaptive_smoothing.runtime import configure_threads, resolve_device

logger = logging.getLogger("benchmark")


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path),
              help="YAML config whose composite is timed.")
@click.option("--mode", type=click.Choice(["attack", "train", "eval"]), default="attack",
              help="attack: attack steps; train: mixer training iterations; eval: standard "
                   "AutoAttack on --n-examples images.")
@click.option("--batch-size", type=click.IntRange(min=1), default=128)
@speed_options(precision="bf16", channels_last=True, compile=False,
               precision_help="Precision of the fast path.",
               channels_last_help="NHWC memory format in the fast path.",
               compile_help="torch.compile in the fast path.")
@click.option("--iters", type=click.IntRange(min=1), default=10,
              help="Timed units per round (after --warmup).")
@click.option("--warmup", type=click.IntRange(min=0), default=2)
@click.option("--rounds", type=click.IntRange(min=1), default=3,
              help="Timed rounds; the median is reported (alternating with --compare).")
@click.option("--compare", is_flag=True,
              help="Also time the fp32 NCHW eager baseline, interleaved, and print the ratio.")
@click.option("--n-examples", type=click.IntRange(min=1), default=16,
              help="--mode eval: images per AutoAttack run.")
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key (YAML value), e.g. "
                   "--set 'forward_settings.std_model_kwargs={width: 16}'.")
@click.option("--flops/--no-flops", default=True,
              help="Count the FLOPs of one attack step (torch.utils.flop_counter).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None,
              help="Append this run's record to the JSON file's 'runs' list.")
@click.option("--label", default=None, help="A name for this run in the JSON file.")
@one_line_errors
def main(config_path: Path, mode: str, batch_size: int, precision: str, channels_last: bool,
         compile_model: bool, threads: Optional[int], iters: int, warmup: int, rounds: int,
         compare: bool, n_examples: int, device: str, overrides: tuple[str, ...],
         flops: bool, json_path: Optional[Path], label: Optional[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    configure_threads(threads)
    # ConfigError, RuntimeSettingsError: one line in one_line_errors.
    config = apply_overrides(load_config(config_path), **parse_set_items(overrides))
    from adaptive_smoothing.tools import speed
    torch_device = resolve_device(device)
    setting = speed.SpeedSetting(precision, channels_last, compile_model)
    record = speed.run_benchmark(config, setting, mode=mode, batch=batch_size,
                                 iterations=iters, warmup=warmup, rounds=rounds,
                                 compare=compare, n_eval=n_examples, device=torch_device,
                                 count_flops=flops)
    record.update(label=label, command=" ".join(["python3", "scripts/benchmark.py",
                                                 *sys.argv[1:]]), config=str(config_path))
    click.echo(speed.format_record(record))
    if json_path is not None:
        speed.append_record(json_path, record)


if __name__ == "__main__":
    main()
