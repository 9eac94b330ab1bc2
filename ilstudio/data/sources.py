"""Where a task's episodes come from: ``task.dataset_dir`` entries of either format.

``task.dataset_dir`` is one entry or a list; each entry is a directory of ACT-layout
``*.hdf5`` episodes, a LeRobot dataset directory (it holds ``meta/info.json``), or a hub
dataset repo id (fetched into ``model.cache_dir`` where the hub is reachable). The result is
one list of episode references in entry order, which the rest of the data layer treats alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ilstudio.data.episodes import scan_episode_files
from ilstudio.data.lerobot_format import dataset_dirs, is_lerobot_dir, local_dir


def scan_episodes(dataset_dir: str | Sequence[str], cache_dir: str | None = None
                  ) -> tuple[list[Any], list[tuple[str, str]]]:
    """(every episode of every entry, [(name, why) for each entry skipped as not an episode]).

    Episodes are Paths for HDF5 files and LeRobotEpisode references. Skipped entries (a
    dangling or looping episode symlink) were warned about; callers count them in
    data_summary.json.
    """
    refs: list[Any] = []
    skipped: list[tuple[str, str]] = []
    for entry in dataset_dirs(dataset_dir):
        d = local_dir(entry, cache_dir)
        if is_lerobot_dir(d):
            from ilstudio.data.lerobot_reader import list_lerobot_episodes

            refs += list_lerobot_episodes(d)
        else:
            files, not_files = scan_episode_files(d)
            refs += files
            skipped += not_files
    return refs, skipped


def list_episodes(dataset_dir: str | Sequence[str], cache_dir: str | None = None) -> list[Any]:
    """Every episode of every entry: Paths for HDF5 files, LeRobotEpisode references."""
    return scan_episodes(dataset_dir, cache_dir)[0]
