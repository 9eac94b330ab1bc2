"""How a parameter is declared, once.

A stable parameter is a field of a frozen dataclass registered with gin under a short
name. The field carries everything the rest of the system needs: its type (the
annotation), default, doc, the key the older YAML files use for it, whether changing it
breaks resuming from a checkpoint, and which policies give it an effect. The YAML adapter,
type validation, ``--explain``, the README table, the resume rules and the policies'
"no silent no-op" check all read these fields; nothing else keeps a copy.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import types
import typing
from collections.abc import Callable, Iterator
from typing import Any

import gin

from ilstudio.config.bounds import INT64, Bounds
from ilstudio.config.bounds import check as check_bounds
from ilstudio.config.bounds import parse as parse_bounds
from ilstudio.errors import UserError, shown

# Every configurable with declared parameters, by its gin name, in declaration order.
CONFIGURABLES: dict[str, type] = {}

# Where a value came from, for the message when a declared check fails at construction:
# resolve sets gin's provenance; a settings object built in Python names that call.
_SOURCE_OF: contextvars.ContextVar[Callable[[str], str]] = contextvars.ContextVar(
    "ilstudio_source_of", default=lambda gin_key: "a Python call")


@contextlib.contextmanager
def sources(source_of: Callable[[str], str]) -> Iterator[None]:
    """Settings objects built inside name ``source_of(gin_key)`` in their errors."""
    token = _SOURCE_OF.set(source_of)
    try:
        yield
    finally:
        _SOURCE_OF.reset(token)


def _checked_on_construction(cls: type) -> None:
    """Every construction checks the declaration (type, choices, bounds, length): through
    gin, the YAML adapter or a Python call alike, so no consumer re-checks a bound by hand."""
    own = cls.__dict__.get("__post_init__")

    def __post_init__(self) -> None:
        validate_instance(self, _SOURCE_OF.get())
        if own is not None:
            own(self)

    cls.__post_init__ = __post_init__


def param(default: Any, doc: str, *, yaml: str | None = None, choices: tuple | None = None,
          documented: bool = True, bounds: str | None = None, length: int | None = None,
          breaks_resume: bool | None = None, policies: tuple[str, ...] | None = None) -> Any:
    """Declare one stable parameter.

    yaml: the key the older YAML files use (defaults to the field name, if ``documented``).
    documented: the seed README lists it (so the YAML adapter accepts it); False for
        parameters that only exist here and are set through gin.
    bounds: the allowed values of a number (of every element, for a tuple) in interval
        notation, e.g. "[0, 1)" (see ilstudio/config/bounds.py). Every numeric parameter has one.
    length: the number of elements a tuple must have (e.g. 2 for an (H, W) size).
    breaks_resume: a checkpoint cannot continue under another value (shapes, modules, what
        the optimizer state belongs to), so resuming with a changed value is refused. None:
        the configurable's default (``configurable(..., breaks_resume=...)``).
    policies: the policies (``model.policy`` names) that give this parameter an effect;
        None: every policy. A documented parameter set away from its default under any
        other policy is a validation error, never a silent no-op.
    """
    return dataclasses.field(
        default=default,
        metadata={"doc": doc, "yaml": yaml, "choices": choices, "documented": documented,
                  "bounds": parse_bounds(bounds), "length": length,
                  "breaks_resume": breaks_resume, "policies": policies},
    )


def configurable(name: str, *, group: str, breaks_resume: bool | None = None):
    """Register a settings dataclass with gin under ``name``, and in CONFIGURABLES.

    group: the heading it appears under in docs (e.g. "LoRA").
    breaks_resume: the default of its parameters' ``breaks_resume`` (True where nearly every
        parameter shapes the model: LoRA, quantization). None: the class's own
        ``breaks_resume`` attribute if it has one (every policy's settings inherit True from
        PolicyConfig), else False.
    """

    def wrap(cls):
        _checked_on_construction(cls)
        cls = dataclasses.dataclass(frozen=True)(cls)
        cls.gin_name = name
        cls.doc_group = group
        cls.breaks_resume = getattr(cls, "breaks_resume", False) if breaks_resume is None \
            else breaks_resume
        CONFIGURABLES[name] = cls
        return gin.configurable(name, module="ilstudio")(cls)

    return wrap


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    """One declared parameter, as seen by the YAML adapter and the docs."""

    configurable: str
    name: str
    type: Any
    default: Any
    doc: str
    yaml_key: str | None
    choices: tuple | None
    bounds: Bounds | None = None
    length: int | None = None
    breaks_resume: bool = False
    policies: tuple[str, ...] | None = None  # None: every policy gives it an effect

    def honoured_by(self, policy: str) -> bool:
        return self.policies is None or policy in self.policies

    @property
    def gin_key(self) -> str:
        return f"{self.configurable}.{self.name}"


def params_of(cls: type) -> list[ParamInfo]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        md = f.metadata
        yaml_key = (md.get("yaml") or f.name) if md.get("documented", True) else None
        breaks = md.get("breaks_resume")
        out.append(ParamInfo(cls.gin_name, f.name, hints[f.name], f.default, md.get("doc", ""),
                             yaml_key, md.get("choices"), md.get("bounds"), md.get("length"),
                             cls.breaks_resume if breaks is None else breaks, md.get("policies")))
    return out


def defaults_of(obj: Any) -> dict[str, Any]:
    """Parameter name -> declared default, for a settings object (or class)."""
    cls = obj if isinstance(obj, type) else type(obj)
    return {info.name: info.default for info in params_of(cls)}


def all_params() -> list[ParamInfo]:
    return [p for cls in CONFIGURABLES.values() for p in params_of(cls)]


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(type_name(a) for a in args) + " or None"
    if origin is tuple:
        return f"tuple of {type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _convert_union(value: Any, tp: Any, where: str) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if value is None or (isinstance(value, str) and value.strip().lower() in {"none", "null", ""}):
        if type(None) in typing.get_args(tp):
            return None
    if any(type(value) is a for a in args):  # already one of the declared plain types
        return value
    errors = []
    for a in args:
        try:
            return convert(value, a, where)
        except UserError as e:
            errors.append(e)
    raise errors[0]


def _convert_tuple(value: Any, tp: Any, where: str) -> tuple:
    (elem,) = typing.get_args(tp)[:1]
    if isinstance(value, str):
        items = [v.strip() for v in value.replace(" ", ",").split(",") if v.strip()]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise UserError(f"{where}: expected a list of {type_name(elem)}, got {shown(value)}")
    return tuple(convert(v, elem, where) for v in items)


def _to_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise UserError(f"{where}: expected true or false, got {shown(value)}")


def _to_int(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise UserError(f"{where}: expected an integer, got {shown(value)}")
    out = None
    if isinstance(value, int):
        out = value
    elif isinstance(value, float) and value.is_integer():
        out = int(value)
    elif isinstance(value, str) and len(value) <= 40:
        try:
            out = int(value.strip())
        except ValueError:
            pass
    if out is None:
        raise UserError(f"{where}: expected an integer, got {shown(value)}")
    if not -INT64 <= out < INT64:  # beyond what torch/numpy hold: an overflow deep inside
        raise UserError(f"{where}: {shown(out)} does not fit a 64-bit integer")
    return out


def _to_float(value: Any, where: str) -> float:
    if isinstance(value, bool):
        raise UserError(f"{where}: expected a number, got {shown(value)}")
    out = None
    if isinstance(value, (int, float)):
        try:
            out = float(value)
        except OverflowError:  # an int beyond float range
            pass
    elif isinstance(value, str):
        try:
            out = float(value.strip())
        except ValueError:
            pass
    if out is not None and math.isfinite(out):
        return out
    if out is not None:  # NaN/inf would reach the optimizer as a silent NaN loss
        raise UserError(f"{where}: expected a finite number, got {shown(value)}")
    raise UserError(f"{where}: expected a number, got {shown(value)}")


def _to_str(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return ",".join(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise UserError(f"{where}: expected a string, got {shown(value)}")


_PLAIN = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def convert(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` to the declared type ``tp`` or raise a UserError naming ``where``.

    Lenient where YAML 1.1 is surprising (``1e-8`` is a string there, ``"16"`` is fine for
    an int); strict where a wrong value would silently change the run (``"sixteen"``, 2.5
    for an int, "maybe" for a bool).
    """
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _convert_union(value, tp, where)
    if origin is tuple:
        return _convert_tuple(value, tp, where)
    plain = _PLAIN.get(tp)
    return plain(value, where) if plain is not None else value


