"""Gin parsing in layers, remembering where every binding came from.

gin itself keeps the last value of each binding and forgets its source. Users need the
source: to see which of two files won, to know where a bad value was set, and to be told
about bindings nothing used. So each layer is scanned with gin's own parser for its
binding locations, then handed to gin unchanged (gin's errors keep their file and line).
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import gin
from absl import logging
from gin import config_parser

from ilstudio.config.hyperparams import HYPER_BY_NAME
from ilstudio.errors import UserError, closest, read_user_text


def _package_root() -> Path:
    """The installed ``ilstudio`` directory: it holds gin_configs/ and configs/deepspeed/ (in a
    checkout, links to the repository's own), so a wheel installed anywhere finds them."""
    from importlib.resources import files

    return Path(str(files("ilstudio")))


# The last entry of every search path: the configs shipped with the package.
CONFIG_ROOT = _package_root()


def find_shipped(name: str | os.PathLike) -> Path | None:
    """A relative path (``configs/deepspeed/zero2.json``) among the shipped configs, if there."""
    p = CONFIG_ROOT / name
    return p if not Path(name).is_absolute() and p.is_file() else None


@dataclasses.dataclass
class Setting:
    source: str
    value: Any


class Provenance:
    """gin key ("lora.r", "scope/lora.r", or a macro name) -> every value set, in order."""

    def __init__(self) -> None:
        self.history: dict[str, list[Setting]] = {}

    def record(self, key: str, source: str, value: Any) -> None:
        previous = self.history.get(key)
        if previous:
            logging.info("gin %s = %r from %s overrides %r from %s", key, value, source,
                         previous[-1].value, previous[-1].source)
        self.history.setdefault(key, []).append(Setting(source, value))

    def source_of(self, key: str) -> str:
        hist = self.history.get(key)
        return hist[-1].source if hist else "default"

    def overridden(self) -> dict[str, list[Setting]]:
        return {k: v for k, v in self.history.items() if len(v) > 1}


def canonical_key(scope: str, selector: str, arg_name: str) -> str:
    """The short, user-facing key for a binding, whatever module path it was written with."""
    if not arg_name:  # a macro
        return selector
    match = gin.config._REGISTRY.get_match(selector)  # noqa: SLF001 (gin offers no public lookup)
    name = match.name if match else selector
    return f"{scope}/{name}.{arg_name}" if scope else f"{name}.{arg_name}"


def registered_names() -> dict[str, list[str]]:
    """Configurable short name -> its parameter names (for suggestions)."""
    import inspect

    out = {}
    for _, c in gin.config._REGISTRY.items():  # noqa: SLF001
        try:
            out[c.name] = list(inspect.signature(c.wrapped).parameters)
        except (TypeError, ValueError):
            out[c.name] = []
    return out


class SearchPath:
    """Where gin files and their includes are looked up: the user's --gin_search_paths, the
    working directory, then the configs shipped inside the package (CONFIG_ROOT)."""

    def __init__(self, extra: list[str]) -> None:
        self.dirs = [Path(p) for p in extra] + [Path.cwd(), CONFIG_ROOT]
        gin.config.clear_config()
        # gin looks an include up under each prefix in turn, starting with '' (the working
        # directory), and asks its Python-package reader too, which crashes on a directory
        # that imports as a namespace package (gin_configs/ on sys.path). Our directories
        # (the working directory among them) are the whole search path, in our order.
        gin.config._LOCATION_PREFIXES[:] = [str(d) for d in self.dirs]  # noqa: SLF001
        # Files are found on the filesystem only (the installed package's gin_configs is a
        # directory in the search path); gin's Python-package reader would log an error for
        # every directory an include is not in.
        gin.config._FILE_READERS[:] = [r for r in gin.config._FILE_READERS  # noqa: SLF001
                                       if "resource_reader" not in getattr(r[0], "__module__", "")]

    def find(self, name: str) -> Path | None:
        p = Path(name)
        if p.is_absolute():
            return p if p.is_file() else None
        for d in self.dirs:
            if (d / p).is_file():
                return (d / p).resolve()
        return None


_NO_CONFIGURABLE = re.compile(r"No configurable matching '([^']+)'")
_NO_PARAMETER = re.compile(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'")


def _with_suggestion(message: str) -> str:
    names = registered_names()
    m = _NO_CONFIGURABLE.search(message)
    if m:
        hit = closest(m.group(1).split(".")[-1], names)
        if hit:
            return f"{message}\n  Did you mean `{hit[0]}`? Configurables: {', '.join(sorted(names))}"
        return f"{message}\n  Configurables: {', '.join(sorted(names))}"
    m = _NO_PARAMETER.search(message)
    if m:
        short = m.group(1).split(".")[-1]
        params = names.get(short, [])
        hit = closest(m.group(2), params)
        tail = f"  Did you mean `{short}.{hit[0]}`?" if hit else f"  `{short}` has: {', '.join(params)}"
        return f"{message}\n{tail}"
    return message


class GinLayers:
    """Applies gin sources in precedence order and records each binding's source."""

    def __init__(self, search: SearchPath) -> None:
        self.search = search
        self.provenance = Provenance()
        self.files: list[Path] = []

    def _scan(self, text: str, label: str, filename: str | None) -> list[tuple[str, Any, str]]:
        """(key, value, source) for each binding in text; includes are scanned in place."""
        out = []
        try:
            statements = list(config_parser.ConfigParser(text, gin.config.ParserDelegate(skip_unknown=True)))
        except Exception:  # noqa: BLE001 - gin's own parse reports syntax errors with location
            return out
        for st in statements:
            line = st.location.line_num
            where = f"{label}:{line}" if filename else label
            if isinstance(st, config_parser.BindingStatement):
                name = st.arg_name or st.selector
                if name in HYPER_BY_NAME and not self._configurable_has(st.selector, st.arg_name):
                    raise UserError(
                        f"{where}: `{st.location.line_content.strip()}` sets the hyperparameter "
                        f"`{name}` through gin. Hyperparameters are flags: use --{name}=... "
                        f"on the command line (or `{name}:` in --training_config).")
                key = canonical_key(st.scope, st.selector, st.arg_name)
                out.append((key, st.value, where))
            elif isinstance(st, config_parser.IncludeStatement):
                inc = self.search.find(st.filename)
                if inc is not None:
                    out.extend(self._scan(read_user_text(inc, "gin include"), str(inc), str(inc)))
        return out

    @staticmethod
    def _configurable_has(selector: str, arg_name: str) -> bool:
        if not arg_name:
            return False
        match = gin.config._REGISTRY.get_match(selector)  # noqa: SLF001
        return bool(match) and arg_name in registered_names().get(match.name, [])

    def _apply(self, parse, text: str, label: str, filename: str | None) -> None:
        found = self._scan(text, label, filename)
        try:
            parse()
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - anything gin raises here is the user's input
            msg = str(e)
            bad = _not_a_literal(msg, text, label, filename)
            if bad:
                raise UserError(bad) from None
            if filename and filename not in msg:
                msg = f"{label}: {msg}"
            elif not filename:
                msg = f"{label}: {msg}"
            raise UserError(_with_suggestion(msg)) from None
        for key, value, where in found:
            self.provenance.record(key, where, value)

    def add_file(self, name: str, role: str) -> Path:
        path = self.search.find(name)
        if path is None:
            raise UserError(f"{role}: gin file `{name}` not found (looked in: "
                            f"{', '.join(str(d) for d in self.search.dirs)})")
        text = read_user_text(path, "gin file")
        self.files.append(path)
        self._apply(lambda: gin.parse_config_file(str(path)), text, str(path), str(path))
        return path

    def add_binding_text(self, text: str, label: str) -> None:
        self._apply(lambda: gin.parse_config(text), text, label, None)

    def bind_value(self, key: str, value: Any, source: str) -> None:
        """Bind a value programmatically: data, never parsed as gin text."""
        try:
            gin.bind_parameter(key, value)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"{source}: cannot bind {key}: {e}") from None
        self.provenance.record(key, source, value)

    def unused_bindings(self) -> list[tuple[str, str]]:
        """Bound (key, source) pairs that no configurable call used.

        Call after every configurable of the run has been constructed.
        """
        used = set()
        for (scope, selector), params in gin.config._OPERATIVE_CONFIG.items():  # noqa: SLF001
            for arg in params:
                used.add(canonical_key(scope, selector, arg))
        macro_uses = _macro_names_in_operative()
        out = []
        for (scope, selector), params in gin.config._CONFIG.items():  # noqa: SLF001
            for arg in params:
                if selector == "gin.macro":
                    if scope not in macro_uses:
                        out.append((scope, self.provenance.source_of(scope)))
                    continue
                key = canonical_key(scope, selector, arg)
                if key not in used:
                    out.append((key, self.provenance.source_of(key)))
        return out


_BAD_TOKEN = re.compile(r"Failed to parse token '(.*?)' \((?:[^()]*, )?line (\d+)\)")


def _not_a_literal(message: str, text: str, label: str, filename: str | None) -> str | None:
    """A readable message for a value gin cannot read (``lora.r = sixteen``), instead of
    Python's ``malformed node or string ... <ast.Name object at 0x...>``."""
    m = _BAD_TOKEN.search(message)
    if not m or "malformed node" not in message:
        return None
    token, line_no = m.group(1), int(m.group(2))
    lines = text.splitlines()
    line = lines[line_no - 1].strip() if 0 < line_no <= len(lines) else token
    key = line.split("=", 1)[0].strip() if "=" in line else ""
    from ilstudio.config.declare import all_params, type_name

    declared = {p.gin_key: p for p in all_params()}
    short = key.split("/")[-1]
    expected = f"expected {type_name(declared[short].type)}; " if short in declared else ""
    where = f"{label}:{line_no}" if filename else label
    return (f"{where}: `{line}`: {expected}`{token}` is not a value gin can read. Gin values are "
            f"Python literals: numbers (16, 1e-3), True/False, None, lists/tuples, and strings in "
            f"quotes ({key or 'name'} = '{token}' is the string). On a command line, quote the "
            f"whole binding: --gin_bindings=\"{key or 'name'} = '{token}'\"")


def _macro_names_in_operative() -> set[str]:
    text = gin.operative_config_str()
    return set(re.findall(r"%([A-Za-z_][\w.]*)", text))
