"""Fixed-alpha mixtures of the rn18w8 CPU base models through the package's own evaluation, as
``run.py --eval --alpha-sweep`` runs them (same model_info, comp None), so that a sweep over the
same folder reuses them.

    python3 fixed_alphas.py OUT_DIR N_EXAMPLES AUTOATTACK_ITERATIONS ALPHAS   (e.g. 0.84,0.8,0.9)

The recorded figures beside this script (alpha_*.json) were produced at commit cb1dc4d, with the
API of that time (build_composite(config), checkpoints.load_std_checkpoint/load_rob_checkpoint,
evaluation.evaluate per alpha); this version calls today's equivalent, run_alpha_sweep with
with_composite=False (the fixed mixtures alone, standard evaluation without the adaptive attack).
"""
import logging
import sys

import torch

from adaptive_smoothing.config import apply_overrides, load_config
from adaptive_smoothing.evaluation import run_alpha_sweep

torch.set_num_threads(1)
logging.basicConfig(level=logging.INFO)
out_dir, n, iters, alphas = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
cfg = apply_overrides(load_config("configs/rn18w8_cifar10_cpu.yaml"), **{
    "evaluation_settings.n_examples": n,
    "evaluation_settings.autoattack_iterations": iters,
    "run.output_dir": out_dir, "run.device": "cpu"})
logging.getLogger(__name__).info("\n%s", run_alpha_sweep(
    cfg, [float(a) for a in alphas.split(",")], with_composite=False))
