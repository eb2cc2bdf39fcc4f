"""The validated configuration: frozen pydantic models, one per concern, none reading another.

Values that the authors' files derive from other sections ('default') are filled in by
:mod:`.legacy`, which also maps their key layout onto these models. docs/CONFIG.md is generated
from the descriptions here (scripts/gen_config_docs.py).
"""
from __future__ import annotations

import ast
import math
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional, get_args

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr,
                      StringConstraints, ValidationInfo, field_validator, model_validator)

# Torch-free modules only: the config loads and validates without torch.
from adaptive_smoothing.alpha_range import check_alpha_range
from adaptive_smoothing.config.randomized_attack import RandomizedAttackSettings
from adaptive_smoothing.errors import UserError
from adaptive_smoothing.model_names import MODEL_NAMES
from adaptive_smoothing.model_names import GammaNorm, MixerInputs
from .provenance import NOTHING, RESULTS, WEIGHTS, WEIGHTS_AND_RESULTS

# The original code's short model names -> this project's registry names.
MODEL_TYPE_ALIASES = {"rn18": "resnet18", "rn50": "bit_m_r50x1", "rn152": "bit_m_r152x2",
                      "wrn": "dm_wrn_28_10", "wrn7016": "dm_wrn_70_16",
                      "wrn7016_silu": "dm_wrn_70_16_silu"}
AUTOATTACK_NAMES = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
STANDARD_AUTOATTACK = ("apgd-ce", "apgd-t", "fab-t", "square")
TRAINING_ATTACKS = ("apgd-ce", "apgd-t")  # 'default' of pgd_settings.attacks_to_run
DEFAULT_EPS = {"Linf": 8 / 255, "L2": 0.5}
# Larger radii are not a threat model anyone evaluates on [0, 1] images but a unit mistake.
MAX_PLAUSIBLE_EPS = {"Linf": 64 / 255, "L2": 8.0}
MAX_SEED = 2**63 - 1  # torch.manual_seed and pyautoattack take seeds up to this
BIT_STD_RESIZE = 128  # the published STD model sees CIFAR images resized to 128x128


class ConfigError(UserError, ValueError):
    """A configuration problem, one line: ``file: key.path = value: problem``."""

    def __init__(self, problem: str, *, key: Optional[str] = None, value: Any = ...,
                 file: Optional[str] = None) -> None:
        self.problem, self.key, self.value, self.file = problem, key, value, file
        where = key if value is ... or key is None else f"{key} = {repr(value)[:200]}"
        super().__init__(": ".join(p for p in (file or "<config>", where, problem) if p))


class FrozenDict(dict):
    """A read-only, hashable dict, so that a frozen config stays immutable and hashable."""

    def _readonly(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("configuration mappings are read-only; use apply_overrides()")

    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _readonly

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items(), key=lambda item: str(item[0]))))


# -- the value spellings of the authors' files that pydantic does not read itself ------------
def _fraction(value: Any) -> Any:  # '8/255'
    if isinstance(value, str) and re.fullmatch(r"\s*[\d.eE+-]+\s*/\s*[\d.eE+-]+\s*", value):
        num, den = value.split("/")
        return float(num) / float(den) if float(den) else value
    return value


def _tuple_text(value: Any) -> Any:  # '(2., 0.4)'; 'a, b' for lists of names
    if not isinstance(value, str):
        return value
    if value.strip()[:1] not in "([":
        return [part.strip() for part in value.split(",") if part.strip()]
    try:
        return ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        raise ValueError("expected a tuple written as '(a, b)'") from None


def _names(table: dict[str, str]) -> BeforeValidator:
    """Case-, '-'- and '_'-insensitive spellings of a name -> the canonical name."""
    keyed = {re.sub(r"[-_\s]", "", k.lower()): v for k, v in table.items()}
    return BeforeValidator(lambda v: keyed.get(re.sub(r"[-_\s]", "", v.lower()), v.strip())
                           if isinstance(v, str) else v)


