"""The task's episodes, listed and checked once: what the plan stage records and the
dataset builder reads (torch-free, so ``--dry_run`` computes it without heavy imports).

``check_dataset`` lists ``task.dataset_dir`` (any registered format), drops mirrored
episodes when asked, checks every episode's header against the task once (``EpisodeRef.check``)
and returns ``CheckedEpisodes``: the references, their lengths, the frame size of each camera,
and what the run records about its data (summary, fingerprint). Nothing after it lists or
checks the episodes again.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ilstudio.config.settings import DatasetSettings, TaskSettings, images_enabled
from ilstudio.data.episodes import episode_ref, is_mirrored
from ilstudio.data.source import EpisodeRef
from ilstudio.data.sources import scan_episodes
from ilstudio.errors import UserError


@dataclass(frozen=True)
class CheckedEpisodes:
    """Every episode the run reads, checked against the task (lengths in steps)."""

    dataset_dir: str | tuple[str, ...]
    refs: tuple[EpisodeRef, ...]
    lengths: tuple[int, ...]
    found: int  # episodes listed, before mirrored ones were skipped
    skipped: tuple[tuple[str, str], ...]  # entries that are not readable episodes: (name, why)
    cameras: tuple[str, ...]  # the cameras the run reads (none without images)
    frame_sizes: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return int(sum(self.lengths))

    def fingerprint(self) -> dict:
        """What the run trains on: every episode's name, length (steps) and size (bytes).
        Recorded at the start (rundir.DATA_FINGERPRINT); a resume on other data is refused."""
        episodes = [{"episode": str(r), "length": int(n), "bytes": _file_size(r)}
                    for r, n in zip(self.refs, self.lengths, strict=True)]
        return {"episodes": episodes, "timesteps": self.steps}

    def describe(self) -> str:
        where = self.dataset_dir if isinstance(self.dataset_dir, str) else list(self.dataset_dir)
        return f"{len(self.refs)} episodes, {self.steps} steps in {where}"


def _file_size(ref: Any) -> int | None:
    """An episode file's size in bytes; None for a format whose episodes are not one file."""
    try:
        return os.stat(os.fspath(ref)).st_size
    except TypeError:  # not path-like (a LeRobot episode lives in shared files)
        return None


def _check_created(task: TaskSettings, task_name: str) -> None:
    """A task whose data a command creates: name that command when the data is not there."""
    if not (task.data_command and isinstance(task.dataset_dir, str)):
        return
    d = Path(task.dataset_dir).expanduser()
    if not d.is_dir() or not any(d.iterdir()):
        command = task.data_command.replace("{dataset_dir}", task.dataset_dir)
        raise UserError(f"dataset directory {d} {'has no *.hdf5 files' if d.is_dir() else 'does not exist'}"
                        f" (task.dataset_dir). Create the data of task '{task_name}' "
                        f"with:\n  {command}")


def _check_camera_sizes(frame_sizes: dict[str, tuple], cameras: Sequence[str],
                        image_size: Sequence[int] | None) -> None:
    """Cameras of different frame sizes are stacked into one tensor only when fitted to
    dataset.image_size; without it, a UserError naming the sizes (not a stacking error later)."""
    if image_size is not None or len(cameras) < 2:
        return
    sizes = {cam: tuple(frame_sizes[cam]) for cam in cameras if cam in frame_sizes}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"'{c}' {h}x{w}" for c, (h, w) in sizes.items())
        raise UserError(f"cameras have different frame sizes ({listed}); bind dataset.image_size = "
                        f"(H, W) so every camera is fitted to one size")


def check_dataset(task: TaskSettings, settings: DatasetSettings, cache_dir: str | None = None,
                  task_name: str = "") -> CheckedEpisodes:
    """List, filter and check the task's episodes, each once (UserError on the first fault).

    cache_dir: where hub datasets named in task.dataset_dir are cached (model.cache_dir).
    """
    _check_created(task, task_name)
    found, not_episodes = scan_episodes(task.dataset_dir, cache_dir)
    refs = [episode_ref(r) for r in found]
    n_found = len(refs)
    if settings.skip_mirrored_data:
        refs = [r for r in refs if not is_mirrored(r)]
        if not refs:
            raise UserError(f"all {n_found} episodes in {task.dataset_dir} are mirrored and "
                            "dataset.skip_mirrored_data is true: nothing left to train on")
    use_images = images_enabled(task, settings)
    frame_shapes: dict[str, tuple] = {}
    lengths = [r.check(task, use_images, frame_shapes) for r in refs]  # each format its own
    if use_images:
        _check_camera_sizes(frame_shapes, task.camera_names, settings.image_size)
    where = task.dataset_dir if isinstance(task.dataset_dir, str) else tuple(task.dataset_dir)
    return CheckedEpisodes(where, tuple(refs), tuple(int(n) for n in lengths), n_found,
                           tuple(not_episodes), tuple(task.camera_names) if use_images else (),
                           {c: (int(s[0]), int(s[1])) for c, s in frame_shapes.items()})
