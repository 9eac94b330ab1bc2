"""The frequent hyperparameters: declared once, defined as absl flags from here.

Names and meanings are those of ``transformers.TrainingArguments``; where transformers 5
dropped a field the older system documented (``warmup_ratio``, ``logging_dir``) the flag
stays and maps onto what v5 offers, as its doc says. This module must stay cheap to
import: ``train.py --help`` reads it without torch or transformers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from absl import flags, logging

from ilstudio.config.bounds import INT64, Bounds
from ilstudio.config.bounds import check as check_bounds
from ilstudio.errors import UserError, shown


@dataclasses.dataclass(frozen=True)
class Hyper:
    name: str
    type: type
    default: Any
    doc: str
    choices: tuple | None = None
    # Documented by the seed README under "Command-line suitable parameters".
    seed_documented: bool = True
    # Passed straight to TrainingArguments under the same name.
    to_training_args: bool = True
    # Allowed values of a number, in interval notation (ilstudio/config/bounds.py); every
    # numeric hyperparameter has one. None (unset) is always allowed where the default is None.
    bounds: str | None = None
    # A checkpoint's optimizer/engine state means something else under another value: resuming
    # with a changed value is refused (ilstudio/resume.py).
    breaks_resume: bool = False
    # The --helpshort/--helpfull heading it is shown under (one of HELP_GROUP_ORDER), and
    # whether --helpshort shows it.
    group: str = ""
    common: bool = False

    @property
    def allowed(self) -> Bounds | None:
        return _parsed_bounds(self.bounds)

    def check(self, value: Any, where: str) -> None:
        """Finite, within 64 bits, within the declared bounds (flags, YAML and the seed API)."""
        if value is None:
            return
        if self.type is float and not math.isfinite(value):  # absl's float flags accept nan/inf
            raise UserError(f"{where}: {value} is not a finite number; allowed: {self.bounds}")
        if self.type is int and not -INT64 <= value < INT64:
            raise UserError(f"{where}: {shown(value)} does not fit a 64-bit integer; "
                            f"allowed: {self.bounds}")
        check_bounds(value, self.allowed, where)


# train.py's help headings, in the order a reader needs them.
RUN, OPTIM, LOGGING, EVAL, HARDWARE = ("Run and configuration", "Optimisation", "Logging and saving",
                                       "Evaluation during training", "Hardware and data loading")
HELP_GROUP_ORDER = (RUN, OPTIM, LOGGING, EVAL, HARDWARE)

_STRATEGIES = ("no", "steps", "epoch")
_PARSED: dict[str, Bounds] = {}


def _parsed_bounds(text: str | None) -> Bounds | None:
    if text is None:
        return None
    if text not in _PARSED:
        _PARSED[text] = Bounds.parse(text)
    return _PARSED[text]


HYPERPARAMS: tuple[Hyper, ...] = (
    Hyper("output_dir", str, None, "Where checkpoints, the final model and config dumps go "
          "(default: runs/<task_name>).", group=RUN, common=True),
    Hyper("num_train_epochs", float, 3.0, "Epochs to train (ignored when --max_steps > 0).",
          bounds="(0, 1e6]", group=OPTIM),
    Hyper("max_steps", int, -1, "Total optimizer steps; -1 trains for --num_train_epochs.",
          bounds="-1 or [1, inf)", group=OPTIM, common=True),
    Hyper("per_device_train_batch_size", int, 8, "Training batch size per device (per process).",
          bounds="[1, inf)", group=OPTIM, common=True),
    Hyper("per_device_eval_batch_size", int, 8, "Evaluation batch size per device.",
          bounds="[1, inf)", group=EVAL),
    Hyper("learning_rate", float, 1e-4, "Peak learning rate of the optimizer.", bounds="[0, inf)", group=OPTIM, common=True),
    Hyper("weight_decay", float, 0.0, "AdamW weight decay.", bounds="[0, inf)", group=OPTIM),
    Hyper("warmup_steps", float, 0.0, "Linear warmup steps (an integer), or a ratio of total steps "
          "if in [0, 1). Takes precedence over --warmup_ratio.", bounds="[0, inf)", group=OPTIM),
    Hyper("warmup_ratio", float, 0.0, "Warmup as a ratio of total steps. transformers 5 removed "
          "this field: it is passed as TrainingArguments.warmup_steps=<ratio>, its v5 equivalent.",
          to_training_args=False, bounds="[0, 1)", group=OPTIM),
    Hyper("lr_scheduler_type", str, "linear", "Learning-rate schedule (linear, cosine, constant, "
          "constant_with_warmup, ...).", group=OPTIM),
    Hyper("optim", str, "adamw_torch", "Optimizer name as TrainingArguments.optim understands it.",
          breaks_resume=True, group=OPTIM),
    Hyper("adam_beta1", float, 0.9, "AdamW beta1.", bounds="[0, 1)", group=OPTIM),
    Hyper("adam_beta2", float, 0.999, "AdamW beta2.", bounds="[0, 1)", group=OPTIM),
    Hyper("adam_epsilon", float, 1e-8, "AdamW epsilon (0 would divide 0 by 0 for a parameter "
          "with no gradient yet).", bounds="(0, inf)", group=OPTIM),
    Hyper("logging_dir", str, None, "TensorBoard directory (default: <output_dir>/runs). A "
          "relative path is resolved under <output_dir>/runs (./logs: <output_dir>/runs/logs), "
          "so runs never write into the directory they start from; an absolute path is used as "
          "given. transformers 5 removed this field: it is passed as the TENSORBOARD_LOGGING_DIR "
          "environment variable.", to_training_args=False, group=LOGGING),
    Hyper("logging_strategy", str, "steps", "When to log: no, steps or epoch.", _STRATEGIES, group=LOGGING),
    Hyper("logging_steps", float, 50, "Log every N steps (or a ratio of total steps if < 1).",
          bounds="(0, inf)", group=LOGGING, common=True),
    Hyper("report_to", str, "none", "Comma list of integrations to report to (tensorboard, "
          "wandb, ...), 'all' or 'none'.", group=LOGGING, common=True),
    Hyper("save_strategy", str, "steps", "When to save checkpoints: no, steps or epoch.", _STRATEGIES, group=LOGGING),
    Hyper("save_steps", float, 500, "Save a checkpoint every N steps (or a ratio of total steps "
          "if < 1).", bounds="(0, inf)", group=LOGGING, common=True),
    Hyper("save_total_limit", int, None, "Keep at most this many checkpoints (oldest deleted).",
          bounds="[1, inf)", group=LOGGING),
    Hyper("resume_from_checkpoint", str, "false", "true: resume from the newest checkpoint-N in "
          "output_dir if there is one, else start fresh; false: start fresh; or a checkpoint path.",
          to_training_args=False, group=RUN, common=True),
    Hyper("resume_weights_only", bool, False, "Accept resuming from a checkpoint that holds the "
          "model's weights but no optimizer, scheduler or RNG state (saved with save_only_model): "
          "training goes on from the weights and step with a fresh optimizer and schedule, and "
          "the run will not be bit-identical to an uninterrupted one. Without it such a "
          "checkpoint is refused.", seed_documented=False, to_training_args=False, group=RUN),
    Hyper("dataloader_num_workers", int, 0, "DataLoader worker processes.", bounds="[0, inf)", group=HARDWARE),
    Hyper("dataloader_pin_memory", bool, True, "Pin host memory in the DataLoader.", group=HARDWARE),
    Hyper("remove_unused_columns", bool, False, "Drop batch keys the model's forward does not "
          "name. Default false (TrainingArguments says true): policies take their inputs by name.", group=HARDWARE),
    Hyper("do_eval", bool, False, "Hold out episodes and evaluate on them (sets --eval_strategy "
          "to steps unless given).", group=EVAL),
    Hyper("eval_steps", float, None, "Evaluate every N steps (default: --logging_steps).",
          bounds="(0, inf)", group=EVAL),
    Hyper("seed", int, 42, "Random seed for model init, data order and dropout. Fixed on "
          "resume: the checkpoint's RNG state decides the rest of the run.",
          bounds="[0, 4294967295]", breaks_resume=True, group=OPTIM, common=True),
    # Promised by the older system's users and never delivered there.
    Hyper("gradient_accumulation_steps", int, 1, "Batches accumulated per optimizer step.",
          seed_documented=False, bounds="[1, inf)", group=OPTIM),
    Hyper("max_grad_norm", float, 1.0, "Gradient clipping norm (0 disables).", seed_documented=False,
          bounds="[0, inf)", group=OPTIM),
    Hyper("bf16", bool, False, "bfloat16 mixed precision.", seed_documented=False, group=HARDWARE),
    Hyper("fp16", bool, False, "float16 mixed precision (CUDA).", seed_documented=False, group=HARDWARE),
    Hyper("gradient_checkpointing", bool, False, "Trade compute for memory in the backbone.",
          seed_documented=False, group=HARDWARE),
    Hyper("deepspeed", str, None, "Path to a DeepSpeed JSON config.", seed_documented=False,
          breaks_resume=True, group=HARDWARE),
    Hyper("eval_every_steps", int, 0, "Roll the policy out in the task's simulator every N "
          "optimizer steps and at the last one (0: never): success rate and mean return are "
          "logged, <output_dir>/best/ keeps the weights with the highest success rate, "
          "learning_curve.png is redrawn. Tasks without a simulator skip it with a message.",
          seed_documented=False, to_training_args=False, bounds="[0, inf)", group=EVAL, common=True),
    Hyper("eval_episodes", int, 10, "Episodes per --eval_every_steps evaluation (evaluation "
          "seed 1; `python -m ilstudio.eval` reports on seed 0's episodes).",
          seed_documented=False, to_training_args=False, bounds="[1, inf)", group=EVAL),
    Hyper("eval_strategy", str, None, "When to evaluate: no, steps or epoch (default: steps if "
          "--do_eval else no).", _STRATEGIES, seed_documented=False, group=EVAL),
)

HYPER_BY_NAME = {h.name: h for h in HYPERPARAMS}
DEFAULT_TASK = "sim_transfer_cube_scripted"


class _ReadByName:
    """Reads by name as well (``hyper["learning_rate"]``, ``hyper.get(name)``), for code and
    tests written against the older dict form."""

    def __getitem__(self, name: str) -> Any:
        if name not in HYPER_BY_NAME and name != "task_name":
            raise KeyError(name)
        return getattr(self, name)

    def get(self, name: str, default: Any = None) -> Any:
        return getattr(self, name, default)


# The resolved hyperparameters of a run, one typed field per declaration (plus the task),
# built from the declarations above so nothing is listed twice. (The seed API's input class,
# ``ilstudio.config.HyperArguments``, also remembers which fields its caller set.)
Hyperparams = dataclasses.make_dataclass(
    "Hyperparams",
    [("task_name", str, dataclasses.field(default=DEFAULT_TASK))]
    + [(h.name, h.type if h.default is not None else h.type | None,
        dataclasses.field(default=h.default)) for h in HYPERPARAMS],
    bases=(_ReadByName,),
    namespace={"__doc__": "A run's hyperparameters (see HYPERPARAMS), typed, one field each."},
)
Hyperparams.__module__ = __name__


def define_gin_flags(fv: flags.FlagValues, default_files: Sequence[str] = ()) -> None:
    """--gin_file, --gin_bindings and --gin_search_paths with the one meaning they have in
    every program (idempotent per FlagValues)."""
    if "gin_file" in fv:
        return
    default_doc = (f" Default: {', '.join(default_files)}; giving one replaces it (build on it "
                   f"with gin's `include`)." if default_files else "")
    flags.DEFINE_multi_string("gin_file", list(default_files),
                              "Gin files, applied in order after the task's file." + default_doc,
                              flag_values=fv)
    flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings, e.g. 'lora.r = 16'; applied last, "
                              "in order. --gin.NAME=VALUE is short for --gin_bindings='NAME = VALUE'.",
                              flag_values=fv)
    flags.DEFINE_multi_string("gin_search_paths", [], "Extra directories to look up gin files and "
                              "includes in (before the working directory and the installed "
                              "package's gin_configs).", flag_values=fv)


def layer_hyperparams(given: Mapping[str, Any], defaults: Mapping[str, Any], yaml_cfg=None
                      ) -> tuple[dict[str, Any], dict[str, str]]:
    """The one precedence rule for hyperparameters: default < YAML < given.

    given: the values set explicitly (a flag on the command line; for the seed's Python API,
    a HyperArguments field away from its default). defaults: name -> default for every
    name to resolve. yaml_cfg: a TrainingConfig (``.hyper`` values, ``.source`` per key) or
    None. An unset output_dir becomes runs/<task_name>. Returns (values, sources).
    """
    values, sources = {}, {}
    for name, default in defaults.items():
        in_yaml = yaml_cfg is not None and name in yaml_cfg.hyper
        if name in given:
            values[name], sources[name] = given[name], f"flag --{name}"
            if in_yaml:
                logging.info("--%s=%r on the command line overrides %r from %s", name,
                             given[name], yaml_cfg.hyper[name], yaml_cfg.source[name])
        elif in_yaml:
            values[name], sources[name] = yaml_cfg.hyper[name], yaml_cfg.source[name]
        else:
            values[name], sources[name] = default, "default"
    if values.get("output_dir") is None:
        values["output_dir"] = str(Path("runs") / str(values["task_name"]))
        sources["output_dir"] = "default (runs/<task_name>)"
    return values, sources


# TrainingArguments fields the run sets itself, from a flag: passing one through
# --training_arg (or as a pass-through YAML key) would bypass that flag's checks (the
# output_dir guard, resume) or silently beat its value while flags.txt records the flag's.
OWNED_BY_FLAG = {
    **{h.name: h.name for h in HYPERPARAMS},
    "overwrite_output_dir": "overwrite_output_dir",
    "activation_checkpointing": "gradient_checkpointing",  # transformers 5's name for it
    "evaluation_strategy": "eval_strategy",  # transformers' old name
    "local_rank": None,  # set by the launcher (torchrun / accelerate), never by hand
}


def owned_field_message(name: str, where: str, yaml_key: bool = False) -> str | None:
    """Why a TrainingArguments field may not be set directly (None if it may)."""
    if name not in OWNED_BY_FLAG:
        return None
    flag = OWNED_BY_FLAG[name]
    if flag is None:
        return (f"{where}: `{name}` is set by the launcher (torchrun / accelerate launch), "
                f"not by a setting")
    use = f"the `{flag}` key" if yaml_key and flag in HYPER_BY_NAME else f"--{flag}"
    return (f"{where}: `{name}` is set by the run from --{flag}, which checks and records it; "
            f"use {use} instead")

_DEFINE = {str: flags.DEFINE_string, int: flags.DEFINE_integer, float: flags.DEFINE_float,
           bool: flags.DEFINE_bool}

# train.py's run-control flags (not hyperparameters), all under RUN in the help: name -> shown
# by --helpshort. Defined below by define_flags (help_gin by main.py); flagfile is absl's own.
RUN_FLAGS = {"task_name": True, "gin_file": True, "gin_bindings": True, "gin_search_paths": True,
             "flagfile": True, "training_config": True, "yaml_unknown_keys": False,
             "overwrite_output_dir": False, "dry_run": True, "explain": True,
             "training_arg": False, "help_gin": True}


def help_groups() -> tuple[list[tuple[str, list[str]]], list[str]]:
    """train.py's --helpfull headings with their flags, and the flags --helpshort shows: read
    from the declarations (Hyper.group/common, RUN_FLAGS), so a new flag cannot miss them."""
    by_group: dict[str, list[str]] = {g: [] for g in HELP_GROUP_ORDER}
    by_group[RUN] += list(RUN_FLAGS)
    for h in HYPERPARAMS:
        by_group[h.group].append(h.name)
    common = [n for n, shown in RUN_FLAGS.items() if shown] + [h.name for h in HYPERPARAMS if h.common]
    return list(by_group.items()), common


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Define every hyperparameter and run-control flag (idempotent per FlagValues)."""
    if "learning_rate" in flag_values:
        return
    for h in HYPERPARAMS:
        doc = f"{h.doc} Allowed: {h.bounds}." if h.bounds else h.doc
        if h.choices and h.type is str:
            flags.DEFINE_enum(h.name, h.default, list(h.choices), doc, flag_values=flag_values)
        else:
            _DEFINE[h.type](h.name, h.default, doc, flag_values=flag_values)
    flags.DEFINE_string("task_name", DEFAULT_TASK,
                        "Task: gin_configs/tasks/<task_name>.gin binds its data and dims.",
                        flag_values=flag_values)
    define_gin_flags(flag_values, ["gin_configs/default.gin"])
    flags.DEFINE_string("training_config", None, "Older flat YAML training config: stable keys "
                        "become gin bindings, hyperparameter keys flag values.",
                        flag_values=flag_values)
    flags.DEFINE_enum("yaml_unknown_keys", "error", ["error", "warn"], "What an unknown key in "
                      "--training_config does: stop the run, or only warn.", flag_values=flag_values)
    flags.DEFINE_multi_string("training_arg", [], "Any other TrainingArguments field as "
                              "name=value (YAML syntax for the value), e.g. dataloader_drop_last=true.",
                              flag_values=flag_values)
    flags.DEFINE_bool("dry_run", False, "Resolve and validate everything, print the configuration, "
                      "write nothing, train nothing.", flag_values=flag_values)
    flags.DEFINE_bool("explain", False, "Like --dry_run, printing where each value came from.",
                      flag_values=flag_values)
    flags.DEFINE_bool("overwrite_output_dir", False, "Replace an output_dir that holds another run.",
                      flag_values=flag_values)
