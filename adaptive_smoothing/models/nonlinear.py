"""Nonlinear mixing without a mixing network (Bai et al., "MixedNUTS"; docs/METHOD.md,
"Nonlinear mixing").

    p(x) = (1 - alpha) * m_std(g(x)) + alpha * softmax(T(h(x))),    output = log p(x)

m_std is STD's "hard max" (the one-hot vector of its argmax) or its softmax; T, the ROB map, is
a layer norm over the top-k logits, a clamp (GELU, ReLU or none) after a shift c, a signed power
p and a scale s. alpha is one constant. STD's one-hot adds at most (1 - alpha) to any class, so
the mixture keeps ROB's decision wherever ROB's transformed probability margin is at least
(1 - alpha) / alpha.

Hard max has no gradient and large s, p saturate, so gradient attacks on the output alone can be
masked. :meth:`NonlinearComposite.surrogate_log_probs` is the authors' differentiable stand-in
(the linear mixture of the raw softmaxes, ROB's blended with a share of the transformed one), and
:class:`SurrogateGradientClassifier` returns the true output with the surrogate's gradient, so an
attack steers by the surrogate and judges success on the true output.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from adaptive_smoothing.models.base import BaseClassifier
from adaptive_smoothing.models.composite import CompositeOutput

StdMap = Literal["hard_max", "identity"]
Clamp = Literal["gelu", "relu", "none"]
STD_MAPS: tuple[str, ...] = ("hard_max", "identity")
CLAMPS: tuple[str, ...] = ("gelu", "relu", "none")
# The authors' layer-norm epsilon (added to the variance) and their share of ROB's raw softmax
# in the gradient surrogate.
_LN_EPS = 1e-8
SURROGATE_RAW_SHARE = 0.9


def rob_map(logits: torch.Tensor, *, s: float, p: float, c: float, clamp: Clamp = "gelu",
            k: Optional[int] = None) -> torch.Tensor:
    """T(l) = s * sign(u) |u|^p with u = clamp(z + c), z = l normalised by the mean and unbiased
    variance of its top-k entries (k None or >= classes: all); float64 like the authors'
    (a large s * |u|^p overflows float32's exp range long before float64's)."""
    l = logits.double()
    top = l if k is None or k >= l.shape[1] else l.topk(k, dim=1).values
    z = (l - top.mean(1, keepdim=True)) / (top.var(1, keepdim=True) + _LN_EPS).sqrt()
    u = z + c
    if clamp == "gelu":
        u = F.gelu(u)
    elif clamp == "relu":
        u = F.relu(u)
    # sign(u) |u|^p; at u = 0 (ReLU's negative side) the value is 0 and so is the gradient,
    # instead of the 0 * inf = NaN that |u|^p's derivative gives there for p < 1.
    zero = u == 0
    powered = u.sign() * torch.where(zero, torch.ones_like(u), u.abs()).pow(p)
    return s * torch.where(zero, torch.zeros_like(u), powered)


def hard_max_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log of the one-hot vector of the argmax: 0 there, -inf elsewhere (no gradient)."""
    index = logits.argmax(1, keepdim=True)
    out = torch.full_like(logits, -math.inf, dtype=torch.float64)
    return out.scatter(1, index, 0.0)


def transformed_margins(logits: torch.Tensor, **transform: float) -> torch.Tensor:
    """Top-1 minus top-2 of softmax(T(logits)) per row: the margin the decision guarantee and
    the calibration use (``transform``: the arguments of :func:`rob_map`)."""
    probs = torch.softmax(rob_map(logits, **transform), dim=1)  # type: ignore[arg-type]
    top2 = probs.topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


