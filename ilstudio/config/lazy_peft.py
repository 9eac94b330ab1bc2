"""Importing transformers' training modules lightly: without peft (and so without
bitsandbytes) or scipy, and with the garbage collector out of the way.

``transformers.trainer_utils`` (which ``transformers.training_args`` imports, so building a
``TrainingArguments`` does too) and ``transformers.trainer`` import peft at import time whenever
peft is installed, to bind ``PeftModel``/``PeftMixedModel``. peft imports bitsandbytes, which
imports torch._inductor (1-4 s here) and, without the optional ``kernels`` package, logs
"Failed to load CPU gemm_4bit_forward ... pip install kernels" on every run that never
quantizes. Only LoRA and quantization runs need either.

``import_lightly(modules)`` imports the modules while peft reads as absent
(``sys.modules["peft"] = None``: ``importlib.util.find_spec`` answers None, ``import peft``
fails), then makes peft importable again (clearing transformers' cached
``is_peft_available``) and gives the modules stand-ins for the peft classes they bind:
``isinstance(x, PeftModel)`` asks the real class once peft is loaded and is False before,
which is the truth (no object can be a PeftModel before peft is imported). A LoRA run later
in the same process gets transformers' peft handling as usual. Should a transformers release
import peft unconditionally, the hidden import fails and the modules are imported plainly
(with peft): slower, never broken.

scipy the same way: ``transformers.loss`` (imported by the Trainer through modeling_utils)
imports ``scipy.optimize`` for the Hungarian matching of six object-detection losses, about
0.25 CPU seconds of every launch (bench/startup.py) that no policy here uses. While scipy
reads as absent those modules skip ``from scipy... import name``; each such name they would
have bound gets a stand-in that imports the real function on its first call. Anything imported
later sees scipy as usual.

The import makes ~350,000 objects (torch and transformers) that live as long as the process.
The garbage collector is paused while they are made (its full collections, triggered as the
heap grows, walked them again and again: ~0.5 CPU s of every launch here), and then they are
moved out of its reach (``gc.freeze``), so that the full ``gc.collect()`` transformers runs as
each ``train()`` starts (accelerate's ``free_memory``) does not walk them either (~0.15 CPU s).
Objects made later are collected as usual.
"""

from __future__ import annotations

import gc
import importlib
import re
import sys
from collections.abc import Sequence

PEFT_CLASSES = ("PeftModel", "PeftMixedModel")
HIDDEN = ("peft", "scipy")  # optional packages transformers' training modules import eagerly
TRAINING_ARGS = ("transformers.trainer_utils", "transformers.training_args")
# Building a TrainingArguments (its __post_init__) imports transformers' modeling stack too.
TRAINING_ARGS_BUILT = (*TRAINING_ARGS, "transformers.modeling_utils")


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


def _forget_cached_answers() -> None:
    from transformers.utils import import_utils

    # transformers caches the answers (lru_cache): let it ask again from now on.
    for name in HIDDEN:
        getattr(getattr(import_utils, f"is_{name}_available", None), "cache_clear", lambda: None)()


def import_lightly(modules: Sequence[str], hide: Sequence[str] = HIDDEN) -> None:
    """Import ``modules`` (transformers' trainer_utils, training_args, trainer) without the
    packages in ``hide`` (peft, scipy) unless loaded already, the garbage collector paused,
    their objects frozen; see the module doc."""
    if all(m in sys.modules for m in modules):
        return
    enabled = gc.isenabled()
    gc.disable()
    try:
        _import_hidden(modules, [n for n in hide if n not in sys.modules])
        gc.freeze()
    finally:
        if enabled:
            gc.enable()


def _import_hidden(modules: Sequence[str], hidden: list[str]) -> None:
    before = set(sys.modules)
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # find_spec(name) -> None
    try:
        for name in modules:
            importlib.import_module(name)
    except ImportError:  # this transformers needs them at import time: import it plainly
        _unhide(hidden)
        _forget_cached_answers()
        for name in modules:
            importlib.import_module(name)
    finally:
        _unhide(hidden)
    _forget_cached_answers()
    _give_stand_ins()
    if "scipy" in hidden:
        _give_scipy_stand_ins(set(sys.modules) - before)


def _unhide(hidden: Sequence[str]) -> None:
    for name in hidden:
        if sys.modules.get(name, 0) is None:
            del sys.modules[name]


def _give_stand_ins() -> None:
    """Bind the peft class names transformers would have bound, where they are missing."""
    for name in ("transformers.trainer_utils", "transformers.trainer"):
        module = sys.modules.get(name)
        for cls in PEFT_CLASSES if module is not None else ():
            if cls not in vars(module):
                setattr(module, cls, _stand_in(cls))


_SCIPY_IMPORT = re.compile(r"^[ \t]+from (scipy[\w.]*) import (\([\w,\s]+\)|[\w, ]+)$", re.M)


def _give_scipy_stand_ins(imported: set[str]) -> None:
    """Each name a just-imported transformers module takes from scipy when scipy is
    available (``if is_scipy_available(): from scipy.optimize import linear_sum_assignment``)
    and so did not bind: a function that imports the real one on its first call."""
    for name in sorted(imported):
        module = sys.modules.get(name)
        path = getattr(module, "__file__", None) or ""
        if not name.startswith("transformers.") or "is_scipy_available" not in vars(module) \
                or not path.endswith(".py"):
            continue
        with open(path, encoding="utf-8") as f:
            for source, names in _SCIPY_IMPORT.findall(f.read()):
                for attr in (n.strip() for n in names.strip("()").split(",")):
                    if attr and attr not in vars(module):
                        setattr(module, attr, _on_first_call(source, attr))


def _on_first_call(module: str, name: str):
    def call(*args, **kwargs):
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"{module}.{name}, imported on the first call (see {__name__})"
    return call


def training_arguments_class(built: bool = False) -> type:
    """``transformers.TrainingArguments``, imported lightly; ``built``: with what building one
    imports (so that it does not import peft or scipy either)."""
    import_lightly(TRAINING_ARGS_BUILT if built else TRAINING_ARGS)
    return sys.modules["transformers.training_args"].TrainingArguments
