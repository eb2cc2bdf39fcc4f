"""Checks of what only a GPU run can show (``scripts/gpu_readiness.py``; issue 13 of the tracker).

Each check returns a JSON-able dict and never raises: a failure is recorded as
``{"ok": false, "error": ...}`` so that one short device session reports every check. With
``smoke=True`` every check runs at tiny sizes, on the CPU too (the test suite runs them so).

- ``sync_debug``: host-device synchronisations in the composite's forward and in APGD steps
  (``torch.cuda.set_sync_debug_mode("warn")``; on the CPU a dispatch-mode stand-in).
- ``precision``: APGD-CE in fp32, bf16 and fp16 on the same points (the comparison of
  ``tools/precision.py``): robust accuracy, and the share of points whose input gradient is all
  zero with and without the gradient scaling of ``grad_scaling.py``.
- ``base_resume``: base-model training resumed on the device (the RNG-state crash).
- ``precision_resume``: the mixer trained in bf16, then resumed in fp16 for two steps.
- ``autoattack_cost``: memory and time of the published architecture (random weights) per
  AutoAttack batch, projected to a full standard AutoAttack batch against NCCL's default timeout.
- ``determinism``: two identical APGD runs, compared bit for bit.
- ``eval_device_vs_cpu``: the demo composite evaluated (clean + APGD-CE) on the device and on the
  CPU.
"""
from __future__ import annotations

import json
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch.utils.data import TensorDataset

from adaptive_smoothing.attacks import apgd
from adaptive_smoothing.models import CompositeModel, MixingNet, create_model
from adaptive_smoothing.persist import write_text_atomic
from adaptive_smoothing.runtime import AutocastModule, resolve_precision

__all__ = ["CHECKS", "run_checks"]

NCCL_DEFAULT_TIMEOUT_S = 600.0
# Gradient evaluations and forward passes per image of a standard AutoAttack batch where no
# attack succeeds (the worst case): APGD-CE 100, APGD-T 9 x 100, FAB-T 9 x 100 iterations
# (about one forward + backward each), Square 5000 queries (forwards).
AUTOATTACK_BACKWARDS, AUTOATTACK_FORWARDS = 100 + 900 + 900, 5000
REPO_ROOT = Path(__file__).resolve().parents[2]


# -- shared pieces --------------------------------------------------------------------------------
def _tiny_composite(device: torch.device, width: int = 2, seed: int = 0) -> CompositeModel:
    torch.manual_seed(seed)
    std = create_model("resnet18", num_classes=10, width=width)
    rob = create_model("resnet18", num_classes=10, width=width)
    mixer = MixingNet((std.feature_channels[0], rob.feature_channels[0]), version=3)
    return CompositeModel(std, rob, mixer, alpha_scale=0.75, alpha_bias=0.2).to(device).eval()


def _demo_composite(device: torch.device) -> tuple[CompositeModel, str]:
    """The demo composite with its weights (demo/), else a tiny random one."""
    from adaptive_smoothing.config import load_config
    from adaptive_smoothing.factory import build_composite, load_composite_weights
    from adaptive_smoothing.prepare import resolve_checkpoints
    try:
        config = load_config(REPO_ROOT / "configs" / "demo.yaml")
        composite = build_composite(config.forward_settings,
                                    config.dataset_settings.num_classes, device,
                                    source=config.source)
        load_composite_weights(composite, resolve_checkpoints(config))
        return composite.eval(), "demo (configs/demo.yaml, weights in demo/)"
    except Exception as exc:  # noqa: BLE001 - reported, then a stand-in is used
        return _tiny_composite(device), f"tiny random composite (demo unavailable: {exc})"


