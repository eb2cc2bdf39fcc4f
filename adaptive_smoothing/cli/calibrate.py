"""Calibrate a composite on held-out images (adaptive_smoothing.calibration; docs/METHOD.md,
"Calibration"): the nonlinear composite's (s, p, c) and alpha for a target beta, the fixed linear
mixture's alpha for the same beta (and the gradient surrogate's), and, with
--target-clean-accuracy, a trained mixer's alpha range.

    adaptive-smoothing-calibrate --config configs/rn18w16_cifar10_cpu.yaml \\
        --data-dir ../shared/data/cifar10 --output-dir runs/calibration \\
        --write-config configs/rn18w16_nonlinear_cpu.yaml

The attack on ROB is resumable per batch: rerun the same line after an interruption.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import click

from adaptive_smoothing.cli.errors import one_line_errors
from adaptive_smoothing.cli.options import parse_set_items, threads_option
from adaptive_smoothing.config import apply_overrides, load_config

logger = logging.getLogger("calibrate")


def _pair(text: Optional[str]) -> Optional[tuple[float, float]]:
    if text is None:
        return None
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"expected two comma-separated numbers LOW,HIGH, got "
                                 f"{text!r}") from None
    return low, high


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path),
              help="YAML config of the composite's base models (and mixer).")
@click.option("--set", "set_items", multiple=True, metavar="KEY=VALUE",
              help="Override a config key, as in run.py.")
@click.option("--data-dir", default=None, help="Dataset folder [dataset_settings.path].")
@click.option("--output-dir", required=True, type=click.Path(path_type=Path),
              help="Folder for the attack's batches (resumable), calibration.json and "
                   "calibration.png.")
@click.option("--write-config", type=click.Path(path_type=Path), default=None,
              help="Write the config with the calibrated nonlinear_settings (enabled) here, "
                   "ready for run.py --eval.")
@click.option("--split", type=click.Choice(["test", "train"]), default="test",
              help="Which split the held-out images come from.")
@click.option("--start", type=click.IntRange(min=0), default=None,
              help="First image index [default: training_settings.val_start]; test images "
                   "below evaluation_settings.n_examples (the evaluated ones) are refused.")
@click.option("--n-images", type=click.IntRange(min=1), default=2000, help="Held-out images.")
@click.option("--beta", type=click.FloatRange(0, 100, min_open=True), default=98.5,
              help="Target share (%) of ROB's robust points whose decision is kept.")
@click.option("--surrogate-beta", type=click.FloatRange(0, 100, min_open=True), default=95.0,
              help="beta of the linear mixture used as the gradient surrogate "
                   "(nonlinear_settings.surrogate_alpha).")
@click.option("--grid-size", type=click.IntRange(min=1), default=8,
              help="Values per axis of the (s, p, c) grid.")
@click.option("--s-range", default=None, metavar="LOW,HIGH",
              help="Scale s (log-spaced) [default: 0.1,10].")
@click.option("--p-range", default=None, metavar="LOW,HIGH",
              help="Power p (linear) [default: 1,6].")
@click.option("--c-range", default=None, metavar="LOW,HIGH",
              help="Shift c (linear) [default: minus the median layer-normalised top logit, 0].")
@click.option("--clamp", type=click.Choice(["gelu", "relu", "none"]), default="gelu",
              help="Clamp of the ROB map.")
@click.option("--k", type=click.IntRange(min=2), default=None,
              help="Layer norm over the top-k logits [default: all classes].")
@click.option("--iterations", type=click.IntRange(min=1), default=100,
              help="APGD iterations per run of the minimum-margin attack.")
@click.option("--targets", type=click.IntRange(min=0), default=9,
              help="APGD-T target classes (runner-ups) after APGD-CE.")
@click.option("--batch-size", type=click.IntRange(min=1), default=250,
              help="Attack batch size, and the unit of resumption.")
@click.option("--target-clean-accuracy", type=click.FloatRange(0, 1), default=None,
              help="Also calibrate a trained mixer's alpha_bias (top of its range kept) for this "
                   "clean accuracy on the held-out images (a fraction, e.g. 0.85).")
@click.option("--device", default=None, help="'auto', 'cpu', 'cuda' or 'cuda:N'.")
@threads_option()
@click.option("--log-level", default="INFO",
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
@one_line_errors
def main(config_path: Path, set_items: tuple[str, ...], data_dir: Optional[str],
         output_dir: Path, write_config: Optional[Path], split: str, start: Optional[int],
         n_images: int, beta: float, surrogate_beta: float, grid_size: int,
         s_range: Optional[str], p_range: Optional[str], c_range: Optional[str], clamp: str,
         k: Optional[int], iterations: int, targets: int, batch_size: int,
         target_clean_accuracy: Optional[float], device: Optional[str], threads: Optional[int],
         log_level: str) -> None:
    """Calibrate the nonlinear composite (and the linear mixture's alpha) on held-out images."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ranges = [_pair(s_range), _pair(p_range), _pair(c_range)]
    config = load_config(config_path)
    config = apply_overrides(config, **parse_set_items(set_items))
    config = apply_overrides(config, **{"dataset_settings.path": data_dir,
                                        "evaluation_settings.device": device,
                                        "evaluation_settings.threads": threads})
    from adaptive_smoothing.calibration import CalibrationOptions, run_calibration
    from adaptive_smoothing.runtime import configure_threads
    configure_threads(config.run.threads)
    options = CalibrationOptions(
        output_dir=output_dir, n_images=n_images, start=start, split=split, beta=beta,
        surrogate_beta=surrogate_beta, grid_size=grid_size, s_range=ranges[0],
        p_range=ranges[1], c_range=ranges[2], clamp=clamp, k=k,  # type: ignore[arg-type]
        n_iter=iterations, n_target=targets, batch_size=batch_size,
        target_clean_accuracy=target_clean_accuracy, write_config=write_config)
    record = run_calibration(config, options)
    best = record["nonlinear"]
    click.echo(f"nonlinear: s {best['s']:.4g}, p {best['p']:.4g}, c {best['c']:.4g}, alpha "
               f"{best['alpha']:.6f} (clean mistakes kept {100 * best['objective']:.1f}%); "
               f"linear alpha at beta {beta}: {record['linear_alpha']['alpha']:.6f}; "
               f"surrogate alpha: {record['surrogate_alpha']['alpha']:.6f}"
               + (f"; config {record['config']}" if "config" in record else ""))


if __name__ == "__main__":
    main()
