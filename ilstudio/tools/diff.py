"""What differs between two configurations: two runs, a run and a .gin/.yaml file, or a
run and the configuration about to resume it.

    python -m ilstudio.tools.diff RUN_A RUN_B

Each side is a run directory (its operative_config.gin and flags.txt), a .gin file or a
.yaml training config. Gin text is parsed with gin's own parser into key -> value without
executing anything: `import` lines are skipped and `@references`/`%macros` stay text, so
diffing a file never runs its code. Exit code: 0 same, 1 different, 2 error.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from gin import config_parser

from ilstudio.errors import UserError, guarded, read_user_text
from ilstudio.rundir import FLAGFILE, OPERATIVE

NOT_SET = "(not set)"

@dataclasses.dataclass
class Config:
    """One side of a comparison: gin key -> value text, flag name -> value text."""

    label: str
    gin: dict[str, str] = dataclasses.field(default_factory=dict)
    flags: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Difference:
    kind: str  # "gin" or "flag"
    key: str
    a: str
    b: str

    @property
    def group(self) -> str:
        if self.kind == "flag":
            return "flags"
        return self.key.rsplit("/", 1)[-1].split(".")[0] if "." in self.key else "macros"

    def line(self) -> str:
        name = f"--{self.key}" if self.kind == "flag" else self.key
        return f"{name}: {self.a} -> {self.b}"


class _TextRef:
    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


class _TextDelegate(config_parser.ParserDelegate):
    """References and macros become their text; nothing is looked up or imported."""

    def configurable_reference(self, scoped_name, evaluate):
        return _TextRef(f"@{scoped_name}{'()' if evaluate else ''}")

    def macro(self, macro_name):
        return _TextRef(f"%{macro_name}")


def value_text(value: Any) -> str:
    """A canonical text for a value: tuples and lists print alike (gin writes both)."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(value_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{value_text(k)}: {value_text(v)}" for k, v in value.items()) + "}"
    return repr(value)


def gin_key(scope: str, selector: str, arg_name: str) -> str:
    if not arg_name:
        return f"%{selector}"
    name = selector.split(".")[-1]  # 'ilstudio.lora' and 'lora' are the same configurable
    return f"{scope}/{name}.{arg_name}" if scope else f"{name}.{arg_name}"


def parse_gin_text(text: str, label: str, search: list[Path] | None = None,
                   _seen: frozenset[Path] = frozenset()) -> dict[str, str]:
    """key -> value text for every binding, includes followed (last binding wins)."""
    out: dict[str, str] = {}
    try:
        statements = list(config_parser.ConfigParser(text, _TextDelegate()))
    except (SyntaxError, ValueError) as e:
        raise UserError(f"{label}: cannot parse gin: {e}") from None
    for st in statements:
        if isinstance(st, config_parser.BindingStatement):
            out[gin_key(st.scope, st.selector, st.arg_name)] = value_text(st.value)
        elif isinstance(st, config_parser.IncludeStatement):
            inc = _find_include(st.filename, search or [])
            if inc is None:
                raise UserError(f"{label}:{st.location.line_num}: include `{st.filename}` not found")
            if inc not in _seen:
                out.update(parse_gin_text(read_user_text(inc, "gin include"), str(inc), search, _seen | {inc}))
    return out


def _find_include(name: str, search: list[Path]) -> Path | None:
    from ilstudio.config.gin_layers import CONFIG_ROOT

    p = Path(name)
    if p.is_absolute():
        return p if p.is_file() else None
    for d in [*search, Path.cwd(), CONFIG_ROOT]:
        if (d / p).is_file():
            return (d / p).resolve()
    return None


