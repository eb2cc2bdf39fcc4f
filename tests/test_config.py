"""Configuration files: the shipped configs, the authors' quirks, overrides, and error messages."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pydantic
import pytest
import torch
import yaml

from adaptive_smoothing.config import (STANDARD_AUTOATTACK, Config, ConfigError, apply_overrides,
                                       config_to_dict, load_config, parse_config)
from adaptive_smoothing.factory import build_composite

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

# A file exactly in the authors' layout (docs/METHOD.md, "Authors' configs"), none of this
# project's new keys.
AUTHORS_FILE = """\
seed: 20230331
log_dir: '/data/models'
log_path: 'Results/CIFAR10_EDM'
model_load_path:
  std: 'Base/cifar10_bit_rn152.tar'
  rob: 'Base/cifar10_linf_edm_wrn70-16.pt'
  comp: 'None'
forward_settings:
  std_model_type: 'rn152'
  rob_model_type: 'wrn7016_silu'
  std_model_scale: 1.2
  rob_model_scale: 0.3
  in_planes: '(512, 256)'
  gamma: 2.
  use_policy: True
  policy_graph: True
  pn_version: 4
  alpha_scale: 0.04
  alpha_bias: 0.96
  parallel: 1
  ema_decay: 0.999
dataset_settings:
  name: 'CIFAR-10'
  train_with_test: False
  train_shuffle: True
  path: '../data'
  pa_path: 'None'
  gamma_0: 'None'
  blocks: 1
training_settings:
  epochs: 3
  batch_size_train_per_gpu: 50
  batch_size_test_per_gpu: 50
  save_eval_imgs: False
  lr: '5e-5'
  weight_decay: '1e-5'
  comp_loss_params:
    consts: {bce: 1.5, ce: 0., prod: 0.3}
    scale: {clean: 1., ada: 1., pa: 1.}
  accum_grad: 4
  use_fast_loader: False
  gamma_consts:
    train: '(2., 0.4)'
    eval: '(2., 1.05)'
  eval_freq:
    epoch: 1
    iter: 100
pgd_settings:
  type: 'l_inf'
  eps: 'default'
  iters_test: 20
  alpha_test: 0.0027
  use_aa: True
  n_target_classes: 9
  pgd_eval_loss: 'ce'
  attacks_to_run: 'default'
randomized_attack_settings:
  randomize: True
  apgd: True
  random_start: True
  eps_factor_loc: 0.4
  eps_factor_scale: 0.7
  mom_decay_loc: 0.1
  mom_decay_scale: 0.3
  iters_df: 75
  iters_const: 0
  alpha_factor: 2.5
  comp_loss_wmax: 0.4
