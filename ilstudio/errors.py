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
