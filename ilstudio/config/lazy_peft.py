"""Importing transformers' training modules without peft (and so without bitsandbytes).

``transformers.trainer_utils`` (which ``transformers.training_args`` imports, so building a
``TrainingArguments`` does too) and ``transformers.trainer`` import peft at import time whenever
peft is installed, to bind ``PeftModel``/``PeftMixedModel``. peft imports bitsandbytes, which
imports torch._inductor (1-4 s here) and, without the optional ``kernels`` package, logs
"Failed to load CPU gemm_4bit_forward ... pip install kernels" on every run that never
quantizes. Only LoRA and quantization runs need either.

``import_without_peft(modules)`` imports the modules while peft reads as absent
(``sys.modules["peft"] = None``: ``importlib.util.find_spec`` answers None, ``import peft``
fails), then makes peft importable again (clearing transformers' cached
``is_peft_available``) and gives the modules stand-ins for the peft classes they bind:
``isinstance(x, PeftModel)`` asks the real class once peft is loaded and is False before,
which is the truth (no object can be a PeftModel before peft is imported). A LoRA run later
in the same process gets transformers' peft handling as usual. Should a transformers release
import peft unconditionally, the hidden import fails and the modules are imported plainly
(with peft): slower, never broken.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

PEFT_CLASSES = ("PeftModel", "PeftMixedModel")
TRAINING_ARGS = ("transformers.trainer_utils", "transformers.training_args")


class _LazyPeftClass(type):
    def __instancecheck__(cls, obj) -> bool:
        real = _real(cls.__name__)
        return real is not None and isinstance(obj, real)

    def __subclasscheck__(cls, sub) -> bool:
        real = _real(cls.__name__)
        return real is not None and issubclass(sub, real)


def _real(name: str) -> type | None:
    peft = sys.modules.get("peft")
    return getattr(peft, name, None) if peft is not None else None


def _stand_in(name: str) -> type:
    return _LazyPeftClass(name, (), {"__doc__": f"peft.{name} once peft is imported (see {__name__})"})


def _forget_cached_peft_answer() -> None:
    from transformers.utils import import_utils

    # transformers caches the answer (lru_cache): let it ask again from now on.
    getattr(import_utils.is_peft_available, "cache_clear", lambda: None)()


def import_without_peft(modules: Sequence[str]) -> None:
    """Import ``modules`` (transformers' trainer_utils, training_args, trainer) without peft,
    unless peft is loaded already; see the module doc."""
    if "peft" in sys.modules or all(m in sys.modules for m in modules):
        for name in modules:
            importlib.import_module(name)
        return
    sys.modules["peft"] = None  # type: ignore[assignment]  # find_spec("peft") -> None
    try:
        for name in modules:
            importlib.import_module(name)
    except ImportError:  # this transformers needs peft at import time: import it plainly
        del sys.modules["peft"]
        _forget_cached_peft_answer()
        for name in modules:
            importlib.import_module(name)
    finally:
        if sys.modules.get("peft", 0) is None:
            del sys.modules["peft"]
    _forget_cached_peft_answer()
    _give_stand_ins()


def _give_stand_ins() -> None:
    """Bind the peft class names transformers would have bound, where they are missing."""
    for name in ("transformers.trainer_utils", "transformers.trainer"):
        module = sys.modules.get(name)
        for cls in PEFT_CLASSES if module is not None else ():
            if cls not in vars(module):
                setattr(module, cls, _stand_in(cls))


def training_arguments_class() -> type:
    """``transformers.TrainingArguments``, imported without peft unless it is loaded already."""
    import_without_peft(TRAINING_ARGS)
    return sys.modules["transformers.training_args"].TrainingArguments
