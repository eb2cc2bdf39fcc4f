"""Before/after of the gamma BatchNorm re-estimation (docs/TRAINING.md, "The gamma BatchNorm").

Two short mixer trainings of the demo's width-8 ResNet-18 bases on the offline CIFAR-10 copy, the
same seed and settings, one with ``reestimate_gamma_bn`` off (the original momentum-0.01 running
averages) and one with it on. At each checkpoint it reports the deployed (eval-mode) mean gamma on
clean held-out images and the training-mode mean gamma on the clean images of the training
buffers since the previous checkpoint, both as the normalised value z = (gamma - bias) / scale of
their own gamma constants, so that they are comparable: with statistics that follow the mixer the
two z agree in sign and size; with stale ones the deployed z swings.

    PYTHONPATH=. OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice -n 10 \
        python3 experiments/gamma_bn_reestimation/gamma_bn_reestimation.py --data ../shared/data/cifar10 --out /tmp/gamma_bn

Small on purpose (runs in minutes on one CPU thread): batch 16, one target class, ~5-iteration
training attacks, lr 1e-3 (the CPU config's), 12 iterations = 48 optimizer steps, a checkpoint
every 2 iterations, 100 validation images (5-iteration attacks).
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from adaptive_smoothing.config import apply_overrides, load_config
from adaptive_smoothing.prepare import prepare
from adaptive_smoothing.training import build_trainer

REPO = Path(__file__).resolve().parents[2]


def _run(data: str, out: Path, reestimate: bool) -> list[dict]:
    config = load_config(REPO / "configs" / "rn18w8_cifar10_cpu.yaml")
    config = apply_overrides(config, **{
        "log_dir": str(REPO / "demo"), "log_path": str(out / f"reestimate_{reestimate}"),
        "model_load_path.std": "std_rn18_w8.pt", "model_load_path.rob": "rob_rn18_w8_fgsm.pt",
        "dataset_settings.path": data, "evaluation_settings.device": "cpu",
        "training_settings.batch_size": 16, "training_settings.accum_grad": 1,
        "training_settings.max_steps": 48, "training_settings.eval_freq.iter": 2,
        "training_settings.n_val_examples": 100, "training_settings.n_detection_examples": 100,
        "training_settings.batch_size_test_per_gpu": 100,
        "training_settings.reestimate_gamma_bn": reestimate,
        "pgd_settings.n_target_classes": 1, "pgd_settings.iters_test": 5,
        "randomized_attack_settings.iters_df": 4, "randomized_attack_settings.iters_const": 1})
    trainer = build_trainer(prepare(config), resume=False)
    trainer.fit()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(Path(config.run.output_dir) / "tensorboard"))
    events.Reload()
    train = [(e.step, e.value) for e in events.Scalars("train/gamma_mean_label0")]
    tc, ec = config.forward_settings.gamma_consts.train, config.forward_settings.gamma_consts.eval
    rows, previous = [], 0
    val = {tag: {e.step: e.value for e in events.Scalars(f"val/{tag}")}
           for tag in ("gamma_clean", "gamma_adv", "auc_fixed", "auc_adaptive", "alpha_clean")}
    for step in sorted(val["gamma_clean"]):
        window = [v for s, v in train if previous < s <= step]
        previous = step
        train_gamma = sum(window) / len(window)
        rows.append({"step": step,
                     "z_eval_clean_heldout": (val["gamma_clean"][step] - ec[1]) / ec[0],
                     "z_train_clean_buffer": (train_gamma - tc[1]) / tc[0],
                     "alpha_clean": val["alpha_clean"][step],
                     "auc_fixed": val["auc_fixed"][step], "auc_adaptive": val["auc_adaptive"][step]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10"))
    parser.add_argument("--out", default="/tmp/gamma_bn_reestimation")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    results = {str(flag): _run(args.data, out, flag) for flag in (False, True)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "gamma_bn_reestimation.json").write_text(json.dumps(results, indent=2) + "\n")
    for flag, rows in results.items():
        logging.getLogger(__name__).warning("reestimate_gamma_bn=%s", flag)
        for r in rows:
            logging.getLogger(__name__).warning(
                "step %3d  z_eval(clean, held-out) %+8.3f  z_train(clean, buffer) %+7.3f  "
                "alpha_clean %.3f  AUC fixed %.3f adaptive %.3f", r["step"],
                r["z_eval_clean_heldout"], r["z_train_clean_buffer"], r["alpha_clean"],
                r["auc_fixed"], r["auc_adaptive"])


if __name__ == "__main__":
    main()
