"""Declared provenance (config/provenance.py): every schema key says what it affects, and one
comparison decides training's resume and evaluation's reuse of finished batches."""

import pytest
from pydantic import BaseModel, ConfigDict

from adaptive_smoothing.config import MOVED, Config, provenance
from adaptive_smoothing.config.schema import Section, key


def test_every_schema_field_declares_what_it_affects():
    paths = [path for path, _, _ in provenance.declared(Config)]  # raises where undeclared
    assert "training_settings.lr" in paths and "evaluation_settings.n_examples" in paths


def test_a_field_added_without_a_declaration_fails():
    class Settings(Section):
        declared: int = key(1, "a documented key", affects=provenance.WEIGHTS)
        added: int = key(2, "a key someone forgot to declare")

    class Root(BaseModel):
        model_config = ConfigDict(frozen=True)
        section: Settings = Settings()

    with pytest.raises(provenance.ProvenanceError, match="section.added does not declare"):
        list(provenance.declared(Root))


def _config(**overrides):
    from adaptive_smoothing.config import apply_overrides, parse_config

    raw = {"model_load_path": {"std": "std.pt", "rob": "rob.pt"},
           "forward_settings": {"std_model_type": "resnet18", "rob_model_type": "resnet18",
                                "std_model_kwargs": {"width": 4}},
           "dataset_settings": {"name": "CIFAR-10"}}
    return apply_overrides(parse_config(raw), **overrides)


def test_identities_hold_what_their_keys_declare():
    config = _config()
    weights = provenance.identity(config, "weights", {"std": "s" * 64})
    results = provenance.identity(config, "results")
    assert weights["training_settings.lr"] == 5e-5 and "training_settings.lr" not in results
    assert results["evaluation_settings.n_examples"] == 10000
    assert "evaluation_settings.n_examples" not in weights
    # Both, flattened to the leaves of a mapping value.
    assert weights["forward_settings.std_model_kwargs.width"] == 4
    assert results["forward_settings.std_model_kwargs.width"] == 4
    # Paths and speed settings are neither (files are compared by content).
    for path in ("model_load_path.std", "run.device", "evaluation_settings.data_dir",
                 "training_settings.precision", "forward_settings.robustbench_model_dir"):
        assert path not in weights and path not in results
    assert weights["fingerprints.std"] == "s" * 64
    # A switched-off section counts with its switch only.
    assert results["nonlinear_settings.enabled"] is False
    assert not any(k.startswith("nonlinear_settings.s") for k in results)
    on = provenance.identity(_config(**{"nonlinear_settings.enabled": True}), "results")
    assert on["nonlinear_settings.s"] == 1.0


def test_a_new_field_at_its_default_is_no_change_and_away_from_it_is():
    current = provenance.identity(_config(**{"training_settings.lr": "1e-3"}), "weights")
    recorded = {k: v for k, v in current.items() if k != "training_settings.max_steps"}
    assert provenance.differences(recorded, current, Config) == {}  # max_steps at its default
    moved = provenance.identity(_config(**{"training_settings.max_steps": 7}), "weights")
    recorded = {k: v for k, v in moved.items() if k != "training_settings.max_steps"}
    recorded["training_settings.lr"] = moved["training_settings.lr"]
    assert provenance.differences(recorded, moved, Config) == {
        "training_settings.max_steps": (None, 7)}
    # A key that no longer counts is ignored; a changed one is reported.
    recorded = dict(current, **{"run.device": "cuda", "training_settings.lr": 0.1})
    assert provenance.differences(recorded, current, Config) == {
        "training_settings.lr": (0.1, 1e-3)}


def test_records_of_earlier_versions_read_in_the_schema_layout():
    training = {"training_settings.gamma_consts.train": [2.0, 0.4],
                "model_load_path.std": "a" * 64, "dataset_settings.train_data": "path data"}
    assert provenance.migrate(training, MOVED) == {
        "forward_settings.gamma_consts.train": [2.0, 0.4], "fingerprints.std": "a" * 64,
        "fingerprints.train_data": "path data"}
    manifest = {"settings": {"n_examples": 5}, "model": {"fingerprints": {"data": "d"},
                                                        "variant": "alpha_0.5"}}
    assert provenance.migrate(manifest, MOVED) == {
        "evaluation_settings.n_examples": 5, "fingerprints.data": "d", "variant": "alpha_0.5"}


def test_describe_names_fingerprints_by_what_they_stand_for():
    assert provenance.describe("fingerprints.rob", "a" * 64, "b" * 64) == (
        "the ROB checkpoint's content changed (sha256 aaaaaaaaaaaa -> bbbbbbbbbbbb)")
    assert provenance.describe("training_settings.lr", 0.1, 0.2) == "training_settings.lr: 0.1 -> 0.2"
