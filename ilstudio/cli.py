"""What every ilstudio program shares on its command line.

``train.py``, ``ilstudio.sim.record``, ``ilstudio.eval`` and ``ilstudio.sim.quickstart`` are
absl programs with one meaning for the flags they share: ``--gin_file`` (repeatable; the
files applied in order, after the task's own file), ``--gin_bindings`` (applied last, in
order), ``--gin_search_paths``, ``--flagfile``, ``--helpshort``/``--helpfull``, and t5x's
``--gin.NAME=VALUE`` shorthand for one binding. User mistakes end with one message and exit
code 2, never a traceback. Importing this module is cheap (absl only).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from absl import flags

from ilstudio.config.hyperparams import define_gin_flags
from ilstudio.errors import UserError, guarded, read_user_text, require_regular_file

__all__ = ["check_flagfiles", "define_gin_flags", "expand_gin_shorthand", "fail", "guarded",
           "parse_command_line", "run_program", "stable_parameter_hint"]

GIN_SHORTHAND = "--gin."


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def expand_gin_shorthand(argv: Sequence[str]) -> list[str]:
    """t5x's ``--gin.lora.r=16`` (or ``--gin.lora.r 16``) -> ``--gin_bindings=lora.r = 16``."""
    out, args = [], list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith(GIN_SHORTHAND):
            name, sep, value = arg[len(GIN_SHORTHAND):].partition("=")
            if not sep:
                if i + 1 >= len(args):
                    raise UserError(f"{arg}: expected {GIN_SHORTHAND}NAME=VALUE, e.g. --gin.lora.r=16")
                i += 1
                value = args[i]
            if not name:
                raise UserError(f"{arg}: expected {GIN_SHORTHAND}NAME=VALUE, e.g. --gin.lora.r=16")
            arg = f"--gin_bindings={name} = {value}"
        out.append(arg)
        i += 1
    return out


_MAX_FLAGFILE_BYTES = 1 << 20
_MAX_FLAGFILE_DEPTH = 10


def _flagfile_names(args: Sequence[str]) -> list[str]:
    names, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg in ("--flagfile", "-flagfile") and i + 1 < len(args):
            names.append(args[i + 1])
            i += 1
        elif arg.startswith(("--flagfile=", "-flagfile=")):
            names.append(arg.split("=", 1)[1])
        i += 1
    return names


def check_flagfiles(argv: Sequence[str], depth: int = 0) -> None:
    """Every ``--flagfile`` (and those it names in turn) is a regular UTF-8 file of at most
    1 MiB, checked before absl opens it: a FIFO would hang the parse, ``/dev/zero`` never end.
    """
    if depth > _MAX_FLAGFILE_DEPTH:
        raise UserError(f"--flagfile: flagfiles nest more than {_MAX_FLAGFILE_DEPTH} deep "
                        f"(one includes itself?)")
    for name in _flagfile_names(argv):
        require_regular_file(name, "--flagfile")
        text = read_user_text(name, "--flagfile", max_bytes=_MAX_FLAGFILE_BYTES)
        check_flagfiles([line.strip() for line in text.splitlines()], depth + 1)


def check_duplicate_flags(argv: Sequence[str], fv: flags.FlagValues) -> None:
    """A flag that takes one value, given twice on the command line with different values:
    absl keeps the last one, and so do we (scripts append overrides to a list of defaults, as
    the quickstart does), but never silently: a warning names both. Repeatable flags
    (--gin_file, --gin_bindings, --training_arg) and a flagfile's values overridden on the
    command line (``--flagfile=RUN/flags.txt --seed=2``, the documented rerun) are not
    duplicates."""
    seen: dict[str, tuple[str, str]] = {}
    for arg in argv:
        if not arg.startswith("--") or arg == "--":
            continue
        name, sep, value = arg[2:].partition("=")
        if not sep and name.startswith("no") and name[2:] in fv and fv[name[2:]].boolean:
            name, value = name[2:], "false"
        elif not sep and name in fv and fv[name].boolean:
            value = "true"
        if name not in fv or name == "flagfile" or isinstance(fv[name], flags.MultiFlag):
            continue
        if name in seen and seen[name][0] != value.strip().lower():
            print(f"warning: --{name} is given twice, as {seen[name][1]!r} and {arg!r}; the "
                  f"last one is used", file=sys.stderr)
        seen[name] = (value.strip().lower(), arg)


