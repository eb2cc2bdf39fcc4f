# Fixed-alpha mixtures through the package's own evaluate(), exactly as run_alpha_sweep does
# (same model_info, comp None), so that `run.py --eval --alpha-sweep` over the same folder reuses them.
import dataclasses, json, logging, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
logging.basicConfig(level=logging.INFO)
from adaptive_smoothing.config import load_config, apply_overrides
from adaptive_smoothing import evaluation as ev
from adaptive_smoothing.models.composite import fixed_alpha_composite
from adaptive_smoothing.factory import build_composite
from adaptive_smoothing.checkpoints import load_std_checkpoint, load_rob_checkpoint
from adaptive_smoothing.data import build_dataset, load_tensors
out_dir, n, iters, alphas = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
cfg = apply_overrides(load_config("configs/rn18w8_cifar10_cpu.yaml"), **{
    "model_load_path.comp": "mixer_e/checkpoints/last.pt", "evaluation_settings.n_examples": n,
    "evaluation_settings.autoattack_iterations": iters,
    "evaluation_settings.output_dir": out_dir, "evaluation_settings.device": "cpu"})
s = cfg.evaluation_settings
comp = build_composite(cfg, "cpu")
load_std_checkpoint(comp.std_model, cfg.model_path("std")); load_rob_checkpoint(comp.rob_model, cfg.model_path("rob"))
x, y = load_tensors(build_dataset("cifar10", "test", "npz", s.data_dir, augment=False), s.n_examples)
info = json.loads(json.dumps({"forward_settings": dataclasses.asdict(cfg.forward_settings),
        "model_load_path": dict(dataclasses.asdict(cfg.model_load_path), comp=None), "dataset": cfg.dataset_settings.name}, default=str))
for alpha in [float(a) for a in alphas.split(",")]:
    name = f"alpha_{alpha:.3f}"
    res = ev.evaluate(fixed_alpha_composite(comp, alpha), x, y, s, Path(out_dir) / name,
                      device=torch.device("cpu"), model_info=dict(info, variant=name))
    print(name, res["clean_accuracy"], res["robust_accuracy"], flush=True)
