"""Typed configuration: frozen dataclasses (``schema.py``) ← YAML ← ``--set a.b=value`` overrides (``loading.py``).

Precedence is defaults < YAML file < ``--set``. Every key is checked against the dataclasses (unknown keys get a
"did you mean"), every value against its field type and range, and "8/255" is read with :class:`fractions.Fraction`
— never ``eval``. Any problem raises :class:`~robustprune.infra.errors.UserError` with a one-line message.
"""
from robustprune.config.loading import config_from_dict, eval_config, load_config, load_stored, parse_override, read_yaml
from robustprune.config.schema import (Config, DataConfig, EvalConfig, ModelConfig, ObjectiveConfig, PruneConfig,
                                       ThreatConfig, TrainConfig)

__all__ = ["Config", "DataConfig", "EvalConfig", "ModelConfig", "ObjectiveConfig", "PruneConfig", "ThreatConfig",
           "TrainConfig", "config_from_dict", "eval_config", "load_config", "load_stored", "parse_override", "read_yaml"]
