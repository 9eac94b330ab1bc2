"""Resolved hyperparameters -> a real ``transformers.TrainingArguments``.

This is where the seed's names meet transformers 5: ``warmup_ratio`` becomes the
fractional ``warmup_steps`` v5 understands, ``logging_dir`` becomes the
TENSORBOARD_LOGGING_DIR environment variable, ``do_eval`` implies an eval strategy.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from ilstudio.config.hyperparams import HYPER_BY_NAME, HYPERPARAMS, Hyperparams, layer_hyperparams
from ilstudio.errors import UserError, did_you_mean, shown

# What a policy trainer needs regardless of user input; a user value still wins.
_TRAINER_DEFAULTS = {
    "label_names": ["action"],  # so evaluate() reports eval_loss for our dict-returning models
    "prediction_loss_only": True,
    "ddp_find_unused_parameters": False,
    "save_safetensors": None,  # placeholder, removed below (gone in v5)
}


def parse_resume(value: str | None) -> bool | str:
    """'true'/'false' or a checkpoint path."""
    if value is None:
        return False
    low = str(value).strip().lower()
    if low in {"true", "yes", "1"}:
        return True
    if low in {"false", "no", "0", "", "none"}:
        return False
    return str(value)


def training_args_kwargs(hyper: Hyperparams, extra: dict[str, Any]) -> dict[str, Any]:
    kwargs = {h.name: getattr(hyper, h.name) for h in HYPERPARAMS
              if h.to_training_args and getattr(hyper, h.name) is not None}
    ratio = hyper.warmup_ratio or 0.0  # both in their declared ranges (config/hyperparams.py)
    steps = kwargs.get("warmup_steps", 0.0)
    if steps >= 1:
        if not float(steps).is_integer():
            raise UserError(f"--warmup_steps={steps}: expected a whole number of steps or a ratio < 1")
        kwargs["warmup_steps"] = int(steps)
    elif steps == 0 and ratio > 0:
        kwargs["warmup_steps"] = ratio
    report = str(kwargs.get("report_to", "none"))
    kwargs["report_to"] = report if report in ("none", "all") else [r.strip() for r in report.split(",") if r.strip()]
    check_report_to(kwargs["report_to"])
    if hyper.eval_strategy is None:
        kwargs["eval_strategy"] = "steps" if hyper.do_eval else "no"
    if kwargs["eval_strategy"] == "steps" and hyper.eval_steps is None:
        kwargs["eval_steps"] = hyper.logging_steps
    if kwargs["eval_strategy"] != "no":
        kwargs["do_eval"] = True
    if hyper.deepspeed:
        check_deepspeed_config(hyper.deepspeed)
    for name in ("logging_steps", "save_steps", "eval_steps"):
        v = kwargs.get(name)
        if isinstance(v, float) and v >= 1 and v.is_integer():
            kwargs[name] = int(v)
    for k, v in _TRAINER_DEFAULTS.items():
        kwargs.setdefault(k, v)
    kwargs.pop("save_safetensors", None)
    kwargs.update(extra)
    if "gradient_checkpointing" in kwargs and "activation_checkpointing" in _ta_field_names():
        # transformers 5 renamed it; the flag keeps the name users know.
        kwargs["activation_checkpointing"] = kwargs.pop("gradient_checkpointing")
    return kwargs


# --report_to integrations -> (a module that must be importable, how to install it).
_REPORTERS = {
    "wandb": (("wandb",), "pip install 'ilstudio[wandb]' (or pip install wandb)"),
    "tensorboard": (("tensorboard", "tensorboardX"), "pip install tensorboard"),
}


def check_report_to(report_to: str | list[str]) -> None:
    """An integration whose package is missing is refused at validation, before anything is
    written (transformers would fail only when the Trainer starts)."""
    import importlib.util

    for name in report_to if isinstance(report_to, list) else []:
        modules, how = _REPORTERS.get(name, ((), ""))
        if modules and not any(importlib.util.find_spec(m) for m in modules):
            raise UserError(f"--report_to={','.join(report_to)}: `{name}` needs the {modules[0]} "
                            f"package, which is not installed ({how}); or leave it out "
                            f"(--report_to=none)")


def check_deepspeed_config(path: str) -> None:
    """--deepspeed names an existing file holding a JSON object.

    Checked here (also by --dry_run) because transformers would otherwise fail later with a
    traceback: a JSONDecodeError, or (see require_deepspeed) PackageNotFoundError.
    """
    import json

    where = f"--deepspeed={path}"
    if not Path(path).is_file():
        raise UserError(f"{where}: file not found (expected a DeepSpeed JSON config, e.g. "
                        f"configs/deepspeed/zero2.json)")
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{where}: not a readable JSON file ({e})") from None
    if not isinstance(config, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(config).__name__}")


def require_deepspeed(path: str) -> None:
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise UserError(f"--deepspeed={path}: the deepspeed package is not installed in this "
                        f"environment (pip install deepspeed; it needs CUDA). Without it, leave "
                        f"out --deepspeed.")


def _ta_field_names() -> set[str]:
    from ilstudio.config.ta_schema import field_names

    return field_names()  # read from transformers' source when it is not imported yet (dry run)


def tensorboard_dir(hyper: Hyperparams) -> str:
    """TensorBoard's directory: ``<output_dir>/runs``; a relative ``--logging_dir`` is resolved
    under it (the older YAML's ``logging_dir: ./logs`` is ``<output_dir>/runs/logs``, not
    ``./logs`` in whatever directory the run starts from, and --overwrite_output_dir clears
    it with the run); an absolute one is used as given."""
    from ilstudio import rundir

    runs = os.path.join(hyper.output_dir, rundir.TENSORBOARD_DIR)
    if not hyper.logging_dir:
        return runs
    given = os.path.expanduser(hyper.logging_dir)
    return given if os.path.isabs(given) else os.path.normpath(os.path.join(runs, given))


def build_training_arguments(hyper: Hyperparams, extra: dict[str, Any] | None = None):
    """A TrainingArguments, or a UserError that says which value transformers refused."""
    from ilstudio.config.lazy_peft import training_arguments_class

    TrainingArguments = training_arguments_class(built=True)  # noqa: N806 - without peft/bitsandbytes

    kwargs = training_args_kwargs(hyper, extra or {})
    if kwargs.get("deepspeed"):
        require_deepspeed(kwargs["deepspeed"])
    try:
        return TrainingArguments(**kwargs)
    except (TypeError, ValueError, OverflowError) as e:
        culprit = _culprit(TrainingArguments, kwargs)
        flag = f"--training_arg={culprit}" if culprit in (extra or {}) else f"--{culprit}"
        where = f"{flag}={kwargs[culprit]}: " if culprit else ""
        hint = did_you_mean(str(kwargs[culprit]), _enum_values(TrainingArguments, culprit)) if culprit else ""
        raise UserError(f"{where}TrainingArguments rejected the hyperparameters{hint}: {e}") from None


def _enum_values(cls, name: str) -> list[str]:
    """The allowed values of an enum-typed TrainingArguments field (empty if not an enum)."""
    import enum
    import typing

    tp = {f.name: f.type for f in dataclasses.fields(cls)}.get(name)
    for arg in typing.get_args(tp) or (tp,):
        if isinstance(arg, type) and issubclass(arg, enum.Enum):
            return [str(e.value) for e in arg]
    return []


def _culprit(cls, kwargs: dict[str, Any]) -> str | None:
    """The one argument whose removal makes TrainingArguments accept the rest (None if none).

    transformers' messages often omit the field name ("'' is not a valid SchedulerType");
    users need the flag. Only runs after a failure, so its cost does not matter.
    """
    for name in kwargs:
        if name == "output_dir":
            continue
        rest = {k: v for k, v in kwargs.items() if k != name}
        try:
            cls(**rest)
        except Exception:  # noqa: BLE001, S112 - still failing without it: not the culprit
            continue
        return name
    return None


def check_training_arguments(hyper: Hyperparams, extra: dict[str, Any] | None = None) -> str:
    """--dry_run's check: the real TrainingArguments if transformers is loaded anyway or its
    source cannot be read; else our checks plus the field names and enum values read from the
    installed transformers' source (ilstudio/config/ta_schema.py: no 5 s import). Returns how."""
    from ilstudio.config.ta_schema import check_kwargs, usable_schema

    schema = usable_schema()
    if schema is None:
        build_training_arguments(hyper, extra)
        return "built transformers.TrainingArguments"
    kwargs = training_args_kwargs(hyper, extra or {})
    if kwargs.get("deepspeed"):
        require_deepspeed(kwargs["deepspeed"])
    check_kwargs(kwargs, schema)
    return (f"checked against transformers {schema['version']}'s TrainingArguments fields and "
            f"choices; checks that need torch run when training starts")


