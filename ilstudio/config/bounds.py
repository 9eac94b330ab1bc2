"""Declared value ranges of numeric parameters, written as intervals.

Every numeric parameter (a hyperparameter flag or a stable gin parameter) carries one
``bounds`` string beside its declaration, in interval notation a reader checks at a glance:
``"[0, 1)"``, ``"(0, inf)"``, ``"[1, inf)"``, and alternatives joined by ``or``
(``"-1 or [1, inf)"`` for max_steps: -1 or a positive count). Validation checks every value
against it before anything is written, so an out-of-range value fails ``--dry_run`` with the
key and the allowed range instead of crashing inside torch after the run files exist.

Cheap to import (nothing beyond ilstudio.errors): ``train.py --help`` reads it.
"""

from __future__ import annotations

import dataclasses
import math
import re

from ilstudio.errors import UserError, shown

INT64 = 2**63

_INTERVAL = re.compile(r"^\s*([\[(])\s*([^,\s]+)\s*,\s*([^,\s]+)\s*([\])])\s*$")


def _number(text: str) -> float:
    text = text.strip()
    if text in ("inf", "+inf"):
        return math.inf
    if text == "-inf":
        return -math.inf
    return float(int(text)) if re.fullmatch(r"[+-]?\d+", text) else float(text)


@dataclasses.dataclass(frozen=True)
class Interval:
    lo: float
    hi: float
    lo_closed: bool
    hi_closed: bool

    def __contains__(self, value: float) -> bool:
        above = value >= self.lo if self.lo_closed else value > self.lo
        below = value <= self.hi if self.hi_closed else value < self.hi
        return above and below


@dataclasses.dataclass(frozen=True)
class Bounds:
    """A union of intervals and single values, parsed from its written form (kept for messages)."""

    text: str
    intervals: tuple[Interval, ...]
    points: tuple[float, ...]

    @classmethod
    def parse(cls, text: str) -> Bounds:
        intervals, points = [], []
        for part in re.split(r"\s+or\s+", text):
            m = _INTERVAL.match(part)
            if m:
                lo, hi = _number(m.group(2)), _number(m.group(3))
                if lo > hi:
                    raise ValueError(f"bounds {text!r}: {part.strip()} is empty")
                intervals.append(Interval(lo, hi, m.group(1) == "[", m.group(4) == "]"))
            else:
                points.append(_number(part))
        return cls(text.strip(), tuple(intervals), tuple(points))

    def __contains__(self, value: float) -> bool:
        if isinstance(value, float) and math.isnan(value):
            return False
        return value in self.points or any(value in i for i in self.intervals)

    @property
    def lowest(self) -> float:
        return min([i.lo for i in self.intervals] + list(self.points))

    def edges(self) -> list[float]:
        """Every finite endpoint and point: where a property test draws values (at and beside)."""
        out = [p for p in self.points]
        for i in self.intervals:
            out += [x for x in (i.lo, i.hi) if math.isfinite(x)]
        return sorted(set(out))


def parse(text: str | None) -> Bounds | None:
    return None if text is None else Bounds.parse(text)


def out_of_bounds(value: object, bounds: Bounds | None) -> bool:
    """True if a number (or any element of a tuple/list of numbers) lies outside bounds."""
    if bounds is None or value is None or isinstance(value, bool):
        return False
    if isinstance(value, (tuple, list)):
        return any(out_of_bounds(v, bounds) for v in value)
    if isinstance(value, (int, float)):
        return value not in bounds
    return False


def check(value: object, bounds: Bounds | None, where: str) -> None:
    """A number outside its declared range is a UserError naming the key and the range."""
    if out_of_bounds(value, bounds):
        each = " (each element)" if isinstance(value, (tuple, list)) else ""
        raise UserError(f"{where}: {shown(value)} is out of range; allowed{each}: {bounds.text}")
