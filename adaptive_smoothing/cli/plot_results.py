"""Plot an alpha sweep: tradeoff.png (clean vs robust accuracy) and alpha_hist.png; and the
composite against the fixed-alpha curve in comparison.json."""
from __future__ import annotations

import json
from pathlib import Path

import click

from adaptive_smoothing.cli.errors import one_line_errors
from adaptive_smoothing.analysis import compare_with_fixed_curve
from adaptive_smoothing.persist import write_text_atomic
from adaptive_smoothing.plots import plot_alpha_histogram, plot_tradeoff


@click.command(context_settings={"show_default": True})
@click.argument("sweep_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--output-dir", type=click.Path(path_type=Path), default=None,
              help="Where the PNGs go (default: SWEEP_DIR).")
@click.option("--title", default="", help="Title prefix of both figures.")
@one_line_errors
def main(sweep_dir: Path, output_dir: Path | None, title: str) -> None:
    """SWEEP_DIR is the output folder of `run.py --eval --alpha-sweep ...` (holds sweep.json)."""
    output_dir = output_dir or sweep_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    sweep = json.loads((sweep_dir / "sweep.json").read_text())
    plot_tradeoff(sweep, output_dir / "tradeoff.png", title=title)
    plot_alpha_histogram(sweep_dir / "adaptive" / "batches", output_dir / "alpha_hist.png",
                         title=f"{title}: alpha" if title else "")
    click.echo(f"wrote {output_dir / 'tradeoff.png'} and {output_dir / 'alpha_hist.png'}")
    if "adaptive" in sweep:
        cmp = compare_with_fixed_curve(sweep)
        write_text_atomic(output_dir / "comparison.json", json.dumps(cmp, indent=1) + "\n")
        curve = ("outside the fixed curve's clean range" if cmp["curve_robust"] is None else
                 f"fixed-alpha curve {cmp['curve_robust']:.1f}% at that clean accuracy "
                 f"(alphas {cmp['bracket_alphas'][0]:g}-{cmp['bracket_alphas'][1]:g}): "
                 f"{cmp['above_curve']:+.1f} points")
        click.echo(f"composite: {cmp['clean']:.1f}% clean (SE {cmp['clean_se']:.1f}), "
                   f"{cmp['robust']:.1f}% robust (SE {cmp['robust_se']:.1f}), n = "
                   f"{cmp['n_examples']}; {curve}; wrote {output_dir / 'comparison.json'}")


if __name__ == "__main__":
    main()
