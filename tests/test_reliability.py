"""Issue 25's faults and bad inputs: each gives a correct result or a one-line refusal.

A full disk (a writer made to fail with ENOSPC), a killed run's temporary files, the same bad
checkpoint files through run.py and run_robustbench.py, --threads above the cores, a resumed
evaluation, paths from another working directory, shape hints, duplicated log lines, and
swapped base models. The image checks of data.py are in tests/test_data.py.
"""
from __future__ import annotations

import builtins
import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

import run
import run_robustbench
from adaptive_smoothing import persist
from adaptive_smoothing.checkpoints import save_checkpoint
from adaptive_smoothing.models import CompositeModel, MixingNet, create_model
from adaptive_smoothing.persist import DiskFullError, write_text_atomic
from adaptive_smoothing.rundir import RunLock
from conftest import REPO_ROOT


def _one_line_error(result) -> str:
    """The CLI failed with one 'Error:' line, not a traceback; returns that line."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


class _FullDiskFile:
    """A file whose writes fail as on a full disk."""

    def __init__(self, handle) -> None:
        self._handle = handle

    def write(self, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._handle.name)

    def __getattr__(self, name: str):
        return getattr(self._handle, name)

    def __enter__(self) -> "_FullDiskFile":
        return self

    def __exit__(self, *exc) -> None:
        self._handle.close()


def _fill_disk_for(monkeypatch, name_part: str) -> None:
    """persist.write_atomic's writes of files whose name contains ``name_part`` hit a full disk."""
    def fake_open(file, mode="r", *args, **kwargs):
        handle = builtins.open(file, mode, *args, **kwargs)
        return _FullDiskFile(handle) if name_part in Path(file).name else handle

    monkeypatch.setattr(persist, "open", fake_open, raising=False)


def _demo_eval_args(out: Path) -> list[str]:
    return ["--eval", "--config", str(REPO_ROOT / "configs" / "demo.yaml"), "--device", "cpu",
            "--set", f"log_dir={REPO_ROOT / 'demo'}", "--data-dir", str(REPO_ROOT / "demo"),
            "--n-examples", "8", "--batch-size", "4", "--attacks", "none",
            "--output-dir", str(out)]