"""


def _write(tmp_path: Path, data: Any, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def _authors_raw() -> dict:
    return yaml.safe_load(AUTHORS_FILE)


def _set(raw: dict, key_path: str, value: Any) -> dict:
    *parents, last = key_path.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return raw


# -- shipped configs ---------------------------------------------------------------------------
# docs/METHOD.md, "Published models": gamma (eval), alpha (scale, bias), logit scales
# (s_std, s_rob).
PUBLISHED = {
    "cifar10_edm": ("cifar10", "dm_wrn_70_16_silu", (2.0, 1.05), (0.04, 0.96), (1.2, 0.3),
                    (1.5, 0.0, 0.3), 1.0),
    "cifar100_edm": ("cifar100", "dm_wrn_70_16_silu", (2.0, 1.3), (0.15, 0.84), (2.0, 1.0),
                     (1.5, 0.0, 0.2), 1.0),
    "cifar100_trades": ("cifar100", "dm_wrn_70_16", (2.0, 1.0), (0.1, 0.815), (2.0, 1.0),
                        (1.0, 0.5, 0.1), 2.0),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_configs(name: str) -> None:
    dataset, rob, eval_gamma, alpha, scales, consts, clean_scale = PUBLISHED[name]
    cfg = load_config(CONFIG_DIR / f"{name}.yaml")
    fwd, train = cfg.forward_settings, cfg.training_settings
    assert cfg.dataset_settings.name == dataset
    assert cfg.dataset_settings.num_classes == (100 if dataset == "cifar100" else 10)
    assert (fwd.std_model_type, fwd.rob_model_type) == ("bit_m_r152x2", rob)
    assert fwd.std_resize == 128
    assert fwd.in_planes == (512, 256) and fwd.pn_version == 4
    assert fwd.use_policy and fwd.policy_graph
    assert (fwd.alpha_scale, fwd.alpha_bias) == alpha
    assert (fwd.std_model_scale, fwd.rob_model_scale) == scales
    assert fwd.gamma_consts.train == (2.0, 0.4)
    assert fwd.gamma_consts.eval == eval_gamma
    c = train.comp_loss_params
    assert (c.consts.bce, c.consts.ce, c.consts.prod) == consts
    assert c.scale.clean == clean_scale
    assert train.accum_grad == 4 and train.weight_decay == 1e-5
    assert train.lr in (5e-5, 1e-4)
    assert train.batch_size_train_per_gpu == 50 and train.batch_size == 200
    assert train.per_process_batch_size(4) == 50 and train.global_batch_size(4) == 200
    pgd = cfg.pgd_settings
    assert pgd.norm == "Linf" and pgd.eps == pytest.approx(8 / 255)
    assert pgd.n_target_classes == 9 and pgd.attacks_to_run == ("apgd-ce", "apgd-t")
    ra = cfg.randomized_attack_settings
    assert (ra.eps_factor_loc, ra.eps_factor_scale, ra.iters_df) == (0.4, 0.7, 75.0)
    assert ra.comp_loss_wmax == 0.4 and ra.apgd
    ev = cfg.evaluation_settings
    assert ev.attacks_to_run == STANDARD_AUTOATTACK and ev.autoattack_version == "standard"
    assert ev.norm == "Linf" and ev.eps == pytest.approx(8 / 255) and ev.n_examples == 10000
    assert cfg.model_load_path.std.startswith("Base/") and cfg.model_load_path.comp == (
        f"CompModel/{name}_best.pt")
    assert cfg.model_path("comp") == Path(cfg.log_dir) / "CompModel" / f"{name}_best.pt"


def test_cifar10_epochs_and_lr() -> None:
    cfg = load_config(CONFIG_DIR / "cifar10_edm.yaml")
    assert cfg.training_settings.epochs == 3
    assert isinstance(cfg.training_settings.lr, float) and cfg.training_settings.lr == 5e-5


@pytest.mark.parametrize("name, width", [("rn18_cifar10", 64), ("rn18_cifar10_gpu", 64),
                                         ("rn18w8_cifar10_cpu", 8)])
def test_rn18_configs(name: str, width: int) -> None:
    """Every ResNet-18 config is the paper's setting, and its mixer fits its base models."""
    cfg = load_config(CONFIG_DIR / f"{name}.yaml")
    fwd = cfg.forward_settings
    assert (fwd.std_model_type, fwd.rob_model_type) == ("resnet18", "resnet18")
    assert fwd.pn_version == 3 and fwd.in_planes == (width, width)
    assert (fwd.alpha_bias, fwd.alpha_bias + fwd.alpha_scale) == (0.2, pytest.approx(0.95))
    assert fwd.std_resize is None
    assert cfg.model_load_path.comp is None and cfg.model_path("comp") is None
    composite = build_composite(cfg.forward_settings, cfg.dataset_settings.num_classes).eval()
    with torch.no_grad():
        out = composite(torch.rand(2, 3, 32, 32))
    assert out.log_probs.shape == (2, 10) and torch.isfinite(out.log_probs).all()
    assert ((out.alpha > 0.2 - 1e-6) & (out.alpha < 0.95 + 1e-6)).all()


def test_authors_rn18_file_loads_with_its_values() -> None:
    """The authors' ResNet-18 file (docs/METHOD.md): 'none' eval iterations, string tuples, the
    pre-attacked-data keys, accum_grad -1 and their evaluation gamma constants."""
    cfg = load_config(CONFIG_DIR / "rn18_cifar10_authors.yaml")
    ts, ds = cfg.training_settings, cfg.dataset_settings
    assert ts.eval_freq.iter is None and ts.eval_freq.epoch == 2
    assert (ts.epochs, ts.batch_size_train_per_gpu, ts.accum_grad, ts.lr) == (5, 500, -1, 1e-4)
    gc = cfg.forward_settings.gamma_consts
    assert gc.train == (2.0, 0.4) and gc.eval == (3.0, 20.0)
    c, sc = ts.comp_loss_params.consts, ts.comp_loss_params.scale
    assert (c.bce, c.ce, c.prod, sc.clean, sc.ada, sc.pa) == (1.0, 0.5, 0.1, 2.0, 1.0, 1.0)
    assert ds.pa_path is not None and (ds.gamma_0, ds.blocks) == (7.1, 8)
    assert cfg.randomized_attack_settings.alpha_factor == 5.0
    assert cfg.forward_settings.std_model_type == "resnet18" and cfg.seed == 20220304