def HyperArguments_defaults() -> dict[str, Any]:  # noqa: N802
    return {h.name: h.default for h in HYPERPARAMS}


class ArgumentError(UserError, ValueError):
    """A bad ``HyperArguments`` field: a UserError (one message, exit 2 in a program) that
    Python code can also catch as the ValueError it is."""


_KIND_NAMES = {int: "an integer", float: "a number", bool: "True or False", str: "a string"}


def check_api_value(name: str, value: Any) -> None:
    """One ``HyperArguments`` field against its declaration: the declared type (a string is
    not a number, 'false' is not False, 2.5 is not an integer), None only where the default is
    None, the choices and the declared range. The command line's flags are parsed by absl to
    the same types; this is the same boundary for the Python API."""
    h = HYPER_BY_NAME[name]
    where = f"HyperArguments.{name}"
    if value is None:
        if h.default is not None:
            raise ArgumentError(f"{where} is None, expected {_KIND_NAMES.get(h.type, h.type.__name__)}"
                                f" (the default is {h.default!r}; leave the field out to use it)")
        return
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str)}.get(h.type, lambda v: True)(value)
    if not ok:
        hint = " (write the number, not a string)" if h.type in (int, float) and isinstance(value, str) \
            else " (write True or False, not a string)" if h.type is bool and isinstance(value, str) else ""
        raise ArgumentError(f"{where} is {shown(value)} ({type(value).__name__}), expected "
                            f"{_KIND_NAMES.get(h.type, h.type.__name__)}{hint}")
    if h.choices and value not in h.choices:
        raise ArgumentError(f"{where} is {shown(value)}, expected one of {list(h.choices)}"
                            f"{did_you_mean(str(value), map(str, h.choices))}")
    try:
        h.check(value, where)
    except UserError as e:
        raise ArgumentError(str(e)) from None


