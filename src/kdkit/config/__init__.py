"""The training config: its validated models and the rules that refuse an option without effect
(``schema``), reading YAML with ``--set`` overrides and errors naming file, line and field (``load``), and
the reference generated from the models (``reference``)."""

from kdkit.config.load import ConfigError, dump_config, load_train_config
from kdkit.config.reference import defaults_yaml, reference_table
from kdkit.config.schema import ObjectiveConfig, TrainConfig

__all__ = ["TrainConfig", "ObjectiveConfig", "load_train_config", "dump_config", "ConfigError", "defaults_yaml",
           "reference_table"]