def test_eval_freq_iter_none_is_accepted_but_zero_refused(tmp_path: Path) -> None:
    base = load_config(CONFIG_DIR / "rn18_cifar10.yaml")
    assert apply_overrides(base, **{"training_settings.eval_freq.iter": "none"}
                           ).training_settings.eval_freq.iter is None
    with pytest.raises(ConfigError, match=r"eval_freq\.iter"):
        apply_overrides(base, **{"training_settings.eval_freq.iter": 0})


def test_every_shipped_config_loads() -> None:
    files = sorted(CONFIG_DIR.glob("*.yaml"))
    assert len(files) >= 4
    for path in files:
        assert isinstance(load_config(path), Config)


# -- the authors' layout and its quirks ---------------------------------------------------------
def test_authors_layout_loads_unchanged(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, AUTHORS_FILE))
    assert cfg.seed == 20230331 and cfg.log_dir == "/data/models"
    assert cfg.training_settings.lr == 5e-5 and isinstance(cfg.training_settings.lr, float)
    assert cfg.training_settings.weight_decay == 1e-5
    assert cfg.forward_settings.in_planes == (512, 256)
    assert all(isinstance(p, int) for p in cfg.forward_settings.in_planes)
    assert cfg.forward_settings.gamma_consts.train == (2.0, 0.4)
    assert cfg.model_load_path.comp is None and cfg.dataset_settings.pa_path is None
    assert cfg.dataset_settings.gamma_0 is None
    assert cfg.pgd_settings.eps == pytest.approx(8 / 255)
    assert cfg.forward_settings.ema_decay == 0.999 and cfg.forward_settings.parallel == 1
    # new keys take their defaults
    tr = cfg.training_settings
    assert tr.batch_size is None and tr.per_process_batch_size(4) == 50
    assert tr.global_batch_size(4) == 200
    assert (tr.precision, tr.max_nonfinite_steps, tr.n_val_examples, tr.max_steps) == (
        "auto", 10, 500, None)
    ev = cfg.evaluation_settings
    assert ev.seed == 20230331 and ev.data_dir == "../data"
    assert cfg.run.output_dir == "/data/models/Results/CIFAR10_EDM"
    assert (ev.pgd_iters, ev.pgd_step_size, ev.pgd_loss) == (20, 0.0027, "ce")
    assert cfg.run.device == "auto" and ev.precision == "fp32" and not ev.adaptive_attack
    assert ev.adaptive_attack_weight == 0.5


def test_quirks_strings_none_default(tmp_path: Path) -> None:
    raw = _authors_raw()
    _set(raw, "pgd_settings.type", "l_2")
    _set(raw, "pgd_settings.n_target_classes", "9")
    _set(raw, "pgd_settings.attacks_to_run", "APGD-CE, apgd-t")
    _set(raw, "training_settings.epochs", "3")
    _set(raw, "forward_settings.use_policy", "True")
    _set(raw, "forward_settings.gamma", "-inf")
    _set(raw, "forward_settings.in_planes", [512, 256])
    _set(raw, "forward_settings.std_resize", "None")
    _set(raw, "dataset_settings.name", "cifar10")
    _set(raw, "evaluation_settings", {"eps": "8/255", "norm": "l_inf", "precision": "bfloat16",
                                      "attacks_to_run": "['apgd-ce']", "pgd_loss": "default"})
    cfg = load_config(_write(tmp_path, raw))
    assert cfg.pgd_settings.eps == 0.5  # 'default' for l_2
    assert cfg.pgd_settings.n_target_classes == 9 and cfg.training_settings.epochs == 3
    assert cfg.pgd_settings.attacks_to_run == ("apgd-ce", "apgd-t")
    assert cfg.forward_settings.use_policy is True
    assert cfg.forward_settings.gamma == -math.inf
    assert cfg.forward_settings.in_planes == (512, 256) and cfg.forward_settings.std_resize is None
    ev = cfg.evaluation_settings
    assert ev.eps == pytest.approx(8 / 255) and ev.norm == "Linf" and ev.precision == "bf16"
    assert ev.attacks_to_run == ("apgd-ce",) and ev.autoattack_version == "custom"
    assert ev.pgd_loss == "ce"


