"""YAML configuration -> validated, typed, frozen pydantic models (docs/CONFIG.md)."""
from .legacy import (ALIASES, FILLED, MOVED, apply_overrides, config_to_dict, load_config,
                     parse_config)
from .schema import (AUTOATTACK_NAMES, DEFAULT_EPS, MODEL_TYPE_ALIASES, STANDARD_AUTOATTACK,
                     TRAINING_ATTACKS, CompLossConsts, CompLossParams, CompLossScale, Config,
                     ConfigError, DatasetSettings, EvalFreq, EvaluationSettings, ForwardSettings,
                     FrozenDict, GammaConsts, ModelLoadPath, PgdSettings,
                     RandomizedAttackSettings, RunSettings, TrainingSettings)
