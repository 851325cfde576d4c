"""The parameters: frozen dataclasses, their layered loading and up-front validation.

Every name is importable from here (``from dcml.config import load_params``); the code
lives in four modules:

- :mod:`dcml.config_schema` — the dataclasses, each key with its default (the CPU demo,
  equal to the repository's ``params.yaml``) and a one-line doc;
- :mod:`dcml.config_layers` — loading: defaults < preset < params file < ``overrides``,
  unknown keys ("did you mean ..."), types, :func:`to_dict` / :func:`flatten`, stored params;
- :mod:`dcml.config_rules` — cross-field rules (:func:`validate`, :func:`check_against_data`)
  and a sweep point's copy (:func:`with_num_learners`);
- :mod:`dcml.config_uri` — credentials in the tracking URI.

Sweeps derive new configs with :func:`dataclasses.replace`. Docs: docs/parameters.md.
"""

from __future__ import annotations

from dcml.config_layers import (
    PRESETS_DIR,
    STORED_FALLBACK,
    all_keys,
    apply_preset,
    available_presets,
    check_keys,
    flatten,
    load_params,
    load_with_sources,
    params_from_dict,
    params_from_stored,
    read_preset,
    read_yaml,
    resolve,
    to_dict,
)
from dcml.config_rules import (
    BASELINE_VALUES,
    HIERARCHY_KEYS,
    LEARNER_VARIANT_KEYS,
    MASK_KEYS,
    check_against_data,
    needs_divisible_dim,
    validate,
    with_defaults_for,
    with_num_learners,
    with_values,
)
from dcml.config_schema import (
    SEED_LIMIT,
    ClusterConfig,
    ConfigError,
    DataConfig,
    DemoConfig,
    EvalConfig,
    LossConfig,
    ModelConfig,
    Params,
    RetrievalConfig,
    SplitConfig,
    SweepConfig,
    TrackingConfig,
    TrainConfig,
)
from dcml.config_uri import redact_uri, split_uri_credentials

__all__ = [
    "BASELINE_VALUES",
    "HIERARCHY_KEYS",
    "LEARNER_VARIANT_KEYS",
    "MASK_KEYS",
    "PRESETS_DIR",
    "SEED_LIMIT",
    "STORED_FALLBACK",
    "ClusterConfig",
    "ConfigError",
    "DataConfig",
    "DemoConfig",
    "EvalConfig",
    "LossConfig",
    "ModelConfig",
    "Params",
    "RetrievalConfig",
    "SplitConfig",
    "SweepConfig",
    "TrackingConfig",
    "TrainConfig",
    "all_keys",
    "apply_preset",
    "available_presets",
    "check_against_data",
    "check_keys",
    "flatten",
    "load_params",
    "load_with_sources",
    "needs_divisible_dim",
    "params_from_dict",
    "params_from_stored",
    "read_preset",
    "read_yaml",
    "redact_uri",
    "resolve",
    "split_uri_credentials",
    "to_dict",
    "validate",
    "with_defaults_for",
    "with_num_learners",
    "with_values",
]