def parse_flag_lines(text: str) -> dict[str, str]:
    """An absl flagfile as name -> value text (repeated flags joined, comments skipped)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("--"):
            continue
        name, sep, value = line[2:].partition("=")
        if not sep:  # --flag / --noflag boolean forms
            name, value = (name[2:], "false") if name.startswith("no") else (name, "true")
        out.setdefault(name, []).append(value)
    return {k: v[0] if len(v) == 1 else str(v) for k, v in out.items()}


def _flag_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def load(path: str | Path) -> Config:
    """A run directory, a .gin file or a .yaml training config."""
    p = Path(path)
    if p.is_dir():
        op, ff = p / OPERATIVE, p / FLAGFILE
        if not op.is_file() and not ff.is_file():
            raise UserError(f"{p}: not a run directory (no {OPERATIVE} or {FLAGFILE})")
        cfg = Config(str(p))
        if op.is_file():
            cfg.gin = parse_gin_text(read_user_text(op, "gin file"), str(op), [p])
        if ff.is_file():
            cfg.flags = parse_flag_lines(read_user_text(ff, "flagfile"))
            if cfg.flags.get("gin_file", "").endswith("/config.gin"):
                cfg.flags.pop("gin_file")  # the run's own config.gin: differs for every run
        return cfg
    if not p.is_file():
        raise UserError(f"{p}: no such run directory or file")
    if p.suffix == ".gin":
        return with_defaults(Config(str(p), gin=parse_gin_text(read_user_text(p, "gin file"), str(p), [p.parent])))
    if p.suffix in (".yaml", ".yml"):
        from ilstudio.config.yaml_adapter import load_training_config

        tc = load_training_config(p, "warn")
        cfg = Config(str(p), gin={k: value_text(v) for k, v in tc.stable.items()})
        cfg.flags = {k: _flag_text(v) for k, v in tc.hyper.items() if v is not None}
        cfg.flags.update({f"training_arg={k}": _flag_text(v) for k, v in tc.training_args.items()})
        return with_defaults(cfg)
    raise UserError(f"{p}: expected a run directory, a .gin file or a .yaml file")


def with_defaults(cfg: Config) -> Config:
    """Fill what a file leaves unset with the declared defaults, as a run would use them.

    A run directory's operative config lists every value used; a .gin or .yaml file only
    what it sets. Without defaults, comparing the two would list every unset parameter.
    Covered: the core configurables, the policy that model.policy names, any configurable
    the file mentions, and every hyperparameter flag.
    """
    from ilstudio.config.declare import CONFIGURABLES, params_of
    from ilstudio.config.hyperparams import HYPERPARAMS
    from ilstudio.policies import import_all_configurations

    import_all_configurations()
    policy = cfg.gin.get("model.policy", "'mlp'").strip("'\"")
    wanted = {"task", "dataset", "model", "lora", "quantization", policy}
    wanted |= {k.rsplit("/", 1)[-1].split(".")[0] for k in cfg.gin}
    gin_defaults = {info.gin_key: value_text(info.default) for name, cls in CONFIGURABLES.items()
                    if name in wanted for info in params_of(cls)}
    flag_defaults = {h.name: _flag_text(h.default) for h in HYPERPARAMS if h.default is not None}
    flag_defaults["task_name"] = "sim_transfer_cube_scripted"
    return Config(cfg.label, gin={**gin_defaults, **cfg.gin}, flags={**flag_defaults, **cfg.flags})


def _same_flag(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return float(a) == float(b)  # '8' and '8.0', '1e-4' and '0.0001'
    except ValueError:
        return False


def compare(a: Config, b: Config) -> list[Difference]:
    out = []
    for key in sorted(a.gin.keys() | b.gin.keys()):
        va, vb = a.gin.get(key, NOT_SET), b.gin.get(key, NOT_SET)
        if va != vb:
            out.append(Difference("gin", key, va, vb))
    for key in sorted(a.flags.keys() | b.flags.keys()):
        va, vb = a.flags.get(key, NOT_SET), b.flags.get(key, NOT_SET)
        if not _same_flag(va, vb):
            out.append(Difference("flag", key, va, vb))
    return out


def report(a: Config, b: Config, diffs: list[Difference]) -> str:
    lines = [f"# A: {a.label}", f"# B: {b.label}"]
    if not diffs:
        return "\n".join([*lines, "no differences"]) + "\n"
    groups: dict[str, list[Difference]] = {}
    for d in diffs:
        groups.setdefault(d.group, []).append(d)
    for group in sorted(groups, key=lambda g: (g == "flags", g)):
        lines.append(f"[{group}]")
        lines += [f"  {d.line()}" for d in groups[group]]
    lines.append(f"{len(diffs)} difference(s)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip().split("\n\n")[1], file=sys.stderr)
        print("usage: python -m ilstudio.tools.diff RUN_A RUN_B", file=sys.stderr)
        return 2

    def run() -> int:
        a, b = load(argv[0]), load(argv[1])
        diffs = compare(a, b)
        print(report(a, b, diffs), end="")
        return 1 if diffs else 0

    return guarded(run, "diff")


if __name__ == "__main__":
    sys.exit(main())
