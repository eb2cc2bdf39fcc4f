"""Pre-attacked data blocks (scripts/pre_attack.py): format, eps ball, gammas, labels, errors."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from adaptive_smoothing.models import CompositeModel, MixingNet, create_model
from adaptive_smoothing.models.composite import fixed_alpha_composite
from adaptive_smoothing.pre_attack import (PreAttackedError, block_labels, generate_blocks,
                                           load_blocks, save_blocks)


def _composite() -> CompositeModel:
    torch.manual_seed(0)
    std, rob = create_model("resnet18", 10, width=2), create_model("resnet18", 10, width=2)
    for model in (std, rob):
        with torch.no_grad():
            model.linear.weight.mul_(20)  # confident, so that the attack has a gradient
    return CompositeModel(std, rob, MixingNet((2, 2), version=3)).eval()


def test_blocks_round_trip_weights_only_inside_the_ball_and_attack_their_mixture(
        tmp_path: Path) -> None:
    model = _composite()
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8).float() / 255
    y = torch.randint(0, 10, (5,))
    eps = 8 / 255
    gammas = (-math.inf, 0.0, math.inf)
    blocks = generate_blocks(model, x, y, torch.arange(10, 15), gammas=gammas, eps=eps,
                             iterations=3, batch_size=4)
    path = save_blocks(blocks, tmp_path / "pa.pt")
    loaded = load_blocks(path)  # weights_only inside
    assert loaded["x"].shape == (3, 5, 3, 32, 32) and loaded["x"].dtype == torch.uint8
    assert loaded["gamma"].tolist() == [-math.inf, 0.0, math.inf]
    assert loaded["index"].tolist() == [10, 11, 12, 13, 14] and torch.equal(loaded["y"], y)
    adv = loaded["x"].float() / 255
    assert (adv - x).abs().max() <= eps + 1e-6  # uint8 rounding stays inside the ball
    assert (adv - x).abs().amax(dim=(1, 2, 3, 4)).min() > 0  # every block moved its images
    # Each block raises the CE of the mixture it attacked (vs the clean images).
    for k, gamma in enumerate(gammas):
        alpha = 0.0 if gamma == -math.inf else 1.0 if gamma == math.inf else 0.5
        fixed = fixed_alpha_composite(model, alpha)
        with torch.no_grad():
            ce_clean = torch.nn.functional.cross_entropy(fixed(x).log_probs, y)
            ce_adv = torch.nn.functional.cross_entropy(fixed(adv[k]).log_probs, y)
        assert ce_adv > ce_clean, k


def test_block_labels_follow_gamma_0() -> None:
    gamma = torch.tensor([-math.inf, -2.0, 7.0, 7.1, 8.0, math.inf], dtype=torch.float64)
    assert block_labels(gamma, 7.1).tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


def test_bad_files_are_refused_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(PreAttackedError, match="missing.pt: pre-attacked data file not found"):
        load_blocks(tmp_path / "missing.pt")
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(PreAttackedError, match="other.pt: not a pre-attacked data file"):
        load_blocks(tmp_path / "other.pt")


def test_a_stopped_generation_resumes_from_its_finished_blocks_and_refuses_other_settings(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import adaptive_smoothing.pre_attack as pre_attack

    model = _composite()
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8).float() / 255
    y = torch.randint(0, 10, (4,))
    args = dict(gammas=(-math.inf, 0.0, math.inf), eps=8 / 255, iterations=2, batch_size=4)
    whole = generate_blocks(model, x, y, torch.arange(4), **args)

    # Stop (as Ctrl-C would) while the third block is being attacked.
    real_pgd, calls = pre_attack.pgd, []

    def pgd_stopping_at_block_3(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_pgd(*a, **k)

    monkeypatch.setattr(pre_attack, "pgd", pgd_stopping_at_block_3)
    progress = tmp_path / "pa.pt.blocks"
    with pytest.raises(KeyboardInterrupt):
        generate_blocks(model, x, y, torch.arange(4), progress_dir=progress, **args)
    assert sorted(p.name for p in progress.iterdir()) == ["00000.pt", "00001.pt"]

    monkeypatch.setattr(pre_attack, "pgd", lambda *a, **k: calls.append(1) or real_pgd(*a, **k))
    calls.clear()
    resumed = generate_blocks(model, x, y, torch.arange(4), progress_dir=progress, **args)
    assert len(calls) == 1  # only the unfinished block was attacked again
    assert torch.equal(resumed["x"], whole["x"])  # the same file as an uninterrupted run

    with pytest.raises(PreAttackedError, match="00000.pt: a finished block made with another "
                                                "iterations"):
        generate_blocks(model, x, y, torch.arange(4), progress_dir=progress,
                        **dict(args, iterations=3))


def test_finished_blocks_of_other_base_models_are_refused(tmp_path: Path) -> None:
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8).float() / 255
    y = torch.randint(0, 10, (2,))
    args = dict(gammas=(-math.inf,), eps=8 / 255, iterations=1, batch_size=2,
                progress_dir=tmp_path / "pa.pt.blocks")
    generate_blocks(_composite(), x, y, torch.arange(2), **args)
    other = _composite()  # e.g. a rerun with another config's ROB into the same output
    with torch.no_grad():
        other.rob_model.linear.bias.add_(1.0)
    with pytest.raises(PreAttackedError, match="00000.pt: a finished block made with another "
                                                "base_models"):
        generate_blocks(other, x, y, torch.arange(2), **args)


def _cli_config(tmp_path: Path, data: str, data_format: str) -> Path:
    from synthetic import make_tiny_training_root

    root = make_tiny_training_root(tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text("\n".join([
        f"log_dir: '{root}'",
        "model_load_path: {std: 'Base/std.pt', rob: 'Base/rob.pt', comp: 'None'}",
        "forward_settings: {std_model_type: resnet18, std_model_kwargs: {width: 2}, "
        "rob_model_type: resnet18, rob_model_kwargs: {width: 2}, pn_version: 3}",
        f"dataset_settings: {{name: CIFAR-10, format: {data_format}, path: '{data}'}}",
        "evaluation_settings: {device: cpu}"]) + "\n")
    return config


def test_the_cli_reads_the_data_dir_flag_and_removes_its_finished_blocks(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from adaptive_smoothing.cli import pre_attack as cli

    config = _cli_config(tmp_path, "nowhere", "torchvision")  # --data-dir replaces both
    output = tmp_path / "pa.pt"
    result = CliRunner().invoke(cli.main, ["--config", str(config), "--output", str(output),
                                           "--data-dir", str(tmp_path / "data"),
                                           "--gammas=-inf,inf", "--n-images", "2",
                                           "--iterations", "1", "--threads", "1"])
    assert result.exit_code == 0, result.output
    blocks = load_blocks(output)
    assert blocks["x"].shape == (2, 2, 3, 32, 32) and blocks["index"].tolist() == [0, 1]
    assert not (tmp_path / "pa.pt.blocks").exists()


def test_the_cli_refuses_finished_blocks_of_other_settings_in_one_line(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from adaptive_smoothing.cli import pre_attack as cli

    config = _cli_config(tmp_path, str(tmp_path / "data"), "npz")
    output = tmp_path / "pa.pt"
    (tmp_path / "pa.pt.blocks").mkdir()
    torch.save({"gamma": 5.0}, tmp_path / "pa.pt.blocks" / "00000.pt")  # another run's block
    result = CliRunner().invoke(cli.main, ["--config", str(config), "--output", str(output),
                                           "--gammas=-inf,inf", "--n-images", "2",
                                           "--iterations", "1", "--threads", "1"])
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1, result.exception
    assert "Error: " in result.output and "00000.pt: a finished block made with another gamma" \
        in result.output
    assert not output.exists()