def check_value(info: ParamInfo, value: Any, where: str) -> Any:
    """Convert and check against the declared choices, bounds and length."""
    out = convert(value, info.type, where)
    if info.choices is not None and out is not None and out not in info.choices:
        raise UserError(f"{where}: expected one of {', '.join(map(repr, info.choices))}, "
                        f"got {shown(out)}")
    check_bounds(out, info.bounds, where)
    if info.length is not None and out is not None and len(out) != info.length:
        raise UserError(f"{where}: expected {info.length} elements, got {shown(out)}")
    return out


def validate_instance(obj: Any, source_of) -> None:
    """Type-check a settings object gin built (gin itself checks no types).

    source_of(gin_key) -> str names where the value came from, for the message.
    """
    for info in params_of(type(obj)):
        value = getattr(obj, info.name)
        where = f"{info.gin_key} (set in {source_of(info.gin_key)})"
        checked = check_value(info, value, where)
        if checked != value or type(checked) is not type(value):
            # gin passes literals as parsed: 16 for a float is harmless, "16" for an int is
            # a typo that would otherwise reach torch as a string.
            if not (isinstance(value, int) and not isinstance(value, bool) and info.type is float):
                if not (isinstance(value, list) and isinstance(checked, tuple)):
                    raise UserError(f"{where}: expected {type_name(info.type)}, got {shown(value)}")
