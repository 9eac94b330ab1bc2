"""Progress bars for long work before the first training step (loading episodes, fitting
frames, statistics), so a run never sits silent for minutes.

A bar shows only where someone watches: on rank 0 (``RANK`` as torchrun sets it) and when
stderr is a terminal (tqdm's ``disable=None``), so tests, CI logs, ``nohup`` output and the
other ranks of a distributed run stay quiet. ``TQDM_DISABLE=1`` turns every bar off.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def shown() -> bool | None:
    """tqdm's ``disable`` value: True (never) off rank 0, None (only on a terminal) on it."""
    return None if os.environ.get("RANK", "0").strip() in ("", "0") else True


def progress(items: Iterable[T], total: int | None = None, desc: str = "",
             unit: str = "it") -> Iterator[T]:
    """``items`` with a progress bar on stderr where one is shown (see the module doc)."""
    from tqdm import tqdm

    yield from tqdm(items, total=total, desc=desc, unit=unit, disable=shown(), dynamic_ncols=True)
