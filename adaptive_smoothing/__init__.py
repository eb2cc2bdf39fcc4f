"""Adaptive smoothing (Bai et al., arXiv 2301.12554): mix an accurate and a robust classifier."""
from adaptive_smoothing.models import CompositeModel, LogProbClassifier, MixingNet, create_model

__all__ = ["CompositeModel", "LogProbClassifier", "MixingNet", "create_model",
           "load_published_model"]


def __getattr__(name: str):
    # Lazy, so that importing the package does not pull in the checkpoint code's dependencies.
    if name == "load_published_model":
        from adaptive_smoothing.published import load_published_model
        return load_published_model
    raise AttributeError(name)