def _binding_value(raw: str | None) -> str:
    """How a value is written in a gin binding: numbers and booleans bare, text quoted."""
    if raw is None:
        return "True"
    low = raw.strip().lower()
    if low in {"true", "false"}:
        return low.capitalize()
    try:
        float(raw)
        return raw.strip()
    except ValueError:
        return repr(raw)


def stable_parameter_hint(argv: Sequence[str], fv: flags.FlagValues) -> None:
    """``--lora_r=16``: the older system's flag names for stable parameters are not flags.

    Raises a UserError that says which gin binding (or YAML key) to use instead, before absl
    reports an unknown flag with a less helpful suggestion.
    """
    from ilstudio.config.yaml_adapter import stable_keys

    keys = stable_keys()
    by_gin = {p.gin_key: p for p in keys.values()}
    for i, arg in enumerate(argv):
        if not arg.startswith("--") or arg == "--":
            continue
        name, sep, value = arg[2:].partition("=")
        if name in fv:
            continue
        info = keys.get(name) or by_gin.get(name)
        if info is None and name.startswith("no") and (keys.get(name[2:]) or by_gin.get(name[2:])):
            info, value, sep = keys.get(name[2:]) or by_gin.get(name[2:]), "false", "="
        if info is None:
            continue
        if not sep and i + 1 < len(argv) and not argv[i + 1].startswith("--") and info.type is not bool:
            value = argv[i + 1]
        shown = _binding_value(value if sep or value else None)
        q = '"' if "'" in shown else "'"
        raise UserError(f"--{name}: {info.yaml_key} is a stable parameter, not a flag: use "
                        f"--gin_bindings={q}{info.gin_key}={shown}{q} (or --gin.{info.gin_key}={q}"
                        f"{shown}{q}), or `{info.yaml_key}: ...` in a --training_config YAML")


def parse_command_line(fv: flags.FlagValues, argv: Sequence[str], *,
                       positional_ok: bool = False) -> list[str]:
    """Parse ``argv`` (program name first) into ``fv``, the way every ilstudio program does.

    Help flags print and exit 0; a flag mistake exits 2 with one message. Returns absl's
    leftover arguments (the program name first).
    """
    try:
        argv = [argv[0], *expand_gin_shorthand(argv[1:])]
        check_flagfiles(argv[1:])
        check_duplicate_flags(argv[1:], fv)
        stable_parameter_hint(argv[1:], fv)
    except UserError as e:
        fail(str(e))
    try:
        rest = fv(argv)
    except flags.Error as e:
        fail(f"{e}\nRun with --helpfull to list every flag.")
    if len(rest) > 1 and not positional_ok:
        fail(f"unexpected positional arguments {rest[1:]}: every setting is a --flag "
             f"(for example --gin_bindings='lora.r = 16')")
    return rest


def flag_help(fv: flags.FlagValues, name: str) -> str:
    """One flag's help entry: its name, doc and default, absl style."""
    flag = fv[name]
    shown = f"--[no]{name}" if flag.boolean else f"--{name}"
    default = flag.default_as_str if flag.default is not None else "None"
    return f"  {shown}: {flag.help}\n    (default: {default})"


def program_help(fv: flags.FlagValues, doc: str, groups: Sequence[tuple[str, Sequence[str]]],
                 full: bool, short: Sequence[str] | None = None) -> str:
    """--helpshort: the program's doc and its common flags, grouped by topic; --helpfull: every
    flag, the same groups first.

    groups: (heading, flag names) in the order a reader needs them. short: the common flags
    --helpshort shows (default: every flag named in groups).
    """
    shown: set[str] = set()
    parts = [doc.strip(), ""]
    for heading, names in groups:
        names = [n for n in names if n not in shown and (full or short is None or n in short)]
        entries = [flag_help(fv, n) if n in fv else FLAGFILE_HELP for n in names
                   if n in fv or n == "flagfile"]
        if entries:
            parts += [f"{heading}:", *entries, ""]
            shown.update(names)
    rest = sorted(n for n in fv if n not in shown and fv[n].name == n and n not in HELP_FLAGS)
    if full:
        if rest:
            parts.append("Other flags:")
            parts += [flag_help(fv, n) for n in rest]
    else:
        parts.append("Every flag, with its documentation: --helpfull.")
    return "\n".join(parts).rstrip() + "\n"


