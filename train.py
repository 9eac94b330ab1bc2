#!/usr/bin/env python
"""Train a policy: python train.py --gin_file=gin_configs/default.gin --learning_rate=1e-3.

Stable parameters come from gin (--gin_file, --gin_bindings) and the task's gin file;
hyperparameters are flags (see --helpshort); --training_config reads an older flat YAML.
``from train import HyperArguments`` gives the older system's hyperparameter dataclass.
"""

from ilstudio.config import HyperArguments
from ilstudio.main import run_cli

__all__ = ["HyperArguments", "run_cli"]

if __name__ == "__main__":
    run_cli()
