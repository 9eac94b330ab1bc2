"""The one exception type for mistakes a user can fix.

Everything raised as ``UserError`` reaches the user as a plain message and exit code 2,
never as a traceback: a traceback tells a researcher that *we* broke, not that a key is
misspelled.
"""

from __future__ import annotations

import difflib
import os
import stat
import sys
from collections.abc import Callable, Iterable
from pathlib import Path


class UserError(Exception):
    """A configuration, flag or data mistake: reported as a message, exit code 2."""


def closest(name: str, candidates: Iterable[str], n: int = 1, cutoff: float = 0.6) -> list[str]:
    """Closest valid names to a misspelled one (case-insensitive, separators ignored)."""
    canon = {}
    for c in candidates:
        canon.setdefault(c.lower().replace("-", "_"), c)
    hits = difflib.get_close_matches(str(name).lower().replace("-", "_"), list(canon), n=n, cutoff=cutoff)
    return [canon[h] for h in hits]


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """' (did you mean `x`?)' or '' when nothing is close."""
    hits = closest(name, candidates)
    return f" (did you mean `{hits[0]}`?)" if hits else ""


def shown(value: object, limit: int = 60) -> str:
    """A bounded repr for messages.

    A value read from a file can be arbitrarily large (a YAML alias bomb expands to hundreds
    of millions of elements, an integer can have thousands of digits): a plain ``repr`` in an
    error message would hang the run. Strings, numbers and containers are cut with ``...``.
    """
    import reprlib

    class _Bounded(reprlib.Repr):
        def repr_int(self, x: int, level: int) -> str:
            if x.bit_length() > 128:  # repr() of a huge int is slow, then refused by Python
                return f"<an integer of about {int(x.bit_length() * 0.30103)} digits>"
            return super().repr_int(x, level)

    r = _Bounded()
    r.maxstring, r.maxother, r.maxlong, r.maxlevel = limit, limit, 40, 2
    r.maxlist = r.maxtuple = r.maxdict = r.maxset = r.maxfrozenset = r.maxdeque = r.maxarray = 4
    text = r.repr(value)
    return text if len(text) <= 2 * limit else text[:2 * limit] + "..."


def read_user_text(path, what: str = "file", max_bytes: int | None = None) -> str:
    """The text of a file the user points at (gin, YAML, a run's dumps) as UTF-8.

    A file that is not UTF-8, unreadable, or larger than ``max_bytes`` is a UserError naming
    it, not a UnicodeDecodeError traceback.
    """
    path = Path(path)
    require_regular_file(path, what)
    try:
        if max_bytes is not None and path.stat().st_size > max_bytes:
            raise UserError(f"{path}: {what} is {path.stat().st_size} bytes, more than the "
                            f"{max_bytes} allowed")
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: {what} does not exist") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read {what}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: {what} is not UTF-8 text (byte {data[e.start]:#04x} at "
                        f"offset {e.start}); save it as UTF-8") from None


# -- only regular files are read as configs, locks or data ----------------------------------

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


def not_regular(mode: int) -> str | None:
    """What a file of this ``st_mode`` is, when it is not a regular file (None if it is)."""
    if stat.S_ISREG(mode):
        return None
    return next((what for test, what in _KINDS if test(mode)), "not a regular file")


def require_regular_file(path, what: str = "file") -> None:
    """``path`` (symlinks followed) is a regular file, or a UserError naming it.

    Reading a FIFO blocks until a writer appears and ``/dev/zero`` never ends: a config, lock
    or data file the user names must be refused before anything opens it.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UserError(f"{path}: {what} does not exist") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read {what}: {e.strerror or e}") from None
    kind = not_regular(mode)
    if kind is not None:
        raise UserError(f"{path}: {what} is {kind}, not a regular file; give the path of a file")


# -- every program's entry: user mistakes, Ctrl-C, and bugs ---------------------------------

BUG_REPORT = "the ilstudio issue tracker (attach the traceback file)"
_INTERRUPT_HINTS: list[Callable[[], str | None]] = []


def on_interrupt(hint: Callable[[], str | None]) -> Callable[[], None]:
    """Register what a program adds to the Ctrl-C line (e.g. the last checkpoint and the
    resume command); returns a function that unregisters it. The newest hint that returns
    text is printed."""
    _INTERRUPT_HINTS.append(hint)
    return lambda: _INTERRUPT_HINTS.remove(hint) if hint in _INTERRUPT_HINTS else None


def _interrupt_line() -> str:
    for hint in reversed(_INTERRUPT_HINTS):
        try:
            text = hint()
        except Exception:  # noqa: BLE001 - a hint must never turn Ctrl-C into a traceback
            text = None
        if text:
            return f"interrupted (Ctrl-C): {text}"
    return "interrupted (Ctrl-C)"


def _report_bug(exc: BaseException, program: str) -> str:
    """Write the traceback to a file; the message says it is ilstudio's bug and where it is."""
    import tempfile
    import traceback

    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    where = ""
    try:
        fd, path = tempfile.mkstemp(prefix=f"ilstudio-bug-{program}-", suffix=".txt")
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{program} {' '.join(sys.argv[1:])}\n\n{text}")
        where = f"; the traceback is in {path}"
    except OSError:
        where = "; the traceback follows:\n" + text
    tb = traceback.extract_tb(exc.__traceback__)
    at = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
    return (f"internal error: this is a bug in ilstudio, not a mistake in your input "
            f"({type(exc).__name__}{at}: {shown(str(exc), 200)}){where}. Please report it to "
            f"{BUG_REPORT}.")


def _quiet(_unraisable: object) -> None:
    """An unraisable-exception hook that says nothing (after Ctrl-C, on the way out)."""


def guarded(main: Callable[[], int | None], program: str = "ilstudio") -> int:
    """Run a program's ``main`` with the three endings every ilstudio program shares.

    A UserError is one line and exit code 2; Ctrl-C is one line (plus a registered hint,
    see ``on_interrupt``) and exit code 130; any other exception is a bug in ilstudio: one
    line that says so, the traceback kept in a file, exit code 1. SystemExit passes through.
    """
    try:
        return main() or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"\n{_interrupt_line()}", file=sys.stderr, flush=True)
        sys.unraisablehook = _quiet  # objects torn down mid-step may complain in __del__: noise now
        return 130
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - the one place a traceback becomes a bug report
        from ilstudio import _interrupted

        if _interrupted(e):  # raised while Ctrl-C unwound (an import, a library's cleanup)
            print(f"\n{_interrupt_line()}", file=sys.stderr, flush=True)
            sys.unraisablehook = _quiet
            return 130
        print(f"error: {_report_bug(e, program)}", file=sys.stderr, flush=True)
        return 1
