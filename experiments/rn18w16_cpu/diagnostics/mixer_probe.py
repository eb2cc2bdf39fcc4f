"""Can the mixing network (V3, in_planes (16,16)) learn to detect a non-adaptive attack from the
frozen bases' features? BCE only, no composite: clean vs one pre-attacked block."""
import sys, time, numpy as np, torch, torch.nn.functional as F
from pathlib import Path
from adaptive_smoothing.base_training import load_base_model
from adaptive_smoothing.pre_attack import load_blocks
from adaptive_smoothing.data import build_dataset, dataset_tensors
from adaptive_smoothing.models.mixing import MixingNet
torch.set_num_threads(1); torch.manual_seed(0)
here = Path("experiments/rn18w16_cpu")
std, rob = load_base_model(here / "std.pt"), load_base_model(here / "rob_fgsm.pt")
pa = load_blocks(sys.argv[1]); block = int(sys.argv[2]); steps = int(sys.argv[3]); lr = float(sys.argv[4])
xs, ys = dataset_tensors(build_dataset("cifar10", "train", "npz", "../shared/data/cifar10", augment=False))
clean = xs[pa["index"]]

@torch.no_grad()
def feats(x):
    f1, f2 = [], []
    for i in range(0, len(x), 500):
        b = x[i:i + 500].float() / 255
        s, r = std.forward_features(b), rob.forward_features(b)
        f1.append(torch.cat([s.features[0], r.features[0]], 1)); f2.append(torch.cat([s.features[1], r.features[1]], 1))
    return torch.cat(f1), torch.cat(f2)

c1, c2 = feats(clean); a1, a2 = feats(pa["x"][block])
def auc(score, label):
    order = np.argsort(score); ranks = np.empty(len(score)); ranks[order] = np.arange(1, len(score) + 1)
    n1 = label.sum(); n0 = len(label) - n1
    return float((ranks[label == 1].sum() - n1 * (n1 + 1) / 2) / (n0 * n1))
net = MixingNet((16, 16), version=3)
opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-5)
def evaluate():
    net.eval()
    with torch.no_grad():
        s = torch.cat([net([c1[4000:, :16], c1[4000:, 16:]], [c2[4000:, :32], c2[4000:, 32:]]),
                       net([a1[4000:, :16], a1[4000:, 16:]], [a2[4000:, :32], a2[4000:, 32:]])]).flatten()
    net.train(); return auc(s.numpy(), np.r_[np.zeros(1000), np.ones(1000)])
t = time.time()
for step in range(steps + 1):
    if step % 100 == 0:
        print(f"block {block} gamma {pa['gamma'][block].item()} step {step} held-out AUC {evaluate():.3f} ({time.time() - t:.0f}s)", flush=True)
    if step == steps: break
    i = torch.randint(0, 4000, (32,)); j = torch.randint(0, 4000, (32,))
    f1 = torch.cat([c1[i], a1[j]]); f2 = torch.cat([c2[i], a2[j]])
    out = net([f1[:, :16], f1[:, 16:]], [f2[:, :32], f2[:, 32:]]).flatten()
    loss = F.binary_cross_entropy_with_logits(out, torch.cat([torch.zeros(32), torch.ones(32)]))
    opt.zero_grad(); loss.backward(); opt.step()
