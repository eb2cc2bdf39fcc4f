"""Batched white-box attacks on the composite model (and on plain classifiers).

- :func:`apgd`: APGD (Croce & Hein 2020) for Linf and L2, step for step as pyautoattack's
  ``APGDAttack.attack_single_run``, but with a per-sample eps, per-sample loss weights, targets and
  the composite attack loss (1 - w) * CE|DLR|DLR-T + w * BCE(gamma, 1).
- :func:`pgd`: PGD with per-sample momentum and eps (the training attacks' PGD variant).
- :func:`generate_training_attacks`: the randomized attacks used to train the mixing network
  (docs/METHOD.md, "Training" step 1), drawn from a :class:`RandomizedAttackSettings` (the config
  section, defined in ``config/randomized_attack.py``), ramped in by
  :func:`curriculum_settings` (docs/TRAINING.md, "Curriculum").
- :func:`apgd_cascade`: the orchestration, APGD-CE then APGD-T on the points still robust
  (validation during training); :func:`adaptive_attack` is it with the composite loss, for
  evaluation beside AutoAttack (AutoAttack sees the log-probabilities only and never aims at
  the mixer).

Attacks differentiate w.r.t. the input only (``torch.autograd.grad``): parameter ``.grad`` fields
are never touched, and the model's mode is left as the caller set it, except in
:func:`generate_training_attacks`, which sets the mode the method prescribes and restores it.
All randomness comes from an optional ``torch.Generator`` so that runs are reproducible, or from
a :class:`PerImageRandom`, whose draws for an image depend only on the seed and that image's index
(evaluation: results then do not depend on the batch size, the number of processes or the device).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

# The settings are a config section; they live with the config, which must load without torch.
from adaptive_smoothing.config.randomized_attack import Norm, RandomizedAttackSettings
from adaptive_smoothing.grad_scaling import call_with_scaled_gradients
from adaptive_smoothing.losses import AttackLossName, composite_attack_loss

logger = logging.getLogger(__name__)

PerSample = Union[float, torch.Tensor]
AttackOutput = tuple[torch.Tensor, Optional[torch.Tensor]]

_NORMS = ("Linf", "L2")
# Keeps the normalisation of zero vectors finite (AutoAttack's constant).
_NORMALIZE_EPS = 1e-12


# -- the attacked function ------------------------------------------------------------------------
class AttackTarget:
    """``forward(x) -> (logits, gamma or None)`` for a composite model or a plain classifier.

    A module returning a ``CompositeOutput`` (or anything with ``log_probs`` and ``gamma``) gives
    both; a module returning a tensor gives ``(logits, None)``.
    """

    def __init__(self, module: Callable[[torch.Tensor], object]) -> None:
        self.module = module

    def __call__(self, x: torch.Tensor) -> AttackOutput:
        # Input gradients at a per-sample power-of-two scale: exact in fp32, and in fp16 the
        # gradients of confidently classified points no longer flush to zero (grad_scaling.py).
        out = call_with_scaled_gradients(self.module, x,
                                         per_sample=not getattr(self.module, "training", False))
        if isinstance(out, torch.Tensor):
            return out, None
        if hasattr(out, "log_probs") and hasattr(out, "gamma"):
            return out.log_probs, out.gamma
        if isinstance(out, tuple) and len(out) == 2:
            return out[0], out[1]
        raise TypeError(f"cannot attack a model whose output is {type(out).__name__}; expected a "
                        "tensor of logits, a CompositeOutput or a (logits, gamma) pair")


def as_attack_target(model: Union[AttackTarget, Callable[[torch.Tensor], object]]) -> AttackTarget:
    """Wrap ``model`` as an :class:`AttackTarget` (idempotent).

    A ``LogProbClassifier`` is unwrapped to its composite: the function is the same, and the
    attack then also sees gamma.
    """
    if isinstance(model, AttackTarget):
        return model
    from adaptive_smoothing.models.composite import LogProbClassifier
    if isinstance(model, LogProbClassifier):
        return AttackTarget(model.composite)
    return AttackTarget(model)


class AttackResult(NamedTuple):
    x_adv: torch.Tensor   # (B, C, H, W) in [0, 1], within each sample's eps ball
    loss: torch.Tensor    # (B,): best attack loss found (APGD) / loss at x_adv (PGD)
    fooled: torch.Tensor  # (B,) bool: misclassified (argmax != y) at an evaluated point


# -- per-image randomness -------------------------------------------------------------------------
_STREAMS = {"autoattack": 1, "pgd": 2, "adaptive": 3, "surrogate": 4, "transfer_rob": 5,
            "transfer_linear": 6, "square": 7, "min_margin": 8}


class PerImageRandom:
    """Random draws whose row i depends only on (seed, stream, image_ids[i], draw number).

    Each image has its own CPU generator, seeded from the evaluation seed and the image's index in
    the test set and re-seeded per draw from how many draws that image has had. An image goes
    through the same sequence of attack runs whatever batch it is in (each run attacks the
    images still robust, and that depends on the image alone), so it gets the same random starts
    at batch size 25 or 250, on one process or eight, on a CPU or a GPU (draws are made on the
    CPU and then moved). Subsets (:meth:`subset`) share the draw counts.
    """

    def __init__(self, seed: int, image_ids: Sequence[int], stream: str = "autoattack",
                 _counts: Optional[dict[int, int]] = None) -> None:
        self.seed, self.stream = int(seed), stream
        self.image_ids = [int(i) for i in image_ids]
        self._counts: dict[int, int] = {} if _counts is None else _counts

    def __len__(self) -> int:
        return len(self.image_ids)

    def subset(self, index: torch.Tensor) -> "PerImageRandom":
        """The draws of the images at positions ``index`` (a 1-D index or bool tensor)."""
        positions = index.nonzero().squeeze(1) if index.dtype == torch.bool else index
        ids = [self.image_ids[i] for i in positions.tolist()]
        return PerImageRandom(self.seed, ids, self.stream, self._counts)

    def _generator(self, image_id: int) -> torch.Generator:
        draw = self._counts.get(image_id, 0)
        self._counts[image_id] = draw + 1
        words = [self.seed % 2**32, self.seed // 2**32 % 2**32, _STREAMS[self.stream],
                 image_id % 2**32, image_id // 2**32, draw]
        state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
        return torch.Generator().manual_seed(int(state[0]) | int(state[1] & 0x7FFFFFFF) << 32)

    def draw(self, shape: tuple[int, ...], *, normal: bool = False,
             dtype: torch.dtype = torch.float32,
             device: Union[str, torch.device] = "cpu") -> torch.Tensor:
        """A (len(self), *shape[1:]) tensor: uniform [0, 1) or standard normal, row per image."""
        if shape[0] != len(self.image_ids):
            raise ValueError(f"a per-image draw of shape {shape} for {len(self.image_ids)} "
                             "images: the first dimension must be the number of images")
        fn = torch.randn if normal else torch.rand
        rows = [fn(tuple(shape[1:]), generator=self._generator(i), dtype=torch.float32)
                for i in self.image_ids]
        out = torch.stack(rows) if rows else torch.empty(shape)
        return out.to(device=device, dtype=dtype)


RandomSource = Union[torch.Generator, PerImageRandom]


def _subset_random(generator: Optional[RandomSource],
                   index: torch.Tensor) -> Optional[RandomSource]:
    # A per-image source follows its images into a subset; a plain generator just continues.
    return generator.subset(index.cpu()) if isinstance(generator, PerImageRandom) else generator


# -- helpers --------------------------------------------------------------------------------------
def _check_norm(norm: str) -> Norm:
    # Names are normalised once, when the config loads; here only the canonical ones exist.
    if norm not in _NORMS:
        raise ValueError(f"unknown norm {norm!r}; expected one of {_NORMS}")
    return norm  # type: ignore[return-value]


def _per_sample(value: PerSample, batch: int, like: torch.Tensor) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):  # a fill, not a copy from the host
        return torch.full((batch,), float(value), dtype=like.dtype, device=like.device)
    t = value.to(dtype=like.dtype, device=like.device)
    if t.dim() == 0:
        return t.expand(batch).clone()
    if t.shape != (batch,):
        raise ValueError(f"per-sample value must be a scalar or have shape ({batch},), "
                         f"got {tuple(t.shape)}")
    return t.clone()


def _view(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (x.dim() - 1)))


def _rand(shape: tuple[int, ...], generator: Optional[RandomSource], like: torch.Tensor,
          normal: bool = False) -> torch.Tensor:
    if isinstance(generator, PerImageRandom):
        return generator.draw(shape, normal=normal, dtype=like.dtype, device=like.device)
    # Draw on the generator's device so one CPU generator serves CPU and GPU runs alike.
    device = generator.device if generator is not None else like.device
    fn = torch.randn if normal else torch.rand
    return fn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def _norm(v: torch.Tensor, norm: Norm) -> torch.Tensor:
    flat = v.flatten(1)
    return flat.abs().amax(1) if norm == "Linf" else flat.pow(2).sum(1).sqrt()


def _normalize(v: torch.Tensor, norm: Norm) -> torch.Tensor:
    return v / (_view(_norm(v, norm), v) + _NORMALIZE_EPS)


def _project(x_new: torch.Tensor, x: torch.Tensor, eps: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Project onto the eps ball around x (eps viewed (B, 1, 1, 1)) and onto [0, 1].

    Clipping to [0, 1] after the ball projection moves every coordinate towards x (x is in
    [0, 1]), so the result stays in the ball.
    """
    if norm == "Linf":
        return torch.clamp(torch.min(torch.max(x_new, x - eps), x + eps), 0.0, 1.0)
    delta = x_new - x
    length = _view(_norm(delta, "L2"), delta)
    return torch.clamp(x + _normalize(delta, "L2") * torch.min(eps, length), 0.0, 1.0)


