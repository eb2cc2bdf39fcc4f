"""Is a non-adaptive attack detectable from the mixer's inputs? Linear probes on pooled STD/ROB
feature maps (what the mixing network reads) and on the STD-ROB disagreement (logits), clean vs
each pre-attacked block; train on images 0-3999, AUC on 4000-4999."""
import json, sys, numpy as np, torch
from pathlib import Path
from adaptive_smoothing.base_training import load_base_model
from adaptive_smoothing.pre_attack import load_blocks
torch.set_num_threads(1)
here = Path("experiments/rn18w16_cpu")
std, rob = load_base_model(here / "std.pt"), load_base_model(here / "rob_fgsm.pt")
pa = load_blocks(sys.argv[1])
from adaptive_smoothing.data import build_dataset, dataset_tensors
xs, ys = dataset_tensors(build_dataset("cifar10", "train", "npz", "../shared/data/cifar10", augment=False))
clean = xs[pa["index"]]
assert clean.dtype == torch.uint8 and (ys[pa["index"]] == pa["y"]).all()

def pooled(f):  # mean and std over space per channel
    return torch.cat([f.mean((2, 3)), f.std((2, 3))], 1)

@torch.no_grad()
def feats(x):
    out = []
    for i in range(0, len(x), 500):
        b = x[i:i + 500].float() / 255
        s, r = std.forward_features(b), rob.forward_features(b)
        ps, pr = s.logits.softmax(1), r.logits.softmax(1)
        kl = (ps * (ps.clamp_min(1e-12).log() - pr.clamp_min(1e-12).log())).sum(1, keepdim=True)
        out.append(torch.cat([pooled(s.features[0]), pooled(s.features[1]),
                              pooled(r.features[0]), pooled(r.features[1]), kl], 1))
    return torch.cat(out)

def auc(score, label):
    order = np.argsort(score); ranks = np.empty(len(score)); ranks[order] = np.arange(1, len(score) + 1)
    n1 = label.sum(); n0 = len(label) - n1
    return float((ranks[label == 1].sum() - n1 * (n1 + 1) / 2) / (n0 * n1))

def probe(a, b, cols):
    xtr = torch.cat([a[:4000, cols], b[:4000, cols]]); ytr = torch.cat([torch.zeros(4000), torch.ones(4000)])
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    w = torch.zeros(len(cols) if isinstance(cols, list) else xtr.shape[1], requires_grad=True); c = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, c], max_iter=200)
    def closure():
        opt.zero_grad(); l = torch.nn.functional.binary_cross_entropy_with_logits((xtr - mu) / sd @ w + c, ytr) + 1e-3 * w.square().sum(); l.backward(); return l
    opt.step(closure)
    xte = torch.cat([a[4000:, cols], b[4000:, cols]]); yte = np.r_[np.zeros(1000), np.ones(1000)]
    return auc(((xte - mu) / sd @ w + c).detach().numpy(), yte)

fc = feats(clean)
d = fc.shape[1]; c1 = 2 * std.feature_channels[0]; c2 = 2 * std.feature_channels[1]
groups = {"std_feat": list(range(0, c1 + c2)), "rob_feat": list(range(c1 + c2, 2 * (c1 + c2))),
          "all_feat": list(range(0, 2 * (c1 + c2))), "kl_std_rob": [d - 1]}
res = {}
for k, g in enumerate(pa["gamma"].tolist()):
    fa = feats(pa["x"][k])
    res[str(g)] = {name: round(probe(fc, fa, cols), 3) for name, cols in groups.items()}
    print(g, res[str(g)], flush=True)
json.dump(res, open(sys.argv[2], "w"), indent=1)