def _hyper_arguments_class():
    """The seed's ``HyperArguments`` dataclass, remembering which fields the caller set.

    The command line's rule is "a flag you give beats the YAML, even when it equals the
    built-in default"; the Python API keeps the same rule, so a field passed to the
    constructor (or assigned afterwards) counts as given whatever its value.
    """
    cls = dataclasses.make_dataclass(
        "HyperArguments",
        [(h.name, Any, dataclasses.field(default=h.default)) for h in HYPERPARAMS],
        namespace={"__doc__": "The command-line hyperparameters of the seed's API, with our "
                              "defaults; fields you set beat --training_config's YAML."},
    )
    names = [h.name for h in HYPERPARAMS]
    init = cls.__init__

    def __init__(self, *args, **kwargs):  # noqa: N807
        unknown = [k for k in kwargs if k not in HYPER_BY_NAME]
        if unknown or len(args) > len(names):
            what = f"field {unknown[0]!r}" if unknown else f"{len(args)} positional values"
            raise ArgumentError(f"HyperArguments has no {what}"
                                f"{did_you_mean(unknown[0], names) if unknown else ''}")
        init(self, *args, **kwargs)  # each value passes __setattr__'s check
        object.__setattr__(self, "_given", set(names[:len(args)]) | set(kwargs))

    def __setattr__(self, name, value):  # noqa: N807
        if name in HYPER_BY_NAME:
            check_api_value(name, value)
        object.__setattr__(self, name, value)
        if name in HYPER_BY_NAME and "_given" in self.__dict__:
            self._given.add(name)

    cls.__init__, cls.__setattr__ = __init__, __setattr__
    cls.__module__ = __name__
    return cls


HyperArguments = _hyper_arguments_class()


def given_hyperparameters(hyper_args: Any) -> dict[str, Any]:
    """The values a caller set on ``hyper_args``: every field it was given for our
    HyperArguments; for any other object (an older HyperArguments of the user's own), the
    fields that differ from our defaults, the only sign of intent it carries."""
    if hyper_args is None:
        return {}
    given = getattr(hyper_args, "_given", None)
    if given is not None:
        return {name: getattr(hyper_args, name) for name in given}
    return {h.name: getattr(hyper_args, h.name) for h in HYPERPARAMS
            if hasattr(hyper_args, h.name) and getattr(hyper_args, h.name) != h.default}


def create_training_arguments(path: str | os.PathLike, hyper_args: Any = None):
    """The seed API: YAML file + HyperArguments -> TrainingArguments.

    Precedence is the command line's (``layer_hyperparams``): a field of ``hyper_args`` the
    caller set (even to its default value) counts as given and wins over the YAML value,
    which wins over the default.
    """
    from ilstudio.config.yaml_adapter import load_training_config

    cfg = load_training_config(path)
    defaults = {**HyperArguments_defaults(), "task_name": "default"}
    given = given_hyperparameters(hyper_args)
    hyper, _ = layer_hyperparams(given, defaults, cfg)
    for h in HYPERPARAMS:
        h.check(hyper[h.name], f"{h.name} ({'HyperArguments' if h.name in given else path})")
    return build_training_arguments(Hyperparams(**hyper), cfg.training_args)


assert set(HYPER_BY_NAME) == {h.name for h in HYPERPARAMS}
