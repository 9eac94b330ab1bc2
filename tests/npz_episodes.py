"""A third episode format, written the way the data layer asks: one module, one registration.

A directory holding ``*.npz`` files, one per episode, each with arrays ``state`` (T, S),
``action`` (T, A), ``image_<camera>`` (T, H, W, 3) uint8 and optional ``instruction`` (a
string). ``register()`` adds the format; nothing else in ilstudio is edited. Used by
tests/test_episode_source.py, in-process and through a train.py run (``python -c``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ilstudio.data.episodes import check_exact_values
from ilstudio.data.source import ArraysSource, EpisodeFormat, register_format
from ilstudio.errors import UserError

PREFIX = "image_"


@dataclass(frozen=True)
class NpzEpisode:
    path: Path
    read_as: ClassVar[str] = " as npz"

    @property
    def name(self) -> str:
        return self.path.name

    def __str__(self) -> str:
        return str(self.path)

    @property
    def mirrored(self) -> bool:
        return False

    def open(self) -> ArraysSource:
        with np.load(self.path) as z:
            images = {k[len(PREFIX):]: z[k] for k in z.files if k.startswith(PREFIX)}
            text = str(z["instruction"]) if "instruction" in z.files else None
            return ArraysSource(str(self.path), z["state"], z["action"], images, instruction=text)

    def check(self, task: Any, need_images: bool, frame_shapes: dict[str, tuple]) -> int:
        with self.open() as src:
            for what, rows, dim in (("state", src.states(), task.state_dim),
                                    ("action", src.actions(), task.action_dim)):
                if rows.ndim != 2 or rows.shape[1] != dim or len(rows) != src.steps:
                    raise UserError(f"{self.path}: {what} has shape {rows.shape}, expected "
                                    f"({src.steps}, {dim})")
                check_exact_values(f"{self.path}: {what}", rows)
            for cam in task.camera_names if need_images else ():
                if cam not in src.images:
                    raise UserError(f"{self.path}: no camera '{cam}'")
                frame_shapes.setdefault(cam, src.frame_size(cam))
            return src.steps


def scan(d: Path) -> tuple[list[NpzEpisode], list[tuple[str, str]]]:
    return [NpzEpisode(p) for p in sorted(Path(d).glob("*.npz"))], []


def register() -> None:
    register_format(EpisodeFormat("npz", lambda d: any(Path(d).glob("*.npz")), scan))


def write_from_hdf5(src_dir: Path, dst: Path, instruction: str = "pick the cube") -> None:
    """The ACT HDF5 episodes of src_dir as npz episodes in dst (same arrays)."""
    import h5py

    dst.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(sorted(Path(src_dir).glob("*.hdf5"))):
        with h5py.File(p) as f:
            images = {PREFIX + c: f[f"observations/images/{c}"][()] for c in f["observations/images"]}
            np.savez(dst / f"ep{i:03d}.npz", state=f["observations/qpos"][()],
                     action=f["action"][()], instruction=np.array(instruction), **images)