def _random_start(x: torch.Tensor, eps: torch.Tensor, norm: Norm,
                  generator: Optional[RandomSource]) -> torch.Tensor:
    # AutoAttack's start: a random direction scaled to the boundary of the ball.
    if norm == "Linf":
        t = 2 * _rand(tuple(x.shape), generator, x) - 1
    else:
        t = _rand(tuple(x.shape), generator, x, normal=True)
    return (x + eps * _normalize(t, norm)).clamp(0.0, 1.0)


def _loss_and_grad(target: AttackTarget, x_adv: torch.Tensor, y: torch.Tensor,
                   bce_weight: torch.Tensor, loss: AttackLossName,
                   y_target: Optional[torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits, per-sample loss and the gradient of the summed loss w.r.t. the input only."""
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        logits, gamma = target(x_adv)
        loss_indiv = composite_attack_loss(logits, gamma, y, bce_weight, loss, y_target)
        grad, = torch.autograd.grad(loss_indiv.sum(), [x_adv])
    return logits.detach(), loss_indiv.detach(), grad.detach()


def _check_oscillation(loss_steps: torch.Tensor, j: int, k: int, rho: float) -> torch.Tensor:
    # pyautoattack's check, negative row indices (wrapping to the zero-filled end) included.
    t = torch.zeros_like(loss_steps[0])
    for c in range(k):
        t += (loss_steps[j - c] > loss_steps[j - c - 1]).to(t.dtype)
    return (t <= k * rho).to(t.dtype)


# -- APGD -----------------------------------------------------------------------------------------
def _setup(model: Union[AttackTarget, Callable[[torch.Tensor], object]], x: torch.Tensor,
           eps: PerSample, bce_weight: PerSample, norm: str,
           n_iter: int) -> tuple[Norm, AttackTarget, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The checked arguments shared by APGD and PGD: (norm, target, x, eps (B,), w (B,))."""
    norm = _check_norm(norm)
    if n_iter < 1:
        raise ValueError(f"n_iter must be >= 1, got {n_iter}")
    x = x.detach()
    return (norm, as_attack_target(model), x, _per_sample(eps, x.shape[0], x),
            _per_sample(bce_weight, x.shape[0], x))


def apgd(model: Union[AttackTarget, Callable[[torch.Tensor], object]], x: torch.Tensor,
         y: torch.Tensor, eps: PerSample, *, norm: Norm = "Linf", n_iter: int = 100,
         loss: AttackLossName = "ce", y_target: Optional[torch.Tensor] = None,
         bce_weight: PerSample = 0.0, momentum: float = 0.75, rho: float = 0.75,
         random_start: bool = True, return_adversarial: bool = False,
         generator: Optional[RandomSource] = None,
         on_iterate: Optional[Callable[[torch.Tensor, torch.Tensor], None]] = None
         ) -> AttackResult:
    """One APGD run (Croce & Hein 2020), batched, every sample with its own eps and loss weight.

    Follows pyautoattack's ``APGDAttack.attack_single_run``: step size 2 * eps, halved per sample
    at the checkpoints (first after 22% of the iterations, then shrinking by 3% down to 6%) when
    the loss oscillated or stalled, restarting from the best point; momentum ``momentum`` (0.75)
    from the second step on.

    Args:
        model: a composite model, a plain classifier or an :class:`AttackTarget`; its mode
            (eval, scale_alpha) is used as set by the caller.
        eps: radius, a float or per-sample (B,) tensor.
        loss: 'ce', 'dlr' or 'dlr_targeted' (then ``y_target`` (B,) is required).
        bce_weight: w in (1 - w) * loss + w * BCEWithLogits(gamma, 1); float or (B,).
        return_adversarial: False returns the highest-loss point per sample (training use).
            True (evaluation use, like AutoAttack) returns, for every sample that was
            misclassified at some iterate, the first misclassified iterate, and the highest-loss
            point for the others.
        generator: source of the random start (global RNG if None).
        on_iterate: called as ``on_iterate(x_adv, logits)`` at every evaluated point (the start
            and each iterate), e.g. to keep each sample's lowest-margin point (calibration.py).

    Returns:
        :class:`AttackResult` with ``fooled`` = misclassified at some evaluated iterate.
    """
    norm, target, x, eps_b, w = _setup(model, x, eps, bce_weight, norm, n_iter)
    batch = x.shape[0]
    eps_v = _view(eps_b, x)

    # Checkpoint schedule of APGD.
    n_iter_2 = max(int(0.22 * n_iter), 1)
    n_iter_min = max(int(0.06 * n_iter), 1)
    size_decr = max(int(0.03 * n_iter), 1)

    x_adv = _random_start(x, eps_v, norm, generator) if random_start else x.clone()
    x_best = x_adv.clone()
    x_first_adv = x_adv.clone()
    loss_steps = torch.zeros(n_iter, batch, device=x.device)

    logits, loss_indiv, grad = _loss_and_grad(target, x_adv, y, w, loss, y_target)
    if on_iterate is not None:
        on_iterate(x_adv, logits)
    grad_best = grad.clone()
    fooled = logits.argmax(1) != y
    loss_best = loss_indiv.clone()

    step_size = 2.0 * eps_v * torch.ones_like(eps_v)
    x_adv_old = x_adv.clone()
    counter3 = 0
    k = n_iter_2
    loss_best_last_check = loss_best.clone()
    reduced_last_check = torch.ones_like(loss_best)

    for i in range(n_iter):
        with torch.no_grad():
            grad2 = x_adv - x_adv_old
            x_adv_old = x_adv.clone()
            a = momentum if i > 0 else 1.0
            direction = grad.sign() if norm == "Linf" else _normalize(grad, norm)
            x_step = _project(x_adv + step_size * direction, x, eps_v, norm)
            x_adv = _project(x_adv + (x_step - x_adv) * a + grad2 * (1 - a), x, eps_v, norm)

        logits, loss_indiv, grad = _loss_and_grad(target, x_adv, y, w, loss, y_target)
        if on_iterate is not None:
            on_iterate(x_adv, logits)

        # torch.where, not boolean-mask indexing: a mask index is a nonzero(), which waits for
        # the GPU; the values are the same.
        with torch.no_grad():
            wrong = logits.argmax(1) != y
            newly = wrong & ~fooled
            x_first_adv = torch.where(_view(newly, x), x_adv, x_first_adv)
            fooled |= wrong

            loss_steps[i] = loss_indiv
            improved = loss_indiv > loss_best
            improved_v = _view(improved, x)
            x_best = torch.where(improved_v, x_adv, x_best)
            grad_best = torch.where(improved_v, grad, grad_best)
            loss_best = torch.where(improved, loss_indiv, loss_best)

            counter3 += 1
            if counter3 == k:
                reduce = _check_oscillation(loss_steps, i, k, rho)
                no_improvement = (1.0 - reduced_last_check) * (
                    loss_best_last_check >= loss_best).to(reduce.dtype)
                reduce = torch.max(reduce, no_improvement)
                reduced_last_check = reduce.clone()
                loss_best_last_check = loss_best.clone()
                halve = _view(reduce > 0, x)
                step_size = torch.where(halve, step_size / 2.0, step_size)
                x_adv = torch.where(halve, x_best, x_adv)
                grad = torch.where(halve, grad_best, grad)
                k = max(k - size_decr, n_iter_min)
                counter3 = 0

    x_out = torch.where(_view(fooled, x), x_first_adv, x_best) if return_adversarial else x_best
    return AttackResult(x_out.detach(), loss_best, fooled)


# -- PGD ------------------------------------------------------------------------------------------
def pgd(model: Union[AttackTarget, Callable[[torch.Tensor], object]], x: torch.Tensor,
        y: torch.Tensor, eps: PerSample, *, norm: Norm = "Linf", n_iter: int = 10,
        step_size: Optional[PerSample] = None, alpha_factor: float = 2.5,
        momentum_decay: PerSample = 0.0, loss: AttackLossName = "ce",
        y_target: Optional[torch.Tensor] = None, bce_weight: PerSample = 0.0,
        random_start: bool = True, generator: Optional[RandomSource] = None) -> AttackResult:
    """PGD with (MI-FGSM style) momentum, per-sample eps and momentum decay.

    g <- mu * g + grad / mean|grad|;  x <- proj(x + step * sign(g))  (Linf) or
    x <- proj(x + step * g / ||g||_2)  (L2). The step is ``step_size`` if given, else
    eps / n_iter * alpha_factor per sample (docs/METHOD.md, "Authors' configs"). mu = 0 is plain
    PGD. Returns the last iterate, with its loss and whether it is misclassified.
    """
    norm, target, x, eps_b, w = _setup(model, x, eps, bce_weight, norm, n_iter)
    batch = x.shape[0]
    eps_v = _view(eps_b, x)
    mu = _view(_per_sample(momentum_decay, batch, x), x)
    if step_size is None:
        step = eps_v / n_iter * alpha_factor
    else:
        step = _view(_per_sample(step_size, batch, x), x)

    if random_start:
        if norm == "Linf":
            x_adv = x + (2 * _rand(tuple(x.shape), generator, x) - 1) * eps_v
        else:
            radius = eps_v * _view(_rand((batch,), generator, x), x)
            x_adv = x + radius * _normalize(_rand(tuple(x.shape), generator, x, True), "L2")
        x_adv = _project(x_adv, x, eps_v, norm)
    else:
        x_adv = x.clone()

    g = torch.zeros_like(x)
    for _ in range(n_iter):
        _, _, grad = _loss_and_grad(target, x_adv, y, w, loss, y_target)
        with torch.no_grad():
            l1 = _view(grad.abs().flatten(1).mean(1), grad)
            g = mu * g + grad / (l1 + _NORMALIZE_EPS)
            direction = g.sign() if norm == "Linf" else _normalize(g, "L2")
            x_adv = _project(x_adv + step * direction, x, eps_v, norm)

    with torch.no_grad():
        logits, gamma = target(x_adv)
        final_loss = composite_attack_loss(logits, gamma, y, w, loss, y_target)
    return AttackResult(x_adv.detach(), final_loss.detach(), logits.argmax(1) != y)


# -- randomized training attacks (docs/METHOD.md, "Training" step 1) ---------------------------
def curriculum_ramp(settings: RandomizedAttackSettings, step: int) -> float:
    """The curriculum's factor at optimizer step ``step``: min(1, step / curriculum_steps), 1
    without a curriculum. A function of the global step alone, so that a resumed run attacks
    as the uninterrupted one (docs/TRAINING.md, "Curriculum")."""
    if step < 0:
        raise ValueError(f"the optimizer step must be >= 0, got {step}")
    if settings.curriculum_steps == 0:
        return 1.0
    return min(1.0, step / settings.curriculum_steps)


def curriculum_settings(settings: RandomizedAttackSettings,
                        step: int) -> RandomizedAttackSettings:
    """The training attacks' settings at optimizer step ``step``: the attack's mixer-term
    weight bound ``comp_loss_wmax`` and its radius ``eps`` (so every drawn eps_i = eps *
    U(eps_factor_loc, eps_factor_loc + eps_factor_scale)) times :func:`curriculum_ramp`.
    The random draws do not change, only their scale: the same uniforms are drawn at every
    step. (At step 0 the radius is 0, so that iteration's attacked images are its clean ones.)
    """
    ramp = curriculum_ramp(settings, step)
    if ramp == 1.0:
        return settings
    return settings.model_copy(update={"eps": settings.eps * ramp,
                                       "comp_loss_wmax": settings.comp_loss_wmax * ramp})


class AttackRunDraw(NamedTuple):
    n_iter: int
    eps: torch.Tensor             # (B,)
    bce_weight: torch.Tensor      # (B,)
    momentum_decay: torch.Tensor  # (B,), used by PGD only


def draw_attack_run(settings: RandomizedAttackSettings, batch: int,
                    generator: Optional[torch.Generator] = None,
                    device: Union[str, torch.device] = "cpu",
                    iterations_generator: Optional[torch.Generator] = None) -> AttackRunDraw:
    """Draw one run's random settings (tensors on ``device``).

    The iteration count comes from ``iterations_generator`` when given (else ``generator``):
    under torch.distributed it is one generator seeded alike on every process, so that all
    processes run the same number of iterations instead of waiting for the slowest draw.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")

    def uniform(low: float, width: float) -> torch.Tensor:
        u = torch.rand(batch, generator=generator, device=gen_device)
        return (low + width * u).to(device)

    # torch has no seeded chi-square sampler; seed numpy's from the same torch generator.
    iter_gen = iterations_generator if iterations_generator is not None else generator
    iter_device = iter_gen.device if iter_gen is not None else torch.device("cpu")
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=iter_gen, device=iter_device).item())
    chi2 = float(np.random.default_rng(seed).chisquare(settings.iters_df))
    n_iter = max(1, int(round(chi2 + settings.iters_const)))
    eps = settings.eps * uniform(settings.eps_factor_loc, settings.eps_factor_scale)
    bce_weight = uniform(0.0, settings.comp_loss_wmax)
    momentum = uniform(settings.mom_decay_loc, settings.mom_decay_scale)
    return AttackRunDraw(n_iter, eps, bce_weight, momentum)


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def generate_training_attacks(composite: nn.Module, x: torch.Tensor, y: torch.Tensor,
                              settings: RandomizedAttackSettings,
                              generator: Optional[torch.Generator] = None,
                              iterations_generator: Optional[torch.Generator] = None
                              ) -> list[torch.Tensor]:
    """1 untargeted + ``n_target`` targeted adversarial batches for training the mixer.

    ``iterations_generator`` (optional) draws the runs' iteration counts (see
    :func:`draw_attack_run`); ``generator`` everything else.

    Untargeted run: loss (1 - w) * CE + w * BCE(gamma, 1); targeted run j (j = 1..n_target):
    (1 - w) * DLR_targeted + w * BCE(gamma, 1) with target the (j + 1)-th highest class of the
    composite's clean output. Each batch holds the highest-loss point per sample (fooled or not).
    The composite runs in eval mode with scale_alpha off (docs/METHOD.md, "Training"); the
    caller's mode is restored afterwards, also on error.
    """
    from adaptive_smoothing.models.composite import CompositeModel
    mode = (composite.mode(False, scale_alpha=False) if isinstance(composite, CompositeModel)
            else _eval_mode(composite))
    with mode:
        target = as_attack_target(composite)
        x = x.detach()
        with torch.no_grad():
            clean_logits, _ = target(x)
        n_classes = clean_logits.shape[1]
        if settings.n_target > n_classes - 1:
            raise ValueError(f"n_target={settings.n_target} needs more than {n_classes} classes")
        # Ascending sort, column -(j + 1) = the (j + 1)-th highest class, as in AutoAttack.
        order = clean_logits.sort(dim=1)[1]
        batches = []
        for run in range(1 + settings.n_target):
            draw = draw_attack_run(settings, x.shape[0], generator, x.device,
                                   iterations_generator)
            loss: AttackLossName = "ce" if run == 0 else "dlr_targeted"
            y_target = None if run == 0 else order[:, -(run + 1)]
            if settings.apgd:
                result = apgd(target, x, y, draw.eps, norm=settings.norm, n_iter=draw.n_iter,
                              loss=loss, y_target=y_target, bce_weight=draw.bce_weight,
                              random_start=settings.random_start, generator=generator)
            else:
                result = pgd(target, x, y, draw.eps, norm=settings.norm, n_iter=draw.n_iter,
                             alpha_factor=settings.alpha_factor,
                             momentum_decay=draw.momentum_decay, loss=loss, y_target=y_target,
                             bce_weight=draw.bce_weight, random_start=settings.random_start,
                             generator=generator)
            logger.debug("training attack %d: %d iterations, fooled %d/%d", run, draw.n_iter,
                         int(result.fooled.sum()), x.shape[0])
            batches.append(result.x_adv)
    return batches


# -- orchestration: APGD-CE, then APGD-T on the points still robust ------------------------------
class CascadeResult(NamedTuple):
    robust: torch.Tensor         # (B,) bool: correct on x and not fooled by any run
    clean_correct: torch.Tensor  # (B,) bool
    x_adv: torch.Tensor          # first adversarial example found per sample, else x
    first_x_adv: torch.Tensor    # the first run's point (first adversarial iterate, else the
    #                              highest-loss one) where it ran, else x


def apgd_cascade(model: Union[AttackTarget, Callable[[torch.Tensor], object]],
                 x: torch.Tensor, y: torch.Tensor, eps: PerSample, *, norm: Norm = "Linf",
                 n_iter: int = 100, n_target: int = 9, bce_weight: PerSample = 0.0,
                 generator: Optional[RandomSource] = None,
                 clean_correct: Optional[torch.Tensor] = None,
                 first_on_all: bool = False) -> CascadeResult:
    """APGD-CE, then APGD-T on the points still robust (AutoAttack's first two attacks).

    Each run attacks only the points still robust; a point is robust only if it is classified
    correctly on x and survives every run (worst case over runs). The targets of APGD-T are the
    2nd .. (n_target + 1)-th highest classes of the model's output on x, taken for the remaining
    points before each run (n_target 0: APGD-CE alone). The losses are (1 - w) * CE|DLR-T +
    w * BCE(gamma, 1) with w = ``bce_weight`` (0: AutoAttack's plain losses). The model's mode
    and autocast are the caller's.

    Args:
        clean_correct: (B,) bool, the points classified correctly on x, if the caller already
            knows them (saves a forward pass).
        first_on_all: the first run also attacks the misclassified points, so that
            ``first_x_adv`` is an attacked input for every point (validation's gamma statistics).
        generator: the random starts; a :class:`PerImageRandom` follows its images into each
            run's subset.
    """
    target = as_attack_target(model)
    x = x.detach()
    batch = x.shape[0]
    eps_b = _per_sample(eps, batch, x)
    if clean_correct is None:
        with torch.no_grad():
            clean_correct = target(x)[0].argmax(1) == y
    robust = clean_correct.clone()
    x_adv, first_x_adv = x.clone(), x.clone()

    runs: list[tuple[AttackLossName, int]] = [("ce", 0)]
    runs += [("dlr_targeted", j) for j in range(2, n_target + 2)]
    for run, (loss, target_rank) in enumerate(runs):
        attack = torch.ones_like(robust) if run == 0 and first_on_all else robust
        idx = attack.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        y_target = None
        if loss == "dlr_targeted":
            with torch.no_grad():
                logits = target(x[idx])[0]
            if target_rank > logits.shape[1]:  # fewer classes than targets
                break
            y_target = logits.sort(dim=1)[1][:, -target_rank]
        result = apgd(target, x[idx], y[idx], eps_b[idx], norm=norm, n_iter=n_iter, loss=loss,
                      y_target=y_target, bce_weight=_per_sample(bce_weight, batch, x)[idx],
                      return_adversarial=True, generator=_subset_random(generator, idx))
        if run == 0:
            first_x_adv[idx] = result.x_adv
        fooled_idx = idx[result.fooled]
        newly = fooled_idx[robust[fooled_idx]]
        x_adv[newly] = result.x_adv[result.fooled][robust[fooled_idx]]
        robust[fooled_idx] = False
        logger.debug("APGD cascade %s%s: robust %d/%d", loss,
                     f" (target rank {target_rank})" if target_rank else "",
                     int(robust.sum()), batch)
    return CascadeResult(robust, clean_correct, x_adv, first_x_adv)


def adaptive_attack(model: Union[AttackTarget, Callable[[torch.Tensor], object]],
                    x: torch.Tensor, y: torch.Tensor, eps: PerSample, norm: Norm = "Linf",
                    n_iter: int = 100, bce_weight: float = 0.5, n_target: int = 9,
                    generator: Optional[RandomSource] = None) -> CascadeResult:
    """The evaluation's adaptive attack: :func:`apgd_cascade` with the composite loss
    ((1 - w) * CE|DLR-T + w * BCE(gamma, 1)), so the attacker also pushes gamma down.

    The model's mode (eval with scale_alpha on, for the published evaluation) is the caller's.
    ``generator`` defaults to one seeded with 0, so that a rerun attacks with the same random
    starts.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    return apgd_cascade(model, x, y, eps, norm=norm, n_iter=n_iter, n_target=n_target,
                        bce_weight=bce_weight, generator=generator)
