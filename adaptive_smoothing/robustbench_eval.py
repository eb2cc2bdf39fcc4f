"""The RobustBench evaluation of a published composite model: RobustBench's ``benchmark()``
(standard AutoAttack, Linf 8/255), resumable (``run_robustbench.py``)."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


from adaptive_smoothing.compat import import_robustbench
from adaptive_smoothing.persist import remove_stale_temporaries, write_text_atomic
from adaptive_smoothing.published import load_published_model, published_model
from adaptive_smoothing.runtime import (AutocastModule, RuntimeSettingsError, prepare_model,
                                        resolve_precision, select_device)

logger = logging.getLogger(__name__)

EPS = 8 / 255  # the RobustBench Linf leaderboard's radius


@dataclass(frozen=True)
class BenchmarkResult:
    dataset: str
    model_name: str
    n_examples: int
    clean_accuracy: float
    robust_accuracy: float
    precision: str


def run_benchmark(root_dir: Path, dataset: str, model_name: str, *, n_examples: int = 10000,
                  precision: str = "fp32", batch_size: int = 100, data_dir: Path = Path("data"),
                  device: str = "auto", output_dir: Path = Path("outputs/robustbench"),
                  channels_last: bool = True, compile: bool = False) -> BenchmarkResult:
    """Load a published model from ``root_dir`` and run RobustBench's standard AutoAttack
    evaluation (Linf, eps 8/255) on the first ``n_examples`` test images.

    AutoAttack's state is kept in ``output_dir``, so an interrupted run resumes where it stopped.
    """
    published_model(dataset, model_name)  # refuses unknown pairs (cifar10 + trades) first
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeSettingsError(
            "run_robustbench.py runs in one process: RobustBench's benchmark() is not "
            "distributed, so under torchrun every process would attack the same images on the "
            "same GPU and share one AutoAttack state file. Start it with python (choose the GPU "
            "with --device cuda:N), or evaluate on several GPUs with torchrun run.py --eval")
    torch_device = select_device(device)
    dtype = resolve_precision(precision, torch_device)
    robustbench = import_robustbench()
    model = load_published_model(root_dir, dataset, model_name, device=str(torch_device))
    prepare_model(model, channels_last=channels_last, compile=compile)
    classifier = AutocastModule(model, torch_device, dtype).eval()

    output_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(output_dir)  # what a killed run's atomic writes left behind
    stem = f"{dataset}_{model_name}_n{n_examples}_{precision}"
    state_path = output_dir / f"{stem}.aa_state.json"
    if state_path.exists():
        logger.info("resuming AutoAttack from %s", state_path)
    clean, robust = robustbench.eval.benchmark(
        classifier, n_examples=n_examples, dataset=dataset, threat_model="Linf", eps=EPS,
        data_dir=str(data_dir), device=torch_device, batch_size=batch_size,
        aa_state_path=state_path)
    result = BenchmarkResult(dataset, model_name, n_examples, float(clean), float(robust),
                             precision)
    write_text_atomic(output_dir / f"{stem}.json", json.dumps(result.__dict__, indent=2))
    logger.info("%s/%s: clean %.2f%%, AutoAttack %.2f%% (%d examples)", dataset, model_name,
                100 * result.clean_accuracy, 100 * result.robust_accuracy, n_examples)
    return result


def published_model_or_error(dataset: str, model_name: str) -> Optional[str]:
    """None if (dataset, model_name) is a published model, else the reason it is not."""
    try:
        published_model(dataset, model_name)
    except ValueError as err:
        return str(err)
    return None
