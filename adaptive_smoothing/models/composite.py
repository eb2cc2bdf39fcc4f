"""The adaptively smoothed ("composite", "mixed") classifier of Bai et al.
(docs/METHOD.md, "Composite").

    out(x) = log((1 - alpha(x)) * softmax(s_std * g(x)) + alpha(x) * softmax(s_rob * h(x)))

The composite only mixes: the base models produce logits and features, the mixing network produces
gamma, and this module turns gamma into alpha and mixes the probabilities.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterable, Iterator, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

# The check lives in a torch-free module: the config validates with it too.
from adaptive_smoothing.alpha_range import ALPHA_RANGE_TOLERANCE, check_alpha_range  # noqa: F401
from adaptive_smoothing.model_names import (GAMMA_NORMS, MIXER_INPUTS, GammaNorm,  # noqa: F401
                                            MixerInputs)
from adaptive_smoothing.models.base import BaseClassifier, BaseOutput
from adaptive_smoothing.models.distributed_bn import convert_to_global_batchnorm, global_mean_std
from adaptive_smoothing.models.gate import LogitGate
from adaptive_smoothing.models.mixing import MixingNet

# The mixer, by what it reads (docs/METHOD.md, "Mixer inputs"): the mixing network on both
# models' feature maps or on ROB's alone, or the gate on ROB's logits.
Mixer = Union[MixingNet, LogitGate]

# Training-mode clamp of gamma to [mean - k * std, mean + k * std] before the gamma BatchNorm.
_CLAMP_STDS = 0.6


class CompositeOutput(NamedTuple):
    log_probs: torch.Tensor  # (B, classes): used as logits downstream
    gamma: torch.Tensor      # (B,): after BN and the gamma constants; -inf/+inf in one-model modes
    alpha: torch.Tensor      # (B,): the weight of the ROB model's probabilities


class CompositeModel(nn.Module):
    """Mix a frozen accurate (STD) and a frozen robust (ROB) classifier.

    Args:
        std_model, rob_model: base classifiers; frozen here (eval mode, no parameter grads).
        mixer: the mixing network (or the logit gate), or None for a fixed ``gamma``.
        mixer_inputs: what the mixer reads (docs/METHOD.md, "Mixer inputs"): ``"both"`` models'
            feature maps (a :class:`MixingNet` built for (STD, ROB)), ``"rob_features"`` (a
            :class:`MixingNet` built for (ROB,)) or ``"rob_logits"``, ROB's scaled logits (a
            :class:`LogitGate`).
        std_scale, rob_scale: positive logit scales s_std, s_rob.
        gamma: fixed gamma when there is no mixer; -inf = STD only, +inf = ROB only.
        train_gamma, eval_gamma: (scale, bias) applied to the BN-normalised gamma in training and
            evaluation mode.
        gamma_norm: ``"batchnorm"`` (the paper's: the mixer's output clamped in training, then
            the gamma BN and ``train_gamma`` / ``eval_gamma``) or ``"none"``: gamma is the
            mixer's output as it is, in training and evaluation alike, so the mixer sets its
            own scale and steepness (docs/METHOD.md, "Gamma normalisation"); the gamma BN and
            the gamma constants are then unused.
        alpha_scale, alpha_bias: with scale_alpha on, alpha <- alpha * alpha_scale + alpha_bias.
            (0, 0) means STD only, alpha_bias == 1 ROB only.
        unsafe_detach_mixer_inputs: detach the features (or logits) fed to the mixer, hiding
            the mixer from gradient-based attacks. NOT VALID FOR EVALUATION: robustness measured
            with it on is overstated. It exists only to reproduce the original code's
            ``policy_graph: false``.
    """

    def __init__(self, std_model: BaseClassifier, rob_model: BaseClassifier,
                 mixer: Optional[Mixer] = None, *, mixer_inputs: MixerInputs = "both",
                 std_scale: float = 1.0, rob_scale: float = 1.0, gamma: float = 0.0,
                 train_gamma: tuple[float, float] = (2.0, 0.4),
                 eval_gamma: tuple[float, float] = (2.0, 1.3),
                 alpha_scale: float = 1.0, alpha_bias: float = 0.0,
                 gamma_norm: GammaNorm = "batchnorm",
                 unsafe_detach_mixer_inputs: bool = False) -> None:
        super().__init__()
        if not (std_scale > 0 and rob_scale > 0):
            raise ValueError(f"logit scales must be positive, got std_scale={std_scale}, "
                             f"rob_scale={rob_scale}")
        check_alpha_range(alpha_bias, alpha_scale)
        if math.isnan(gamma):
            raise ValueError("gamma must not be NaN")
        if mixer_inputs not in MIXER_INPUTS:
            raise ValueError(f"mixer_inputs must be one of {MIXER_INPUTS}, got {mixer_inputs!r}")
        if gamma_norm not in GAMMA_NORMS:
            raise ValueError(f"gamma_norm must be one of {GAMMA_NORMS}, got {gamma_norm!r}")
        expected = LogitGate if mixer_inputs == "rob_logits" else MixingNet
        if mixer is not None and not isinstance(mixer, expected):
            raise ValueError(f"mixer_inputs {mixer_inputs!r} needs a {expected.__name__}, got "
                             f"a {type(mixer).__name__}")
        self.std_model = std_model
        self.rob_model = rob_model
        for model in (self.std_model, self.rob_model):
            model.eval()
            model.requires_grad_(False)
        self.mixer = mixer
        self.mixer_inputs: MixerInputs = mixer_inputs
        self.gamma_norm: GammaNorm = gamma_norm
        # Running statistics of gamma are learned with the mixer and saved as its "bn" state.
        self.gamma_bn = nn.BatchNorm1d(1, affine=False, momentum=0.01)
        self.std_scale = float(std_scale)
        self.rob_scale = float(rob_scale)
        self.gamma = float(gamma)
        self.train_gamma = (float(train_gamma[0]), float(train_gamma[1]))
        self.eval_gamma = (float(eval_gamma[0]), float(eval_gamma[1]))
        self.alpha_scale = float(alpha_scale)
        self.alpha_bias = float(alpha_bias)
        self.unsafe_detach_mixer_inputs = unsafe_detach_mixer_inputs
        self.scale_alpha = True
        self.global_batch_stats = False
        self.train(False)

    def use_global_batch_statistics(self) -> None:
        """Training-mode batch statistics (mixer BN, gamma clamp, gamma BN) over all processes of
        torch.distributed, so that DDP training at a global batch B computes what one process at
        batch B computes (see models/distributed_bn.py). Call on every process before wrapping
        the mixer in DDP."""
        self.gamma_bn = convert_to_global_batchnorm(self.gamma_bn)
        if self.mixer is not None:
            convert_to_global_batchnorm(self.mixer)
        self.global_batch_stats = True

    # -- modes -------------------------------------------------------------------------------
    def train(self, mode: bool = True, scale_alpha: Optional[bool] = None) -> "CompositeModel":
        """Set the mixer and gamma BN to ``mode``; the base models always stay in eval mode.

        ``scale_alpha`` defaults to ``not mode`` (on for evaluation, off for training).
        """
        if not isinstance(mode, bool):
            raise ValueError(f"training mode must be a bool, got {mode!r}")
        self.training = mode
        if self.mixer is not None:
            self.mixer.train(mode)
        self.gamma_bn.train(mode)
        self.scale_alpha = (not mode) if scale_alpha is None else bool(scale_alpha)
        return self

    def eval(self, scale_alpha: Optional[bool] = None) -> "CompositeModel":
        return self.train(False, scale_alpha=scale_alpha)

    @contextlib.contextmanager
    def mode(self, training: bool, scale_alpha: Optional[bool] = None
             ) -> Iterator["CompositeModel"]:
        """``train(training, scale_alpha)`` inside the ``with`` block; the caller's mode
        (training and scale_alpha) comes back afterwards, also on error."""
        was_training, was_scale_alpha = self.training, self.scale_alpha
        self.train(training, scale_alpha=scale_alpha)
        try:
            yield self
        finally:
            self.train(was_training, scale_alpha=was_scale_alpha)

    @property
    def std_only(self) -> bool:
        return ((self.mixer is None and self.gamma == -math.inf)
                or (self.alpha_scale == 0 and self.alpha_bias == 0))

    @property
    def rob_only(self) -> bool:
        return (self.mixer is None and self.gamma == math.inf) or self.alpha_bias == 1

    # -- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, mixer: Optional[nn.Module] = None) -> CompositeOutput:
        """``mixer``: a wrapper of ``self.mixer`` to call instead (the trainer's
        DistributedDataParallel, whose forward arms the gradient all-reduce)."""
        batch = x.shape[0]
        if self.std_only:
            logits = self.std_model(x).float() * self.std_scale
            return CompositeOutput(logits, _full(batch, -math.inf, x), _full(batch, 0.0, x))
        if self.rob_only:
            logits = self.rob_model(x).float() * self.rob_scale
            return CompositeOutput(logits, _full(batch, math.inf, x), _full(batch, 1.0, x))

        std_out, rob_out = self._base_outputs(x)
        gamma = self._gamma(std_out, rob_out, x, mixer)

        # log((1 - a) p_std + a p_rob) in log space: the direct form underflows to log(0) = -inf
        # (and NaN gradients) wherever both models give a class a probability below ~1e-38,
        # which confident models do on attacked inputs.
        log_std, log_rob = self._log_weights(gamma)
        alpha = log_rob.exp()
        std_log_probs = torch.log_softmax(std_out.logits.float() * self.std_scale, dim=1)
        rob_log_probs = torch.log_softmax(rob_out.logits.float() * self.rob_scale, dim=1)
        log_probs = torch.logaddexp(log_std.float().unsqueeze(1) + std_log_probs,
                                    log_rob.float().unsqueeze(1) + rob_log_probs)
        return CompositeOutput(log_probs, gamma, alpha)

    def _log_weights(self, gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log(1 - alpha), log(alpha)): the one place where gamma becomes alpha.

        alpha = b + s * sigmoid(gamma), with (b, s) = (alpha_bias, alpha_scale) when the mixer's
        alpha is scaled (scale_alpha on) and (0, 1) otherwise. Computed as
        log(alpha) = logaddexp(log b, log s + logsigmoid(gamma)) and
        log(1 - alpha) = logaddexp(log(1 - b - s), log s + logsigmoid(-gamma)), which stay finite,
        with finite gradients, even where sigmoid(gamma) rounds to 0 or 1.
        """
        # A degenerate range (alpha_scale 0) is reported as gamma = logit(alpha_bias) instead.
        scaled = self.mixer is not None and self.scale_alpha and self.alpha_scale != 0
        bias, scale = (self.alpha_bias, self.alpha_scale) if scaled else (0.0, 1.0)

        def log_const(value: float) -> torch.Tensor:
            # A fill on the device; torch.tensor(value, device=cuda) would be a blocking copy.
            return torch.full_like(gamma, math.log(value) if value > 0 else -math.inf)

        log_rob = torch.logaddexp(log_const(bias),
                                  log_const(scale) + F.logsigmoid(gamma))
        log_std = torch.logaddexp(log_const(max(1.0 - bias - scale, 0.0)),
                                  log_const(scale) + F.logsigmoid(-gamma))
        return log_std, log_rob

    def _base_outputs(self, x: torch.Tensor) -> tuple[BaseOutput, BaseOutput]:
        """Both base models' logits, with the feature maps where the mixer reads them (a
        model's plain forward otherwise: a RobustBench model without known feature maps then
        still serves, e.g. as ROB under the logit gate)."""
        reads = self._features_read()
        outputs = []
        for which, model in (("std", self.std_model), ("rob", self.rob_model)):
            outputs.append(model.forward_features(x) if which in reads
                           else BaseOutput(model(x), ()))
        return outputs[0], outputs[1]

    def _features_read(self) -> tuple[str, ...]:
        # Without a mixer both models still give their features, as they always have: the
        # paper's composite keeps computing exactly what it computed.
        if self.mixer is None or self.mixer_inputs == "both":
            return ("std", "rob")
        return ("rob",) if self.mixer_inputs == "rob_features" else ()

    def _mixer_output(self, std_out: BaseOutput, rob_out: BaseOutput,
                      mixer: Optional[nn.Module] = None) -> torch.Tensor:
        """The mixer's raw output (B, 1), in the gamma BN's dtype, on what its kind reads
        (docs/METHOD.md, "Mixer inputs"): the one place that feeds the mixer, for the forward
        and the gamma BN's re-estimation alike. Nothing is detached (unless
        ``unsafe_detach_mixer_inputs``), so gradient attacks differentiate through the mixer."""
        def fed(t: torch.Tensor) -> torch.Tensor:
            return t.detach() if self.unsafe_detach_mixer_inputs else t

        mixer = self.mixer if mixer is None else mixer
        assert mixer is not None
        if self.mixer_inputs == "rob_logits":
            raw = mixer(fed(rob_out.logits.float() * self.rob_scale))
        else:
            models = (rob_out,) if self.mixer_inputs == "rob_features" else (std_out, rob_out)
            raw = mixer([fed(out.features[0]) for out in models],
                        [fed(out.features[1]) for out in models])
        # The gamma BN runs in its own dtype (fp32 under autocast, fp64 after .double()).
        return raw.to(self.gamma_bn.running_mean.dtype)

    def _gamma(self, std_out: BaseOutput, rob_out: BaseOutput, x: torch.Tensor,
               mixer: Optional[nn.Module] = None) -> torch.Tensor:
        """gamma (B,): the mixer's output after clamp, BN and the gamma constants."""
        batch = x.shape[0]
        if self.mixer is None:
            return _full(batch, self.gamma, x)
        if self.alpha_scale == 0:
            # A degenerate range: alpha is the constant alpha_bias; report its logit as gamma.
            return torch.logit(_full(batch, self.alpha_bias, x))

        gamma = self._mixer_output(std_out, rob_out, mixer)  # (B, 1)
        if self.gamma_norm == "none":
            return gamma.reshape(-1)
        if self.training:
            # Clamping before the BN keeps outliers from dominating its running statistics.
            mean, std = (global_mean_std(gamma) if self.global_batch_stats
                         else (gamma.mean().detach(), gamma.std().detach()))
            gamma = _clamp(gamma, mean, std)
        scale, bias = self.train_gamma if self.training else self.eval_gamma
        return (self.gamma_bn(gamma) * scale + bias).reshape(-1)

    @torch.no_grad()
    def reestimate_gamma_bn(self, batches: Iterable[torch.Tensor]) -> int:
        """Set the gamma BN's running statistics to the average batch statistics that training
        normalises with, measured for the deployed (eval-mode) mixer; returns the batch count.

        Training normalises each mini-batch's clamped mixer output by that batch's mean and
        (unbiased) variance; evaluation uses the running statistics instead. With momentum 0.01
        and a mixer that changes fast, those lag far behind. Here, for each batch (give the
        training mini-batches, clean and attacked as in the buffer), the mixer's raw output is
        computed with the mixer in eval mode (its own BN running statistics, as deployed, and
        untouched here), clamped per batch exactly as in training, and the running mean/var
        become the plain average of the batch means/variances (BatchNorm's momentum-None
        cumulative average). So an input at the training batches' centre gets gamma = the
        evaluation bias, with the spread training used. The caller sets autocast. With
        ``gamma_norm`` "none" there is no BN to set: returns 0.
        """
        if self.mixer is None or self.gamma_norm == "none":
            return 0
        mixer_mode = self.mixer.training
        self.mixer.eval()
        means, variances = [], []
        try:
            for x in batches:
                if x.shape[0] < 2:
                    continue  # a batch of one has no variance (training never sees one)
                raw = self._mixer_output(*self._base_outputs(x))
                clamped = _clamp(raw, raw.mean(), raw.std())
                means.append(clamped.mean())
                variances.append(clamped.var())
        finally:
            self.mixer.train(mixer_mode)
        if not means:
            return 0
        self.gamma_bn.running_mean.fill_(torch.stack(means).mean().item())
        self.gamma_bn.running_var.fill_(torch.stack(variances).mean().item())
        return len(means)