@pytest.mark.parametrize("short, name", [("rn18", "resnet18"), ("rn50", "bit_m_r50x1"),
                                         ("rn152", "bit_m_r152x2"), ("wrn", "dm_wrn_28_10"),
                                         ("wrn7016", "dm_wrn_70_16"),
                                         ("wrn7016_silu", "dm_wrn_70_16_silu"),
                                         ("dm_wrn", "dm_wrn"), ("bit_s_r50x1", "bit_s_r50x1")])
def test_model_type_names(tmp_path: Path, short: str, name: str) -> None:
    raw = _set(_authors_raw(), "forward_settings.rob_model_type", short)
    assert load_config(_write(tmp_path, raw)).forward_settings.rob_model_type == name


def test_logit_scale_aliases_honoured(tmp_path: Path) -> None:
    raw = _authors_raw()
    fwd = raw["forward_settings"]
    del fwd["std_model_scale"], fwd["rob_model_scale"]
    fwd["std_scale"], fwd["rob_scale"] = "1.5", 0.25
    cfg = load_config(_write(tmp_path, raw))
    assert (cfg.forward_settings.std_model_scale, cfg.forward_settings.rob_model_scale) == (
        1.5, 0.25)


def test_logit_scale_given_twice(tmp_path: Path) -> None:
    raw = _set(_authors_raw(), "forward_settings.std_scale", 2.0)
    path = _write(tmp_path, raw)
    with pytest.raises(ConfigError, match=r"forward_settings\.std_scale = 2\.0.*given twice"):
        load_config(path)


def test_config_is_frozen_hashable_and_serialisable() -> None:
    cfg = load_config(CONFIG_DIR / "cifar10_edm.yaml")
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        cfg.forward_settings.alpha_bias = 0.5  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.forward_settings.std_model_kwargs["width"] = 3  # type: ignore[index]
    assert hash(cfg) == hash(copy.deepcopy(cfg))
    json.dumps(config_to_dict(cfg))  # sections may be pydantic models (not dataclasses)
    again = yaml.safe_load(yaml.safe_dump(config_to_dict(cfg)))
    assert parse_config(again) == cfg


# -- overrides --------------------------------------------------------------------------------
def test_overrides() -> None:
    cfg = load_config(CONFIG_DIR / "rn18_cifar10.yaml")
    new = apply_overrides(cfg, training_settings__lr="2e-4",
                          **{"evaluation_settings.n_examples": 100, "seed": 7,
                             "forward_settings": {"std_model_kwargs": {"width": 16}},
                             "evaluation_settings.device": None})
    assert new.training_settings.lr == 2e-4 and new.evaluation_settings.n_examples == 100
    assert new.seed == 7 and new.evaluation_settings.seed == 7  # derived again
    assert dict(new.forward_settings.std_model_kwargs) == {"width": 16}
    assert new.run.device == cfg.run.device  # None = not given
    assert cfg.training_settings.lr == 1e-4  # the original is unchanged
    assert apply_overrides(cfg) is cfg


def test_override_rederives_defaults_and_replaces_aliases(tmp_path: Path) -> None:
    raw = _authors_raw()
    raw["forward_settings"]["std_scale"] = raw["forward_settings"].pop("std_model_scale")
    cfg = load_config(_write(tmp_path, raw))
    new = apply_overrides(cfg, pgd_settings__type="l_2",
                          forward_settings__std_model_scale=3.0)
    assert new.pgd_settings.eps == 0.5
    assert new.evaluation_settings.norm == "L2" and new.evaluation_settings.eps == 0.5
    assert new.forward_settings.std_model_scale == 3.0


def test_bad_override_names_key_and_value() -> None:
    cfg = load_config(CONFIG_DIR / "cifar10_edm.yaml")
    with pytest.raises(ConfigError) as info:
        apply_overrides(cfg, evaluation_settings__batch_size=0)
    msg = str(info.value)
    assert "cifar10_edm.yaml" in msg and "evaluation_settings.batch_size = 0" in msg
    with pytest.raises(ConfigError, match="training_settings.lrr"):
        apply_overrides(cfg, training_settings__lrr=1.0)


def test_per_process_batch_size_must_divide() -> None:
    cfg = load_config(CONFIG_DIR / "cifar10_edm.yaml")
    with pytest.raises(ConfigError, match="training_settings.batch_size = 200"):
        cfg.training_settings.per_process_batch_size(3)


