"""The frequent hyperparameters: declared once, defined as absl flags from here.

Names and meanings are those of ``transformers.TrainingArguments``; where transformers 5
dropped a field the older system documented (``warmup_ratio``, ``logging_dir``) the flag
stays and maps onto what v5 offers, as its doc says. This module must stay cheap to
import: ``train.py --help`` reads it without torch or transformers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from absl import flags


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


_STRATEGIES = ("no", "steps", "epoch")

HYPERPARAMS: tuple[Hyper, ...] = (
    Hyper("output_dir", str, None, "Where checkpoints, the final model and config dumps go "
          "(default: runs/<task_name>)."),
    Hyper("num_train_epochs", float, 3.0, "Epochs to train (ignored when --max_steps > 0)."),
    Hyper("max_steps", int, -1, "Total optimizer steps; -1 trains for --num_train_epochs."),
    Hyper("per_device_train_batch_size", int, 8, "Training batch size per device (per process)."),
    Hyper("per_device_eval_batch_size", int, 8, "Evaluation batch size per device."),
    Hyper("learning_rate", float, 1e-4, "Peak learning rate of the optimizer."),
    Hyper("weight_decay", float, 0.0, "AdamW weight decay."),
    Hyper("warmup_steps", float, 0.0, "Linear warmup steps (an integer), or a ratio of total steps "
          "if in [0, 1). Takes precedence over --warmup_ratio."),
    Hyper("warmup_ratio", float, 0.0, "Warmup as a ratio of total steps. transformers 5 removed "
          "this field: it is passed as TrainingArguments.warmup_steps=<ratio>, its v5 equivalent.",
          to_training_args=False),
    Hyper("lr_scheduler_type", str, "linear", "Learning-rate schedule (linear, cosine, constant, "
          "constant_with_warmup, ...)."),
    Hyper("optim", str, "adamw_torch", "Optimizer name as TrainingArguments.optim understands it."),
    Hyper("adam_beta1", float, 0.9, "AdamW beta1."),
    Hyper("adam_beta2", float, 0.999, "AdamW beta2."),
    Hyper("adam_epsilon", float, 1e-8, "AdamW epsilon."),
    Hyper("logging_dir", str, None, "TensorBoard directory (default: <output_dir>/runs). "
          "transformers 5 removed this field: it is passed as the TENSORBOARD_LOGGING_DIR "
          "environment variable.", to_training_args=False),
    Hyper("logging_strategy", str, "steps", "When to log: no, steps or epoch.", _STRATEGIES),
    Hyper("logging_steps", float, 50, "Log every N steps (or a ratio of total steps if < 1)."),
    Hyper("report_to", str, "none", "Comma list of integrations to report to (tensorboard, "
          "wandb, ...), 'all' or 'none'."),
    Hyper("save_strategy", str, "steps", "When to save checkpoints: no, steps or epoch.", _STRATEGIES),
    Hyper("save_steps", float, 500, "Save a checkpoint every N steps."),
    Hyper("save_total_limit", int, None, "Keep at most this many checkpoints (oldest deleted)."),
    Hyper("resume_from_checkpoint", str, "false", "true: resume from the newest checkpoint-N in "
          "output_dir if there is one, else start fresh; false: start fresh; or a checkpoint path.",
          to_training_args=False),
    Hyper("dataloader_num_workers", int, 0, "DataLoader worker processes."),
    Hyper("dataloader_pin_memory", bool, True, "Pin host memory in the DataLoader."),
    Hyper("remove_unused_columns", bool, False, "Drop batch keys the model's forward does not "
          "name. Default false (TrainingArguments says true): policies take their inputs by name."),
    Hyper("do_eval", bool, False, "Hold out episodes and evaluate on them (sets --eval_strategy "
          "to steps unless given)."),
    Hyper("eval_steps", float, None, "Evaluate every N steps (default: --logging_steps)."),
    Hyper("seed", int, 42, "Random seed for model init, data order and dropout."),
    # Promised by the older system's users and never delivered there.
    Hyper("gradient_accumulation_steps", int, 1, "Batches accumulated per optimizer step.",
          seed_documented=False),
    Hyper("max_grad_norm", float, 1.0, "Gradient clipping norm (0 disables).", seed_documented=False),
    Hyper("bf16", bool, False, "bfloat16 mixed precision.", seed_documented=False),
    Hyper("fp16", bool, False, "float16 mixed precision (CUDA).", seed_documented=False),
    Hyper("gradient_checkpointing", bool, False, "Trade compute for memory in the backbone.",
          seed_documented=False),
    Hyper("deepspeed", str, None, "Path to a DeepSpeed JSON config.", seed_documented=False),
    Hyper("eval_strategy", str, None, "When to evaluate: no, steps or epoch (default: steps if "
          "--do_eval else no).", _STRATEGIES, seed_documented=False),
)

HYPER_BY_NAME = {h.name: h for h in HYPERPARAMS}


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


_DEFINE = {str: flags.DEFINE_string, int: flags.DEFINE_integer, float: flags.DEFINE_float,
           bool: flags.DEFINE_bool}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Define every hyperparameter and run-control flag (idempotent per FlagValues)."""
    if "learning_rate" in flag_values:
        return
    for h in HYPERPARAMS:
        if h.choices and h.type is str:
            flags.DEFINE_enum(h.name, h.default, list(h.choices), h.doc, flag_values=flag_values)
        else:
            _DEFINE[h.type](h.name, h.default, h.doc, flag_values=flag_values)
    flags.DEFINE_string("task_name", "sim_transfer_cube_scripted",
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
