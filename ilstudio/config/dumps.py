"""What a run writes about itself, and how the configuration is printed.

Every file is written atomically (``rundir.write_atomic``), so a killed run never leaves a
config dump that looks complete and is not.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import gin

from ilstudio.config.declare import params_of
from ilstudio.config.hyperparams import HYPERPARAMS
from ilstudio.rundir import ALL_BINDINGS, FLAGFILE, OPERATIVE, TRAINING_ARGS, write_atomic


def _flag_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def flagfile_text(resolved, config_gin: Path) -> str:
    """An absl flagfile that reruns this configuration.

    The gin side is pinned to the run's own config.gin (every binding as parsed, YAML stable
    keys and --gin_bindings included), so a rerun does not depend on files that may have
    changed since.
    """
    lines = [
        "# Rerun this configuration: python train.py --flagfile=<this file> [--output_dir=...]",
        f"# Original gin files: {', '.join(resolved.gin_files) or 'none'}",
        f"# Original --gin_bindings: {resolved.gin_bindings}",
        f"# Original --training_config: {resolved.yaml.path if resolved.yaml else 'none'}",
        f"--task_name={resolved.task_name}",
        f"--gin_file={config_gin.resolve()}",
    ]
    for h in HYPERPARAMS:
        value = getattr(resolved.hyper, h.name)
        if value is not None:
            lines.append(f"--{h.name}={_flag_value(value)}")
    for name, value in resolved.training_args_extra.items():
        lines.append(f"--training_arg={name}={json.dumps(value)}")
    return "\n".join(lines) + "\n"


def config_gin_text(resolved) -> str:
    header = (f"# Every gin binding of this run as parsed (task {resolved.task_name}, files "
              f"{', '.join(resolved.gin_files)}, YAML stable keys and --gin_bindings merged).\n")
    return header + gin.config_str()


def operative_text() -> str:
    return "# The parameters this run actually used, defaults included.\n" + gin.operative_config_str()


def write_run_config(resolved, output_dir: str | os.PathLike, training_args_json: str) -> None:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / ALL_BINDINGS, config_gin_text(resolved))
    write_atomic(out / OPERATIVE, operative_text())
    write_atomic(out / FLAGFILE, flagfile_text(resolved, out / ALL_BINDINGS))
    write_atomic(out / TRAINING_ARGS, training_args_json)


def describe(resolved, explain: bool) -> str:
    """The resolved configuration as text; with ``explain``, each value's source."""

    def row(key: str, value: Any, source: str) -> str:
        text = f"{key} = {value!r}"
        return f"{text:<58} # {source}" if explain else text

    lines = [f"# ilstudio resolved configuration (task: {resolved.task_name})", "",
             "# Hyperparameters (absl flags)"]
    for h in HYPERPARAMS:
        lines.append(row(f"--{h.name}", getattr(resolved.hyper, h.name), resolved.hyper_source[h.name]))
    lines.append(row("--task_name", resolved.task_name, resolved.hyper_source["task_name"]))
    for name, value in resolved.training_args_extra.items():
        lines.append(row(f"--training_arg {name}", value, resolved.hyper_source.get(name, "?")))
    lines += ["", "# Stable parameters (gin)"]
    src = resolved.layers.provenance.source_of
    for obj in (resolved.task, resolved.dataset, resolved.model, resolved.lora,
                resolved.quantization, resolved.policy):
        for info in params_of(type(obj)):
            lines.append(row(info.gin_key, getattr(obj, info.name), src(info.gin_key)))
    if resolved.unused:
        lines += ["", "# WARNING: bindings never used by this run (they have no effect)"]
        lines += [f"#   {key}  (from {source})" for key, source in resolved.unused]
    overridden = resolved.layers.provenance.overridden()
    if overridden and explain:
        lines += ["", "# Values set more than once (last wins)"]
        for key, hist in overridden.items():
            chain = " < ".join(f"{s.value!r} ({s.source})" for s in hist)
            lines.append(f"#   {key}: {chain}")
    return "\n".join(lines) + "\n"