def _images(n: int, data_dir: Optional[Path]) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The first n CIFAR-10 test images from data_dir (.npz folder), else seeded noise."""
    if data_dir is not None and (Path(data_dir) / "test.npz").exists():
        from adaptive_smoothing.data import build_dataset, load_tensors
        x, y = load_tensors(build_dataset("cifar10", "test", "npz", data_dir), n)
        return x, y, f"CIFAR-10 test set, first {n} ({data_dir})"
    gen = torch.Generator().manual_seed(0)
    return (torch.rand(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen),
            f"{n} uniform-noise images (no CIFAR-10 .npz given)")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SyncRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """CPU stand-in for CUDA's sync debug mode: ops that wait for the GPU (.item()/bool(),
    nonzero and boolean-mask indexing) or copy Python data to it (torch.tensor / as_tensor)."""

    SYNCS = {"nonzero", "_local_scalar_dense", "lift_fresh", "lift_fresh_copy", "masked_select",
             "is_nonzero"}

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if name in self.SYNCS:
            self.found.append(name)
        if name in ("index", "index_put", "index_put_") and any(
                t is not None and t.dtype == torch.bool for t in args[1]):
            self.found.append(f"{name} with a boolean mask")
        return func(*args, **(kwargs or {}))


def _count_syncs(fn: Callable[[], Any], device: torch.device) -> list[str]:
    """The synchronisations ``fn`` causes (messages of CUDA's sync debug warnings)."""
    if device.type != "cuda":
        with SyncRecorder() as recorder:
            fn()
        return recorder.found
    _synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [str(w.message).splitlines()[0] for w in caught
            if "synchroniz" in str(w.message).lower()]


# -- the checks -----------------------------------------------------------------------------------
def check_sync_debug(device: torch.device, smoke: bool, data_dir: Optional[Path]) -> dict:
    composite = _tiny_composite(device, width=2 if smoke else 8)
    x, y, _ = _images(8 if smoke else 128, None)
    x, y = x.to(device), y.to(device)
    generator = torch.Generator().manual_seed(0)

    def attack(n_iter: int) -> None:
        apgd(composite, x, y, 8 / 255, n_iter=n_iter, loss="ce", bce_weight=0.3,
             generator=generator)

    attack(2)  # warm-up: lazy initialisations are not per-step costs
    forward = _count_syncs(lambda: composite(x), device)
    one_step, four_steps = _count_syncs(lambda: attack(1), device), _count_syncs(
        lambda: attack(4), device)
    return {"ok": not forward and len(four_steps) == len(one_step),
            "syncs_in_forward": forward,
            "syncs_in_3_apgd_steps": len(four_steps) - len(one_step),
            "syncs_in_apgd_setup": one_step[:10],
            "method": ("torch.cuda.set_sync_debug_mode('warn')" if device.type == "cuda"
                       else "CPU dispatch-mode stand-in")}


def _zero_grad_share(model: AutocastModule, x: torch.Tensor, y: torch.Tensor,
                     scaled: bool) -> float:
    x = x.clone().requires_grad_(True)
    out = model(x) if scaled else model._forward(x)
    logits = out.log_probs if hasattr(out, "log_probs") else out
    grad, = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, y, reduction="sum"), x)
    return (grad.flatten(1).abs().amax(1) == 0).float().mean().item()


def _precision_comparison(composite: CompositeModel, x: torch.Tensor, y: torch.Tensor,
                          n_iter: int) -> dict[str, Any]:
    from adaptive_smoothing.config import EvaluationSettings
    from adaptive_smoothing.tools.precision import apgd_ce_settings, compare_settings
    from adaptive_smoothing.tools.speed import SpeedSetting

    device = x.device
    # The evaluation's APGD-CE (tools/precision.py, as the device check's bf16 agreement runs it).
    settings = apgd_ce_settings(EvaluationSettings(), eps=8 / 255, iterations=n_iter,
                                batch_size=len(y))
    results: dict[str, Any] = {}
    for name in ("fp32", "bf16", "fp16"):
        try:
            setting = SpeedSetting(name)
            result = compare_settings(composite, x, y, settings, [setting],
                                      device=device)[setting.label]
            model = AutocastModule(composite, device, resolve_precision(name, device))
            results[name] = {
                "clean_accuracy": result["clean_accuracy"],
                "robust_accuracy": result["robust_accuracy"],
                "zero_input_gradient_share_scaled": _zero_grad_share(model, x, y, True),
                "zero_input_gradient_share_unscaled": _zero_grad_share(model, x, y, False)}
        except Exception as exc:  # noqa: BLE001 - e.g. fp16, which needs CUDA
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    # Sound when no precision loses more input gradients to zero than fp32 does (1 point slack).
    fp32 = results["fp32"].get("zero_input_gradient_share_scaled")
    results["ok"] = fp32 is not None and all(
        results[k]["zero_input_gradient_share_scaled"] <= fp32 + 1 / len(y) + 1e-9
        for k in ("bf16", "fp16") if "error" not in results[k])
    return results