# -- bad configs: one error naming the file, the key path and the value -------------------------
BAD = [
    # (key path to set, value, key path in the message, value text in the message)
    ("forward_settings.alpha_bias", 0.97, "forward_settings.alpha_bias", "0.97"),  # + 0.04 > 1
    ("forward_settings.alpha_bias", -0.1, "forward_settings.alpha_bias", "-0.1"),
    ("forward_settings.alpha_scale", "1.5", "forward_settings.alpha_scale", "1.5"),
    ("pgd_settings.eps", -0.03, "pgd_settings.eps", "-0.03"),
    ("evaluation_settings.eps", "0", "evaluation_settings.eps", "'0'"),
    ("training_settings.batch_size_train_per_gpu", 0, "training_settings.batch_size_train_per_gpu",
     "0"),
    ("training_settings.batch_size", -200, "training_settings.batch_size", "-200"),
    ("evaluation_settings.batch_size", 0, "evaluation_settings.batch_size", "0"),
    ("training_settings.lr", "-5e-5", "training_settings.lr", "-5e-5"),
    ("training_settings.lr", "five", "training_settings.lr", "five"),
    ("forward_settings.std_model_type", "rn999", "forward_settings.std_model_type", "rn999"),
    ("dataset_settings.name", "MNIST", "dataset_settings.name", "MNIST"),
    ("dataset_settings.format", "hdf5", "dataset_settings.format", "hdf5"),
    ("forward_settings.in_planes", "(512, 256", "forward_settings.in_planes", "(512, 256"),
    ("forward_settings.in_planes", "(512, 256, 3)", "forward_settings.in_planes", "256, 3"),
    ("training_settings.gamma_consts.eval", "(2., )", "training_settings.gamma_consts.eval",
     "(2., )"),
    ("training_settings.gamma_consts.train", "(-2., 0.4)", "training_settings.gamma_consts.train",
     "(-2., 0.4)"),
    ("training_settings.precision", "fp8", "training_settings.precision", "fp8"),
    ("evaluation_settings.precision", "auto", "evaluation_settings.precision", "auto"),
    ("evaluation_settings.device", "tpu", "evaluation_settings.device", "tpu"),
    ("evaluation_settings.norm", "L1", "evaluation_settings.norm", "L1"),
    ("evaluation_settings.pgd_loss", "hinge", "evaluation_settings.pgd_loss", "hinge"),
    ("pgd_settings.attacks_to_run", ["apgd-ce", "pgd-100"], "pgd_settings.attacks_to_run",
     "pgd-100"),
    ("pgd_settings.type", "l_1", "pgd_settings.type", "l_1"),
    ("forward_settings.pn_version", 5, "forward_settings.pn_version", "5"),
    ("forward_settings.std_model_scale", -1.2, "forward_settings.std_model_scale", "-1.2"),
    ("forward_settings.rob_model_scale", 0, "forward_settings.rob_model_scale", "0"),
    ("forward_settings.gamma", "nan", "forward_settings.gamma", "nan"),
    ("forward_settings.alpha_biass", 0.5, "forward_settings.alpha_biass", "0.5"),
    ("foo_settings", {"a": 1}, "foo_settings", "'a': 1"),
    ("training_settings.epochs", "three", "training_settings.epochs", "three"),
    ("training_settings.epochs", 2.5, "training_settings.epochs", "2.5"),
    ("forward_settings.use_policy", "maybe", "forward_settings.use_policy", "maybe"),
    ("model_load_path.std", 5, "model_load_path.std", "5"),
    ("training_settings.accum_grad", 0, "training_settings.accum_grad", "0"),
    ("training_settings.comp_loss_params.consts.bce", -1.0,
     "training_settings.comp_loss_params.consts.bce", "-1.0"),
    ("pgd_settings.n_target_classes", 10, "pgd_settings.n_target_classes", "10"),
    ("forward_settings.std_resize", 0, "forward_settings.std_resize", "0"),
    ("forward_settings.std_model_type", "rn18", "forward_settings.std_resize", "128"),
    ("randomized_attack_settings.comp_loss_wmax", 1.5,
     "randomized_attack_settings.comp_loss_wmax", "1.5"),
    ("forward_settings.std_model_kwargs", [16], "forward_settings.std_model_kwargs", "[16]"),
    ("dataset_settings", "CIFAR-10", "dataset_settings", "CIFAR-10"),
]


@pytest.mark.parametrize("key, value, key_in_msg, value_in_msg", BAD,
                         ids=[f"{k}={v!r}" for k, v, *_ in BAD])