def _clamp(gamma: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return torch.clamp(gamma, min=mean - _CLAMP_STDS * std, max=mean + _CLAMP_STDS * std)


def base_weight_sums(composite: CompositeModel) -> list[float]:
    """Per-tensor float64 sums of the base models' parameters and buffers, summed on the CPU:
    a cheap check that the base models are (still) the same ones, on any device."""
    tensors = [*composite.std_model.state_dict().values(),
               *composite.rob_model.state_dict().values()]
    return [float(t.detach().cpu().double().sum()) for t in tensors if t.is_floating_point()]


def fixed_alpha_composite(composite: CompositeModel, alpha: float) -> CompositeModel:
    """The same base models and logit scales mixed with one constant alpha for every input
    (alpha 0: STD only, alpha 1: ROB only): the baseline adaptive smoothing is compared with."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    gamma = -math.inf if alpha == 0 else math.inf if alpha == 1 else math.log(alpha / (1 - alpha))
    return CompositeModel(composite.std_model, composite.rob_model, None,
                          std_scale=composite.std_scale, rob_scale=composite.rob_scale,
                          gamma=gamma).eval()


def _full(batch: int, value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full((batch,), value, device=like.device, dtype=torch.float32)


class LogProbClassifier(nn.Module):
    """The composite as a plain classifier: returns log-probabilities only.

    This is the model AutoAttack and RobustBench see; ``train``/``eval`` pass through so that
    ``model.eval()`` gives the evaluation behaviour (scale_alpha on).
    """

    def __init__(self, composite: CompositeModel) -> None:
        super().__init__()
        self.composite = composite

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.composite(x).log_probs

    def train(self, mode: bool = True, scale_alpha: Optional[bool] = None) -> "LogProbClassifier":
        self.training = mode
        self.composite.train(mode, scale_alpha=scale_alpha)
        return self

    def eval(self, scale_alpha: Optional[bool] = None) -> "LogProbClassifier":
        return self.train(False, scale_alpha=scale_alpha)
