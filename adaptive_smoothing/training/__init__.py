"""Training the mixing network (docs/METHOD.md, "Training"); docs/TRAINING.md is the user's guide.

The loop is ``loop.py``; the public names are re-exported here.
"""
from adaptive_smoothing.training.loop import (CHECKPOINT_DIR, LAST_CHECKPOINT, Trainer,
                                              TrainingDivergedError, TrainingResumeError,
                                              ValidationAttack, build_trainer,
                                              optimizer_steps_per_iteration, run_training,
                                              training_identity)

__all__ = ["CHECKPOINT_DIR", "LAST_CHECKPOINT", "Trainer", "TrainingDivergedError",
           "TrainingResumeError", "ValidationAttack", "build_trainer",
           "optimizer_steps_per_iteration", "run_training", "training_identity"]
