"""Adaptive smoothing (Bai et al., arXiv 2301.12554): mix an accurate and a robust classifier."""
import os

# Before torch loads OpenMP, which reads this once: idle OpenMP threads sleep instead of
# spin-waiting. Spinning threads take the cores that a busy neighbour process and torch's own
# working threads need: in a quick check beside other busy processes, a 2-thread convolution
# loop took 4.0 s with the default policy and 1.8 s with PASSIVE (docs/RESULTS.md). A value
# the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from adaptive_smoothing.models import (CompositeModel, LogProbClassifier,  # noqa: E402
                                       MixingNet, create_model)

__all__ = ["CompositeModel", "LogProbClassifier", "MixingNet", "create_model",
           "load_published_model"]


def __getattr__(name: str):
    # Lazy, so that importing the package does not pull in the checkpoint code's dependencies.
    if name == "load_published_model":
        from adaptive_smoothing.published import load_published_model
        return load_published_model
    raise AttributeError(name)
