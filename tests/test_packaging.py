"""pyproject.toml's console commands and the files beside them (run.py, run_robustbench.py,
scripts/*.py) are one and the same click command each; the developer tools' scripts call
adaptive_smoothing/tools/cli instead and are no console commands."""
from __future__ import annotations

import importlib
import importlib.util
import tomllib
from pathlib import Path

import click
import pytest

REPO = Path(__file__).resolve().parents[1]
ENTRY_POINTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
# The developer tools' commands: run through scripts/, not installed as console commands.
TOOLS = {path.stem for path in (REPO / "adaptive_smoothing" / "tools" / "cli").glob("*.py")
         if path.stem != "__init__"}


def _load_file(path: Path) -> object:
    spec = importlib.util.spec_from_file_location(f"cli_file_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_each_console_command_is_a_click_command_of_the_cli_package(name: str) -> None:
    module_name, _, function = ENTRY_POINTS[name].partition(":")
    assert module_name.startswith("adaptive_smoothing.cli.")
    assert isinstance(getattr(importlib.import_module(module_name), function), click.Command)


def test_run_files_and_scripts_call_the_console_commands_functions() -> None:
    targets = {value.partition(":")[0].rsplit(".", 1)[1]: value for value in ENTRY_POINTS.values()}
    files = {"run": REPO / "run.py", "robustbench_eval": REPO / "run_robustbench.py",
             **{path.stem: path for path in (REPO / "scripts").glob("*.py")
                if path.stem not in TOOLS}}
    assert set(files) == set(targets), "a CLI file without a console command, or the reverse"
    for stem, path in files.items():
        module_name, _, function = targets[stem].partition(":")
        expected = getattr(importlib.import_module(module_name), function)
        assert _load_file(path).main is expected, path


def test_developer_tools_are_scripts_and_no_console_commands() -> None:
    assert TOOLS == {"benchmark", "benchmark_busy", "gpu_check", "gpu_readiness"}
    assert not [value for value in ENTRY_POINTS.values() if ".tools." in value]
    for stem in TOOLS:
        expected = importlib.import_module(f"adaptive_smoothing.tools.cli.{stem}").main
        assert isinstance(expected, click.Command)
        assert _load_file(REPO / "scripts" / f"{stem}.py").main is expected, stem


@pytest.mark.parametrize("command", ["run", "benchmark", "gpu_check"])
def test_every_set_flag_refuses_an_item_without_a_value_in_the_same_words(
        command: str, tmp_path: Path) -> None:
    from click.testing import CliRunner

    package = "adaptive_smoothing.tools.cli" if command in TOOLS else "adaptive_smoothing.cli"
    module = importlib.import_module(f"{package}.{command}")
    args = {"run": ["--eval", "--config", "configs/demo.yaml"],
            "benchmark": ["--config", "configs/demo.yaml"],
            "gpu_check": ["speed", "--out", str(tmp_path)]}[command]
    result = CliRunner().invoke(module.main, args + ["--set", "training_settings.lr"])
    assert result.exit_code == 1, result.output
    assert "--set 'training_settings.lr': expected KEY=VALUE" in result.output