def _known_model_names() -> set[str]:
    """The built-in architectures (a torch-free table) and, once the registry is loaded (torch
    then is too), the names registered at run time with ``register_model``."""
    registry = sys.modules.get("adaptive_smoothing.models.registry")
    return set(MODEL_NAMES) | (set(registry.list_models()) if registry is not None else set())


def _model_name(value: Any) -> Any:
    name = MODEL_TYPE_ALIASES.get(value.strip().lower(), value.strip()) if isinstance(
        value, str) else value
    # A RobustBench zoo name is checked against the zoo when the model is built (importing
    # robustbench here would slow every config load).
    if isinstance(name, str) and re.fullmatch(r"robustbench:\s*\S+", name):
        return re.sub(r":\s*", ":", name, count=1)
    known = _known_model_names()
    if not isinstance(name, str) or name not in known:
        raise ValueError(f"expected one of {sorted(known)}, a short name "
                         f"{sorted(MODEL_TYPE_ALIASES)} or robustbench:<zoo model name>")
    return name


def _check(test: Callable[[Any], bool], problem: str) -> AfterValidator:
    def check(value: Any) -> Any:
        if not test(value):
            raise ValueError(problem)
        return value
    return AfterValidator(check)


Str = Annotated[str, BeforeValidator(lambda v: os.fspath(v) if isinstance(v, os.PathLike) else v),
                StringConstraints(strip_whitespace=True, min_length=1)]
Num = Annotated[float, BeforeValidator(_fraction)]
Unit = Annotated[float, BeforeValidator(_fraction), Field(ge=0, le=1)]
PosInt = Annotated[int, Field(ge=1)]
Norm = Annotated[Literal["Linf", "L2"], _names({"linf": "Linf", "l_inf": "Linf", "inf": "Linf",
                                                "l2": "L2", "l_2": "L2"})]
