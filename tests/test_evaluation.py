"""Evaluation: clean accuracy, AutoAttack through pyautoattack, PGD, resumability."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from adaptive_smoothing.config import EvaluationSettings
from adaptive_smoothing import evaluation
from adaptive_smoothing.prepare import prepare
from adaptive_smoothing.evaluation import EvaluationError, evaluate, format_table
from synthetic import synthetic_data, tiny_composite

CPU = torch.device("cpu")


def _settings(**kw) -> EvaluationSettings:
    base = dict(n_examples=48, batch_size=16, precision="fp32", data_dir="unused",
                attacks_to_run=(), norm="Linf", eps=8 / 255, pgd=False,
                pgd_iters=10, pgd_step_size=2 / 255, pgd_loss="ce", adaptive_attack=False,
                adaptive_attack_weight=0.5, adaptive_attack_iterations=10,
                autoattack_iterations=10, save_adversarial=False, seed=0)
    base.update(kw)
    return EvaluationSettings(**base)


@pytest.fixture(scope="module")
def composite():
    return tiny_composite(mixer=True, alpha_bias=0.2, alpha_scale=0.75)


@pytest.fixture(scope="module")
def data():
    return synthetic_data(48, seed=7)


def test_clean_accuracy_and_mixing_stats_equal_direct_computation(composite, data, tmp_path):
    x, y = data
    summary = evaluate(composite, x, y, _settings(), tmp_path, device=CPU)
    with torch.no_grad():
        out = composite.eval()(x)
    assert summary["n_examples"] == 48
    assert summary["clean_accuracy"] == pytest.approx((out.log_probs.argmax(1) == y).float().mean())
    assert summary["mean_alpha_clean"] == pytest.approx(out.alpha.mean().item(), abs=1e-6)
    assert summary["mean_gamma_clean"] == pytest.approx(out.gamma.mean().item(), abs=1e-5)
    assert 0.2 <= summary["mean_alpha_clean"] <= 0.95
    assert summary["autoattack_robust_accuracy"] is None
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["clean_accuracy"] == summary["clean_accuracy"]
    assert "clean accuracy" in (tmp_path / "results.md").read_text()


def test_autoattack_runs_end_to_end_and_is_bounded_by_clean(composite, data, tmp_path):
    x, y = data
    summary = evaluate(composite, x, y, _settings(attacks_to_run=("apgd-ce", "apgd-t")),
                       tmp_path, device=CPU)
    assert summary["clean_accuracy"] > 0.8  # the tiny models learned the synthetic task
    assert summary["autoattack_robust_accuracy"] <= summary["clean_accuracy"]
    assert summary["robust_accuracy"] <= summary["autoattack_robust_accuracy"]
    assert summary["autoattack_version"] == "custom"
    assert summary["mean_alpha_adv"] is not None


def test_undefended_model_has_about_zero_robust_accuracy_at_large_eps(data, tmp_path):
    std_only = tiny_composite(mixer=False, gamma=-math.inf)
    x, y = data
    summary = evaluate(std_only, x, y,
                       _settings(attacks_to_run=("apgd-ce",), eps=0.3, pgd=True),
                       tmp_path, device=CPU)
    assert summary["clean_accuracy"] > 0.8
    assert summary["autoattack_robust_accuracy"] <= 0.05
    assert summary["pgd_robust_accuracy"] <= 0.1
    # gamma is -inf for the STD-only model: no mean is reported rather than -inf or NaN.
    assert summary["mean_gamma_clean"] is None
    assert summary["mean_alpha_clean"] == 0.0


def test_adaptive_attack_is_reported_and_bounded(composite, data, tmp_path):
    x, y = data
    summary = evaluate(composite, x[:16], y[:16], _settings(adaptive_attack=True, eps=16 / 255),
                       tmp_path, device=CPU)
    assert summary["adaptive_robust_accuracy"] <= summary["clean_accuracy"]
    assert summary["robust_accuracy"] == summary["adaptive_robust_accuracy"]
    assert "adaptive" in format_table(summary)


def test_interrupted_evaluation_resumes_without_recomputing(composite, data, tmp_path,
                                                           monkeypatch):
    x, y = data
    settings = _settings(attacks_to_run=("apgd-ce",), pgd=True)
    reference = evaluate(composite, x, y, settings, tmp_path / "reference", device=CPU)

    calls: list[int] = []
    real = evaluation.evaluate_batch

    def crash_on_third(*args, **kwargs):
        calls.append(len(calls))
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C during batch 3
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate_batch", crash_on_third)
    out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        evaluate(composite, x, y, settings, out, device=CPU)
    assert sorted(p.name for p in (out / "batches").glob("0*.json")) == [
        "00000.json", "00001.json"]

    calls.clear()
    monkeypatch.setattr(evaluation, "evaluate_batch",
                        lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    resumed = evaluate(composite, x, y, settings, out, device=CPU)
    assert len(calls) == 1  # only the unfinished third batch ran again
    assert resumed == reference
    assert (json.loads((out / "results.json").read_text())
            == json.loads((tmp_path / "reference" / "results.json").read_text()))


def test_output_dir_of_a_different_evaluation_is_refused(composite, data, tmp_path):
    x, y = data
    evaluate(composite, x[:16], y[:16], _settings(), tmp_path, device=CPU)
    with pytest.raises(EvaluationError, match=r"evaluation_settings\.eps: .* -> "):
        evaluate(composite, x[:16], y[:16], _settings(eps=4 / 255), tmp_path, device=CPU)


def test_adversarial_examples_are_saved_within_eps(composite, data, tmp_path):
    x, y = data
    evaluate(composite, x[:16], y[:16],
             _settings(attacks_to_run=("apgd-ce",), save_adversarial=True, eps=16 / 255),
             tmp_path, device=CPU)
    x_adv = torch.load(tmp_path / "adversarial" / "00000.pt", weights_only=True)
    assert x_adv.shape == x[:16].shape
    assert (x_adv - x[:16]).abs().max() <= 16 / 255 + 1e-6


def test_detached_mixer_marks_results_invalid(data, tmp_path):
    unsafe = tiny_composite(mixer=True, unsafe_detach_mixer_inputs=True)
    x, y = data
    summary = evaluate(unsafe, x[:16], y[:16], _settings(), tmp_path, device=CPU)
    assert summary["valid"] is False
    assert "NOT VALID" in (tmp_path / "results.md").read_text()


# -- numbers are checked before they are reported ---------------------------------------------
@pytest.mark.parametrize("poison", ["nan_mixer", "inf_base"])
def test_non_finite_model_outputs_stop_the_evaluation_instead_of_reporting(data, tmp_path,
                                                                           poison):
    broken = tiny_composite(mixer=True)
    with torch.no_grad():
        if poison == "nan_mixer":
            next(broken.mixer.parameters()).fill_(float("nan"))
        else:
            broken.rob_model.linear.weight.fill_(float("inf"))
    x, y = data
    with pytest.raises(EvaluationError, match=r"batch 0 \(images 0\.\.15\) are not finite"):
        evaluate(broken, x[:16], y[:16], _settings(), tmp_path, device=CPU)
    assert not (tmp_path / "results.json").exists()


def test_results_json_is_strict_json_without_nan(tmp_path):
    path = tmp_path / "r.json"
    evaluation._atomic_write_json({"mean_alpha_adv": float("nan"), "x": [float("inf"), 1.0]},
                                  path)

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    assert json.loads(path.read_text(), parse_constant=refuse) == {
        "mean_alpha_adv": None, "x": [None, 1.0]}


def test_corrupt_batch_file_is_named_in_the_error(composite, data, tmp_path):
    x, y = data
    evaluate(composite, x[:32], y[:32], _settings(), tmp_path, device=CPU)
    (tmp_path / "batches" / "00001.json").write_text('{"n": 16, "clean_corr')
    with pytest.raises(EvaluationError, match=r"batches/00001\.json: unreadable batch result.*"
                                              r"delete this file"):
        evaluate(composite, x[:32], y[:32], _settings(), tmp_path, device=CPU)


def test_changed_fingerprint_refuses_reuse_and_overwrite_starts_over(composite, data, tmp_path):
    x, y = data
    info = {"fingerprints": {"comp": "a" * 64, "data": "b" * 64}}
    evaluate(composite, x[:16], y[:16], _settings(), tmp_path, device=CPU, model_info=info)
    changed = {"fingerprints": {"comp": "c" * 64, "data": "b" * 64}}
    with pytest.raises(EvaluationError, match=r"mixer checkpoint's content changed "
                                              r"\(sha256 aaaaaaaaaaaa -> cccccccccccc\).*"
                                              r"--overwrite"):
        evaluate(composite, x[:16], y[:16], _settings(), tmp_path, device=CPU,
                 model_info=changed)
    summary = evaluate(composite, x[:16], y[:16], _settings(), tmp_path, device=CPU,
                       model_info=changed, overwrite=True)
    assert summary["model"]["fingerprints"]["comp"] == "c" * 64
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["fingerprints.comp"] == "c" * 64


def test_second_evaluation_into_a_locked_folder_is_refused(composite, data, tmp_path):
    from adaptive_smoothing.rundir import RunDirError, RunLock

    x, y = data
    with RunLock(tmp_path):
        with pytest.raises(RunDirError, match=rf"{tmp_path} is in use by another run \(pid "
                                              rf"{os.getpid()}"):
            evaluate(composite, x[:16], y[:16], _settings(), tmp_path, device=CPU)
    evaluate(composite, x[:16], y[:16], _settings(), tmp_path, device=CPU)  # released


# -- per-image determinism ----------------------------------------------------------------------
@pytest.mark.e2e
def test_demo_robust_accuracy_does_not_depend_on_the_batch_size(tmp_path):
    """Random starts drawn per batch made robust accuracy depend on --batch-size (7.0% at 250
    vs 7.5% at 25 on the same 200 images); per-image draws make every image's result, and so
    its attacked alpha, independent of its batch."""
    from adaptive_smoothing.config import apply_overrides, load_config
    from conftest import REPO_ROOT

    config = apply_overrides(load_config(REPO_ROOT / "configs" / "demo.yaml"), **{
        "log_dir": str(REPO_ROOT / "demo"), "dataset_settings.path": str(REPO_ROOT / "demo"),
        "evaluation_settings.n_examples": 200, "evaluation_settings.device": "cpu",
        "evaluation_settings.autoattack_iterations": 5})
    run = prepare(config)
    composite, x, y, dtype, info = evaluation._load(run)
    device = run.device
    runs = {}
    for batch_size in (250, 25):
        settings = config.evaluation_settings.model_copy(update={"batch_size": batch_size})
        out = tmp_path / str(batch_size)
        runs[batch_size] = evaluate(composite, x, y, settings, out, device=device, dtype=dtype,
                                    model_info=info)
        runs[batch_size]["alpha_adv"] = [a for f in sorted((out / "batches").glob("*.json"))
                                         for a in json.loads(f.read_text())["alpha_adv"]]
    assert 0 < runs[250]["robust_accuracy"] < runs[250]["clean_accuracy"]
    assert runs[25]["robust_accuracy"] == runs[250]["robust_accuracy"]
    assert runs[25]["autoattack_robust_accuracy"] == runs[250]["autoattack_robust_accuracy"]
    assert runs[25]["alpha_adv"] == pytest.approx(runs[250]["alpha_adv"], abs=1e-4)


def test_committed_evaluation_folders_still_resume_under_the_current_schema(shared_cifar10,
                                                                           tmp_path):
    """The fixed-alpha folders of experiments/rn18w16_cpu/eval were written by an
    earlier version (a nested manifest, before declared provenance, and before the schema
    gained nonlinear_settings and robustbench_model_dir): they must still match, and a real
    change must still be refused."""
    import shutil
    from pathlib import Path

    from adaptive_smoothing.config import apply_overrides, load_config

    root = Path(__file__).resolve().parents[1]
    folder = root / "experiments/rn18w16_cpu/eval/fixed/alpha_0.720"
    config = apply_overrides(load_config(root / "configs/rn18w16_cifar10_cpu.yaml"), **{
        "log_dir": str(root / "experiments/rn18w16_cpu"),
        "dataset_settings.path": str(shared_cifar10),
        "evaluation_settings.data_dir": str(shared_cifar10)})
    *_, info = evaluation._load(prepare(config))
    fixed = dict(info, model_load_path=dict(info["model_load_path"], comp=None),
                 fingerprints=dict(info["fingerprints"], comp=None), variant="alpha_0.720")
    settings = config.evaluation_settings.model_copy(update={"adaptive_attack": False})
    fixed["unsafe_detach_mixer_inputs"] = False
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(folder / "manifest.json", copy / "manifest.json")
    assert set(json.loads((copy / "manifest.json").read_text())) == {"settings", "model"}
    evaluation._check_manifest(copy, evaluation._plan(settings, fixed))  # matches
    changed = settings.model_copy(update={"n_examples": 999})
    with pytest.raises(EvaluationError, match=r"evaluation_settings\.n_examples: 1000 -> 999"):
        evaluation._check_manifest(copy, evaluation._plan(changed, fixed))
