"""Write pre-attacked training data (blocks of training images attacked once, ahead of time).

Block design and file format: adaptive_smoothing/pre_attack.py. Training reads such a file through
dataset_settings.pa_path (docs/TRAINING.md, "Pre-attacked data").
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import click

from adaptive_smoothing.cli.errors import one_line_errors
from adaptive_smoothing.cli.options import threads_option
from adaptive_smoothing.config import apply_overrides, load_config
from adaptive_smoothing.data import build_dataset, load_tensors
from adaptive_smoothing.checkpoints import swapped_bases_allowed
from adaptive_smoothing.factory import build_composite, load_composite_weights
from adaptive_smoothing.prepare import resolve_checkpoints
from adaptive_smoothing.pre_attack import DEFAULT_GAMMAS, generate_blocks, save_blocks
from adaptive_smoothing.runtime import configure_threads, resolve_device


def _gammas(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers (inf allowed), got {text!r}")


@click.command(context_settings={"show_default": True})
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path),
              help="The mixer's config: base models, dataset, pgd_settings.eps.")
@click.option("--output", required=True, type=click.Path(path_type=Path),
              help="The file to write (torch.save, loads with weights_only).")
@click.option("--gammas", default=",".join(str(g) for g in DEFAULT_GAMMAS),
              help="One block per gamma of the fixed mixture attacked (-inf: STD, inf: ROB).")
@click.option("--data-dir", default=None,
              help="Dataset folder [dataset_settings.path]; a folder holding train.npz selects "
                   "the offline .npz format.")
@click.option("--n-images", default=None, type=int, help="First N training images [all].")
@click.option("--iterations", default=10, type=int, help="PGD-CE iterations per image.")
@click.option("--step-size", default=None, type=float, help="PGD step [eps / 4].")
@click.option("--batch-size", default=256, type=int)
@threads_option()
@click.option("--allow-swapped-bases", is_flag=True,
              help="Load the base models although their checkpoints record that STD was "
                   "adversarially trained and ROB was not (refused otherwise).")
@one_line_errors
def main(config_path: Path, output: Path, gammas: str, data_dir: str | None,
         n_images: int | None, iterations: int, step_size: float | None, batch_size: int,
         threads: int | None, allow_swapped_bases: bool) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    configure_threads(threads)
    # A ConfigError, PreAttackedError (finished blocks of other settings) and the like become
    # one "Error:" line in one_line_errors, as in every command.
    config = apply_overrides(load_config(config_path), **{
        "dataset_settings.path": data_dir,
        "dataset_settings.format": "auto" if data_dir is not None else None})
    if output.exists():
        raise click.ClickException(f"{output.absolute()} exists; delete it to make it again")
    # Finished blocks wait here until the whole file is written (a rerun resumes from them).
    progress_dir = output.with_name(output.name + ".blocks")
    ds = config.dataset_settings
    device = resolve_device(config.run.device)
    composite = build_composite(config.forward_settings, config.dataset_settings.num_classes,
                                device, source=config.source)
    with swapped_bases_allowed(allow_swapped_bases):
        load_composite_weights(composite, resolve_checkpoints(config))
    train = build_dataset(ds.name, "train", ds.format, ds.path, augment=False)
    x, y = load_tensors(train, n_images)
    import torch
    blocks = generate_blocks(composite, x, y, torch.arange(len(y)), gammas=_gammas(gammas),
                             eps=config.pgd_settings.eps, norm=config.pgd_settings.norm,
                             iterations=iterations, step_size=step_size,
                             batch_size=batch_size, device=device, seed=config.seed,
                             progress_dir=progress_dir)
    logging.info("wrote %s", save_blocks(blocks, output))
    shutil.rmtree(progress_dir)


if __name__ == "__main__":
    main()