HELP_FLAGS = ("help", "helpshort", "helpfull", "help_gin", "helpxml", "?")
FLAGFILE_HELP = ("  --flagfile: Read flags from a file, one --flag=value per line (train.py writes "
                 "one as RUN/flags.txt).\n    (repeatable)")
SHARED_FLAG_GROUP = ("Configuration (the same in every ilstudio program)",
                     ["gin_file", "gin_bindings", "gin_search_paths", "flagfile"])


def run_program(fv: flags.FlagValues, main: Callable[[list[str]], int | None], argv: Sequence[str] | None,
                doc: str, groups: Sequence[tuple[str, Sequence[str]]], *,
                known_only: bool = False) -> int:
    """Parse, answer --help/--helpshort/--helpfull, run ``main``; UserError -> exit code 2.

    For programs with their own FlagValues (record, eval, quickstart), which tests also call
    in-process. ``main(rest)`` gets the arguments left over: with known_only, the flags this
    program does not define (the quickstart hands them to train.py); otherwise none.
    """
    argv = list(sys.argv if argv is None else ["prog", *argv])
    for name in ("helpshort", "helpfull"):
        if name not in fv:
            flags.DEFINE_bool(name, False, "Show the common flags" if name == "helpshort"
                              else "Show every flag, with its documentation.", flag_values=fv)
    if "help" not in fv:
        flags.DEFINE_bool("help", False, "Same as --helpshort.", flag_values=fv, short_name="?")
    asked = next((a for a in argv[1:] if a in ("--help", "--helpshort", "--helpfull", "-h", "-?")), None)
    if asked:
        short = [*groups[0][1], *SHARED_FLAG_GROUP[1]]  # the first group is the common one
        print(program_help(fv, doc, [*groups, SHARED_FLAG_GROUP], asked == "--helpfull", short), end="")
        return 0
    fv.unparse_flags()

    def parse_and_run() -> int | None:
        try:
            if known_only:
                check_flagfiles(argv[1:])
                rest = fv([argv[0], *expand_gin_shorthand(argv[1:])], known_only=True)[1:]
            else:
                parse_command_line(fv, argv)
                rest = []
            return main(rest)
        except flags.Error as e:
            raise UserError(f"{e}\nRun with --helpfull to list every flag.") from None

    try:
        return guarded(parse_and_run, Path(argv[0]).name)
    except SystemExit as e:  # parse_command_line's fail()
        return int(e.code or 0)


def gin_help() -> str:
    """--help_gin: every configurable's parameters with type, default and doc, from the
    declarations (the same source as README's tables and the YAML adapter)."""
    from ilstudio.config import settings as _settings  # noqa: F401  (registers task.* ... sim.*)
    from ilstudio.config.declare import CONFIGURABLES, params_of, type_name
    from ilstudio.policies import import_all_configurations

    import_all_configurations()
    parts = ["Gin parameters: bind them in a .gin file, with --gin_bindings='NAME = VALUE' or "
             "--gin.NAME=VALUE. Values are Python literals: 16, 1e-3, True, None, 'text', (1, 2).", ""]
    for name, cls in CONFIGURABLES.items():
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        parts.append(f"{name}.*  ({cls.doc_group}) {doc}")
        for p in params_of(cls):
            yaml = f"; YAML {p.yaml_key}" if p.yaml_key else ""
            choices = f"; one of {', '.join(map(repr, p.choices))}" if p.choices else ""
            length = f"; {p.length} values" if p.length else ""
            each = " each" if p.length else ""
            allowed = f"; in {p.bounds.text}{each}" if p.bounds else ""
            parts.append(f"  {p.gin_key} = {p.default!r}  "
                         f"({type_name(p.type)}{yaml}{choices}{length}{allowed})")
            parts.append(f"      {p.doc}")
        parts.append("")
    return "\n".join(parts)
