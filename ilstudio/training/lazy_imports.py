"""Start-up cost: transformers' Trainer without peft (and bitsandbytes) unless a run needs them.

``import transformers.trainer`` imports peft whenever peft is installed, peft imports
bitsandbytes (1-4 s here, and a "pip install kernels" warning on every run): only LoRA and
quantization use them. The mechanism (peft hidden while transformers' training modules are
imported, stand-ins for the classes they bind) lives in ``ilstudio.config.lazy_peft``, so
that building ``TrainingArguments`` in the pre-launch check avoids peft as well.
"""

from __future__ import annotations

import importlib

from ilstudio.config.lazy_peft import import_without_peft

TRAINER_MODULES = ("transformers.trainer_utils", "transformers.training_args", "transformers.trainer")


def import_trainer(need_peft: bool) -> None:
    """Import ``transformers.trainer``; without peft/bitsandbytes unless ``need_peft``."""
    if need_peft:
        importlib.import_module("transformers.trainer")
        return
    import_without_peft(TRAINER_MODULES)
