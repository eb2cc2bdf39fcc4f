"""YAML configuration -> validated, typed, frozen pydantic models (docs/CONFIG.md)."""
from .legacy import (ALIASES, FILLED, MOVED, apply_overrides, config_to_dict, load_config,
                     parse_config)
from .schema import (AUTOATTACK_NAMES, STANDARD_AUTOATTACK, CompLossConsts, CompLossParams,
                     CompLossScale, Config, ConfigError, DatasetSettings, EvalFreq,
                     EvaluationSettings, ForwardSettings, GammaConsts, ModelLoadPath, NonlinearSettings, PgdSettings,
                     RandomizedAttackSettings, RunSettings, TrainingSettings)
