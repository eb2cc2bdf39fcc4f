"""The real composite (train mode: clamp, gamma BN, train constants) + the real CompLoss, clean vs
one pre-attacked block, no online attacks. Held-out AUC of eval-mode gamma (BN re-estimated)."""
import sys, time, numpy as np, torch
from pathlib import Path
from adaptive_smoothing.config import load_config
from adaptive_smoothing.factory import build_composite
from adaptive_smoothing.checkpoints import load_authors_checkpoints
from adaptive_smoothing.losses import CompLoss
from adaptive_smoothing.pre_attack import load_blocks
from adaptive_smoothing.data import build_dataset, dataset_tensors
torch.set_num_threads(1); torch.manual_seed(0)
cfg = load_config("configs/rn18w16_cifar10_cpu.yaml")
here = Path("experiments/rn18w16_cpu")
comp = build_composite(cfg.forward_settings, 10)
load_authors_checkpoints(comp, here / "std.pt", here / "rob_fgsm.pt", None)
pa = load_blocks(sys.argv[1]); block = int(sys.argv[2]); steps = int(sys.argv[3])
xs, ys = dataset_tensors(build_dataset("cifar10", "train", "npz", "../shared/data/cifar10", augment=False))
clean = xs[pa["index"]].float() / 255; adv = pa["x"][block].float() / 255; y = pa["y"]
tc = cfg.training_settings.comp_loss_params
loss_fn = CompLoss(tc.consts.bce, tc.consts.ce, tc.consts.prod, clean_scale=tc.scale.clean, adv_scale=tc.scale.ada)
opt = torch.optim.AdamW(comp.mixer.parameters(), lr=1e-3, weight_decay=1e-5)
def auc(score, label):
    order = np.argsort(score); ranks = np.empty(len(score)); ranks[order] = np.arange(1, len(score) + 1)
    n1 = label.sum(); n0 = len(label) - n1
    return float((ranks[label == 1].sum() - n1 * (n1 + 1) / 2) / (n0 * n1))
def evaluate():
    comp.reestimate_gamma_bn([torch.cat([clean[:32], adv[32:64]])] * 1)
    comp.eval()
    with torch.no_grad():
        g = torch.cat([comp(clean[4000:4500]).gamma, comp(adv[4000:4500]).gamma])
    return auc(g.numpy(), np.r_[np.zeros(500), np.ones(500)])
t = time.time()
for step in range(steps + 1):
    if step % 100 == 0:
        print(f"block {block} step {step} held-out AUC {evaluate():.3f} ({time.time() - t:.0f}s)", flush=True)
    if step == steps: break
    i = torch.randint(0, 4000, (32,)); j = torch.randint(0, 4000, (32,))
    with comp.mode(True, scale_alpha=False):
        out = comp(torch.cat([clean[i], adv[j]]))
        loss = loss_fn(out.log_probs, out.gamma, torch.cat([y[i], y[j]]), torch.cat([torch.zeros(32), torch.ones(32)]))
    opt.zero_grad(); loss.backward(); opt.step()