def test_bad_config(tmp_path: Path, key: str, value: Any, key_in_msg: str,
                    value_in_msg: str) -> None:
    raw = _set(_authors_raw(), key, value)
    if key == "forward_settings.std_model_type":
        raw["forward_settings"]["std_resize"] = 128  # BiT-only option on a ResNet
    path = _write(tmp_path, raw, "bad_config.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert str(path) in msg and "bad_config.yaml" in msg
    assert f"{key_in_msg} = " in msg, msg
    assert value_in_msg in msg.split(f"{key_in_msg} = ", 1)[1], msg
    assert "expected" in msg
    assert msg.count("\n") == 0  # one error, one line


def test_config_error_is_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_unknown_key_suggests(tmp_path: Path) -> None:
    raw = _set(_authors_raw(), "forward_settings.alpha_biass", 0.5)
    with pytest.raises(ConfigError, match="did you mean 'alpha_bias'"):
        load_config(_write(tmp_path, raw))


def test_missing_required_key(tmp_path: Path) -> None:
    raw = _authors_raw()
    del raw["forward_settings"]["rob_model_type"]
    path = _write(tmp_path, raw, "missing.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert "missing.yaml" in msg and "forward_settings.rob_model_type" in msg
    assert "missing required key" in msg


def test_missing_required_section(tmp_path: Path) -> None:
    raw = _authors_raw()
    del raw["model_load_path"]
    path = _write(tmp_path, raw, "nosection.yaml")
    with pytest.raises(ConfigError, match=r"nosection\.yaml: model_load_path: missing required"):
        load_config(path)


def test_file_not_found(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"nope\.yaml: file not found"):
        load_config(path)


def test_yaml_syntax_error(tmp_path: Path) -> None:
    path = _write(tmp_path, "seed: 1\nforward_settings:\n  alpha_bias: [0.5\n", "syntax.yaml")
    with pytest.raises(ConfigError, match=r"syntax\.yaml: YAML syntax error at line \d+"):
        load_config(path)


def test_duplicate_key(tmp_path: Path) -> None:
    path = _write(tmp_path, AUTHORS_FILE + "seed: 2\n", "dup.yaml")
    with pytest.raises(ConfigError, match=r"dup\.yaml: YAML syntax error.*duplicate key 'seed'"):
        load_config(path)


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "just a string\n", ""])
def test_top_level_not_a_mapping(tmp_path: Path, text: str) -> None:
    path = _write(tmp_path, text, "top.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert "top.yaml" in msg and "mapping" in msg
    if text:
        assert "<top level> = " in msg


# -- building the model -----------------------------------------------------------------------
def _tiny_config(tmp_path: Path, **forward: Any) -> Config:
    cfg = load_config(CONFIG_DIR / "rn18_cifar10.yaml")
    return apply_overrides(cfg, log_dir=str(tmp_path), forward_settings={
        "std_model_kwargs": {"width": 8}, "rob_model_kwargs": {"width": 8}, "in_planes": "None",
        **forward})


def test_build_composite_tiny(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from adaptive_smoothing.factory import build_composite

    cfg = _tiny_config(tmp_path, std_scale=1.5, policy_graph=False)
    model = build_composite(cfg.forward_settings, cfg.dataset_settings.num_classes, "cpu")
    assert model.mixer is not None and model.mixer.version == 3
    assert model.mixer.in_planes == (8, 8)
    assert (model.std_scale, model.rob_scale) == (1.5, 1.0)
    assert (model.alpha_bias, model.alpha_scale) == (0.2, 0.75)
    assert model.train_gamma == (2.0, 0.4) and model.eval_gamma == (2.0, 1.3)
    assert model.unsafe_detach_mixer_inputs
    assert "NOT VALID" in caplog.text
    out = model(torch.rand(2, 3, 32, 32))
    assert out.log_probs.shape == (2, 10)
    assert ((out.alpha > 0.2) & (out.alpha < 0.95)).all()


def test_build_composite_in_planes_mismatch(tmp_path: Path) -> None:
    from adaptive_smoothing.factory import build_composite

    cfg = _tiny_config(tmp_path, in_planes="(64, 64)")
    with pytest.raises(ConfigError, match=r"forward_settings\.in_planes = \(64, 64\)"):
        build_composite(cfg.forward_settings, cfg.dataset_settings.num_classes)


def test_build_composite_bad_model_kwargs(tmp_path: Path) -> None:
    from adaptive_smoothing.factory import build_composite

    cfg = _tiny_config(tmp_path, rob_model_kwargs={"widht": 8})
    with pytest.raises(ConfigError, match=r"forward_settings\.rob_model_kwargs = \{'widht': 8\}"):
        build_composite(cfg.forward_settings, cfg.dataset_settings.num_classes)


def test_load_composite_weights(tmp_path: Path) -> None:
    from adaptive_smoothing.factory import build_composite, load_composite_weights
    from adaptive_smoothing.prepare import resolve_checkpoints

    cfg = apply_overrides(_tiny_config(tmp_path), model_load_path={
        "std": "Base/std.tar", "rob": "Base/rob.pt", "comp": "CompModel/mixer.pt"})
    source = build_composite(cfg.forward_settings, cfg.dataset_settings.num_classes)
    with torch.no_grad():
        source.gamma_bn.running_var.fill_(4.0)
    (tmp_path / "Base").mkdir()
    (tmp_path / "CompModel").mkdir()
    # The STD file under the other accepted suffix (.pt instead of .tar).
    torch.save({"model": source.std_model.state_dict()}, tmp_path / "Base" / "std.pt")
    torch.save(source.rob_model.state_dict(), tmp_path / "Base" / "rob.pt")
    torch.save({"model": source.mixer.state_dict(), "bn": source.gamma_bn.state_dict()},
               tmp_path / "CompModel" / "mixer.pt")
    torch.manual_seed(1)
    target = build_composite(cfg.forward_settings, cfg.dataset_settings.num_classes)
    load_composite_weights(target, resolve_checkpoints(cfg))
    for key, value in source.state_dict().items():
        assert torch.equal(value, target.state_dict()[key]), key


def test_every_key_is_documented() -> None:
    from adaptive_smoothing.config import FILLED, MOVED

    doc = (Path(__file__).resolve().parents[1] / "docs" / "CONFIG.md").read_text()
    yaml_name = {schema.rsplit(".", 1)[1]: name.rsplit(".", 1)[1]
                 for name, schema in MOVED.items()}
    filled = {path.rsplit(".", 1)[1] for path in FILLED}  # written in pgd_settings

    def check(cls: type) -> None:
        assert f"`{cls.__name__}`" in doc, cls.__name__
        for name, field in cls.model_fields.items():
            if cls.__name__ == "RandomizedAttackSettings" and name in filled:
                continue
            key = yaml_name.get(name, name)
            assert f"| `{key}` |" in doc, f"{cls.__name__}.{name} missing in CONFIG.md"
            if isinstance(field.annotation, type) and issubclass(field.annotation,
                                                                 pydantic.BaseModel):
                check(field.annotation)

    check(Config)


def test_config_doc_is_not_stale() -> None:
    """docs/CONFIG.md is generated from the schema; a changed key, default or description
    without running scripts/gen_config_docs.py fails here."""
    from adaptive_smoothing.cli.gen_config_docs import OUTPUT, render

    assert OUTPUT.read_text() == render(), (
        "docs/CONFIG.md is stale: run python3 scripts/gen_config_docs.py")


@pytest.mark.parametrize("overrides, key, hint", [
    ({"pgd_settings.eps": 8}, "pgd_settings.eps", "did you mean 8/255"),
    ({"evaluation_settings.eps": 16}, "evaluation_settings.eps", "did you mean 16/255"),
    ({"pgd_settings.type": "l_2", "pgd_settings.eps": 12}, "pgd_settings.eps", "above 8"),
])
def test_implausible_eps_is_refused_instead_of_reporting_zero_robustness(overrides, key, hint):
    from adaptive_smoothing.config import apply_overrides, load_config
    from conftest import REPO_ROOT

    config = load_config(REPO_ROOT / "configs" / "demo.yaml")
    with pytest.raises(ConfigError, match=rf"{key} = .*{hint}"):
        apply_overrides(config, **overrides)
    ok = apply_overrides(config, **dict(overrides, **{
        key: 0.5 if overrides.get("pgd_settings.type") == "l_2" else "8/255"}))
    assert ok.evaluation_settings.eps <= 0.5


# -- the authors' layout at the boundary ----------------------------------------------------------
@pytest.mark.slow  # builds the authors' published-size composite twice
def test_unused_authors_keys_are_logged_once_each_and_given_no_meaning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    with caplog.at_level(logging.INFO, logger="adaptive_smoothing.config"):
        cfg = load_config(_write(tmp_path, AUTHORS_FILE))
    lines = [r.getMessage() for r in caplog.records if "accepted but not used" in r.getMessage()]
    assert sorted(line.split(" ")[0] for line in lines) == [
        "forward_settings.ema_decay", "forward_settings.parallel",
        "training_settings.save_eval_imgs", "training_settings.use_fast_loader"]
    # Changing them changes nothing that is built or trained from the config.
    other = apply_overrides(cfg, **{"forward_settings.parallel": 4,
                                    "training_settings.use_fast_loader": True})
    torch.manual_seed(0)
    a = build_composite(cfg.forward_settings, 10).state_dict()
    torch.manual_seed(0)
    b = build_composite(other.forward_settings, 10).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_randomize_false_is_refused_in_files_and_overrides(tmp_path: Path) -> None:
    raw = _set(_authors_raw(), "randomized_attack_settings.randomize", False)
    with pytest.raises(ConfigError, match=r"randomized_attack_settings\.randomize = False: "
                                          r"expected true"):
        load_config(_write(tmp_path, raw))
    cfg = load_config(_write(tmp_path, AUTHORS_FILE))
    assert apply_overrides(cfg, **{"randomized_attack_settings.randomize": "true"}) == cfg
    with pytest.raises(ConfigError, match="expected true"):
        apply_overrides(cfg, **{"randomized_attack_settings.randomize": 0})


def test_training_threat_model_is_written_once_in_pgd_settings(tmp_path: Path) -> None:
    cfg = apply_overrides(load_config(_write(tmp_path, AUTHORS_FILE)),
                          **{"pgd_settings.type": "L2", "pgd_settings.n_target_classes": 3})
    ras = cfg.randomized_attack_settings
    assert (ras.norm, ras.eps, ras.n_target) == ("L2", 0.5, 3)
    with pytest.raises(ConfigError,
                       match=r"randomized_attack_settings\.eps = 0\.1: .*pgd_settings"):
        apply_overrides(cfg, **{"randomized_attack_settings.eps": 0.1})
    assert "eps" not in config_to_dict(cfg)["randomized_attack_settings"]


@pytest.mark.parametrize("spelling, norm", [("l_inf", "Linf"), ("linf", "Linf"), ("Linf", "Linf"),
                                            ("L2", "L2"), ("l_2", "L2"), ("l2", "L2")])
def test_norm_spellings_become_the_canonical_name_at_load(tmp_path: Path, spelling: str,
                                                          norm: str) -> None:
    cfg = load_config(_write(tmp_path, _set(_authors_raw(), "pgd_settings.type", spelling)))
    assert cfg.pgd_settings.norm == cfg.evaluation_settings.norm == norm
    assert cfg.randomized_attack_settings.norm == norm


def test_evaluated_gamma_comes_from_the_model_section(tmp_path: Path) -> None:
    """The file writes the evaluation gamma in training_settings; the composite gets it from
    the model section alone."""
    cfg = load_config(CONFIG_DIR / "rn18_cifar10_authors.yaml")
    composite = build_composite(cfg.forward_settings, cfg.dataset_settings.num_classes)
    assert composite.eval_gamma == (3.0, 20.0) and composite.train_gamma == (2.0, 0.4)
    assert config_to_dict(cfg)["training_settings"]["gamma_consts"]["eval"] == [3.0, 20.0]


def test_overrides_compose_and_rederive_only_what_was_not_given(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, AUTHORS_FILE))
    step = apply_overrides(cfg, seed=7, **{"evaluation_settings.pgd_iters": 5})
    new = apply_overrides(step, **{"pgd_settings.type": "l_2", "log_path": "other"})
    assert new.seed == 7 and new.evaluation_settings.seed == 7  # the first override is kept
    assert new.evaluation_settings.eps == 0.5 and new.pgd_settings.eps == 0.5  # derived again
    assert new.evaluation_settings.pgd_iters == 5  # given, so not derived again
    assert new.run.output_dir == "/data/models/other"
    pinned = apply_overrides(cfg, **{"evaluation_settings.seed": 3})
    assert apply_overrides(pinned, seed=9).evaluation_settings.seed == 3


def test_the_authors_comp_simple_is_read_once_as_comp() -> None:
    """One meaning for validation and evaluation: CE + w * BCE(gamma, 1) with the evaluation's
    adaptive_attack_weight (the authors' word decoded at the boundary, not by each reader)."""
    from adaptive_smoothing.config import apply_overrides, load_config
    from conftest import REPO_ROOT

    config = apply_overrides(load_config(REPO_ROOT / "configs/rn18_cifar10_authors.yaml"),
                             **{"pgd_settings.pgd_eval_loss": "comp_simple"})
    assert config.pgd_settings.pgd_eval_loss == "comp"
    assert config.evaluation_settings.pgd_loss == "comp"
