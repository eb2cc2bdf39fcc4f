"""The fixed mixtures on the held-out validation images, attacked exactly as the mixer
trainings' periodic validation attacks their composites (the same function, images, seed and
attack settings), so that a pilot's validation curve has its fixed-alpha reference.

    python3 experiments/rn18w16_cpu/rob_logits_pilots/fixed_validation.py [ALPHA ...]

Adds to fixed_validation.json beside this file; one thread, ~1 minute per alpha on 2 cores.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch

from adaptive_smoothing.config import load_config
from adaptive_smoothing.data import build_dataset, load_tensors
from adaptive_smoothing.factory import build_composite, load_composite_weights
from adaptive_smoothing.models.composite import fixed_alpha_composite
from adaptive_smoothing.prepare import prepare
from adaptive_smoothing.seeding import stream
from adaptive_smoothing.validation import validate

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parents[2] / "configs" / "rn18w16_rob_logits_cpu.yaml"


def main(alphas: list[float]) -> None:
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(1)
    run = prepare(load_config(CONFIG))
    composite = build_composite(run.forward, run.num_classes, run.device, source=run.source)
    load_composite_weights(composite, run.checkpoints)
    ts, pgd = run.training, run.pgd
    test = build_dataset(run.dataset.name, "test", run.dataset.format, run.dataset.path,
                         augment=False)
    x, y = load_tensors(test, ts.val_start + ts.n_val_examples)
    x, y = x[ts.val_start:], y[ts.val_start:]
    out = {"images": f"test {ts.val_start}..{ts.val_start + ts.n_val_examples - 1}",
           "attack": f"APGD-CE then APGD-T ({run.attack.n_target} target), "
                     f"{pgd.iters_test} iterations each, Linf {pgd.eps:.5f}", "alphas": {}}
    if (HERE / "fixed_validation.json").exists():  # add to the alphas measured before
        out["alphas"] = json.loads((HERE / "fixed_validation.json").read_text())["alphas"]
    for alpha in alphas:
        result = validate(fixed_alpha_composite(composite, alpha), x, y, eps=pgd.eps,
                          norm=pgd.norm, n_iter=pgd.iters_test, n_target=run.attack.n_target,
                          device=run.device, dtype=torch.float32,
                          batch_size=ts.batch_size_test_per_gpu,
                          generator=stream(run.seed, "validate", 0), use_apgd=pgd.use_aa)
        out["alphas"][f"{alpha:.3f}"] = {"clean": result["clean_acc"],
                                          "robust": result["robust_acc"]}
        logging.info("alpha %.3f: clean %.3f robust %.3f", alpha, result["clean_acc"],
                     result["robust_acc"])
        out["alphas"] = dict(sorted(out["alphas"].items()))
        (HERE / "fixed_validation.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main([float(a) for a in sys.argv[1:]] or [0.72, 0.8, 0.85, 0.9])