def check_precision(device: torch.device, smoke: bool, data_dir: Optional[Path]) -> dict:
    # Smoke runs (CPU autocast in bf16/fp16 is slow) take the tiny composite, sharpened only.
    composite, model_name = ((_tiny_composite(device), "tiny random composite") if smoke
                             else _demo_composite(device))
    x, y, data = _images(8 if smoke else 256, data_dir)
    x, y = x.to(device), y.to(device)
    n_iter = 3 if smoke else 100
    results: dict[str, Any] = {"model": model_name, "data": data, "attack": f"APGD-CE, "
                               f"Linf 8/255, {n_iter} iterations", "n": len(y)}
    # Logit scales x8 make the base models confident, where fp16 input gradients flush to zero.
    noise = data_dir is None or not (Path(data_dir) / "test.npz").exists()
    if noise:
        results["labels"] = "the fp32 model's own clean predictions (noise images)"
    for scale in ((8.0,) if smoke else (1.0, 8.0)):
        composite.std_scale = composite.rob_scale = scale
        if noise:
            with torch.no_grad():
                y = composite(x).log_probs.argmax(1)
        results[f"logit_scale_{scale:g}"] = _precision_comparison(composite, x, y, n_iter)
    results["ok"] = all(v["ok"] for k, v in results.items() if k.startswith("logit_scale"))
    return results


def check_base_resume(device: torch.device, smoke: bool, data_dir: Optional[Path]) -> dict:
    from adaptive_smoothing.base_training import BaseTrainingSettings, train_base_model
    from adaptive_smoothing.checkpoints import read_checkpoint
    x, y, _ = _images(8, None)
    settings = BaseTrainingSettings(arch_kwargs={"width": 2}, epochs=1, batch_size=4,
                                    device=str(device), precision="fp32")
    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp) / "base.pt"
        train_base_model(settings, TensorDataset(x, y), output)
        saved = read_checkpoint(output)["rng_state"]
        train_base_model(settings, TensorDataset(x, y), output)  # resumes the finished run
        return {"ok": bool(torch.equal(torch.get_rng_state(), saved)),
                "resumed_rng_state_restored": bool(torch.equal(torch.get_rng_state(), saved))}


def _tiny_training_config(root: Path, precision: str, max_steps: int, device: torch.device
                          ) -> Any:
    from adaptive_smoothing.config import load_config
    (root / "Base").mkdir(exist_ok=True)
    for name, seed in (("std", 1), ("rob", 2)):
        torch.manual_seed(seed)
        model = create_model("resnet18", 10, width=2)
        torch.save({"model": model.state_dict()}, root / "Base" / f"{name}.pt")
    lines = ["seed: 5", f"log_dir: '{root}'", "log_path: 'run'",
             "model_load_path: {std: 'Base/std.pt', rob: 'Base/rob.pt', comp: 'None'}",
             "forward_settings: {std_model_type: resnet18, std_model_kwargs: {width: 2}, "
             "rob_model_type: resnet18, rob_model_kwargs: {width: 2}, pn_version: 3, "
             "alpha_scale: 0.75, alpha_bias: 0.2}",
             "dataset_settings: {name: CIFAR-10, format: npz, path: 'unused'}",
             f"training_settings: {{epochs: 1, batch_size: 4, lr: 3e-3, accum_grad: 2, "
             f"n_val_examples: 4, batch_size_test_per_gpu: 4, precision: {precision}, "
             f"max_steps: {max_steps}, eval_freq: {{epoch: 1, iter: 1}}}}",
             "pgd_settings: {n_target_classes: 1, iters_test: 2}",
             "randomized_attack_settings: {iters_df: 2, iters_const: 0}",
             f"evaluation_settings: {{device: '{device}'}}"]
    path = root / f"{precision}.yaml"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return load_config(path)


