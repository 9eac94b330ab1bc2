"""Configuration: gin configurables for stable parameters, absl flags for hyperparameters,
and the older YAML files. The seed's Python API lives on here."""

from ilstudio.config.training_args import HyperArguments, create_training_arguments
from ilstudio.config.yaml_adapter import TrainingConfig, load_training_config

__all__ = ["HyperArguments", "TrainingConfig", "create_training_arguments", "load_training_config"]
