"""Train a base classifier (standard, PGD-AT or FGSM-RS fast AT) for the composite model."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from adaptive_smoothing.cli.errors import one_line_errors
from adaptive_smoothing.base_training import METHODS, BaseTrainingSettings, train_base_model
from adaptive_smoothing.cli.options import PRECISIONS, speed_options
from adaptive_smoothing.data import FORMATS, build_dataset, take_first
from adaptive_smoothing.runtime import configure_threads


@click.command(context_settings={"show_default": True})
@click.option("--arch", default="resnet18", help="Registered architecture name.")
@click.option("--arch-kwargs", default="{}", help='JSON keyword arguments, e.g. \'{"width": 16}\'.')
@click.option("--dataset", default="cifar10", type=click.Choice(["cifar10", "cifar100"]))
@click.option("--data-format", default="torchvision", type=click.Choice(list(FORMATS)),
              help="torchvision (downloads), npz (offline copy) or imagefolder.")
@click.option("--data-dir", default="data", type=click.Path(path_type=Path),
              help="Dataset folder (npz: folder with train.npz/test.npz).")
@click.option("--n-train", default=None, type=int, help="Use only the first N training images.")
@click.option("--method", default="standard", type=click.Choice(METHODS),
              help="standard training, PGD adversarial training or FGSM-RS fast AT.")
@click.option("--epochs", default=10, type=int)
@click.option("--batch-size", default=128, type=int)
@click.option("--lr", default=0.1, type=float, help="Peak LR of the one-cycle schedule (SGD).")
@click.option("--weight-decay", default=5e-4, type=float)
@click.option("--eps", default=8 / 255, type=float, help="Linf radius for adversarial training.")
@click.option("--pgd-steps", default=7, type=int, help="PGD-AT iterations.")
@click.option("--pgd-step-size", default=2 / 255, type=float, help="PGD-AT step size.")
@speed_options(precision="auto", channels_last=True, compile=False,
               precisions=("auto", *PRECISIONS),
               precision_help="auto = bf16 autocast on CUDA, fp32 on CPU; bf16 also works on CPU "
                              "(fast only with native bf16); fp16 needs CUDA.",
               channels_last_help="NHWC memory format (faster convolutions).")
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
@click.option("--seed", default=0, type=int)
@click.option("--output", required=True, type=click.Path(path_type=Path),
              help="Checkpoint file; an existing one is resumed unless --no-resume.")
@click.option("--resume/--no-resume", default=True)
@one_line_errors
def main(arch: str, arch_kwargs: str, dataset: str, data_format: str, data_dir: Path,
         n_train: int | None, method: str, epochs: int, batch_size: int, lr: float,
         weight_decay: float, eps: float, pgd_steps: int, pgd_step_size: float, precision: str,
         channels_last: bool, compile_model: bool, threads: int | None, device: str, seed: int,
         output: Path, resume: bool) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    configure_threads(threads)
    try:
        kwargs = json.loads(arch_kwargs)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint="--arch-kwargs")
    settings = BaseTrainingSettings(
        arch=arch, arch_kwargs=kwargs, num_classes=100 if dataset == "cifar100" else 10,
        method=method, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
        eps=eps, pgd_steps=pgd_steps, pgd_step_size=pgd_step_size, precision=precision,
        channels_last=channels_last, compile=compile_model, device=device, seed=seed)
    # Unaugmented: the training crops and flips whole batches itself (data.augment_batch).
    train_set = take_first(build_dataset(dataset, "train", data_format, data_dir, augment=False),
                           n_train)
    output.parent.mkdir(parents=True, exist_ok=True)
    # Bad settings (BaseTrainingError, RuntimeSettingsError) become one line in one_line_errors.
    train_base_model(settings, train_set, output, resume=resume)


if __name__ == "__main__":
    main()
