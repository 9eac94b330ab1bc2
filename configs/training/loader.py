"""The older system's Python API, as its README prints it::

    from configs.training.loader import load_training_config, create_training_arguments
    config = load_training_config('configs/training/default.yaml')
    from train import HyperArguments
    training_args = create_training_arguments('configs/training/default.yaml', HyperArguments())

Both functions live in ``ilstudio.config`` (this module only re-exports them): YAML values
are typed and validated, stable keys become gin bindings, and a HyperArguments field you set
beats the YAML, as a flag does on the command line.
"""

from ilstudio.config import create_training_arguments, load_training_config

__all__ = ["create_training_arguments", "load_training_config"]
