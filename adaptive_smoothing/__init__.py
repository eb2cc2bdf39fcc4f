"""Adaptive smoothing (Bai et al., arXiv 2301.12554): mix an accurate and a robust classifier."""
import os

# Before torch loads OpenMP, which reads this once: idle OpenMP threads sleep instead of
# spin-waiting. Spinning threads take the cores that a busy neighbour process and torch's own
# working threads need: in a quick check beside other busy processes, a 2-thread convolution
# loop took 4.0 s with the default policy and 1.8 s with PASSIVE (docs/RESULTS.md). A value
# the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__all__ = ["CompositeModel", "LogProbClassifier", "MixingNet", "create_model",
           "load_published_model"]

_MODELS = ("CompositeModel", "LogProbClassifier", "MixingNet", "create_model")


def __getattr__(name: str):
    # Lazy, so that importing a torch-free part (adaptive_smoothing.config, .errors) does not load
    # torch and every architecture, nor the checkpoint code's dependencies.
    if name in _MODELS:
        from adaptive_smoothing import models
        return getattr(models, name)
    if name == "load_published_model":
        from adaptive_smoothing.published import load_published_model
        return load_published_model
    raise AttributeError(name)