Precision = _names({"float32": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"})
Attacks = Annotated[tuple[Annotated[Literal[AUTOATTACK_NAMES], _names(  # type: ignore[valid-type]
    {n: n for n in AUTOATTACK_NAMES})], ...], BeforeValidator(_tuple_text)]
GammaPair = Annotated[tuple[Num, Num], BeforeValidator(_tuple_text),
                      _check(lambda v: v[0] > 0, "expected (scale, bias) with scale > 0")]
ModelName = Annotated[str, BeforeValidator(_model_name)]
Kwargs = Annotated[dict[str, Any], AfterValidator(FrozenDict)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


def key(default: Any, description: str, derived: str = "", *,
        affects: Optional[frozenset[str]] = None, mixer: bool = False,
        **constraints: Any) -> Any:
    """A documented key. ``derived``: the rule that fills it in at load (:mod:`.legacy`) when a
    file leaves it out or writes 'default'. ``affects``: what its value changes (every leaf key
    must say; sections do not), which is all that training's resume and evaluation's manifest
    read (:mod:`.provenance`). ``mixer``: a forward_settings key that shapes how the composite
    mixes (its mixer, gamma, alpha range), which a fixed-alpha mixture of the same base models
    does not read, so its results stay valid when the key changes."""
    extra: dict[str, Any] = {"derived": derived} if derived else {}
    if affects is not None:
        extra["affects"] = sorted(affects)
    if mixer:
        extra["mixer"] = True
    return Field(default, description=description, **constraints,
                 json_schema_extra=extra or None)


class Section(BaseModel):
    """Frozen, no unknown keys, no inf/nan unless a field allows it; reads the authors' 'None'
    (where None is allowed) and 'default' (where a value is derived at load)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _authors_words(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        out = {}
        for name, value in data.items():
            field, word = cls.model_fields.get(name), str(value).strip().lower()
            if field is not None and isinstance(value, str):
                if word == "default" and "derived" in (field.json_schema_extra or {}):
                    continue  # unset: legacy.py derives it
                if word in ("none", "null", "~") and type(None) in get_args(field.annotation):
                    value = None
            out[name] = value
        return out


class ModelLoadPath(Section):
    std: Str = key(..., "STD (accurate) model checkpoint, relative to `log_dir`", affects=NOTHING)
    rob: Str = key(..., "ROB (robust) model checkpoint, relative to `log_dir`", affects=NOTHING)
    comp: Optional[Str] = key(None, "mixing-network checkpoint (`{model, bn}`), relative to "
                              "`log_dir`; None = a new, untrained mixer", affects=NOTHING)


class GammaConsts(Section):
    train: GammaPair = key((2.0, 0.4), "(scale > 0, bias) of the normalised gamma in training",
                           affects=WEIGHTS)
    eval: GammaPair = key((2.0, 1.3), "the same in evaluation mode (published: 1.05 CIFAR-10, "
                          "1.3 CIFAR-100 EDM, 1.0 CIFAR-100 TRADES)", affects=RESULTS)


class ForwardSettings(Section):
    """The composite model: base models, logit scales, mixer, alpha range and gamma constants."""

    std_model_type: ModelName = key(..., "STD architecture: a short name (`rn18`, `rn50`, "
                                    "`rn152`), a registry name, or `robustbench:<Name>`, a "
                                    "RobustBench zoo model with its weights (dataset: "
                                    "`dataset_settings.name`, Linf; docs/METHOD.md)",
                                    affects=WEIGHTS_AND_RESULTS)
    rob_model_type: ModelName = key(..., "ROB architecture: a short name (`rn18`, `wrn`, "
                                    "`wrn7016`, `wrn7016_silu`), a registry name, or "
                                    "`robustbench:<Name>`", affects=WEIGHTS_AND_RESULTS)
    robustbench_model_dir: Optional[Str] = key(
        None, "robustbench's model folder for `robustbench:<Name>` base models: it reads "
              "`<dir>/<dataset>/Linf/<Name>.pt` and downloads the file there where it is "
              "missing; their `model_load_path` entry is then ignored", "`log_dir/robustbench`",
              affects=NOTHING)
    std_model_scale: Num = key(1.0, "STD logit scale s_std", gt=0, affects=WEIGHTS_AND_RESULTS)
    rob_model_scale: Num = key(1.0, "ROB logit scale s_rob", gt=0, affects=WEIGHTS_AND_RESULTS)
    std_model_kwargs: Kwargs = key(FrozenDict(), "extra arguments of `create_model` for STD, "
                                   "e.g. `{width: 16}`", affects=WEIGHTS_AND_RESULTS)
    rob_model_kwargs: Kwargs = key(FrozenDict(), "the same for ROB", affects=WEIGHTS_AND_RESULTS)
    std_resize: Optional[PosInt] = key(None, "resize STD inputs to this size (BiT only)",
                                       "128 for BiT STD models, None otherwise",
                                       affects=WEIGHTS_AND_RESULTS)
    in_planes: Optional[Annotated[tuple[PosInt, PosInt], BeforeValidator(_tuple_text)]] = key(
        None, "first-feature channels (STD, ROB), e.g. `'(512, 256)'`; None = read from the "
              "models; checked against them when the model is built", affects=WEIGHTS_AND_RESULTS, mixer=True)
    gamma: Annotated[float, _check(lambda v: not math.isnan(v), "expected a number, not NaN")] = (
        key(0.0, "fixed gamma when `use_policy` is false (alpha = sigmoid(gamma)); `-inf` = STD "
                 "only, `inf` = ROB only", allow_inf_nan=True, affects=WEIGHTS_AND_RESULTS, mixer=True))
    use_policy: bool = key(True, "use the mixing network (false: fixed `gamma`)",
                           affects=WEIGHTS_AND_RESULTS, mixer=True)
    policy_graph: bool = key(True, "false detaches the mixer's inputs, hiding it from attacks: "
                             "robust accuracy so measured is **not valid**",
                             affects=WEIGHTS_AND_RESULTS, mixer=True)
    pn_version: Literal[3, 4] = key(4, "mixing network version (V4 adds a 1x1 conv on the "
                                    "second features)", affects=WEIGHTS_AND_RESULTS, mixer=True)
    mixer_inputs: MixerInputs = key(
        "both", "what the mixer reads (docs/METHOD.md, \"Mixer inputs\"): `both` models' "
                "feature maps (the paper's; every published checkpoint), `rob_features` (the "
                "same network on ROB's feature maps only), `rob_logits` (a gate of ~240 "
                "parameters on ROB's scaled logits, adaptive_smoothing/models/gate.py); with "
                "`rob_*` gamma does not depend on STD, so an attacker cannot steer it through "
                "STD's features", affects=WEIGHTS_AND_RESULTS, mixer=True)
    mixer_width: Optional[Annotated[float, Field(gt=0)]] = key(
        None, "multiplier of the mixing network's last two stage widths (c2, c3 of each "
              "channel plan; docs/METHOD.md, \"Mixing network\"), e.g. 0.5 for a network of "
              "about a third of the parameters; None = the plan as is (the paper's); not for "
              "`mixer_inputs: rob_logits`", affects=WEIGHTS_AND_RESULTS, mixer=True)
    alpha_scale: Unit = key(1.0, "alpha <- alpha * alpha_scale + alpha_bias",
                            affects=WEIGHTS_AND_RESULTS, mixer=True)
    alpha_bias: Unit = key(0.0, "lower end of the alpha range; alpha_bias + alpha_scale <= 1",
                           affects=WEIGHTS_AND_RESULTS, mixer=True)
    gamma_norm: GammaNorm = key(
        "batchnorm", "how the mixer's output becomes gamma (docs/METHOD.md, \"Gamma "
                     "normalisation\"): `batchnorm` (the paper's: clamped in training, the gamma "
                     "BN, then `gamma_consts`) or `none` (the output as it is, in training and "
                     "evaluation alike: the mixer sets its own scale; `gamma_consts` unused)",
        affects=WEIGHTS_AND_RESULTS, mixer=True)
    gamma_consts: GammaConsts = key(GammaConsts(), "gamma constants (files: training_settings)",
                                    mixer=True)
    parallel: int = key(1, "authors' key, not used (one process per GPU)", ge=0, affects=NOTHING)
    ema_decay: Optional[float] = key(None, "authors' key, not used", affects=NOTHING)

    @field_validator("alpha_bias")
    @classmethod
    def _alpha_range(cls, bias: float, info: ValidationInfo) -> float:
        check_alpha_range(bias, info.data.get("alpha_scale", 0.0))
        return bias

    @field_validator("mixer_width")
    @classmethod
    def _width_of_a_network(cls, width: Optional[float], info: ValidationInfo
                            ) -> Optional[float]:
        if width is not None and info.data.get("mixer_inputs") == "rob_logits":
            raise ValueError("expected None: the logit gate of `mixer_inputs: rob_logits` has "
                             "no channel plan to scale")
        return width


class DatasetSettings(Section):
    name: Annotated[Literal["cifar10", "cifar100"], _names(
        {"CIFAR-10": "cifar10", "CIFAR-100": "cifar100"})] = key(
        ..., "dataset, `'CIFAR-10'` or `'CIFAR-100'` (stored as `cifar10`/`cifar100`)",
        affects=WEIGHTS_AND_RESULTS)
    format: Literal["auto", "torchvision", "npz", "imagefolder"] = key(
        "torchvision", "layout of `path`; `auto`: `npz` where `path` is a .npz file or holds "
        "train.npz / test.npz, else `torchvision`", affects=NOTHING)
    path: Str = key("data", "dataset folder", affects=NOTHING)
    train_with_test: bool = key(False, "train the mixer on the test split", affects=WEIGHTS)
    train_shuffle: bool = key(True, "shuffle the training data", affects=WEIGHTS)
    pa_path: Optional[Str] = key(None, "pre-attacked training data, a file of "
                                 "`scripts/pre_attack.py` (docs/TRAINING.md)", affects=NOTHING)
    gamma_0: Optional[float] = key(None, "with `pa_path` (then required): a pre-attacked "
                                   "block's label is 1 where its gamma < gamma_0", affects=WEIGHTS)
    blocks: Optional[int] = key(None, "with `pa_path`: use its first `blocks` blocks (None: all)",
                                affects=WEIGHTS)

    @property
    def num_classes(self) -> int:
        return 100 if self.name == "cifar100" else 10


class CompLossConsts(Section):
    """Loss per sample: `bce * BCE(gamma, label) + ce * CE(out, y) + prod * BCE * CE`."""

    bce: Num = key(1.5, "weight of BCE(gamma, mixer label)", ge=0, affects=WEIGHTS)
    ce: Num = key(0.0, "weight of CE(composite output, y)", ge=0, affects=WEIGHTS)
    prod: Num = key(0.3, "weight of BCE * CE", ge=0, affects=WEIGHTS)


class CompLossScale(Section):
    clean: Num = key(1.0, "loss scale of clean samples", ge=0, affects=WEIGHTS)
    ada: Num = key(1.0, "loss scale of adversarial samples", ge=0, affects=WEIGHTS)
    pa: Num = key(1.0, "loss scale of pre-attacked samples (with pa_path)", ge=0, affects=WEIGHTS)


class CompLossParams(Section):
    consts: CompLossConsts = key(CompLossConsts(), "loss weights")
    scale: CompLossScale = key(CompLossScale(), "per-group scales")


class EvalFreq(Section):
    epoch: PosInt = key(1, "validate and save every this many epochs", affects=NOTHING)
    iter: Optional[PosInt] = key(200, "... and every this many iterations (attack buffers); "
                                 "`'none'`: at epoch ends only", affects=NOTHING)


class TrainingSettings(Section):
    epochs: PosInt = key(3, "training epochs", affects=WEIGHTS)
    batch_size: Optional[PosInt] = key(None, "**global** training batch size (all processes); "
                                       "None = per-process size x processes", affects=WEIGHTS)
    batch_size_train_per_gpu: PosInt = key(50, "per-process training batch size", affects=WEIGHTS)
    batch_size_test_per_gpu: PosInt = key(50, "per-process validation batch size", affects=NOTHING)
    save_eval_imgs: bool = key(False, "authors' key, not used", affects=NOTHING)
    lr: Num = key(5e-5, "AdamW learning rate", gt=0, affects=WEIGHTS)
    weight_decay: Num = key(1e-5, "AdamW weight decay", ge=0, affects=WEIGHTS)
    comp_loss_params: CompLossParams = key(CompLossParams(), "loss")
    loss_images: Literal["all", "decisive"] = key(
        "all", "the images the loss counts: `all` (the paper's) or `decisive`, those where "
               "exactly one base model is right (elsewhere alpha hardly changes the decision; "
               "docs/TRAINING.md, \"Decisive images\")", affects=WEIGHTS)
    accum_grad: Annotated[int, _check(lambda v: v == -1 or v >= 1, "expected -1 (one step per "
                                      "buffer) or >= 1")] = key(
        4, "mini-batches per optimizer step; -1 = one step per attack buffer", affects=WEIGHTS)
    use_fast_loader: bool = key(False, "authors' key, not used", affects=NOTHING)
    eval_freq: EvalFreq = key(EvalFreq(), "validation frequency")
    precision: Annotated[Literal["auto", "fp32", "bf16", "fp16"], Precision] = key(
        "auto", "`'auto'` = bf16 autocast on CUDA, fp32 on CPU; `'fp16'` needs CUDA",
        affects=NOTHING)
    channels_last: bool = key(True, "NHWC weights and activations", affects=NOTHING)
    compile: bool = key(False, "`torch.compile` the composite", affects=NOTHING)
    max_nonfinite_steps: PosInt = key(10, "consecutive non-finite losses before training stops",
                                      affects=NOTHING)
    n_val_examples: PosInt = key(500, "test images of periodic validation", affects=NOTHING)
    val_start: int = key(0, "validation (and the detection AUCs) use the test images from this "
                         "index on; past `evaluation_settings.n_examples`, choosing a checkpoint "
                         "never looks at the images an evaluation reports", ge=0, affects=NOTHING)
    max_steps: Optional[PosInt] = key(None, "stop after this many steps", affects=WEIGHTS)
    n_detection_examples: int = key(200, "held-out images (the first validation images) of the "
                                    "detection AUCs; 0 = off", ge=0, affects=NOTHING)
    detection_alpha: Unit = key(0.5, "alpha of the fixed mixture that the non-adaptive "
                                "detection attack (APGD-CE) aims at", affects=NOTHING)
    reestimate_gamma_bn: bool = key(True, "before each validation and checkpoint, set the gamma "
                                    "BN's running statistics to those of the last training "
                                    "buffer (docs/TRAINING.md)", affects=WEIGHTS)

    def global_batch_size(self, world_size: int = 1) -> int:
        """Clean images per training step over all processes."""
        return self.per_process_batch_size(world_size) * world_size

    def per_process_batch_size(self, world_size: int = 1) -> int:
        """Clean images per training step in one process (``batch_size`` split evenly)."""
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if self.batch_size is None:
            return self.batch_size_train_per_gpu
        if self.batch_size % world_size:
            raise ConfigError(f"expected a multiple of the number of processes ({world_size})",
                              key="training_settings.batch_size", value=self.batch_size)
        return self.batch_size // world_size


class PgdSettings(Section):
    norm: Norm = key("Linf", "threat model of training and validation (`l_inf`, `l_2`, ...)",
                     affects=WEIGHTS)
    eps: Num = key(8 / 255, "attack radius; above 64/255 (Linf) or 8 (L2) it is refused as a "
                   "unit mistake", "8/255 (Linf), 0.5 (L2)", gt=0, affects=WEIGHTS)
    iters_test: PosInt = key(20, "PGD iterations in validation", affects=NOTHING)
    alpha_test: Num = key(0.0027, "PGD step size in validation", gt=0, affects=NOTHING)
    use_aa: bool = key(True, "validate with APGD rather than PGD", affects=NOTHING)
    n_target_classes: PosInt = key(9, "targets of APGD-T (at most classes - 1)", affects=WEIGHTS)
    # The authors' word 'comp_simple' is read as 'comp' here, once: CE + w * BCE(gamma, 1) with
    # w = evaluation_settings.adaptive_attack_weight, for validation and evaluation alike.
    pgd_eval_loss: Annotated[Literal["ce", "dlr", "comp"], _names({"comp_simple": "comp"})] = key(
        "ce", "loss of the validation PGD (`comp`, the authors' `comp_simple`: CE + w * "
              "BCE(gamma, 1), w = `evaluation_settings.adaptive_attack_weight`)", affects=NOTHING)
    attacks_to_run: Attacks = key(TRAINING_ATTACKS, "validation attacks (a list or "
                                  f"comma-separated) of {list(AUTOATTACK_NAMES)}",
                                  "apgd-ce, apgd-t", affects=NOTHING)


class EvaluationSettings(Section):
    """The evaluation (`run.py --eval`); 'default' values are filled in when the file loads."""

    n_examples: PosInt = key(10000, "test images (10000 = the full test set)", affects=RESULTS)
    batch_size: PosInt = key(200, "evaluation batch size", affects=RESULTS)
    precision: Annotated[Literal["fp32", "bf16", "fp16"], Precision] = key(
        "fp32", "autocast dtype of the forward; `'fp16'` on CUDA only", affects=RESULTS)
    channels_last: bool = key(True, "NHWC weights and activations", affects=NOTHING)
    compile: bool = key(False, "`torch.compile` the composite", affects=NOTHING)
    data_dir: Str = key("data", "test data folder", "`dataset_settings.path`", affects=NOTHING)
    attacks_to_run: Attacks = key(STANDARD_AUTOATTACK, "AutoAttack attacks; [] = clean only",
                                  "the standard four", affects=RESULTS)
    norm: Norm = key("Linf", "threat model", "that of `pgd_settings.type`", affects=RESULTS)
    eps: Num = key(8 / 255, "radius, as plausible as `pgd_settings.eps`", "`pgd_settings.eps` "
                   "when the norms agree, else 8/255 or 0.5", gt=0, affects=RESULTS)
    pgd: bool = key(False, "also run PGD", affects=RESULTS)
    pgd_iters: PosInt = key(20, "PGD iterations", "`pgd_settings.iters_test`", affects=RESULTS)
    pgd_step_size: Num = key(0.0027, "PGD step size", "`pgd_settings.alpha_test`", gt=0,
                             affects=RESULTS)
    pgd_loss: Literal["ce", "dlr", "comp"] = key(
        "ce", "PGD loss", "`pgd_settings.pgd_eval_loss`", affects=RESULTS)
    adaptive_attack: bool = key(False, "also run the adaptive (mixer-aware) attack: APGD with a "
                                "BCE(gamma, 1) term", affects=RESULTS)
    adaptive_attack_weight: Unit = key(0.5, "weight w of that BCE term", affects=RESULTS)
    adaptive_attack_iterations: PosInt = key(100, "APGD iterations of that attack", affects=RESULTS)
    autoattack_iterations: PosInt = key(100, "APGD iterations inside AutoAttack (100 = "
                                        "standard; else the run is reported `custom`)",
                                        affects=RESULTS)
    save_adversarial: bool = key(False, "save the adversarial images", affects=RESULTS)
    seed: Seed = key(0, "seed of the attacks' per-image random starts", "the top-level `seed`",
                     affects=RESULTS)

    @property
    def autoattack_version(self) -> str:
        """'standard' for AutoAttack's standard attacks and iterations, else 'custom'."""
        standard = (set(self.attacks_to_run) == set(STANDARD_AUTOATTACK)
                    and self.autoattack_iterations == 100)
        return "standard" if standard else "custom"


class NonlinearSettings(Section):
    """The nonlinear composite (docs/METHOD.md, "Nonlinear mixing"): no mixing network; STD's
    map and ROB's transformed softmax mixed with one alpha. `scripts/calibrate.py` writes it.
    Its evaluation keys (`transfer_attacks`, `square_examples`, `square_queries`,
    `surrogate_alpha`) also apply, with `enabled` false, to a composite whose mixer is the
    `rob_logits` gate (docs/METHOD.md, "Mixer inputs")."""

    enabled: bool = key(False, "use the nonlinear composite instead of the mixing network / "
                        "fixed gamma of `forward_settings` (whose base models and logit scales "
                        "it uses; its mixer keys are then ignored)", affects=RESULTS)
    std_map: Literal["hard_max", "identity"] = key(
        "hard_max", "STD map: `hard_max` (one-hot of STD's argmax, the published choice) or "
                    "`identity` (softmax of s_std * STD's logits)", affects=RESULTS)
    clamp: Literal["gelu", "relu", "none"] = key("gelu", "clamp of ROB's map after the shift c",
                                                 affects=RESULTS)
    s: Num = key(1.0, "scale s of ROB's map", gt=0, affects=RESULTS)
    p: Num = key(1.0, "power p of ROB's map (signed power)", gt=0, affects=RESULTS)
    c: Num = key(0.0, "shift c before the clamp", affects=RESULTS)
    k: Optional[Annotated[int, Field(ge=2)]] = key(
        None, "layer norm over the top-k logits (>= 2); None = all classes (the authors' 250)",
        affects=RESULTS)
    alpha: Annotated[float, BeforeValidator(_fraction), Field(gt=0, le=1)] = key(
        0.99, "ROB's weight, in (0, 1]; ROB's decision is kept where its transformed margin is "
              ">= (1 - alpha) / alpha", affects=RESULTS)
    surrogate_alpha: Optional[Unit] = key(
        None, "alpha of the gradient surrogate's linear mixture (the authors': the linear "
              "mixture calibrated for its own beta), also the transfer attacks' one; None = "
              "`alpha` (for a `rob_logits` gate: its alpha at gamma = the evaluation bias, or at "
              "gamma = 0 with `gamma_norm: none`)",
        affects=RESULTS)
    surrogate_raw_share: Unit = key(0.9, "share of ROB's raw softmax in the surrogate's ROB "
                                    "term (the rest: the transformed softmax)", affects=RESULTS)
    surrogate_attack: bool = key(True, "evaluation: also APGD-CE/T steered by the surrogate's "
                                 "gradient, success judged on the true output", affects=RESULTS)
    transfer_attacks: bool = key(True, "evaluation: also transfer APGD-CE/T examples found "
                                 "against ROB alone and against the surrogate's linear mixture",
                                 affects=RESULTS)
    square_examples: int = key(200, "evaluation: Square (gradient-free, the masking check) on "
                               "the evaluated images with index below this; 0 = off", ge=0,
                               affects=RESULTS)
    square_queries: PosInt = key(5000, "Square's queries (5000 = AutoAttack's standard)",
                                 affects=RESULTS)


class RunSettings(Section):
    """Where and on what a run (training or evaluation) happens."""

    device: Annotated[str, _check(lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None,
                                  "expected 'auto', 'cpu', 'cuda' or 'cuda:N'")] = key(
        "auto", "`'auto'` (the first GPU if any, else the CPU), `'cpu'`, `'cuda'`, `'cuda:N'`; "
                "for training too", affects=NOTHING)
    threads: Optional[PosInt] = key(None, "torch intra-op threads, for training too; None = "
                                    "OMP_NUM_THREADS or the usable cores divided by the local "
                                    "torchrun processes", affects=NOTHING)
    output_dir: Str = key("results", "results folder (training's too)", "`log_dir/log_path`",
                          affects=NOTHING)


class Config(Section):
    seed: Seed = key(0, "random seed (training, and evaluation by default)", affects=WEIGHTS)
    log_dir: Str = key(".", "root folder of checkpoints (`Base/`, `CompModel/`)", affects=NOTHING)
    log_path: Str = key("results", "output folder, relative to `log_dir`", affects=NOTHING)
    model_load_path: ModelLoadPath = key(..., "checkpoint paths")
    forward_settings: ForwardSettings = key(..., "the composite model")
    dataset_settings: DatasetSettings = key(..., "the dataset")
    training_settings: TrainingSettings = key(TrainingSettings(), "training the mixing network")
    pgd_settings: PgdSettings = key(PgdSettings(), "attacks of training and validation")
    randomized_attack_settings: RandomizedAttackSettings = key(
        RandomizedAttackSettings(), "the randomised training attacks")
    evaluation_settings: EvaluationSettings = key(EvaluationSettings(), "the evaluation command")
    run: RunSettings = key(RunSettings(), "device, threads, output (files: evaluation_settings)")
    nonlinear_settings: NonlinearSettings = key(NonlinearSettings(), "the nonlinear composite "
                                                "(off unless `enabled`)")
    _source: Optional[str] = PrivateAttr(None)  # the file it was read from, for messages

    @property
    def source(self) -> Optional[str]:
        return self._source

    def __eq__(self, other: Any) -> bool:  # the source is not part of the configuration
        return isinstance(other, Config) and self.model_dump() == other.model_dump()

    def model_path(self, which: Literal["std", "rob", "comp"]) -> Optional[Path]:
        """A ``model_load_path`` entry resolved against ``log_dir`` (None for comp: None)."""
        rel = getattr(self.model_load_path, which)
        return None if rel is None else Path(self.log_dir) / rel
