"""The one interface every episode format implements, and the registry of formats.

Why: the data layer above (datasets, batched gathering, normalization, language, the
converter, the checks) reads episodes of any format the same way, and asks nothing about
which format it holds. A format provides three things:

* an ``EpisodeRef`` per episode (what the data layer keeps and pickles into DataLoader
  workers): a display name, ``mirrored``, ``check`` (validate against the task; returns the
  episode length) and ``open`` (an ``EpisodeSource``);
* an ``EpisodeSource``: one open episode, read by named fields (state and action rows, qvel
  where present, a camera's frames over a range of steps, the instruction and per-step texts);
* an ``EpisodeFormat`` registered with ``register_format``: how to recognise a dataset
  directory of that format and list its episodes.

HDF5 (``episodes.py``) is the default for a directory no other format claims; LeRobot
(``lerobot_reader.py``) is registered in ``sources.py``. ``ArraysSource`` holds an episode
in memory (the dataset's preload uses it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ilstudio.errors import UserError

STEP_TEXTS = ("subtask", "reasoning")  # the per-step texts a source may hold


@runtime_checkable
class EpisodeSource(Protocol):
    """One open episode. Rows and frames are numpy arrays in the stored dtype; ``stop=None``
    means to the end. Use as a context manager (``close`` releases what ``open`` took)."""

    @property
    def name(self) -> str:
        """The episode as messages name it (a file path, or dataset#episode)."""

    @property
    def steps(self) -> int:
        """Number of steps (rows of state)."""

    @property
    def mirrored(self) -> bool: ...

    @property
    def fps(self) -> float | None: ...

    @property
    def instruction(self) -> str | None:
        """The task instruction, None when the episode has none."""

    def __enter__(self) -> EpisodeSource: ...

    def __exit__(self, *exc: object) -> None: ...

    def close(self) -> None: ...

    def states(self, start: int = 0, stop: int | None = None) -> np.ndarray: ...

    def actions(self, start: int = 0, stop: int | None = None) -> np.ndarray: ...

    def velocities(self) -> np.ndarray | None:
        """qvel rows, None where the format or the episode has none."""

    def cameras(self) -> list[str]: ...

    def frame_size(self, camera: str) -> tuple[int, int]:
        """(H, W) of the camera's frames, from headers."""

    def frames(self, camera: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """uint8 (n, H, W, 3) frames of steps [start, stop)."""

    def frame_blocks(self, camera: str, block: int) -> Iterator[np.ndarray]:
        """Every frame of the camera in order, ``block`` at a time, holding as little as the
        format allows (HDF5 reads one block; a video is decoded whole, then sliced)."""

    def step_texts(self, kind: str, steps: int) -> tuple[str, ...] | None:
        """One string per step for ``kind`` in STEP_TEXTS (``steps`` of them: the episode's
        checked length), None when absent."""

    def check_declared(self) -> None:
        """Stored metadata against its declaration (a UserError naming the episode)."""


@runtime_checkable
class EpisodeRef(Protocol):
    """A reference to one episode: cheap, hashable, picklable."""

    @property
    def name(self) -> str:
        """Short name for messages listing episodes."""

    @property
    def read_as(self) -> str:
        """Added to 'cannot be read' messages (" as HDF5"), or ""."""

    @property
    def mirrored(self) -> bool: ...

    def open(self) -> EpisodeSource: ...

    def check(self, task: Any, need_images: bool, frame_shapes: dict[str, tuple]) -> int:
        """Validate against the task (frame sizes shared across episodes through
        ``frame_shapes``); returns the episode length. UserError naming the episode."""


@dataclass(frozen=True)
class EpisodeFormat:
    """A dataset format: ``claims(dir)`` says a directory is one; ``scan(dir)`` lists its
    episodes and the entries skipped as not episodes ([(name, why)])."""

    name: str
    claims: Callable[[Path], bool]
    scan: Callable[[Path], tuple[list[Any], list[tuple[str, str]]]]


_FORMATS: list[EpisodeFormat] = []


def register_format(fmt: EpisodeFormat) -> None:
    """Add a format (a later registration is asked first; one name is registered once)."""
    _FORMATS[:] = [f for f in _FORMATS if f.name != fmt.name]
    _FORMATS.insert(0, fmt)


def registered_formats() -> list[EpisodeFormat]:
    return list(_FORMATS)


@contextmanager
def read_errors(ref: EpisodeRef) -> Iterator[None]:
    """Turn read failures (OSError) into a UserError naming the episode."""
    try:
        yield
    except OSError as e:
        how = ref.read_as
        raise UserError(f"{ref}: cannot be read{how} (truncated or corrupt?): {e}") from None


def _rows(a: np.ndarray, start: int, stop: int | None) -> np.ndarray:
    return a[start:stop]


@dataclass
class ArraysSource:
    """An episode held in memory (preloaded, or a format whose files are plain arrays)."""

    name: str
    state: np.ndarray
    action: np.ndarray
    images: dict[str, np.ndarray] = field(default_factory=dict)
    velocity: np.ndarray | None = None
    instruction: str | None = None
    fps: float | None = None
    mirrored: bool = False
    texts: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return len(self.state)

    def __enter__(self) -> ArraysSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Nothing to release."""

    def states(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return _rows(self.state, start, stop)

    def actions(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return _rows(self.action, start, stop)

    def velocities(self) -> np.ndarray | None:
        return self.velocity

    def cameras(self) -> list[str]:
        return list(self.images)

    def frame_size(self, camera: str) -> tuple[int, int]:
        return tuple(self.images[camera].shape[1:3])

    def frames(self, camera: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self.images[camera][start:stop]

    def frame_blocks(self, camera: str, block: int) -> Iterator[np.ndarray]:
        frames = self.images[camera]
        for s in range(0, len(frames), block):
            yield frames[s:s + block]

    def step_texts(self, kind: str, steps: int) -> tuple[str, ...] | None:
        return self.texts.get(kind)

    def check_declared(self) -> None:
        """In-memory arrays declare nothing further."""
