"""Start-up cost: transformers' Trainer without peft (and bitsandbytes) unless a run needs them,
without scipy, and with the import's objects out of the garbage collector's way.

``import transformers.trainer`` imports peft whenever peft is installed, peft imports
bitsandbytes (1-4 s here, and a "pip install kernels" warning on every run): only LoRA and
quantization use them. The mechanism (peft hidden while transformers' training modules are
imported, stand-ins for the classes they bind; scipy likewise) lives in
``ilstudio.config.lazy_peft``, so that building ``TrainingArguments`` in the pre-launch check
avoids peft as well.
"""

from __future__ import annotations

from ilstudio.config.lazy_peft import import_lightly

TRAINER_MODULES = ("transformers.trainer_utils", "transformers.training_args", "transformers.trainer")


def import_trainer(need_peft: bool) -> None:
    """Import ``transformers.trainer`` (and torch with it); without peft/bitsandbytes unless
    ``need_peft``, without scipy, the garbage collector paused (ilstudio.config.lazy_peft)."""
    if need_peft:  # imported as it is (scipy included), so that transformers binds its classes
        import_lightly(("peft",), hide=())
    import_lightly(TRAINER_MODULES)
