"""The one exception type for mistakes a user can fix.

Everything raised as ``UserError`` reaches the user as a plain message and exit code 2,
never as a traceback: a traceback tells a researcher that *we* broke, not that a key is
misspelled.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


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
    from pathlib import Path

    path = Path(path)
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
