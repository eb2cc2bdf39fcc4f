"""What the mixer reads (docs/METHOD.md, "Mixer inputs") and the attack curriculum
(docs/TRAINING.md, "Curriculum"): each kind trains and resumes exactly, the adaptive attack's
gradient reaches the gate, gamma ignores STD where it should, a checkpoint of another kind is
refused in one line, and the defaults leave the recorded identities as they were.

Tiny models (ResNet-18 of width 2 or 4) keep every test to seconds on a shared 2-core CPU.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from adaptive_smoothing import evaluation
from adaptive_smoothing.training import loop as training_loop  # where the Trainer looks names up
from adaptive_smoothing.attacks import (RandomizedAttackSettings, apgd, curriculum_ramp,
                                        curriculum_settings, draw_attack_run)
from adaptive_smoothing.checkpoints import (CheckpointError, load_mixer_checkpoint,
                                            mixer_checkpoint, save_checkpoint)
from adaptive_smoothing.cli.errors import user_error_message
from adaptive_smoothing.config import Config, ConfigError, apply_overrides, provenance
from adaptive_smoothing.config.schema import EvaluationSettings, NonlinearSettings
from adaptive_smoothing.factory import build_composite, load_composite_weights
from adaptive_smoothing.prepare import prepare, resolve_checkpoints
from adaptive_smoothing.models import CompositeModel, MixingNet
from adaptive_smoothing.models.gate import LogitGate
from adaptive_smoothing.training import (Trainer, TrainingResumeError, build_trainer,
                                         run_training, training_identity)
from synthetic import make_tiny_training_root, synthetic_data, tiny_base
from test_training import _assert_states_close, _Interrupted, _load, _tiny_config

CPU = torch.device("cpu")
NEW_KEYS = ("forward_settings.mixer_inputs", "forward_settings.mixer_width",
            "forward_settings.gamma_norm", "randomized_attack_settings.curriculum_steps")
# The trainings of the `runs` fixture: name -> (mixer kind, further overrides); `rob_logits_raw`
# is the gate with gamma = its own output over the whole alpha range (gamma_norm none), its loss
# on the decisive images only (training_settings.loss_images).
RUNS = {"rob_features": ("rob_features", {}), "rob_logits": ("rob_logits", {}),
        "rob_logits_raw": ("rob_logits", {"forward_settings.gamma_norm": "none",
                                          "forward_settings.alpha_bias": 0.0,
                                          "forward_settings.alpha_scale": 1.0,
                                          "training_settings.loss_images": "decisive",
                                          "training_settings.comp_loss_params.consts.ce": 1.0})}
KINDS = ("both", "rob_features", "rob_logits")


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_training_root(tmp_path_factory.mktemp("mixer_inputs"))


def _config(root: Path, out: str, kind: str, **overrides: Any):
    """The tiny training of test_training (2 iterations of 2 optimizer steps), with the mixer
    kind and a curriculum over the first 3 steps."""
    extra = {"forward_settings.mixer_inputs": kind,
             "randomized_attack_settings.curriculum_steps": 3}
    if kind == "rob_features":
        extra["forward_settings.mixer_width"] = 0.5
    return apply_overrides(_tiny_config(root, out, epochs=1), **{**extra, **overrides})


# -- each kind trains and resumes exactly --------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tiny_root: Path) -> dict[str, dict[str, Any]]:
    """Per new kind, an uninterrupted run: its checkpoint, initial mixer, losses and the
    training attacks' (global step, eps, comp_loss_wmax)."""
    out: dict[str, dict[str, Any]] = {}
    for name, (kind, overrides) in RUNS.items():
        config = _config(tiny_root, f"{name}_reference", kind, **overrides)
        record: dict[str, list] = {"losses": [], "attacks": []}
        original_iteration = Trainer._train_iteration
        original_attacks = training_loop.generate_training_attacks

        def iteration(self: Trainer, *args: Any) -> Any:
            metrics = original_iteration(self, *args)
            record["losses"].append(metrics["loss"])
            return metrics

        def attacks(composite: Any, x: Any, y: Any, settings: RandomizedAttackSettings,
                    *args: Any) -> Any:
            record["attacks"].append((trainer.global_step, settings.eps,
                                      settings.comp_loss_wmax))
            return original_attacks(composite, x, y, settings, *args)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(Trainer, "_train_iteration", iteration)
            patch.setattr(training_loop, "generate_training_attacks", attacks)
            trainer = build_trainer(prepare(config))
            initial = {k: v.clone() for k, v in trainer.mixer.state_dict().items()}
            path = trainer.fit()
        out[name] = {"config": config, "path": path, "initial": initial, **record,
                     "mixer": type(trainer.mixer)}
    return out


