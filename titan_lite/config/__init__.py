"""Job configuration: the dataclasses in ``schema`` are the single source of truth.

TOML sections and keys, ``--section.key value`` command-line overrides, defaults, validation and
``--help`` text are all generated from them (``loader``); checks that need the world size live in
``checks``. Every problem is collected and reported at once as one line each, and the entry
points exit with status 2 on any of them.
"""

from titan_lite.config.loader import ConfigError, expand_bare_keys, help_text, load_config
from titan_lite.config.schema import (
    DEFAULT_CONFIG,
    ActivationCheckpoint,
    Checkpoint,
    Comm,
    Data,
    Generation,
    Job,
    JobConfig,
    Lora,
    LRScheduler,
    Metrics,
    Model,
    Optimizer,
    Parallelism,
    Predict,
    Tokenizer,
    Training,
    Validation,
)

__all__ = [
    "DEFAULT_CONFIG", "ActivationCheckpoint", "Checkpoint", "Comm", "ConfigError", "Data",
    "Generation", "Job", "JobConfig", "Lora", "LRScheduler", "Metrics", "Model", "Optimizer",
    "Parallelism", "Predict", "Tokenizer", "Training", "Validation", "expand_bare_keys",
    "help_text", "load_config",
]