# -- item 3: a full disk, the atomic writer, stray temporary files ---------------------------------
def test_full_disk_names_the_folder_and_the_space_needed_and_keeps_the_previous_file(tmp_path,
                                                                                    monkeypatch):
    path = tmp_path / "results.json"
    write_text_atomic(path, '{"n": 1}')
    _fill_disk_for(monkeypatch, "results.json")
    with pytest.raises(DiskFullError) as err:
        write_text_atomic(path, '{"n": 2, "more": "' + "x" * 1000 + '"}')
    message = str(err.value)
    assert message.startswith(f"No space left on device in {tmp_path} while writing results.json")
    assert "needs 1.0 kB" in message and "free" in message and "\n" not in message
    assert err.value.errno == errno.ENOSPC
    assert json.loads(path.read_text()) == {"n": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_full_disk_during_checkpoint_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1}, path)
    _fill_disk_for(monkeypatch, "last.pt")
    with pytest.raises(DiskFullError, match="No space left on device in .* while writing last.pt"):
        save_checkpoint({"step": 2, "w": torch.zeros(1000)}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_full_disk_during_evaluation_is_one_line_and_results_md_stays_whole(tmp_path,
                                                                            monkeypatch):
    out = tmp_path / "eval"
    first = CliRunner().invoke(run.main, _demo_eval_args(out))
    assert first.exit_code == 0, first.output
    table = (out / "results.md").read_text()
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert table.startswith("| metric |")

    _fill_disk_for(monkeypatch, "results.md")  # results.md was written without the atomic writer
    second = CliRunner().invoke(run.main, _demo_eval_args(out))
    message = _one_line_error(second)
    assert f"No space left on device in {out}" in message and "results.md" in message
    assert "needs" in message
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # every earlier file intact, results.md included, no temporary


def test_full_disk_during_base_training_is_one_line(tmp_path, monkeypatch):
    from adaptive_smoothing.cli import train_base
    from synthetic import write_npz

    data = tmp_path / "data"
    data.mkdir()
    write_npz(data / "train.npz", 16, 0)
    _fill_disk_for(monkeypatch, "std.pt")
    result = CliRunner().invoke(train_base.main, [
        "--output", str(tmp_path / "out" / "std.pt"), "--arch-kwargs", '{"width": 2}',
        "--epochs", "1", "--batch-size", "8", "--data-format", "npz", "--data-dir", str(data),
        "--device", "cpu", "--threads", "1"])
    message = _one_line_error(result)
    assert f"No space left on device in {tmp_path / 'out'} while writing std.pt" in message
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.e2e
def test_full_disk_during_mixer_training_is_one_line_and_leaves_no_partial_checkpoint(
        tmp_path, monkeypatch):
    _fill_disk_for(monkeypatch, "last.pt")
    out = tmp_path / "train"
    result = CliRunner().invoke(run.main, [
        "--training", "--config", str(REPO_ROOT / "configs" / "demo.yaml"), "--device", "cpu",
        "--set", f"log_dir={REPO_ROOT / 'demo'}", "--data-dir", str(REPO_ROOT / "demo"),
        "--output-dir", str(out), "--debug"])
    message = _one_line_error(result)
    assert "No space left on device in" in message and "while writing last.pt" in message
    checkpoints = out / "debug" / "checkpoints"
    assert not any(p.name.endswith(".tmp") or p.name == "last.pt"
                   for p in checkpoints.rglob("*")), list(checkpoints.rglob("*"))


_WRITER = """
import sys, time
from adaptive_smoothing.persist import write_atomic
write_atomic(sys.argv[1], lambda file: (print("writing", flush=True), time.sleep(120)))
"""


def test_killed_runs_temporary_files_are_removed_on_the_next_run(tmp_path):
    out = tmp_path / "eval"
    (out / "batches").mkdir(parents=True)
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(out / "batches" / "00000.json")],
                              stdout=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert writer.stdout.readline().strip() == b"writing"
    os.kill(writer.pid, signal.SIGKILL)  # a killed run: its temporary file stays behind
    writer.wait()
    stray = list((out / "batches").glob(".00000.json.*.tmp"))
    assert len(stray) == 1 and stray[0].stat().st_size == 0
    # A temporary file of a process that still runs is left alone.
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = out / f".results.json.{alive.pid}.0123abcd.tmp"
        live.write_bytes(b"")
        with RunLock(out):
            pass
        assert not stray[0].exists()
        assert live.exists()
    finally:
        alive.kill()
        alive.wait()


def test_a_stray_temporary_of_the_same_file_is_removed_by_its_next_write(tmp_path):
    stray = tmp_path / ".sweep.json.999999999.0123abcd.tmp"  # no such pid
    stray.write_bytes(b"")
    write_text_atomic(tmp_path / "sweep.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.json"]


# -- item 4: the same bad checkpoint files through run.py and run_robustbench.py ---------------------
def _tiny_published_stand_in(monkeypatch) -> None:
    """The published architectures are ~500M parameters; the files are what is tested, so the
    composite they would be loaded into is a tiny one (the loading code is the real one)."""
    from adaptive_smoothing import evaluation, published

    def tiny(*args, **kwargs) -> CompositeModel:
        torch.manual_seed(0)
        std, rob = create_model("resnet18", width=2), create_model("resnet18", width=2)
        return CompositeModel(std, rob, MixingNet((2, 2), version=3))

    monkeypatch.setattr(published, "_build_for_loading", tiny)
    monkeypatch.setattr(evaluation, "build_composite", tiny)