@pytest.mark.parametrize("name, mixer", [("rob_features", MixingNet), ("rob_logits", LogitGate),
                                         ("rob_logits_raw", LogitGate)])
def test_each_kind_builds_trains_and_changes_its_mixer(runs: dict, name: str, mixer: type) -> None:
    run = runs[name]
    assert run["mixer"] is mixer
    assert len(run["losses"]) == 2 and all(torch.isfinite(torch.tensor(run["losses"])))
    state = _load(run["path"])
    assert state["global_step"] == 4 and state["nonfinite_streak"] == 0
    changed = [k for k, v in run["initial"].items() if not torch.equal(v, state["model"][k])]
    assert any(k.endswith("weight") for k in changed)


@pytest.mark.parametrize("name", list(RUNS))
def test_each_kind_resumes_exactly(runs: dict, tiny_root: Path, name: str,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    kind, overrides = RUNS[name]
    config = _config(tiny_root, f"{name}_resumed", kind, **overrides)
    original = Trainer._train_iteration

    def crash_at_second(self: Trainer, *args: Any) -> Any:
        if self.iteration == 1:  # killed after the first checkpoint, inside the curriculum
            raise _Interrupted()
        return original(self, *args)

    monkeypatch.setattr(Trainer, "_train_iteration", crash_at_second)
    with pytest.raises(_Interrupted):
        run_training(config)
    monkeypatch.setattr(Trainer, "_train_iteration", original)
    resumed, reference = _load(run_training(config)), _load(runs[name]["path"])
    assert resumed["global_step"] == reference["global_step"] == 4
    _assert_states_close(resumed["model"], reference["model"])
    _assert_states_close(resumed["bn"], reference["bn"])


# -- gamma_norm none: gamma is the mixer's output, in training and evaluation alike ----------------
def test_with_gamma_norm_none_gamma_is_the_gates_output_and_training_computes_what_is_evaluated(
        bases) -> None:
    std, rob = bases
    torch.manual_seed(3)
    x, y = synthetic_data(8, seed=5)
    raw = CompositeModel(std, rob, LogitGate(10), mixer_inputs="rob_logits", gamma_norm="none")
    paper = CompositeModel(std, rob, LogitGate(10), mixer_inputs="rob_logits")
    paper.mixer.load_state_dict(raw.mixer.state_dict())
    with torch.no_grad():
        gate_output = raw.mixer(rob(x).float()).reshape(-1)
        bn_before = {k: v.clone() for k, v in raw.gamma_bn.state_dict().items()}
        outputs = {}
        for training in (True, False):
            with raw.mode(training):
                outputs[training] = raw(x)
            torch.testing.assert_close(outputs[training].gamma, gate_output, rtol=0, atol=0)
        # Alpha range (0, 1): the training composite (scale_alpha off) is the evaluated one.
        torch.testing.assert_close(outputs[True].log_probs, outputs[False].log_probs)
        torch.testing.assert_close(outputs[False].alpha, torch.sigmoid(gate_output))
        # No gamma BN is touched, by a training forward or by its re-estimation.
        assert raw.reestimate_gamma_bn([x]) == 0
        for k, v in raw.gamma_bn.state_dict().items():
            assert torch.equal(v, bn_before[k])
        # The paper's normalisation computes another gamma from the same gate, and its training
        # forward another composite than its evaluation.
        with paper.mode(False):
            assert not torch.allclose(paper(x).gamma, gate_output)
        with paper.mode(True):
            trained = paper(x).log_probs
        assert not torch.allclose(trained, paper.eval()(x).log_probs)
    # The gate's steepness is its own: doubling its output doubles gamma (the BN would undo it).
    with torch.no_grad():
        raw.mixer.out.weight.mul_(2)
        raw.mixer.out.bias.mul_(2)
        getattr(raw.mixer, "raw_margin_weight").copy_(
            torch.log(torch.expm1(2 * raw.mixer.margin_weight)))
        torch.testing.assert_close(raw.eval()(x).gamma, 2 * gate_output, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="gamma_norm"):
        CompositeModel(std, rob, LogitGate(10), mixer_inputs="rob_logits", gamma_norm="layer")


def test_decisive_images_keep_their_scale_and_the_others_get_zero(tiny_root: Path) -> None:
    kind, overrides = RUNS["rob_logits_raw"]
    trainer = build_trainer(prepare(_config(tiny_root, "decisive_scales", kind, **overrides)))
    std, rob = trainer.composite.std_model, trainer.composite.rob_model
    x, _ = synthetic_data(24, seed=6)
    with torch.no_grad():
        std_pred, rob_pred = std(x).argmax(1), rob(x).argmax(1)
    # Labels that make every case appear: both right, STD only, ROB only, both wrong.
    other = (std_pred + 1) % 10
    ys = torch.where(torch.arange(24) % 4 == 0, std_pred,
                     torch.where(torch.arange(24) % 4 == 1, rob_pred, other))
    labels = (torch.arange(24) % 2).float()  # clean and attacked images alike
    scales = trainer._decisive_scales(x, ys, labels, None)
    decisive = (std_pred == ys) != (rob_pred == ys)
    assert decisive.any() and (~decisive).any()
    clean_scale, adv_scale = trainer.loss_fn.clean_scale, trainer.loss_fn.adv_scale
    expected = torch.where(labels > 0.5, adv_scale, clean_scale) * decisive.float()
    torch.testing.assert_close(scales, expected)
    # Given scales (pre-attacked data's) are kept on the decisive images.
    given = torch.rand(24)
    torch.testing.assert_close(trainer._decisive_scales(x, ys, labels, given),
                               given * decisive.float())
    # A training iteration hands its optimizer steps these scales for the whole buffer.
    seen: list[Any] = []

    def step(xs: torch.Tensor, ys_: torch.Tensor, labels_: torch.Tensor, groups: list,
             scales_: Any = None) -> Any:
        seen.append((xs, ys_, labels_, scales_))
        return original(xs, ys_, labels_, groups, scales_)

    original = trainer._optimizer_step
    trainer._optimizer_step = step  # type: ignore[method-assign]
    trainer._train_iteration(x[:6], ys[:6], x[6:12], ys[6:12])
    xs, ys_, labels_, scales_ = seen[0]
    with torch.no_grad():
        buffer_decisive = (std(xs).argmax(1) == ys_) != (rob(xs).argmax(1) == ys_)
    torch.testing.assert_close(scales_, torch.where(labels_ > 0.5, adv_scale, clean_scale)
                               * buffer_decisive.float())


# -- the curriculum -------------------------------------------------------------------------------
def test_curriculum_ramps_the_attack_weight_and_radius_linearly() -> None:
    settings = RandomizedAttackSettings(eps=8 / 255, comp_loss_wmax=0.4, curriculum_steps=10)
    for step, ramp in ((0, 0.0), (5, 0.5), (10, 1.0), (20, 1.0)):
        at = curriculum_settings(settings, step)
        assert curriculum_ramp(settings, step) == ramp
        assert at.comp_loss_wmax == pytest.approx(0.4 * ramp)
        assert at.eps == pytest.approx(8 / 255 * ramp)
        # The same uniforms, scaled: every drawn eps_i and w_i is the full draw times the ramp.
        full = draw_attack_run(settings, 6, torch.Generator().manual_seed(1))
        ramped = draw_attack_run(at, 6, torch.Generator().manual_seed(1))
        torch.testing.assert_close(ramped.eps, full.eps * ramp)
        torch.testing.assert_close(ramped.bce_weight, full.bce_weight * ramp)
        assert ramped.n_iter == full.n_iter
    off = RandomizedAttackSettings()
    assert off.curriculum_steps == 0
    assert curriculum_settings(off, 0) is off  # the default changes nothing


def test_the_trainer_attacks_as_the_curriculum_says_at_each_global_step(runs: dict) -> None:
    eps = runs["rob_logits"]["config"].randomized_attack_settings.eps
    attacks = runs["rob_logits"]["attacks"]  # 2 iterations of 2 optimizer steps, N = 3
    assert [step for step, _, _ in attacks] == [0, 2]
    assert [a[1] for a in attacks] == pytest.approx([0.0, eps * 2 / 3])
    assert [a[2] for a in attacks] == pytest.approx([0.0, 0.4 * 2 / 3])


# -- the gate and the example configs ------------------------------------------------------------
def test_the_gate_is_small_reads_sorted_logits_and_weighs_the_margin_non_negatively() -> None:
    torch.manual_seed(0)
    gate = LogitGate(10)
    assert sum(p.numel() for p in gate.parameters()) < 300
    logits = 3 * torch.randn(5, 10)
    permuted = logits[:, torch.randperm(10)]
    torch.testing.assert_close(gate(permuted), gate(logits))  # confidence, not classes
    margin = gate.inputs(logits)[:, gate.top_k]
    top2 = torch.nn.functional.layer_norm(logits, (10,)).topk(2, dim=1).values
    torch.testing.assert_close(margin, top2[:, 0] - top2[:, 1])
    with torch.no_grad():
        gate.raw_margin_weight.fill_(-20.0)
    assert gate.margin_weight.item() >= 0


@pytest.mark.parametrize("name, kind", [("rob_logits", "rob_logits"),
                                        ("rob_features", "rob_features")])
def test_the_example_configs_load_and_build_their_mixer(name: str, kind: str) -> None:
    from adaptive_smoothing.config import load_config

    root = Path(__file__).resolve().parents[1]
    config = load_config(root / "configs" / f"rn18w16_{name}_cpu.yaml")
    fwd = config.forward_settings
    assert fwd.mixer_inputs == kind and config.randomized_attack_settings.curriculum_steps > 0
    assert config.training_settings.val_start >= config.evaluation_settings.n_examples
    composite = build_composite(fwd, config.dataset_settings.num_classes)
    assert composite.mixer_inputs == kind
    assert isinstance(composite.mixer, LogitGate if kind == "rob_logits" else MixingNet)


# -- gradients and what gamma depends on ---------------------------------------------------------
@pytest.fixture(scope="module")
def bases():
    return tiny_base(0, train=False), tiny_base(1, train=False)


def _composite(bases, kind: str) -> CompositeModel:
    std, rob = bases
    torch.manual_seed(3)
    mixer = {"both": lambda: MixingNet((4, 4), version=4),
             "rob_features": lambda: MixingNet((4,), version=4, width=0.5),
             "rob_logits": lambda: LogitGate(10)}[kind]()
    return CompositeModel(std, rob, mixer, mixer_inputs=kind, alpha_bias=0.2,
                          alpha_scale=0.75).eval()


@pytest.mark.parametrize("kind", ["rob_features", "rob_logits"])
def test_the_adaptive_attacks_gradient_reaches_the_mixers_input(bases, kind: str) -> None:
    composite = _composite(bases, kind)
    seen: list[torch.Tensor] = []
    grads: list[torch.Tensor] = []

    def capture(_module: Any, inputs: tuple, _output: Any) -> None:
        tensors = [inputs[0]] if kind == "rob_logits" else [*inputs[0], *inputs[1]]
        for tensor in tensors:
            seen.append(tensor)
            if tensor.requires_grad:
                tensor.register_hook(grads.append)

    composite.mixer.register_forward_hook(capture)
    x, y = synthetic_data(6, seed=2)
    # The adaptive attack's loss: (1 - w) CE + w BCE(gamma, 1), differentiated w.r.t. the input.
    apgd(composite, x, y, 8 / 255, n_iter=1, bce_weight=0.5,
         generator=torch.Generator().manual_seed(0))
    assert seen and all(t.requires_grad for t in seen)
    assert grads and all(torch.count_nonzero(g) > 0 for g in grads)
    # With the inputs detached (the unsafe setting), nothing reaches the mixer.
    composite.unsafe_detach_mixer_inputs = True
    seen.clear()
    with torch.enable_grad():
        composite(x.requires_grad_(True))
    assert seen and not any(t.requires_grad for t in seen)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("training_mode", [False, True])
def test_gamma_depends_on_std_only_when_the_mixer_reads_both(bases, kind: str,
                                                             training_mode: bool) -> None:
    import copy

    composite = _composite((copy.deepcopy(bases[0]), bases[1]), kind)
    x, _ = synthetic_data(8, seed=4)

    def gamma() -> torch.Tensor:
        with torch.no_grad(), composite.mode(training_mode):
            bn = copy.deepcopy(composite.gamma_bn.state_dict())
            out = composite(x).gamma
            composite.gamma_bn.load_state_dict(bn)  # training mode moves its statistics
        return out

    before = gamma()
    with torch.no_grad():
        for parameter in composite.std_model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    after = gamma()
    if kind == "both":
        assert not torch.allclose(before, after)
    else:
        assert torch.equal(before, after)


# -- a checkpoint of another kind -----------------------------------------------------------------
@pytest.mark.parametrize("saved, loaded", [
    ("both", "rob_logits"), ("rob_logits", "both"), ("both", "rob_features"),
    ("rob_features", "both"), ("rob_features", "rob_logits"), ("rob_logits", "rob_features")])
def test_a_mixer_of_another_kind_is_refused_in_one_line_naming_the_key(
        bases, tmp_path: Path, saved: str, loaded: str) -> None:
    path = tmp_path / "mixer.pt"
    save_checkpoint(mixer_checkpoint(_composite(bases, saved)), path)
    target = _composite(bases, loaded)
    before = {k: v.clone() for k, v in target.mixer.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_mixer_checkpoint(target, path)
    message = user_error_message(err.value)
    assert message is not None and "\n" not in message
    assert f"forward_settings.mixer_inputs = '{saved}'" in message and repr(loaded) in message
    _assert_states_close(before, target.mixer.state_dict(), atol=0)  # nothing was loaded
    load_mixer_checkpoint(_composite(bases, saved), path)  # the right kind loads


def test_a_config_of_another_kind_refuses_the_trained_mixer_and_its_resume(
        runs: dict, tiny_root: Path) -> None:
    trained = runs["rob_logits"]["path"]
    config = apply_overrides(_config(tiny_root, "other_kind", "both"),
                             **{"model_load_path.comp": str(trained)})
    composite = build_composite(config.forward_settings, 10)
    with pytest.raises(CheckpointError, match=r"forward_settings\.mixer_inputs = 'rob_logits'"):
        load_composite_weights(composite, resolve_checkpoints(config))
    # Resuming that run as another kind: the identity says which key changed ...
    resumed = tiny_root / "other_kind_resume" / "checkpoints"
    resumed.mkdir(parents=True)
    (resumed / "last.pt").write_bytes(trained.read_bytes())
    config = _config(tiny_root, "other_kind_resume", "both")
    with pytest.raises(TrainingResumeError,
                       match=r"forward_settings\.mixer_inputs: 'rob_logits' -> 'both'"):
        build_trainer(prepare(config))
    # ... and with the change allowed, the file is refused naming it.
    with pytest.raises(TrainingResumeError, match=r"forward_settings\.mixer_inputs = "
                                                  r"'rob_logits'.*--no-resume"):
        build_trainer(prepare(config), allow_config_change=["forward_settings.mixer_inputs"])


def test_a_width_for_the_gate_is_refused_naming_the_key(tiny_root: Path) -> None:
    with pytest.raises(ConfigError, match=r"forward_settings\.mixer_width = 0\.5: expected None"):
        _config(tiny_root, "gate_width", "rob_logits", **{"forward_settings.mixer_width": 0.5})


# -- the defaults leave the recorded identities as they were --------------------------------------
def test_the_new_keys_block_no_earlier_checkpoint_and_count_away_from_their_defaults(
        tiny_root: Path) -> None:
    """A checkpoint written before the keys existed records none of them: at their defaults
    that is no change (declared provenance), set otherwise it is one."""
    default = training_identity(prepare(_tiny_config(tiny_root, "identity_default")))
    earlier = {k: v for k, v in default.items() if k not in NEW_KEYS}
    assert provenance.differences(earlier, default, Config) == {}
    for kind in ("rob_features", "rob_logits"):
        identity = training_identity(prepare(_config(tiny_root, f"identity_{kind}", kind)))
        changed = provenance.differences(earlier, identity, Config)
        assert changed["forward_settings.mixer_inputs"] == (None, kind)
        assert changed["randomized_attack_settings.curriculum_steps"] == (None, 3)
        assert "forward_settings.gamma_norm" not in changed  # at its default
    kind, overrides = RUNS["rob_logits_raw"]
    identity = training_identity(prepare(_config(tiny_root, "identity_raw", kind, **overrides)))
    changed = provenance.differences(earlier, identity, Config)
    assert changed["forward_settings.gamma_norm"] == (None, "none")


def test_the_new_keys_block_no_earlier_evaluation_and_count_away_from_their_defaults(
        tiny_root: Path) -> None:
    default = apply_overrides(_tiny_config(tiny_root, "manifest_default"),
                              **{"evaluation_settings.n_examples": 4})
    *_, info = evaluation._load(prepare(default))
    plan = evaluation._plan(default.evaluation_settings, info)
    earlier = {k: v for k, v in plan.items() if not k.startswith(
        ("forward_settings.mixer_", "forward_settings.gamma_norm"))}
    assert provenance.differences(earlier, plan, Config) == {}
    gate = apply_overrides(default, **{"forward_settings.mixer_inputs": "rob_logits"})
    *_, info = evaluation._load(prepare(gate))
    changed = provenance.differences(earlier, evaluation._plan(gate.evaluation_settings, info),
                                     Config)
    assert changed["forward_settings.mixer_inputs"] == (None, "rob_logits")
    raw = apply_overrides(gate, **{"forward_settings.gamma_norm": "none"})
    *_, info = evaluation._load(prepare(raw))
    changed = provenance.differences(earlier, evaluation._plan(raw.evaluation_settings, info),
                                     Config)
    assert changed["forward_settings.gamma_norm"] == (None, "none")


# -- the rob_logits gate's evaluation: transfer attacks and Square too ---------------------------
def test_the_gates_evaluation_adds_transfer_and_square_and_takes_the_worst_case(
        tmp_path: Path) -> None:
    std, rob = tiny_base(0), tiny_base(1)
    torch.manual_seed(0)
    composite = CompositeModel(std, rob, LogitGate(10), mixer_inputs="rob_logits",
                               alpha_bias=0.5, alpha_scale=0.49).eval()
    x, y = synthetic_data(16, seed=4)
    settings = EvaluationSettings(n_examples=16, batch_size=8, precision="fp32",
                                  data_dir="unused", attacks_to_run=("apgd-ce",), norm="Linf",
                                  eps=4 / 255, autoattack_iterations=3, adaptive_attack=True,
                                  adaptive_attack_iterations=3, seed=0)
    nl = NonlinearSettings(square_examples=4, square_queries=10)  # not enabled: its eval keys
    summary = evaluation.evaluate(composite, x, y, settings, tmp_path, device=CPU, nonlinear=nl)
    assert summary["kind"] == "mixture" and summary["valid"]
    assert summary["surrogate_robust_accuracy"] is None  # the gate is differentiable
    names = ("autoattack", "adaptive", "transfer_rob", "transfer_linear")
    for name in names:
        assert summary["robust_accuracy"] <= summary[f"{name}_robust_accuracy"]
    assert summary["square_examples"] == 4 and summary["square_queries"] == 10
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    extra = {k.removeprefix("extra_attacks."): v for k, v in manifest.items()
             if k.startswith("extra_attacks.")}
    assert extra["surrogate"] is False and extra["square_examples"] == 4
    # The linear mixture's alpha: the composite's at the centre of its training gamma.
    assert extra["linear_alpha"] == pytest.approx(0.5 + 0.49 * torch.sigmoid(
        torch.tensor(composite.eval_gamma[1])).item())
    per_image = json.loads((tmp_path / "per_image.json").read_text())["outcomes"]
    assert {"transfer_rob", "transfer_linear", "square"} <= set(per_image)
    assert (torch.tensor(per_image["square"][4:]) == -1).all()
    robust = torch.tensor(per_image["robust"])
    worst = torch.tensor(per_image["clean"]) & torch.tensor(per_image["autoattack"])
    for name in ("transfer_rob", "transfer_linear"):
        worst &= torch.tensor(per_image[name])
    worst[:4] &= torch.tensor(per_image["square"][:4])
    assert (robust <= worst).all()  # the adaptive attack is in the worst case too
    # The paper's mixer gets none of them (its manifests stay as they were).
    plain = CompositeModel(std, rob, MixingNet((4, 4), version=3), alpha_bias=0.5,
                           alpha_scale=0.49).eval()
    assert evaluation.extra_attacks(plain, nl) is None