def check_nonlinear_constants(*, alpha: float, s: float, p: float, k: Optional[int]) -> None:
    """ValueError unless the constants describe a valid nonlinear mixture."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must lie in (0, 1], got {alpha}")
    if not s > 0:
        raise ValueError(f"the ROB map's scale s must be positive, got {s}")
    if not p > 0:
        raise ValueError(f"the ROB map's power p must be positive, got {p}")
    if k is not None and k < 2:
        raise ValueError(f"the layer norm's top-k must be at least 2, got {k}")


@dataclass(frozen=True)
class NonlinearConstants:
    """The constants of one nonlinear mixture (the published ones sit in published.py)."""

    alpha: float
    s: float
    p: float
    c: float
    clamp: Clamp = "gelu"
    k: Optional[int] = None
    std_map: StdMap = "hard_max"
    surrogate_alpha: Optional[float] = None

    def __post_init__(self) -> None:
        check_nonlinear_constants(alpha=self.alpha, s=self.s, p=self.p, k=self.k)

    def composite(self, std_model: BaseClassifier, rob_model: BaseClassifier,
                  **kwargs: float) -> "NonlinearComposite":
        """The nonlinear composite of these constants (``kwargs``: its other arguments)."""
        return NonlinearComposite(std_model, rob_model, alpha=self.alpha, s=self.s, p=self.p,
                                  c=self.c, clamp=self.clamp, k=self.k, std_map=self.std_map,
                                  surrogate_alpha=self.surrogate_alpha, **kwargs)

    @classmethod
    def from_composite(cls, composite: "NonlinearComposite") -> "NonlinearConstants":
        t = composite.transform
        return cls(alpha=composite.alpha, s=t["s"], p=t["p"], c=t["c"], clamp=t["clamp"],
                   k=t["k"], std_map=composite.std_map,  # type: ignore[arg-type]
                   surrogate_alpha=composite.surrogate_alpha)


class NonlinearComposite(nn.Module):
    """STD's map and ROB's transformed softmax mixed with one constant alpha, in log space.

    It has the face of :class:`~adaptive_smoothing.models.composite.CompositeModel` (a
    ``CompositeOutput``, ``std_model``/``rob_model``/logit scales for fixed-alpha baselines,
    ``train(mode, scale_alpha)``), so evaluation, sweeps and AutoAttack take it unchanged.

    Args:
        std_model, rob_model: frozen base classifiers.
        alpha: ROB's weight, in (0, 1].
        s, p, c, clamp, k: the ROB map (:func:`rob_map`).
        std_map: 'hard_max' (the published choice) or 'identity' (softmax of s_std * g).
        std_scale, rob_scale: logit scales of the raw softmaxes (identity map, surrogate).
        surrogate_alpha: alpha of the surrogate's linear mixture (default ``alpha``).
        surrogate_raw_share: share of ROB's raw softmax in the surrogate's ROB term.
    """

    mixer = None                       # no mixing network: nothing for a mixer-aware attack
    unsafe_detach_mixer_inputs = False  # every input gradient flows (evaluation is valid)

    def __init__(self, std_model: BaseClassifier, rob_model: BaseClassifier, *, alpha: float,
                 s: float, p: float, c: float, clamp: Clamp = "gelu", k: Optional[int] = None,
                 std_map: StdMap = "hard_max", std_scale: float = 1.0, rob_scale: float = 1.0,
                 surrogate_alpha: Optional[float] = None,
                 surrogate_raw_share: float = SURROGATE_RAW_SHARE) -> None:
        super().__init__()
        check_nonlinear_constants(alpha=alpha, s=s, p=p, k=k)
        if clamp not in CLAMPS or std_map not in STD_MAPS:
            raise ValueError(f"clamp must be one of {CLAMPS} and std_map one of {STD_MAPS}, got "
                             f"{clamp!r}, {std_map!r}")
        surrogate_alpha = alpha if surrogate_alpha is None else surrogate_alpha
        if not 0.0 <= surrogate_alpha <= 1.0 or not 0.0 <= surrogate_raw_share <= 1.0:
            raise ValueError(f"surrogate_alpha and surrogate_raw_share must lie in [0, 1], got "
                             f"{surrogate_alpha}, {surrogate_raw_share}")
        self.std_model, self.rob_model = std_model, rob_model
        for model in (std_model, rob_model):
            model.eval()
            model.requires_grad_(False)
        self.alpha = float(alpha)
        self.transform = {"s": float(s), "p": float(p), "c": float(c), "clamp": clamp, "k": k}
        self.std_map = std_map
        self.std_scale, self.rob_scale = float(std_scale), float(rob_scale)
        self.surrogate_alpha = float(surrogate_alpha)
        self.surrogate_raw_share = float(surrogate_raw_share)
        self.scale_alpha = True
        self.training = False

    # The base models stay in eval mode; there is nothing else with a mode.
    def train(self, mode: bool = True, scale_alpha: Optional[bool] = None
              ) -> "NonlinearComposite":
        self.training = bool(mode)
        return self

    def eval(self, scale_alpha: Optional[bool] = None) -> "NonlinearComposite":
        return self.train(False)

    @property
    def rob_only(self) -> bool:
        return self.alpha == 1.0

    def _constant(self, x: torch.Tensor, value: float) -> torch.Tensor:
        return torch.full((x.shape[0],), value, device=x.device, dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> CompositeOutput:
        rob_logits = self.rob_model(x).float()
        std_logits = None if self.rob_only else self.std_model(x).float()
        return self._output(self._log_probs(std_logits, rob_logits), x)

    def _output(self, log_probs: torch.Tensor, x: torch.Tensor) -> CompositeOutput:
        gamma = math.inf if self.rob_only else math.log(self.alpha / (1 - self.alpha))
        return CompositeOutput(log_probs, self._constant(x, gamma), self._constant(x, self.alpha))

    def _log_probs(self, std_logits: Optional[torch.Tensor],
                   rob_logits: torch.Tensor) -> torch.Tensor:
        """log((1 - a) m_std + a softmax(T)) in float64 log space: hard max's zeros are -inf
        terms of a logaddexp, which stays finite (and has finite gradients) since ROB's term
        is finite everywhere."""
        rob_log = torch.log_softmax(rob_map(rob_logits, **self.transform), dim=1)
        if std_logits is None:
            return rob_log.float()
        std_log = (hard_max_log_probs(std_logits) if self.std_map == "hard_max"
                   else torch.log_softmax(std_logits.double() * self.std_scale, dim=1))
        mixed = torch.logaddexp(math.log1p(-self.alpha) + std_log, math.log(self.alpha) + rob_log)
        return mixed.float()

    def _surrogate_log_probs(self, std_logits: torch.Tensor,
                             rob_logits: torch.Tensor) -> torch.Tensor:
        a, r = self.surrogate_alpha, self.surrogate_raw_share
        std_log = torch.log_softmax(std_logits.double() * self.std_scale, dim=1)
        rob_raw = torch.log_softmax(rob_logits.double() * self.rob_scale, dim=1)
        rob_t = torch.log_softmax(rob_map(rob_logits, **self.transform), dim=1)
        terms = [(1 - a, std_log), (a * r, rob_raw), (a * (1 - r), rob_t)]
        stacked = torch.stack([math.log(w) + t for w, t in terms if w > 0])
        return torch.logsumexp(stacked, dim=0).float()

    def surrogate_log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """The differentiable surrogate: log of (1 - a_d) softmax(s_std g) + a_d (r softmax(
        s_rob h) + (1 - r) softmax(T(h))), a_d = ``surrogate_alpha``, r = the raw share."""
        return self._surrogate_log_probs(self.std_model(x).float(), self.rob_model(x).float())

    def true_and_surrogate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both outputs from one forward pass of each base model."""
        std_logits, rob_logits = self.std_model(x).float(), self.rob_model(x).float()
        return (self._log_probs(None if self.rob_only else std_logits, rob_logits),
                self._surrogate_log_probs(std_logits, rob_logits))


class SurrogateGradientClassifier(nn.Module):
    """The nonlinear composite's true log-probabilities, differentiated as its surrogate.

    ``surrogate + (true - surrogate).detach()``: every value an attack reads (its loss, whether
    a point is misclassified, which iterate to keep) is the true output's, and every gradient is
    the surrogate's. An attack on this module is thus judged on the true model.
    """

    def __init__(self, composite: NonlinearComposite) -> None:
        super().__init__()
        self.composite = composite

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        true, surrogate = self.composite.true_and_surrogate(x)
        return surrogate + (true - surrogate).detach()
