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
from ilstudio.errors import UserError, shown
from ilstudio.rundir import ALL_BINDINGS, FLAGFILE, OPERATIVE, TRAINING_ARGS, write_atomic


def _flag_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def unrepresentable(text: str) -> str | None:
    """Why ``text`` cannot be one value of an absl flagfile line (None if it can).

    absl reads a flagfile line by line (``readlines``: '\\n', '\\r') and strips each line;
    ilstudio's own readers (tools/diff, resume) split with ``str.splitlines``. A flagfile has
    no escapes, so a value holding a line break would become a line of its own (a
    ``--gin_file=`` of the value's choosing), and trailing whitespace would be lost: such a
    value is refused, never written.
    """
    if len((text + ".").splitlines()) > 1:
        return "it contains a line break"
    if any(ch.isspace() for ch in text[-1:]):
        return "it ends with whitespace (a flagfile line is stripped when read)"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "it is not valid Unicode (a lone surrogate)"
    return None


def flag_line(name: str, value: Any, source: str | None = None) -> str:
    """``--name=value`` that absl reads back as exactly ``value``; UserError where no such
    line exists (see ``unrepresentable``), naming where the value came from."""
    text = _flag_value(value)
    why = unrepresentable(text)
    if why:
        origin = f" (from {source})" if source else ""
        raise UserError(f"--{name}={shown(text)}{origin}: cannot be written as one line of "
                        f"an absl flagfile ({FLAGFILE}, .flags) ({why}): read back, it would "
                        f"mean something else. Choose a value without line breaks or trailing "
                        f"whitespace.")
    return f"--{name}={text}"


def comment(text: Any) -> str:
    """A value inside a comment line: ASCII escapes, so it can never start a line of its own
    (in a flagfile or a gin file)."""
    return ascii(text)


def flagfile_text(resolved, config_gin: Path) -> str:
    """An absl flagfile that reruns this configuration.

    The gin side is pinned to the run's own config.gin (every binding as parsed, YAML stable
    keys and --gin_bindings included), so a rerun does not depend on files that may have
    changed since.
    """
    lines = [
        "# Rerun this configuration: python train.py --flagfile=<this file> [--output_dir=...]",
        f"# Original gin files: {comment(list(resolved.gin_files)) if resolved.gin_files else 'none'}",
        f"# Original --gin_bindings: {comment(list(resolved.gin_bindings))}",
        f"# Original --training_config: {comment(str(resolved.yaml.path)) if resolved.yaml else 'none'}",
        flag_line("task_name", resolved.task_name),
        flag_line("gin_file", config_gin.resolve(), "--output_dir"),
    ]
    source = resolved.hyper_source
    for h in HYPERPARAMS:
        value = getattr(resolved.hyper, h.name)
        if value is not None:
            lines.append(flag_line(h.name, value, source.get(h.name)))
    for name, value in resolved.training_args_extra.items():
        lines.append(flag_line("training_arg", f"{name}={json.dumps(value)}", source.get(name)))
    return "\n".join(lines) + "\n"


def check_recordable(resolved) -> None:
    """The boundary check for the run's own files: every value can be written to flags.txt
    and read back unchanged (UserError, before anything is written, otherwise)."""
    flagfile_text(resolved, Path(resolved.output_dir) / ALL_BINDINGS)


def config_gin_text(resolved) -> str:
    header = (f"# Every gin binding of this run as parsed (task {comment(resolved.task_name)}, "
              f"files {comment(list(resolved.gin_files))}, YAML stable keys and --gin_bindings "
              f"merged).\n")
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
