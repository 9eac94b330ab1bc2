#!/usr/bin/env python
"""Train a policy: python train.py --gin_file=gin_configs/default.gin --learning_rate=1e-3.

Stable parameters come from gin (--gin_file, --gin_bindings) and the task's gin file;
hyperparameters are flags (see --helpshort); --training_config reads an older flat YAML.
``from train import HyperArguments`` gives the older system's hyperparameter dataclass.
"""

import sys

from ilstudio.errors import guarded  # cheap: everything else is imported inside the guard

__all__ = ["HyperArguments", "run_cli"]  # noqa: F822 - module __getattr__ below


def __getattr__(name: str):
    """``HyperArguments`` and ``run_cli``, imported on first use (PEP 562): a Ctrl-C while the
    program's modules load is then one line, exit 130, like one at any later moment."""
    if name == "HyperArguments":
        from ilstudio.config import HyperArguments

        return HyperArguments
    if name == "run_cli":
        from ilstudio.main import run_cli

        return run_cli
    raise AttributeError(name)


def _main() -> None:
    from ilstudio.main import run_cli

    run_cli()


if __name__ == "__main__":
    sys.exit(guarded(_main, "train.py"))
