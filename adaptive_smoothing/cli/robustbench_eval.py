"""Evaluate a published adaptive-smoothing model with RobustBench's benchmark() (AutoAttack, Linf
8/255).

    adaptive-smoothing-robustbench --root_dir models --dataset cifar10 --model_name edm
    python3 run_robustbench.py --root_dir models --dataset cifar10 --model_name edm  # the same

The checkpoint layout under --root_dir is described in the README (Base/, CompModel/); the
MixedNUTS mixtures (--model_name mixednuts) need Base/ only.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import click

from adaptive_smoothing.robustbench_eval import published_model_or_error, run_benchmark
from adaptive_smoothing.checkpoints import swapped_bases_allowed
from adaptive_smoothing.cli.errors import one_line_errors
from adaptive_smoothing.cli.options import PRECISION_HELP, speed_options
from adaptive_smoothing.published import PUBLISHED_NAMES
from adaptive_smoothing.runtime import configure_threads


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--root_dir", required=True, type=click.Path(path_type=Path),
              help="Folder holding Base/ and CompModel/ with the published checkpoints.")
@click.option("--dataset", required=True, type=click.Choice(["cifar10", "cifar100"]))
@click.option("--model_name", required=True, type=click.Choice(PUBLISHED_NAMES),
              help="edm: WRN-70-16 trained with EDM data; trades: DeepMind's TRADES WRN-70-16 "
                   "(CIFAR-100 only); mixednuts: the nonlinear MixedNUTS mixture "
                   "(Bai2024MixedNUTS).")
@click.option("--n_examples", default=10000, type=int, help="Test images to evaluate.")
@click.option("--fp16/--fp32", default=False,
              help="fp16 autocast for the forward passes (CUDA only); same as --precision fp16.")
@speed_options(precision=None, channels_last=True, compile=False,
               precision_help=PRECISION_HELP + " [fp32; --fp16 = fp16].",
               compile_help="torch.compile the composite.")
@click.option("--batch_size", default=100, type=int, help="AutoAttack batch size.")
@click.option("--data_dir", default="data", type=click.Path(path_type=Path),
              help="Where RobustBench finds (or downloads) the CIFAR test set.")
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
@click.option("--output_dir", default="outputs/robustbench", type=click.Path(path_type=Path),
              help="Result JSON and AutoAttack state (an interrupted run resumes from it).")
@click.option("--allow-swapped-bases", is_flag=True,
              help="Load the base models although their checkpoints record that STD was "
                   "adversarially trained and ROB was not (refused otherwise).")
@one_line_errors
def main(root_dir: Path, dataset: str, model_name: str, n_examples: int, fp16: bool,
         precision: Optional[str], channels_last: bool, compile_model: bool,
         threads: Optional[int], batch_size: int, data_dir: Path, device: str,
         output_dir: Path, allow_swapped_bases: bool) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    reason = published_model_or_error(dataset, model_name)
    if reason is not None:
        raise click.BadParameter(reason, param_hint="--dataset/--model_name")
    if fp16 and precision not in (None, "fp16"):
        raise click.BadParameter(f"--fp16 contradicts --precision {precision}",
                                 param_hint="--precision")
    configure_threads(threads)
    # The same check of the base models' recorded training as run.py's (checkpoints.py).
    with swapped_bases_allowed(allow_swapped_bases):
        result = run_benchmark(root_dir, dataset, model_name, n_examples=n_examples,
                               precision=precision or ("fp16" if fp16 else "fp32"),
                               batch_size=batch_size, data_dir=data_dir, device=device,
                               output_dir=output_dir, channels_last=channels_last,
                               compile=compile_model)
    click.echo(f"{dataset} {model_name}: clean accuracy {100 * result.clean_accuracy:.2f}%, "
               f"AutoAttack robust accuracy {100 * result.robust_accuracy:.2f}% "
               f"({result.n_examples} examples)")


if __name__ == "__main__":
    main()
