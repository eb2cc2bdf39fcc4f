"""Plot a mixer training's held-out validation curves: validation.png and validation.json."""
from __future__ import annotations

import json
from pathlib import Path

import click

from adaptive_smoothing.cli.errors import one_line_errors
from adaptive_smoothing.persist import write_text_atomic
from adaptive_smoothing.plots import plot_validation_curves, read_validation_curves


@click.command(context_settings={"show_default": True})
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--output-dir", type=click.Path(path_type=Path), default=None,
              help="Where validation.png and validation.json go (default: RUN_DIR).")
@click.option("--title", default="", help="Title of the figure.")
@one_line_errors
def main(run_dir: Path, output_dir: Path | None, title: str) -> None:
    """RUN_DIR is the output folder of `run.py --training` (holds tensorboard/).

    validation.json holds every validation scalar as {tag: [[step, value], ...]}: the detection
    AUCs under the fixed and the adaptive attack, clean and robust accuracy, gammas and alphas.
    """
    output_dir = output_dir or run_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    curves = read_validation_curves(run_dir / "tensorboard")
    write_text_atomic(output_dir / "validation.json", json.dumps(curves, indent=1) + "\n")
    plot_validation_curves(curves, output_dir / "validation.png", title=title)
    auc = curves.get("val/auc_adaptive")
    if auc:
        step, best = max(auc, key=lambda sv: sv[1])
        click.echo(f"adaptive-attack AUC: last {auc[-1][1]:.3f} (step {auc[-1][0]}), "
                   f"best {best:.3f} (step {step}), {len(auc)} validations")
    click.echo(f"wrote {output_dir / 'validation.png'} and {output_dir / 'validation.json'}")


if __name__ == "__main__":
    main()