def check_precision_resume(device: torch.device, smoke: bool, data_dir: Optional[Path]) -> dict:
    from adaptive_smoothing.prepare import prepare
    from adaptive_smoothing.training import build_trainer
    cuda = device.type == "cuda"
    first, second = ("bf16", "fp16") if cuda else ("fp32", "fp32")
    x, y, _ = _images(8, None)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        trainer = build_trainer(prepare(_tiny_training_config(root, first, 2, device)),
                                train_set=TensorDataset(x, y), val_set=(x[:4], y[:4]))
        trainer.fit()
        # Extending the run (max_steps 2 -> 4) changes the schedule: a resume must be told.
        resumed = build_trainer(prepare(_tiny_training_config(root, second, 4, device)),
                                train_set=TensorDataset(x, y), val_set=(x[:4], y[:4]),
                                allow_config_change=("training_settings.max_steps",))
        start = resumed.global_step
        resumed.fit()
        finite = all(torch.isfinite(p).all().item() for p in resumed.mixer.parameters())
        return {"ok": start == 2 and resumed.global_step == 4 and finite,
                "precisions": [first, second], "steps_before_resume": start,
                "steps_after": resumed.global_step, "scaler_enabled": resumed.scaler.is_enabled(),
                "mixer_finite": finite}


def check_autoattack_cost(device: torch.device, smoke: bool, data_dir: Optional[Path]) -> dict:
    if smoke:
        composite, arch, batch = _tiny_composite(device), "tiny ResNet-18 composite", 8
    else:
        from adaptive_smoothing.published import build_published_composite
        composite = build_published_composite("cifar10", "edm").to(device).eval()
        arch, batch = "published cifar10/edm (BiT-M-R152x2 + WRN-70-16, random weights)", 200
    x, y, _ = _images(batch, None)
    x, y = x.to(device), y.to(device)
    results: dict[str, Any] = {"architecture": arch, "batch": batch}
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        if device.type != "cuda" and dtype != torch.float32:
            continue
        model = AutocastModule(composite, device, dtype)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        def backward() -> None:
            xg = x.clone().requires_grad_(True)
            loss = torch.nn.functional.cross_entropy(model(xg).log_probs, y)
            torch.autograd.grad(loss, xg)

        def forward() -> None:
            with torch.no_grad():
                model(x)
        timings = {}
        for label, fn in (("forward_backward_s", backward), ("forward_s", forward)):
            fn()
            _synchronize(device)
            start, repeats = time.perf_counter(), 1 if smoke else 3
            for _ in range(repeats):
                fn()
            _synchronize(device)
            timings[label] = (time.perf_counter() - start) / repeats
        projected = (AUTOATTACK_BACKWARDS * timings["forward_backward_s"]
                     + AUTOATTACK_FORWARDS * timings["forward_s"])
        results[name] = dict(timings, projected_full_autoattack_batch_s=projected,
                             exceeds_nccl_default_timeout=projected > NCCL_DEFAULT_TIMEOUT_S,
                             peak_memory_gib=(torch.cuda.max_memory_allocated(device) / 2**30
                                              if device.type == "cuda" else None))
    results["nccl_default_timeout_s"] = NCCL_DEFAULT_TIMEOUT_S
    results["note"] = ("evaluation.evaluate waits for other ranks' batch files, not in a "
                       "collective, so a batch longer than the timeout does not abort the job")
    results["ok"] = True
    return results


