"""Check hyperparameters against TrainingArguments without importing transformers.

``from transformers import TrainingArguments`` costs ~5 s here (it pulls torch, peft and
bitsandbytes): more than everything else ``--dry_run`` does. So the dry run reads what it
needs (the dataclass's field names and the values its enum-typed fields accept) from the
*installed* transformers' own source files with ``ast``, without executing them. That stays
correct on every release pyproject allows, unlike a stored snapshot, which described one
release and sent every other one down the slow path. When the source cannot be read
that way (an unusual install, a zip import, a rewritten module) or transformers is already
imported anyway, the real TrainingArguments is built instead. Checks that need torch (fp16
without CUDA, ...) still run at training start, before anything is written.
``tests/test_startup.py`` compares this schema with the live classes of the installed release.
"""

from __future__ import annotations

import ast
import functools
import sys
from pathlib import Path
from typing import Any

from ilstudio.errors import UserError, did_you_mean

# field -> (module inside the transformers package, enum class) giving its allowed values
ENUM_FIELDS = {
    "lr_scheduler_type": ("trainer_utils", "SchedulerType"),
    "optim": ("training_args", "OptimizerNames"),
    "logging_strategy": ("trainer_utils", "IntervalStrategy"),
    "eval_strategy": ("trainer_utils", "IntervalStrategy"),
    "save_strategy": ("trainer_utils", "SaveStrategy"),
}


def live_schema() -> dict[str, Any]:
    """The installed transformers' schema from its live classes (imports transformers)."""
    import dataclasses
    import importlib

    import transformers

    from ilstudio.config.lazy_peft import training_arguments_class

    TrainingArguments = training_arguments_class()  # noqa: N806 - without peft/bitsandbytes

    fields = sorted(f.name for f in dataclasses.fields(TrainingArguments) if f.init)
    choices = {name: sorted(e.value for e in getattr(
        importlib.import_module(f"transformers.{mod}"), cls))
        for name, (mod, cls) in ENUM_FIELDS.items()}
    return {"version": transformers.__version__, "fields": fields, "choices": choices}


def installed_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers")
    except PackageNotFoundError:
        return None


def _package_dir() -> Path | None:
    """transformers' directory, found without importing the package."""
    import importlib.util

    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.origin or not spec.origin.endswith("__init__.py"):
        return None
    return Path(spec.origin).parent


def _class_body(tree: ast.Module, name: str) -> list[ast.stmt] | None:
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node.body
    return None


def _init_field(stmt: ast.stmt) -> str | None:
    """A dataclass field's name, unless it is declared ``field(init=False)``."""
    if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
        return None
    value = stmt.value
    if isinstance(value, ast.Call):
        for kw in value.keywords:
            if kw.arg == "init" and isinstance(kw.value, ast.Constant) and kw.value.value is False:
                return None
    return stmt.target.id


def _enum_values(body: list[ast.stmt]) -> list[str] | None:
    values = []
    for stmt in body:
        if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Constant):
            if not isinstance(stmt.value.value, str):
                return None  # not the plain string enum this reader understands
            values.append(stmt.value.value)
    return sorted(values) or None


@functools.lru_cache(maxsize=1)
def source_schema() -> dict[str, Any] | None:
    """The installed release's schema read from its source (None: it could not be read)."""
    root = _package_dir()
    if root is None:
        return None
    try:
        trees = {mod: ast.parse((root / f"{mod}.py").read_text(encoding="utf-8"))
                 for mod in {m for m, _ in ENUM_FIELDS.values()} | {"training_args"}}
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None
    body = _class_body(trees["training_args"], "TrainingArguments")
    if body is None:
        return None
    fields = sorted(name for name in map(_init_field, body) if name)
    choices = {}
    for name, (mod, cls) in ENUM_FIELDS.items():
        enum_body = _class_body(trees[mod], cls)
        values = _enum_values(enum_body) if enum_body is not None else None
        if values is None or name not in fields:
            return None
        choices[name] = values
    return {"version": installed_version(), "fields": fields, "choices": choices}


def usable_schema() -> dict[str, Any] | None:
    """The source-read schema, when using it saves importing transformers (None: build the
    real TrainingArguments instead)."""
    return None if "transformers" in sys.modules else source_schema()


def field_names() -> set[str]:
    schema = usable_schema()
    if schema is not None:
        return set(schema["fields"])
    from ilstudio.config.yaml_adapter import training_args_fields

    return set(training_args_fields())


def check_kwargs(kwargs: dict[str, Any], schema: dict[str, Any]) -> None:
    """What TrainingArguments would refuse by name or enum value, as a UserError."""
    fields = set(schema["fields"])
    for name, value in kwargs.items():
        if name not in fields:
            raise UserError(f"`{name}` is not a TrainingArguments field{did_you_mean(name, fields)}")
        allowed = schema["choices"].get(name)
        if allowed is not None and value is not None and str(value) not in allowed:
            raise UserError(f"--{name}={value}: TrainingArguments accepts one of "
                            f"{', '.join(allowed)}{did_you_mean(str(value), allowed)}")
