"""Adaptive smoothing: evaluate (--eval) or train the mixing network (--training) from a config.

    adaptive-smoothing --eval --config configs/demo.yaml         # or: python3 run.py --eval ...
    adaptive-smoothing --training --config configs/rn18_cifar10.yaml
    torchrun --nproc_per_node 4 run.py --training --config configs/cifar10_edm.yaml

Command-line flags override the config's values; every config key is in docs/CONFIG.md.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import click

from adaptive_smoothing.cli.errors import one_line_errors
from adaptive_smoothing.cli.options import PRECISION_HELP, parse_set_items, speed_options
from adaptive_smoothing.config import AUTOATTACK_NAMES, apply_overrides, load_config

logger = logging.getLogger("run")


def _attack_list(value: Optional[str]) -> Optional[list[str]]:
    if value is None:
        return None
    if value.strip().lower() in ("none", ""):
        return []
    return [name.strip() for name in value.split(",") if name.strip()]


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path),
              help="YAML config (the authors' layout is accepted unchanged).")
@click.option("--eval", "eval_flag", is_flag=True, help="Evaluate the composite model.")
@click.option("--training", "training_flag", is_flag=True,
              help="Train the mixing network (docs/TRAINING.md).")
@click.option("--set", "set_items", multiple=True, metavar="KEY=VALUE",
              help="Override any config key (dotted path, YAML value), e.g. --set "
                   "training_settings.lr=1e-4; repeatable; checked like the file. The flags "
                   "below override --set.")
@click.option("--n-examples", type=int, default=None,
              help="Evaluation: use the first N test images [evaluation_settings.n_examples].")
@click.option("--batch-size", type=int, default=None,
              help="Evaluation batch size, or the GLOBAL training batch size with --training.")
@click.option("--device", default=None,
              help="'auto', 'cpu', 'cuda' or 'cuda:N' [evaluation_settings.device].")
@speed_options(
    precision=None, channels_last=None, compile=None,
    precision_help=PRECISION_HELP + " [evaluation_settings/training_settings.precision].",
    channels_last_help="NHWC memory format for the models [evaluation_settings/"
                       "training_settings.channels_last; default on].",
    compile_help="torch.compile the composite [evaluation_settings/training_settings.compile; "
                 "default off].",
    threads_help="torch threads of this process [evaluation_settings.threads; default "
                 "OMP_NUM_THREADS, else the cores (shared by torchrun's processes)].")
@click.option("--data-dir", default=None,
              help="Dataset folder [dataset_settings.path]; a folder holding train.npz/test.npz "
                   "selects the offline .npz format.")
@click.option("--data-format", type=click.Choice(["auto", "torchvision", "npz", "imagefolder"]),
              default=None, help="[dataset_settings.format]; with --data-dir, auto (npz "
                                 "where the folder holds .npz files) unless given.")
@click.option("--mixer-checkpoint", default=None,
              help="Mixing-network checkpoint to load, relative to log_dir "
                   "[model_load_path.comp]; e.g. a training run's checkpoints/mixer.pt.")
@click.option("--output-dir", default=None,
              help="Where results / checkpoints go [log_dir/log_path].")
@click.option("--attacks", default=None,
              help=f"Comma-separated AutoAttack attacks out of {', '.join(AUTOATTACK_NAMES)}; "
                   "'none' to skip AutoAttack [evaluation_settings.attacks_to_run].")
@click.option("--pgd/--no-pgd", default=None, help="Also run PGD [evaluation_settings.pgd].")
@click.option("--adaptive/--no-adaptive", default=None,
              help="Also run the adaptive attack (APGD-CE/T with w * BCE(gamma, 1)) "
                   "[evaluation_settings.adaptive_attack].")
@click.option("--save-adversarial/--no-save-adversarial", default=None,
              help="Save adversarial images under OUTPUT_DIR/adversarial.")
@click.option("--autoattack-iterations", type=int, default=None,
              help="APGD iterations inside AutoAttack (100 = standard) "
                   "[evaluation_settings.autoattack_iterations].")
@click.option("--alpha-sweep", default=None,
              help="Evaluation: also evaluate fixed-alpha mixtures of the same base models, e.g. "
                   "'0,0.25,0.5,0.75,1' (0 = STD only, 1 = ROB only), into OUTPUT_DIR/<model>/. "
                   "Finished fixed-alpha results are reused when only the mixer changes; the adaptive "
                   "attack runs on the composite only.")
@click.option("--fixed-alphas-only", is_flag=True,
              help="With --alpha-sweep: evaluate the fixed-alpha mixtures only, not the "
                   "composite (e.g. while its mixer is still being trained).")
@click.option("--seed", type=int, default=None, help="Random seed [seed].")
@click.option("--overwrite", is_flag=True,
              help="Evaluation: delete the results of an earlier evaluation in the output "
                   "folder first (needed when the model, data or settings changed).")
@click.option("--resume/--no-resume", default=True,
              help="Training: continue from the newest checkpoint in the output folder.")
@click.option("--allow-config-change", default=None, metavar="KEY[,KEY]",
              help="Training: resume although these config keys changed since the checkpoint "
                   "(e.g. training_settings.lr); the change is applied and recorded.")
@click.option("--allow-swapped-bases", is_flag=True,
              help="Load the base models although their checkpoints record that STD was "
                   "adversarially trained and ROB was not (refused otherwise: swapped in the "
                   "config).")
@click.option("--debug", is_flag=True, help="Training: two iterations end to end, then stop.")
@click.option("--log-level", default="INFO",
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
@one_line_errors
def main(config_path: Path, eval_flag: bool, training_flag: bool, set_items: tuple[str, ...],
         n_examples: Optional[int],
         batch_size: Optional[int], device: Optional[str], precision: Optional[str],
         channels_last: Optional[bool], compile_model: Optional[bool], threads: Optional[int],
         data_dir: Optional[str], data_format: Optional[str], mixer_checkpoint: Optional[str],
         output_dir: Optional[str],
         attacks: Optional[str], pgd: Optional[bool], adaptive: Optional[bool],
         save_adversarial: Optional[bool], autoattack_iterations: Optional[int],
         alpha_sweep: Optional[str], fixed_alphas_only: bool, seed: Optional[int],
         overwrite: bool, resume: bool,
         allow_config_change: Optional[str], allow_swapped_bases: bool, debug: bool,
         log_level: str) -> None:
    # Under torchrun only rank 0 logs progress; the others report warnings and errors.
    if int(os.environ.get("RANK", "0")) != 0 and logging.getLevelName(log_level) < logging.WARNING:
        log_level = "WARNING"
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if eval_flag and training_flag:
        raise click.ClickException("--eval and --training exclude each other; run them one "
                                   "after the other")
    if not (eval_flag or training_flag):
        raise click.ClickException("choose --eval or --training")
    mode = "eval" if eval_flag else "training"
    if data_dir is not None and data_format is None:
        data_format = "auto"  # another folder than the config's: its layout is detected
    section = "evaluation_settings" if mode == "eval" else "training_settings"
    # A ConfigError becomes one line in one_line_errors, as every UserError does.
    config = load_config(config_path)
    config = apply_overrides(config, **parse_set_items(set_items))
    config = apply_overrides(config, **{
        "seed": seed,
        "dataset_settings.path": data_dir,
        "dataset_settings.format": data_format,
        "model_load_path.comp": mixer_checkpoint,
        "evaluation_settings.device": device,
        "evaluation_settings.precision": precision,
        "evaluation_settings.output_dir": output_dir,
        "evaluation_settings.n_examples": n_examples,
        "evaluation_settings.attacks_to_run": _attack_list(attacks),
        "evaluation_settings.pgd": pgd,
        "evaluation_settings.adaptive_attack": adaptive,
        "evaluation_settings.save_adversarial": save_adversarial,
        "evaluation_settings.autoattack_iterations": autoattack_iterations,
        "evaluation_settings.data_dir": data_dir,
        ("evaluation_settings.batch_size" if mode == "eval"
         else "training_settings.batch_size"): batch_size,
        "training_settings.precision": precision if mode == "training" else None,
        f"{section}.channels_last": channels_last,
        f"{section}.compile": compile_model,
        "evaluation_settings.threads": threads,
    })

    alphas: list[float] = []
    if mode == "eval" and alpha_sweep is not None:
        try:
            alphas = [float(a) for a in alpha_sweep.split(",") if a.strip()]
        except ValueError:
            alphas = []
        if not alphas or not all(0.0 <= a <= 1.0 for a in alphas):
            raise click.ClickException(
                f"--alpha-sweep {alpha_sweep!r}: expected comma-separated numbers in [0, 1] "
                "(ROB's weight: 0 = STD only, 1 = ROB only), e.g. 0,0.25,0.5,0.75,1")
    if fixed_alphas_only and not alphas:
        raise click.ClickException("--fixed-alphas-only needs --alpha-sweep (and --eval)")
    allowed = [k.strip() for k in (allow_config_change or "").split(",") if k.strip()]
    # Imported here, not at the top, so that --help does not wait for torch and AutoAttack.
    from adaptive_smoothing.checkpoints import swapped_bases_allowed
    from adaptive_smoothing.evaluation import run_alpha_sweep, run_evaluation
    from adaptive_smoothing.runtime import configure_threads
    from adaptive_smoothing.training import run_training
    # Errors about the user's files and settings (and a full disk) become one line in
    # one_line_errors: the message says what to fix, and a traceback would only bury it.
    configure_threads(config.run.threads)
    with swapped_bases_allowed(allow_swapped_bases):
        if mode == "eval":
            table = (run_alpha_sweep(config, alphas, overwrite=overwrite,
                                     with_composite=not fixed_alphas_only)
                     if alpha_sweep is not None else run_evaluation(config, overwrite=overwrite))
            if table is not None:  # None on the other processes under torchrun
                click.echo(table)
        else:
            run_training(config, resume=resume, debug=debug, allow_config_change=allowed)


if __name__ == "__main__":
    main()
