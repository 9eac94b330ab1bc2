"""Where a task's episodes come from: ``task.dataset_dir`` entries of any registered format.

``task.dataset_dir`` is one entry or a list; each entry is a directory of a registered
format (LeRobot: it holds ``meta/info.json``), a hub dataset repo id (fetched into
``model.cache_dir`` where the hub is reachable), or else a directory of ACT-layout ``*.hdf5``
episodes (the default format). The result is one list of episode references
(``source.EpisodeRef``) in entry order, which the rest of the data layer treats alike.

This is the one place formats are registered: a new format is a module implementing
``source.EpisodeRef``/``EpisodeSource`` plus one ``register_format`` line here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ilstudio.data.episodes import HDF5Episode, scan_episode_files
from ilstudio.data.lerobot_format import dataset_dirs, is_lerobot_dir, local_dir
from ilstudio.data.source import EpisodeFormat, register_format, registered_formats


def _scan_lerobot(d: Path) -> tuple[list[Any], list[tuple[str, str]]]:
    from ilstudio.data.lerobot_reader import list_lerobot_episodes  # pyarrow/av: only when used

    return list(list_lerobot_episodes(d)), []


def _scan_hdf5(d: Path) -> tuple[list[Any], list[tuple[str, str]]]:
    files, skipped = scan_episode_files(d)
    return [HDF5Episode(f) for f in files], skipped


register_format(EpisodeFormat("lerobot", is_lerobot_dir, _scan_lerobot))
DEFAULT_FORMAT = EpisodeFormat("hdf5", lambda d: True, _scan_hdf5)  # a directory no format claims


def format_of(d: Path) -> EpisodeFormat:
    """The registered format that claims directory d (newest registration first), else HDF5."""
    return next((f for f in registered_formats() if f.claims(d)), DEFAULT_FORMAT)


def scan_episodes(dataset_dir: str | Sequence[str], cache_dir: str | None = None
                  ) -> tuple[list[Any], list[tuple[str, str]]]:
    """(every episode of every entry, [(name, why) for each entry skipped as not an episode]).

    Skipped entries (a dangling or looping episode symlink) were warned about; callers count
    them in data_summary.json.
    """
    refs: list[Any] = []
    skipped: list[tuple[str, str]] = []
    for entry in dataset_dirs(dataset_dir):
        d = local_dir(entry, cache_dir)
        found, not_episodes = format_of(d).scan(d)
        refs += found
        skipped += not_episodes
    return refs, skipped


def list_episodes(dataset_dir: str | Sequence[str], cache_dir: str | None = None) -> list[Any]:
    """Every episode reference of every entry, in entry order."""
    return scan_episodes(dataset_dir, cache_dir)[0]
