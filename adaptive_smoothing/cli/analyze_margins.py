"""How much of ROB's robustness can a mixture keep? ROB's probability margins under attack and
fixed-alpha mixtures at several ROB logit scales (adaptive_smoothing.analysis;
docs/METHOD.md, "Certified robustness")."""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path

import click

from adaptive_smoothing.analysis import fixed_mixture_accuracy, rob_margin_report
from adaptive_smoothing.base_training import load_base_model
from adaptive_smoothing.checkpoints import BASE_TRAINING_FORMAT, check_base_roles, read_entries
from adaptive_smoothing.cli.errors import one_line_errors
from adaptive_smoothing.data import build_dataset, load_tensors
from adaptive_smoothing.models import CompositeModel
from adaptive_smoothing.persist import write_text_atomic

logger = logging.getLogger("analyze_margins")


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}") from None


@click.command(context_settings={"show_default": True})
@click.option("--std", "std_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="STD checkpoint written by scripts/train_base.py.")
@click.option("--rob", "rob_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="ROB checkpoint written by scripts/train_base.py.")
@click.option("--dataset", type=click.Choice(["cifar10", "cifar100"]), default="cifar10")
@click.option("--data-format", type=click.Choice(["torchvision", "npz", "imagefolder"]),
              default="npz")
@click.option("--data-dir", default="../shared/data/cifar10", help="Dataset folder.")
@click.option("--n-examples", type=int, default=300, help="First N test images.")
@click.option("--alphas", default="0.8,0.9,0.95", help="Fixed mixture weights on ROB.")
@click.option("--rob-scales", default="1,2,4", help="ROB logit scales s_rob to try.")
@click.option("--std-scale", type=float, default=1.0, help="STD logit scale s_std.")
@click.option("--n-iter", type=int, default=20, help="APGD-CE iterations (Linf 8/255).")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="JSON file for the results.")
@click.option("--allow-swapped-bases", is_flag=True,
              help="Analyse although the checkpoints record that STD was adversarially trained "
                   "and ROB was not (refused otherwise).")
@one_line_errors
def main(std_path: str, rob_path: str, dataset: str, data_format: str, data_dir: str,
         n_examples: int, alphas: str, rob_scales: str, std_scale: float, n_iter: int,
         output: Path, allow_swapped_bases: bool) -> None:
    """Report ROB's margins at its adversarial points and the fixed mixtures' accuracies."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    alpha_list, scale_list = _floats(alphas), _floats(rob_scales)
    # The same check of the recorded training as the composite's loader (checkpoints.py).
    check_base_roles(*(read_entries(path, ("model",), BASE_TRAINING_FORMAT)
                       for path in (std_path, rob_path)), std_path, rob_path,
                     allow_swapped=allow_swapped_bases)
    std, rob = load_base_model(Path(std_path)), load_base_model(Path(rob_path))
    x, y = load_tensors(build_dataset(dataset, "test", data_format, data_dir, augment=False),
                        n_examples)
    report = rob_margin_report(rob, x, y, alpha_list, n_iter=n_iter)
    logger.info("ROB: clean %.3f, robust %.3f; margin quantiles at its robust points %s; share "
                "of points kept whatever STD says, per alpha: %s", report.rob_clean_accuracy,
                report.rob_robust_accuracy, report.margin_quantiles, report.kept_at_alpha)
    mixtures = []
    for s_rob in scale_list:
        composite = CompositeModel(std, rob, None, std_scale=std_scale, rob_scale=s_rob).eval()
        for alpha in alpha_list:
            clean, robust = fixed_mixture_accuracy(composite, alpha, x, y, n_iter=n_iter)
            logger.info("s_std %g, s_rob %g, alpha %g: clean %.3f, robust %.3f", std_scale,
                        s_rob, alpha, clean, robust)
            mixtures.append({"std_scale": std_scale, "rob_scale": s_rob, "alpha": alpha,
                             "clean_accuracy": clean, "robust_accuracy": robust})
    write_text_atomic(output, json.dumps({
        "command": " ".join(sys.argv), "n_examples": len(y), "attack": f"APGD-CE {n_iter} it, "
        "Linf 8/255 (adaptive_smoothing.attacks.apgd)", "rob": dataclasses.asdict(report),
        "fixed_mixtures": mixtures}, indent=2))
    click.echo(f"wrote {output}")


if __name__ == "__main__":
    main()
