"""The older flat YAML training files, translated into gin bindings and flag values.

YAML is data: values are converted to the declared type and bound with
``gin.bind_parameter``, never pasted into gin text, so no YAML string can inject a
binding, a reference or an import.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from pathlib import Path
from typing import Any

import yaml

from ilstudio.config import settings as _settings  # noqa: F401  (registers the configurables)
from ilstudio.config.declare import ParamInfo, all_params, check_value, convert
from ilstudio.config.hyperparams import HYPER_BY_NAME, Hyper, owned_field_message
from ilstudio.errors import UserError, closest, read_user_text, shown

# Keys transformers renamed; real files still carry the old name.
RENAMED_KEYS = {"evaluation_strategy": "eval_strategy"}
# Keys real files use for something we have under another name: a better hint than spelling.
SYNONYMS = {
    "vision_backbone_freeze": "freeze_vision_tower",
    "language_model_freeze": "freeze_backbone",
    "wandb_project": "report_to: wandb (wandb reads WANDB_PROJECT from the environment)",
    "wandb_entity": "report_to: wandb (wandb reads WANDB_ENTITY from the environment)",
}
# Run-level flags a YAML file may also set.
RUN_FLAG_KEYS = {"task_name": str}


@dataclasses.dataclass
class TrainingConfig:
    """A loaded YAML file, split by where each value goes."""

    path: str
    stable: dict[str, Any] = dataclasses.field(default_factory=dict)  # gin key -> value
    hyper: dict[str, Any] = dataclasses.field(default_factory=dict)  # flag -> value
    training_args: dict[str, Any] = dataclasses.field(default_factory=dict)  # other TA fields
    source: dict[str, str] = dataclasses.field(default_factory=dict)  # gin key/flag -> "file:line key"
    warnings: list[str] = dataclasses.field(default_factory=list)

    def __getitem__(self, key: str) -> Any:
        """Look a value up by its YAML key, gin key or flag name (the seed's dict-like use)."""
        info = stable_keys().get(key)
        for store, k in ((self.stable, info.gin_key if info else key), (self.hyper, key),
                         (self.training_args, key)):
            if k in store:
                return store[k]
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default


@functools.cache
def stable_keys() -> dict[str, ParamInfo]:
    """YAML key -> declared stable parameter."""
    return {p.yaml_key: p for p in all_params() if p.yaml_key}


@functools.cache
def training_args_fields() -> dict[str, Any]:
    """TrainingArguments field name -> annotated type (imports transformers: only on demand)."""
    from ilstudio.config.lazy_peft import training_arguments_class

    return {f.name: f.type for f in dataclasses.fields(training_arguments_class()) if f.init}


def convert_training_arg(name: str, value: Any, where: str) -> Any:
    """Convert a value for a TrainingArguments field we do not declare ourselves."""
    tp = training_args_fields()[name]
    args = typing.get_args(tp) or (tp,)
    if value is None:
        return None
    for simple in (bool, int, float):
        if simple in args and not (simple is bool and isinstance(value, str) and str in args):
            try:
                return convert(value, simple, where)
            except UserError:
                if len(args) == 1:
                    raise
    takes_number = {bool, int, float} & set(args)
    if isinstance(value, (bool, int, float)) and not takes_number and (
            dict in args or any(typing.get_origin(a) is dict for a in args)):
        # A config-or-path field (accelerator_config, fsdp_config, ...): transformers would
        # open(True), i.e. file descriptor 1, read the run's stdout and close it.
        raise UserError(f"{where}: `{name}` takes a mapping or a JSON file path, got "
                        f"{shown(value)}")
    return value


def convert_hyper(h: Hyper, value: Any, where: str) -> Any:
    if h.type is str and isinstance(value, bool):
        return "true" if value else "false"
    out = convert(value, h.type, where) if value is not None else None
    if h.choices and out is not None and out not in h.choices:
        raise UserError(f"{where}: expected one of {', '.join(h.choices)}, got {shown(out)}")
    h.check(out, where)
    return out


# A training config is a flat mapping of small values. Anything bigger is refused before it is
# constructed: an alias bomb ("billion laughs") composes to a few nodes but expands to
# hundreds of millions of values, which any later repr or conversion would walk.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_VALUES = 10_000


def _expanded_size(node: yaml.Node, where: str, memo: dict[int, int], active: set[int]) -> int:
    """Values the node stands for once every alias is expanded (memoised: linear in nodes)."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in active:
        raise UserError(f"{where}: a YAML alias refers to itself (line "
                        f"{node.start_mark.line + 1}); a training config holds no recursive values")
    active.add(key)
    total = 1
    if isinstance(node, yaml.SequenceNode):
        total += sum(_expanded_size(n, where, memo, active) for n in node.value)
    elif isinstance(node, yaml.MappingNode):
        total += sum(_expanded_size(k, where, memo, active) + _expanded_size(v, where, memo, active)
                     for k, v in node.value)
    active.discard(key)
    memo[key] = total
    if total > MAX_YAML_VALUES:
        raise UserError(f"{where}: YAML value at line {node.start_mark.line + 1} expands to more "
                        f"than {MAX_YAML_VALUES} values (aliases included); a training config "
                        f"holds small values")
    return total


MAX_YAML_DEPTH = 32


class _BoundedLoader(yaml.SafeLoader):
    """The safe loader, stopping as soon as the document is deeper or larger than a training
    config can be (before the rest is even composed: a 20,000-key file is refused at the
    10,001st node, a 3,000-deep nesting at level 33, not by a RecursionError)."""

    def __init__(self, stream: str, where: str) -> None:
        super().__init__(stream)
        self.where, self.nodes, self.depth = where, 0, 0

    def compose_node(self, parent, index):
        self.nodes += 1
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH or self.nodes > MAX_YAML_VALUES:
                what = (f"nests deeper than {MAX_YAML_DEPTH} levels" if self.depth > MAX_YAML_DEPTH
                        else f"holds more than {MAX_YAML_VALUES} values")
                raise UserError(f"{self.where}: the YAML {what} (line "
                                f"{self.peek_event().start_mark.line + 1}); a training config "
                                f"holds small values")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def load_bounded_yaml(text: str, where: str, invalid_as_text: bool = False
                      ) -> tuple[yaml.Node | None, Any]:
    """(composed node, value) of a YAML text with the safe loader, its size bounded.

    Every YAML the configuration reads goes through here (--training_config files and
    --training_arg values): Python tags are refused by the safe loader; depth and node count
    while composing, and the alias-expanded size before anything is constructed.
    invalid_as_text: text that is not valid YAML is returned as the string itself (a
    --training_arg value such as a path with a colon); too large is still an error.
    """
    loader = None
    try:
        loader = _BoundedLoader(text, where)  # refuses unprintable characters already
        node = loader.get_single_node()
        if node is None:
            return None, None
        _expanded_size(node, where, {}, set())
        return node, loader.construct_document(node)
    except yaml.YAMLError as e:
        if invalid_as_text:
            return None, text
        raise UserError(f"{where}: not valid YAML: {e}") from None
    except (ValueError, OverflowError, RecursionError) as e:  # e.g. a 5000-digit integer
        raise UserError(f"{where}: YAML value cannot be read: {e}") from None
    finally:
        if loader is not None:
            loader.dispose()


def _read_mapping(path: Path) -> list[tuple[str, int, Any]]:
    """(key, line, value) for each top-level key; duplicate keys are an error, not 'last wins'."""
    if not path.exists():
        raise UserError(f"--training_config: {path} does not exist")
    text = read_user_text(path, "training config", max_bytes=MAX_YAML_BYTES)
    node, data = load_bounded_yaml(text, str(path))
    if data is None:
        return []
    if not isinstance(data, dict) or not isinstance(node, yaml.MappingNode):
        raise UserError(f"{path}: expected a flat mapping of keys to values, got {type(data).__name__}")
    seen: dict[str, int] = {}
    for key_node, _ in node.value:
        key, line = key_node.value, key_node.start_mark.line + 1
        if key in seen:
            raise UserError(f"{path}:{line}: key `{key}` is given twice (also line {seen[key]})")
        seen[key] = line
    out = [(str(k), seen.get(str(k), 0), v) for k, v in data.items()]
    return out


def _hint(key: str) -> str:
    if key in SYNONYMS:
        return f" (did you mean `{SYNONYMS[key]}`?)"
    gin_only = {p.name: p.gin_key for p in all_params() if p.yaml_key is None}
    if key in gin_only:
        return f" (a gin parameter: bind `{gin_only[key]}` in a .gin file or --gin_bindings)"
    hit = closest(key, valid_keys(), cutoff=0.72)
    return f" (did you mean `{hit[0]}`?)" if hit else ""


def valid_keys() -> list[str]:
    return [*stable_keys(), *HYPER_BY_NAME, *RUN_FLAG_KEYS, *training_args_fields()]


def load_training_config(path: str | Path, unknown_keys: str = "error") -> TrainingConfig:
    """Load and validate a flat YAML training file.

    unknown_keys: "error" reports every unknown key at once and raises; "warn" keeps them
    as warnings in the result.
    """
    path = Path(path)
    cfg = TrainingConfig(path=str(path))
    unknown = []
    targets: dict[str, tuple[str, int, Any]] = {}  # what a key sets -> (the key, line, value)
    for key, line, value in _read_mapping(path):
        key = str(key)
        where = f"{path}:{line}: {key}"
        given = key
        if key in RENAMED_KEYS:
            new = RENAMED_KEYS[key]
            cfg.warnings.append(f"{where}: `{key}` was renamed `{new}` in transformers; read as `{new}`")
            key = new
        target = stable_keys()[key].gin_key if key in stable_keys() else key
        if target in targets:
            # Two spellings of one parameter (eval_strategy / evaluation_strategy): with two
            # values neither may silently win. Real files written across the rename carry
            # both with one value; that is only worth a warning.
            other, other_line, other_value = targets[target]
            if other_value != value or type(other_value) is not type(value):
                raise UserError(f"{path}:{line}: `{given}` sets the same parameter as `{other}` "
                                f"(line {other_line}) to a different value ({shown(value)} vs "
                                f"{shown(other_value)}); give it once")
            cfg.warnings.append(f"{path}:{line}: `{given}` repeats `{other}` (line {other_line}) "
                                f"with the same value; give it once")
            continue
        targets[target] = (given, line, value)
        if key in stable_keys():
            info = stable_keys()[key]
            cfg.stable[info.gin_key] = check_value(info, value, where)
            cfg.source[info.gin_key] = f"YAML {path}:{line} ({key})"
        elif key in HYPER_BY_NAME or key in RUN_FLAG_KEYS:
            h = HYPER_BY_NAME.get(key) or Hyper(key, RUN_FLAG_KEYS[key], None, "")
            cfg.hyper[key] = convert_hyper(h, value, where)
            cfg.source[key] = f"YAML {path}:{line} ({key})"
        elif key in training_args_fields():
            owned = owned_field_message(key, where, yaml_key=True)
            if owned:
                raise UserError(owned)
            cfg.training_args[key] = convert_training_arg(key, value, where)
            cfg.source[key] = f"YAML {path}:{line} ({key})"
        else:
            unknown.append(f"  line {line}: {key}{_hint(key)}")
    if unknown:
        head = (f"{path}: {len(unknown)} unknown key(s): they belong to no documented parameter "
                f"and no TrainingArguments field")
        if unknown_keys == "warn":
            cfg.warnings.append(head + " (ignored because --yaml_unknown_keys=warn):\n" + "\n".join(unknown))
        else:
            raise UserError(head + ":\n" + "\n".join(unknown) + "\nFix or remove them, or pass "
                            "--yaml_unknown_keys=warn to ignore them with a warning.")
    return cfg