def check_determinism(device: torch.device, smoke: bool, data_dir: Optional[Path]) -> dict:
    composite, model_name = _demo_composite(device)
    x, y, data = _images(16 if smoke else 256, data_dir)
    x, y = x.to(device), y.to(device)
    runs = [apgd(composite, x, y, 8 / 255, n_iter=5 if smoke else 20, loss="ce",
                 generator=torch.Generator().manual_seed(0)) for _ in range(2)]
    same = torch.equal(runs[0].x_adv, runs[1].x_adv)
    # The two backward passes the README names as non-deterministic on CUDA (atomic adds).
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(8, 3, 32, 32, generator=gen).to(device)
    upstream = {"interpolate_bilinear_to_128": torch.rand(8, 3, 128, 128, generator=gen),
                "adaptive_avg_pool2d_to_1": torch.rand(8, 3, 1, 1, generator=gen)}
    ops = {"interpolate_bilinear_to_128": lambda t: torch.nn.functional.interpolate(
               t, size=(128, 128), mode="bilinear"),
           "adaptive_avg_pool2d_to_1": lambda t: torch.nn.functional.adaptive_avg_pool2d(t, 1)}
    backward_identical = {}
    for name, op in ops.items():
        grads = []
        for _ in range(2):
            t = images.clone().requires_grad_(True)
            grads.append(torch.autograd.grad(op(t), t, upstream[name].to(device))[0])
        backward_identical[name] = bool(torch.equal(grads[0], grads[1]))
    return {"ok": True, "model": model_name, "data": data, "bit_identical": same,
            "backward_bit_identical": backward_identical,
            "max_abs_diff_x_adv": (runs[0].x_adv - runs[1].x_adv).abs().max().item(),
            "max_abs_diff_loss": (runs[0].loss - runs[1].loss).abs().max().item(),
            "same_fooled": bool(torch.equal(runs[0].fooled, runs[1].fooled))}


def check_eval_device_vs_cpu(device: torch.device, smoke: bool, data_dir: Optional[Path]
                             ) -> dict:
    from adaptive_smoothing.config import EvaluationSettings
    from adaptive_smoothing.evaluation import evaluate
    x, y, data = _images(8 if smoke else 200, data_dir)
    summaries = {}
    for where in (device, torch.device("cpu")):
        composite, model_name = _demo_composite(where)
        settings = EvaluationSettings(
            n_examples=len(y), batch_size=len(y), precision="fp32", data_dir="unused",
            attacks_to_run=("apgd-ce",), norm="Linf",
            eps=8 / 255, pgd=False, pgd_iters=10, pgd_step_size=2 / 255, pgd_loss="ce",
            adaptive_attack=False, adaptive_attack_weight=0.5, adaptive_attack_iterations=10,
            autoattack_iterations=5 if smoke else 20, save_adversarial=False, seed=0)
        with tempfile.TemporaryDirectory() as tmp:
            summary = evaluate(composite, x, y, settings, Path(tmp), device=where)
        summaries[where.type if where.type == "cpu" else str(where)] = {
            k: summary[k] for k in ("clean_accuracy", "autoattack_robust_accuracy",
                                    "mean_alpha_clean", "mean_alpha_adv")}
    values = list(summaries.values())
    diffs = {k: abs(values[0][k] - values[-1][k]) for k in values[0]}
    return {"ok": diffs["clean_accuracy"] <= 1 / len(y) + 1e-9, "model": model_name,
            "data": data, "results": summaries, "abs_differences": diffs}


CHECKS: dict[str, Callable[[torch.device, bool, Optional[Path]], dict]] = {
    "sync_debug": check_sync_debug, "precision": check_precision,
    "base_resume": check_base_resume, "precision_resume": check_precision_resume,
    "autoattack_cost": check_autoattack_cost, "determinism": check_determinism,
    "eval_device_vs_cpu": check_eval_device_vs_cpu,
}


def run_checks(names: list[str], out_dir: Path, device: torch.device, *, smoke: bool = False,
               data_dir: Optional[Path] = None) -> dict[str, dict]:
    """Run the named checks, writing ``out_dir/<name>.json`` after each; returns all results."""
    unknown = sorted(set(names) - set(CHECKS))
    if unknown:
        raise ValueError(f"unknown check(s) {unknown}; expected some of {sorted(CHECKS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = {"device": str(device), "torch": torch.__version__, "smoke": smoke,
               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    results = {}
    for name in names:
        start = time.perf_counter()
        try:
            result = CHECKS[name](device, smoke, data_dir)
        except Exception as exc:  # noqa: BLE001 - recorded; the other checks still run
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                      "traceback": traceback.format_exc(limit=8)}
        result.update(seconds=round(time.perf_counter() - start, 3), machine=machine)
        results[name] = result
        write_text_atomic(out_dir / f"{name}.json", json.dumps(result, indent=2, sort_keys=True,
                                                               default=str))
    return results
