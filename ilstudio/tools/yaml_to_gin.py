"""Migrate an older YAML training file: ``python -m ilstudio.tools.yaml_to_gin my.yaml``.

Writes the stable keys as a .gin file (stdout, or ``--output my.gin``) and, next to it,
the hyperparameters as an absl flagfile (``my.flags``): hyperparameters are flags, not gin.
Values are rendered with ``repr`` after type conversion, so the output is gin literals only;
flag values go through the run's own ``flag_line`` (a value a flagfile line cannot hold, such
as one with a line break, is refused: exit code 2, nothing written), and the YAML's path
appears in comments only as an ASCII-escaped literal.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ilstudio.config.dumps import comment, flag_line
from ilstudio.config.yaml_adapter import load_training_config
from ilstudio.errors import UserError, guarded
from ilstudio.rundir import write_atomic


def gin_literal(value) -> str:
    if isinstance(value, tuple):
        value = list(value)
    return repr(value)


def convert(yaml_path: str, unknown_keys: str = "error") -> tuple[str, str]:
    """(gin text, flagfile text) equivalent to the YAML file."""
    cfg = load_training_config(yaml_path, unknown_keys)
    gin_lines = [f"# Converted from {comment(str(yaml_path))} by ilstudio.tools.yaml_to_gin.",
                 "# Stable parameters only; hyperparameters are in the companion flagfile.", ""]
    for key, value in cfg.stable.items():
        gin_lines.append(f"{key} = {gin_literal(value)}")
    flag_lines = [f"# Hyperparameters converted from {comment(str(yaml_path))}: pass "
                  f"--flagfile=<this file>."]
    where = f"{yaml_path}: key"
    for name, value in cfg.hyper.items():
        flag_lines.append(flag_line(name, value, f"{where} {name}"))
    for name, value in cfg.training_args.items():
        flag_lines.append(flag_line("training_arg", f"{name}={json.dumps(value)}", f"{where} {name}"))
    return "\n".join(gin_lines) + "\n", "\n".join(flag_lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("yaml_path")
    parser.add_argument("--output", help="write the .gin here (and <stem>.flags beside it)")
    parser.add_argument("--yaml_unknown_keys", choices=("error", "warn"), default="error")
    args = parser.parse_args(argv)
    return guarded(lambda: _run(args), "yaml_to_gin")


def check_output(out: Path) -> None:
    """--output and its .flags companion can be written as regular files (checked before either
    is written): a directory, a FIFO, a missing or read-only parent is one message, exit 2."""
    for path in (out, out.with_suffix(".flags")):
        if path.exists() and not path.is_file():
            raise UserError(f"--output={out}: {path} exists and is not a regular file")
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            raise UserError(f"--output={out}: the folder {parent} does not exist")
        if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise UserError(f"--output={out}: {path} cannot be written (permission denied)")
    if out.suffix == ".flags":
        raise UserError(f"--output={out}: the gin output would be overwritten by its .flags "
                        f"companion; name it *.gin")


def _run(args: argparse.Namespace) -> int:
    gin_text, flag_text = convert(args.yaml_path, args.yaml_unknown_keys)
    if args.output:
        out = Path(args.output)
        check_output(out)
        write_atomic(out, gin_text)
        write_atomic(out.with_suffix(".flags"), flag_text)
        print(f"wrote {out} and {out.with_suffix('.flags')}")
    else:
        sys.stdout.write(gin_text + "\n" + "".join("# " + line + "\n" for line in flag_text.splitlines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
