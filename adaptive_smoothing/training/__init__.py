"""Training the mixing network (docs/METHOD.md, "Training"); docs/TRAINING.md is the user's guide.

- ``loop.py``: the :class:`Trainer` (buffer, optimizer steps, the loop);
- ``steps.py``: an iteration's statistics as a named type;
- ``resume.py``: the checkpoint's state and files, resuming from it;
- ``monitor.py``: validation, detection, TensorBoard, the log file, training_results.json;
- ``build.py``: from a config or a prepared run to a Trainer (``build_trainer``,
  ``run_training``, ``training_identity``).
"""
from adaptive_smoothing.training.build import build_trainer, run_training, training_identity
from adaptive_smoothing.training.loop import (Trainer, TrainingDivergedError,
                                              optimizer_steps_per_iteration)
from adaptive_smoothing.training.monitor import ValidationAttack
from adaptive_smoothing.training.resume import (CHECKPOINT_DIR, LAST_CHECKPOINT,
                                                TrainingResumeError)
from adaptive_smoothing.training.steps import StepStatistics

__all__ = ["CHECKPOINT_DIR", "LAST_CHECKPOINT", "StepStatistics", "Trainer",
           "TrainingDivergedError", "TrainingResumeError", "ValidationAttack", "build_trainer",
           "optimizer_steps_per_iteration", "run_training", "training_identity"]
