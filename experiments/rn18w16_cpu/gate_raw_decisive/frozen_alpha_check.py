"""A further attack on the gate of raw_decisive: APGD-CE + APGD-T (pyautoattack, 9 targets, 100
iterations, per-image random starts) following the gradient of the composite with each image's
alpha held fixed (the gate's inputs detached, so the gradient is the mixture's alone), judged on
the true composite. It checks that the gate's own gradient, which the evaluation's attacks
follow, does not steer them away from adversarial examples that exist (docs/RESULTS.md).

Only the images still robust after the evaluation's attacks (per_image.json, worst case) are
attacked: an image already broken stays broken. Writes frozen_alpha_check.json beside this file
with the new worst case over the evaluation's attacks and this one.

    python3 experiments/rn18w16_cpu/gate_raw_decisive/frozen_alpha_check.py
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from adaptive_smoothing.attacks import PerImageRandom
from adaptive_smoothing.config import apply_overrides, load_config
from adaptive_smoothing.data import build_dataset, load_tensors
# The evaluation's own AutoAttack call (standard parameters, per-image random starts).
from adaptive_smoothing.evaluation import _autoattack
from adaptive_smoothing.factory import build_composite, load_composite_weights
from adaptive_smoothing.models.composite import LogProbClassifier
from adaptive_smoothing.prepare import prepare
from adaptive_smoothing.runtime import AutocastModule

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
EVAL = ROOT / "experiments/rn18w16_cpu/eval/gate_raw_decisive/adaptive"


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    config = apply_overrides(
        load_config(ROOT / "configs/rn18w16_rob_logits_raw_cpu.yaml"),
        **{"model_load_path.comp": "rob_logits_pilots/raw_decisive/checkpoints/mixer.pt",
           "dataset_settings.path": str(ROOT.parent / "shared/data/cifar10"),
           "evaluation_settings.data_dir": str(ROOT.parent / "shared/data/cifar10")})
    run = prepare(config)
    composite = build_composite(run.forward, run.num_classes, run.device, source=run.source)
    load_composite_weights(composite, run.checkpoints)
    composite.eval()
    per_image = json.loads((EVAL / "per_image.json").read_text())
    ids = [i for i, r in zip(per_image["image_ids"], per_image["outcomes"]["robust"]) if r]
    test = build_dataset(run.dataset.name, "test", run.dataset.format,
                         run.evaluation.data_dir, augment=False)
    x_all, y_all = load_tensors(test, run.evaluation.n_examples)
    x, y = x_all[ids], y_all[ids]

    composite.unsafe_detach_mixer_inputs = True  # the attack's model: alpha held per image
    attacked = AutocastModule(LogProbClassifier(composite), run.device, torch.float32)
    x_adv = _autoattack(attacked, x, y, run.evaluation, ("apgd-ce", "apgd-t"),
                        # The surrogate attack's stream: a nonlinear composite's surrogate attack
                        # uses it; the gate's evaluation does not, so these starts are new.
                        device=run.device, random=PerImageRandom(run.evaluation.seed, ids,
                                                                 "surrogate"),
                        seed=run.evaluation.seed)
    composite.unsafe_detach_mixer_inputs = False  # judged on the true composite
    with torch.no_grad():
        still = (composite(x_adv).log_probs.argmax(1) == y).tolist()
    robust_after = sum(still)
    result = {
        "attack": "APGD-CE + APGD-T (9 targets), 100 iterations, pyautoattack, per-image random "
                  "starts, on the composite with the gate's inputs detached; judged on the true "
                  "composite",
        "images": "first 1,000 test images; attacked: the ones robust after the evaluation",
        "robust_before": len(ids),
        "robust_after": robust_after,
        "worst_case_robust_accuracy": robust_after / len(per_image["image_ids"]),
        "broken_image_ids": [i for i, s in zip(ids, still) if not s],
    }
    (HERE / "frozen_alpha_check.json").write_text(json.dumps(result, indent=2) + "\n")
    logging.info("robust before %d, after the frozen-alpha attack %d (of %d)", len(ids),
                 robust_after, len(per_image["image_ids"]))


if __name__ == "__main__":
    main()