def _published_root(root: Path, case: str) -> Path:
    whole = (REPO_ROOT / "demo" / "std_rn18_w8.pt").read_bytes()
    for name in ("Base/cifar10_bit_rn152.tar", "Base/cifar10_linf_edm_wrn70-16.pt",
                 "CompModel/cifar10_edm_best.pt"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        if case == "truncated":
            (root / name).write_bytes(whole[:len(whole) // 3])
        elif case == "missing" and name.startswith("CompModel"):
            torch.save({"model": {}, "bn": {}}, root / name)
    return root / "Base" / "cifar10_bit_rn152.tar"


@pytest.mark.parametrize("case, expected", [("missing", ("not found", "missing")),
                                            ("truncated", ("unreadable, a zip archive that is "
                                                           "truncated",) * 2)])
def test_bad_checkpoint_files_give_the_same_one_line_error_in_run_and_run_robustbench(
        tmp_path, monkeypatch, case, expected):
    _tiny_published_stand_in(monkeypatch)
    root = tmp_path / "models"
    std = _published_root(root, case)
    through_run = CliRunner().invoke(run.main, [
        "--eval", "--config", str(REPO_ROOT / "configs" / "cifar10_edm.yaml"), "--device", "cpu",
        "--set", f"log_dir={root}", "--data-dir", str(REPO_ROOT / "demo"), "--n-examples", "4",
        "--output-dir", str(tmp_path / "out")])
    through_robustbench = CliRunner().invoke(run_robustbench.main, [
        "--root_dir", str(root), "--dataset", "cifar10", "--model_name", "edm", "--device",
        "cpu", "--n_examples", "4", "--output_dir", str(tmp_path / "rb")])
    for result, words in zip((through_run, through_robustbench), expected):
        message = _one_line_error(result)
        assert str(std) in message and words in message, message


def test_other_clis_report_a_truncated_checkpoint_in_one_line(tmp_path):
    from adaptive_smoothing.cli import analyze_margins

    whole = (REPO_ROOT / "demo" / "std_rn18_w8.pt").read_bytes()
    bad = tmp_path / "std.pt"
    bad.write_bytes(whole[:len(whole) // 3])
    result = CliRunner().invoke(analyze_margins.main, [
        "--std", str(bad), "--rob", str(REPO_ROOT / "demo" / "rob_rn18_w8_fgsm.pt"),
        "--output", str(tmp_path / "m.json"), "--data-format", "npz",
        "--data-dir", str(REPO_ROOT / "demo"), "--n-examples", "4"])
    assert f"{bad}: unreadable" in _one_line_error(result)


# -- item 5: threads, resume, paths, shape hints, log lines ---------------------------------------
def test_threads_above_the_cores_warn_once_and_say_what_it_costs(monkeypatch, caplog):
    from adaptive_smoothing import runtime

    set_to: list[int] = []
    monkeypatch.setattr(runtime.torch, "set_num_threads", set_to.append)  # 999 real threads: no
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    runtime._warn_oversubscribed.cache_clear()
    with caplog.at_level(logging.WARNING, logger="adaptive_smoothing.runtime"):
        assert runtime.configure_threads(999) == 999
        runtime.configure_threads(999)
        runtime.configure_threads(2)
    warnings = [r.getMessage() for r in caplog.records if "core(s) available" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "999 torch threads but only 2 core(s)" in warnings[0]
    assert "many times slower" in warnings[0] and "--threads 2 or fewer" in warnings[0]
    assert set_to == [999, 999, 2]  # a warning, not a refusal


def test_resumed_evaluation_logs_how_many_batches_it_reused(tmp_path, caplog):
    out = tmp_path / "eval"
    first = CliRunner().invoke(run.main, _demo_eval_args(out))
    assert first.exit_code == 0, first.output
    (out / "batches" / "00001.json").unlink()  # as if killed during the second batch
    with caplog.at_level(logging.INFO, logger="adaptive_smoothing.evaluation"):
        second = CliRunner().invoke(run.main, _demo_eval_args(out))
    assert second.exit_code == 0, second.output
    assert any(f"{out}: resuming, reusing 1 of 2 finished batches" in r.getMessage()
               for r in caplog.records)


def test_missing_checkpoint_from_another_directory_names_the_full_path_and_its_base(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # configs/demo.yaml's log_dir 'demo' is relative
    result = CliRunner().invoke(run.main, [
        "--eval", "--config", str(REPO_ROOT / "configs" / "demo.yaml"), "--device", "cpu",
        "--output-dir", str(tmp_path / "out")])
    message = _one_line_error(result)
    assert f"checkpoint file not found: {tmp_path / 'demo' / 'std_rn18_w8.pt'}" in message
    assert "relative to log_dir 'demo'" in message
    assert f"relative to the working directory {tmp_path}" in message


def test_missing_config_from_another_directory_names_the_full_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(run.main, ["--eval", "--config", "configs/demo.yaml"])
    message = _one_line_error(result)
    assert (f"configs/demo.yaml: file not found (looked for {tmp_path / 'configs' / 'demo.yaml'}"
            ", relative to the working directory)") in message


def test_missing_data_folder_names_the_full_path_and_its_base(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(run.main, [
        "--eval", "--config", str(REPO_ROOT / "configs" / "demo.yaml"), "--device", "cpu",
        "--set", f"log_dir={REPO_ROOT / 'demo'}", "--data-dir", "nowhere", "--data-format",
        "npz", "--output-dir", str(tmp_path / "out")])
    message = _one_line_error(result)
    assert (f"dataset path {tmp_path / 'nowhere'} does not exist (relative to the working "
            f"directory {tmp_path})") in message


def test_100_class_checkpoint_in_a_10_class_resnet18_names_resnet_not_bit(tmp_path):
    from adaptive_smoothing.checkpoints import CheckpointError, load_authors_checkpoints

    torch.manual_seed(0)
    wrong = create_model("resnet18", num_classes=100, width=2)
    torch.save({"model": wrong.state_dict()}, tmp_path / "std.pt")
    torch.save({"model": create_model("resnet18", width=2).state_dict()}, tmp_path / "rob.pt")
    composite = CompositeModel(create_model("resnet18", width=2),
                               create_model("resnet18", width=2), None)
    with pytest.raises(CheckpointError) as err:
        load_authors_checkpoints(composite, tmp_path / "std.pt", tmp_path / "rob.pt", None)
    message = str(err.value)
    assert "does not match ResNet (expected STD checkpoint" in message
    assert "ResNet state_dict" in message and "BiT" not in message
    assert "the file has 100 classes, the model 10" in message


def test_download_retry_lines_are_printed_once(monkeypatch):
    import io

    import huggingface_hub.utils.logging  # noqa: F401  (installs its own stderr handler)

    from adaptive_smoothing import download

    stream = io.StringIO()
    library = logging.getLogger("huggingface_hub")
    for own in library.handlers:  # huggingface_hub's stderr handler, made visible
        monkeypatch.setattr(own, "stream", stream)
    monkeypatch.setattr(library, "handlers", list(library.handlers))  # restored afterwards
    root = logging.getLogger()
    handler = logging.StreamHandler(stream)  # what logging.basicConfig installs
    root.addHandler(handler)
    try:
        download.route_library_logs()
        logging.getLogger("huggingface_hub.utils._http").warning(
            "Retrying in 1s [Retry 1/5].")
    finally:
        root.removeHandler(handler)
    assert stream.getvalue().count("Retrying in 1s [Retry 1/5].") == 1, stream.getvalue()


def test_download_command_routes_the_library_logs(tmp_path, monkeypatch):
    from adaptive_smoothing import download
    from adaptive_smoothing.cli import download_models

    called = []
    monkeypatch.setattr(download, "route_library_logs", lambda: called.append(True))
    result = CliRunner().invoke(download_models.main, ["--list"])
    assert result.exit_code == 0, result.output
    assert called == [True]


# -- item 2: base models identify themselves ---------------------------------------------------
def _swapped_demo_args(out: Path) -> list[str]:
    # The demo's checkpoints record their training (train_base.py): STD 'standard', ROB 'fgsm'.
    return _demo_eval_args(out) + ["--set", "model_load_path.std=rob_rn18_w8_fgsm.pt",
                                   "--set", "model_load_path.rob=std_rn18_w8.pt"]


def test_swapped_std_and_rob_checkpoints_are_refused_with_the_evidence(tmp_path):
    result = CliRunner().invoke(run.main, _swapped_demo_args(tmp_path / "eval"))
    message = _one_line_error(result)
    assert "STD and ROB look swapped" in message
    assert f"STD checkpoint {REPO_ROOT / 'demo' / 'rob_rn18_w8_fgsm.pt'}" in message
    assert "method 'fgsm'" in message and "method 'standard'" in message
    assert "--allow-swapped-bases" in message
    assert not (tmp_path / "eval" / "results.json").exists()


def test_allow_swapped_bases_evaluates_them_anyway_with_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="adaptive_smoothing.checkpoints"):
        result = CliRunner().invoke(run.main, _swapped_demo_args(tmp_path / "eval")
                                    + ["--allow-swapped-bases"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "eval" / "results.json").exists()
    assert any("look swapped" in r.getMessage() for r in caplog.records)


def test_correctly_ordered_demo_bases_load_without_a_word(tmp_path, caplog):
    from adaptive_smoothing.checkpoints import check_base_roles

    std = torch.load(REPO_ROOT / "demo" / "std_rn18_w8.pt", weights_only=True)
    rob = torch.load(REPO_ROOT / "demo" / "rob_rn18_w8_fgsm.pt", weights_only=True)
    with caplog.at_level(logging.WARNING, logger="adaptive_smoothing.checkpoints"):
        check_base_roles(std, rob, "std.pt", "rob.pt")
        check_base_roles({"model": {}}, {"model_state_dict": {}}, "a", "b")  # nothing recorded
    assert caplog.records == []


def test_run_robustbench_refuses_swapped_bases_too(tmp_path, monkeypatch):
    from adaptive_smoothing import published

    def demo_sized(*args, **kwargs) -> CompositeModel:
        return CompositeModel(create_model("resnet18", width=8), create_model("resnet18", width=8),
                              MixingNet((8, 8), version=3))

    monkeypatch.setattr(published, "_build_for_loading", demo_sized)
    root = tmp_path / "models"
    (root / "Base").mkdir(parents=True)
    (root / "CompModel").mkdir()
    demo = REPO_ROOT / "demo"
    (root / "Base" / "cifar10_bit_rn152.tar").write_bytes((demo / "rob_rn18_w8_fgsm.pt").read_bytes())
    (root / "Base" / "cifar10_linf_edm_wrn70-16.pt").write_bytes((demo / "std_rn18_w8.pt").read_bytes())
    (root / "CompModel" / "cifar10_edm_best.pt").write_bytes((demo / "mixer_rn18_w8.pt").read_bytes())
    result = CliRunner().invoke(run_robustbench.main, [
        "--root_dir", str(root), "--dataset", "cifar10", "--model_name", "edm", "--device",
        "cpu", "--output_dir", str(tmp_path / "rb")])
    message = _one_line_error(result)
    assert "STD and ROB look swapped" in message and "--allow-swapped-bases" in message


def test_analyze_margins_refuses_swapped_bases_too(tmp_path):
    from adaptive_smoothing.cli import analyze_margins

    result = CliRunner().invoke(analyze_margins.main, [
        "--std", str(REPO_ROOT / "demo" / "rob_rn18_w8_fgsm.pt"),
        "--rob", str(REPO_ROOT / "demo" / "std_rn18_w8.pt"),
        "--output", str(tmp_path / "m.json"), "--data-format", "npz",
        "--data-dir", str(REPO_ROOT / "demo"), "--n-examples", "4"])
    message = _one_line_error(result)
    assert "STD and ROB look swapped" in message and "method 'fgsm'" in message
