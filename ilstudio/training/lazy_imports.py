"""Start-up cost: transformers' Trainer without peft (and bitsandbytes) unless a run needs them.

``import transformers.trainer`` imports peft whenever peft is installed (trainer_utils and
trainer bind ``PeftModel``/``PeftMixedModel`` at import time), and peft imports bitsandbytes,
which imports torch._inductor: 1-4 s on these CPUs (bench/startup.py), paid by every run,
though only LoRA and quantization use them. ``import_trainer(need_peft=False)`` imports the
Trainer while peft reads as absent (``sys.modules["peft"] = None`` makes
``importlib.util.find_spec`` answer None), then makes peft importable again (clearing
transformers' cached ``is_peft_available``) and gives those
two modules stand-ins for the classes they bound: ``isinstance(x, PeftModel)`` asks the real
peft class once peft is loaded and is False before, which is the truth (no object can be a
PeftModel before peft is imported). A LoRA run later in the same process therefore gets
transformers' peft handling as usual.
"""

from __future__ import annotations

import importlib
import sys

PEFT_CLASSES = ("PeftModel", "PeftMixedModel")
_BINDERS = ("transformers.trainer_utils", "transformers.trainer")


class _LazyPeftClass(type):
    def __instancecheck__(cls, obj) -> bool:
        peft = sys.modules.get("peft")
        real = getattr(peft, cls.__name__, None) if peft is not None else None
        return real is not None and isinstance(obj, real)

    def __subclasscheck__(cls, sub) -> bool:
        peft = sys.modules.get("peft")
        real = getattr(peft, cls.__name__, None) if peft is not None else None
        return real is not None and issubclass(sub, real)


def _stand_in(name: str) -> type:
    return _LazyPeftClass(name, (), {"__doc__": f"peft.{name} once peft is imported (see {__name__})"})


def import_trainer(need_peft: bool) -> None:
    """Import ``transformers.trainer``; without peft/bitsandbytes unless ``need_peft``."""
    if need_peft or "peft" in sys.modules or all(m in sys.modules for m in _BINDERS):
        importlib.import_module("transformers.trainer")
        return
    sys.modules["peft"] = None  # type: ignore[assignment]  # find_spec("peft") -> None
    try:
        for name in _BINDERS:
            importlib.import_module(name)
    finally:
        if sys.modules.get("peft", 0) is None:
            del sys.modules["peft"]
        from transformers.utils import import_utils

        # transformers caches the answer (lru_cache): let it ask again from now on.
        getattr(import_utils.is_peft_available, "cache_clear", lambda: None)()
    for name in _BINDERS:
        module = sys.modules[name]
        for cls in PEFT_CLASSES:
            if cls not in vars(module):
                setattr(module, cls, _stand_in(cls))
