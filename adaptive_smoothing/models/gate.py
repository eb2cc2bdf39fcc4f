"""The logit gate: gamma from ROB's logits alone (docs/METHOD.md, "Mixer inputs").

A mixing network that reads STD's feature maps gives the attacker a lever on gamma that does not
pass through the robust model: a perturbation that moves STD's features, which STD does not
resist, can push gamma towards STD. The gate (``forward_settings.mixer_inputs: rob_logits``)
reads only ROB's scaled logits s_rob * h(x), so to move gamma an attacker has to move ROB's
output, which is what ROB is trained to resist.

Its input per image, all computed in float32 from z = s_rob * h(x):

- the top-k of z layer-normalised over the classes ((z - mean) / std), sorted descending
  (k = min(10, classes): all of CIFAR-10's; a sorted vector does not depend on which class is on
  top, so the gate learns confidence, not classes);
- three statistics: the margin m = top-1 minus top-2 of the normalised logits, the entropy of
  softmax(z) and -log max softmax(z) (= logsumexp(z) - max z, the log-sum-exp in a bounded form).

Those k + 3 numbers go through Linear(k + 3 -> 16), tanh and Linear(16 -> 1); to that is added
w * m with w = softplus(a) >= 0, a learned parameter. The margin term is always there (not a
setting): it is the MixedNUTS prior (docs/METHOD.md, "Nonlinear mixing") that ROB's confident
decisions are its robust ones, so, other things equal, gamma grows with ROB's margin. It is a
prior, not a guarantee: the MLP also sees the margin and may bend the whole away from monotone.
About 240 parameters; the gate has no BatchNorm, so training and evaluation mode compute the
same (the composite's gamma BN still follows it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GATE_TOP_K = 10
GATE_HIDDEN = 16
_LN_EPS = 1e-5
# The parameter whose softplus is the margin weight; its name marks a gate's state dict
# (checkpoints.py tells the mixer kinds apart by it).
MARGIN_PARAMETER = "raw_margin_weight"


class LogitGate(nn.Module):
    """gamma (B, 1) from ROB's scaled logits (B, classes); see the module docstring.

    Args:
        num_classes: the classes of the logits (at least 2).
        top_k: how many sorted normalised logits it reads (at most ``num_classes``).
        hidden: width of the hidden layer.
    """

    def __init__(self, num_classes: int, top_k: int = GATE_TOP_K,
                 hidden: int = GATE_HIDDEN) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"the logit gate needs at least 2 classes, got {num_classes}")
        self.num_classes = int(num_classes)
        self.top_k = min(int(top_k), self.num_classes)
        self.hidden = nn.Linear(self.top_k + 3, hidden)
        self.out = nn.Linear(hidden, 1)
        # softplus(0) = log 2: the margin term starts on, with a modest weight.
        self.register_parameter(MARGIN_PARAMETER, nn.Parameter(torch.zeros(())))

    @property
    def margin_weight(self) -> torch.Tensor:
        """w >= 0, the weight of ROB's margin in gamma."""
        return F.softplus(getattr(self, MARGIN_PARAMETER))

    def inputs(self, scaled_logits: torch.Tensor) -> torch.Tensor:
        """The (B, top_k + 3) input of the MLP; column top_k is the margin."""
        z = scaled_logits.float()
        if z.dim() != 2 or z.shape[1] != self.num_classes:
            raise ValueError(f"the logit gate expects logits of shape (B, {self.num_classes}), "
                             f"got {tuple(z.shape)}")
        normed = F.layer_norm(z, (self.num_classes,), eps=_LN_EPS)
        top = normed.topk(self.top_k, dim=1).values  # sorted descending
        margin = top[:, 0] - top[:, 1]
        log_p = torch.log_softmax(z, dim=1)
        entropy = -(log_p.exp() * log_p).sum(1)
        neg_log_p_max = -log_p.max(1).values
        return torch.cat([top, torch.stack([margin, entropy, neg_log_p_max], 1)], 1)

    def forward(self, scaled_logits: torch.Tensor) -> torch.Tensor:
        """Return gamma, shape (B, 1), in float32 (under autocast too: a few hundred
        parameters cost nothing, and bf16 would round gamma)."""
        with torch.autocast(scaled_logits.device.type, enabled=False):
            features = self.inputs(scaled_logits)
            margin = features[:, self.top_k:self.top_k + 1]
            return self.out(torch.tanh(self.hidden(features))) + self.margin_weight * margin
