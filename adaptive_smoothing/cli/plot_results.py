"""Plot an alpha sweep: tradeoff.png (clean vs robust accuracy of every kind) and, for a trained
mixer, alpha_hist.png; and each composite against the fixed mixtures in comparison.json (the
fixed-alpha curve, and the matched fixed alpha with paired statistics)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from adaptive_smoothing.analysis import compare_sweep
from adaptive_smoothing.cli.errors import one_line_errors
from adaptive_smoothing.persist import write_text_atomic
from adaptive_smoothing.plots import plot_alpha_histogram, plot_tradeoff


@click.command(context_settings={"show_default": True})
@click.argument("sweep_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--output-dir", type=click.Path(path_type=Path), default=None,
              help="Where the PNGs and comparison.json go (default: SWEEP_DIR).")
@click.option("--title", default="", help="Title prefix of the figures.")
@one_line_errors
def main(sweep_dir: Path, output_dir: Path | None, title: str) -> None:
    """SWEEP_DIR is the output folder of `run.py --eval --alpha-sweep ...` (holds sweep.json)."""
    output_dir = output_dir or sweep_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    sweep = json.loads((sweep_dir / "sweep.json").read_text())
    plot_tradeoff(sweep, output_dir / "tradeoff.png", title=title)
    written = [output_dir / "tradeoff.png"]
    if (sweep_dir / "adaptive" / "batches").is_dir():
        plot_alpha_histogram(sweep_dir / "adaptive" / "batches", output_dir / "alpha_hist.png",
                             title=f"{title}: alpha" if title else "")
        written.append(output_dir / "alpha_hist.png")
    click.echo(f"wrote {', '.join(map(str, written))}")
    if not any(name in sweep for name in ("adaptive", "nonlinear")):
        return
    comparison = compare_sweep(sweep_dir)
    write_text_atomic(output_dir / "comparison.json", json.dumps(comparison, indent=1) + "\n")
    for name, cmp in comparison.items():
        curve = ("outside the fixed curve's clean range" if cmp["curve_robust"] is None else
                 f"fixed-alpha curve {cmp['curve_robust']:.1f}% at that clean accuracy "
                 f"(alphas {cmp['bracket_alphas'][0]:g}-{cmp['bracket_alphas'][1]:g}): "
                 f"{cmp['above_curve']:+.1f} points")
        matched = cmp["matched"]
        if matched is not None:
            paired = matched["robust_paired"]
            curve += (f"; matched fixed alpha {matched['fixed_alpha']:.4f} ({matched['clean']:.1f}"
                      f"% clean, {matched['robust']:.1f}% robust): {paired['difference']:+.1f} "
                      f"points (paired SE {paired['difference_se']:.1f}, McNemar p "
                      f"{paired['mcnemar_p']:.3g})")
        click.echo(f"{name}: {cmp['clean']:.1f}% clean (SE {cmp['clean_se']:.1f}), "
                   f"{cmp['robust']:.1f}% robust (SE {cmp['robust_se']:.1f}), n = "
                   f"{cmp['n_examples']}; {curve}")
    click.echo(f"wrote {output_dir / 'comparison.json'}")


if __name__ == "__main__":
    main()
