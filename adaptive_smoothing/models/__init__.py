"""Base architectures (chosen by name), the mixing network, the logit gate and the composite
model."""
from adaptive_smoothing.models.base import BaseClassifier, BaseOutput
from adaptive_smoothing.models.registry import create_model, list_models, register_model

# Importing the architecture modules fills the registry.
from adaptive_smoothing.models import bit, resnet, robustbench_zoo, wide_resnet  # noqa: F401,E402
from adaptive_smoothing.models.composite import (CompositeModel, CompositeOutput,  # noqa: E402
                                                 LogProbClassifier)
from adaptive_smoothing.models.constants import CompositeConstants  # noqa: E402
from adaptive_smoothing.models.gate import LogitGate  # noqa: E402
from adaptive_smoothing.models.mixing import MixingNet  # noqa: E402

__all__ = ["BaseClassifier", "BaseOutput", "CompositeConstants", "CompositeModel", "CompositeOutput",
           "LogProbClassifier", "LogitGate", "MixingNet", "create_model", "list_models",
           "register_model"]
