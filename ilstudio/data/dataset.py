"""Episodes -> (qpos, action chunk, is_pad, images) training samples.

A sample is one timestep t of one episode: the normalized state at t and the next
``chunk_size`` normalized actions (ACT-style action chunking), padded past the episode
end with its last action and flagged in ``is_pad`` so the loss can ignore them.

Two ways to read: ``preload_data`` loads everything once (fast epochs, needs RAM);
otherwise each sample reads just its slices from an episode source (``source.py``: any
format) held open per process.

Memory while frames are fitted up front (``lazy_preprocess = False``): frames are fitted as
they are read, ``FIT_BLOCK`` frames at a time, inside the (parallel) read. Each reading thread
(``read_threads``: at most 8, the CPU count, the episode count) holds at most one block of
full-size uint8 frames of one camera (``EpisodeSource.frame_blocks``: HDF5 reads just that
block), plus ``fit_frames``' float32
copy of it (5 bytes per value in all: 37 MB at 240x320, against 92 MB for a 400-step episode);
a LeRobot video camera is decoded whole, so there the bound is one episode of one camera per
thread. Only fitted frames are kept, so preloading 50 episodes recorded at
240x320 for a 60x80 policy holds 50 episodes of 60x80 frames, not of 240x320 ones.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ilstudio.config.settings import DatasetSettings, TaskSettings, images_enabled
from ilstudio.data.checked import CheckedEpisodes
from ilstudio.data.episodes import check_camera_sizes, check_episodes, episode_ref
from ilstudio.data.image_ops import fit_frames
from ilstudio.data.normalization import NormStats, compute_stats
from ilstudio.data.progress import progress
from ilstudio.data.source import ArraysSource, EpisodeRef, EpisodeSource, read_errors
from ilstudio.data.video import set_cache_mb
from ilstudio.errors import UserError

FIT_BLOCK = 32  # frames read and fitted at once when fitting up front (see the module doc)


def read_threads(n_episodes: int) -> int:
    """Threads that read episodes in parallel (h5py is locked; reading overlaps fitting)."""
    return max(1, min(8, n_episodes, os.cpu_count() or 1))


class EpisodeDataset(Dataset):
    """All (episode, t) pairs of the given episodes, as normalized training samples."""

    def __init__(self, paths: Sequence[str | Path | EpisodeRef], task: TaskSettings, settings: DatasetSettings,
                 chunk_size: int, stats: NormStats,
                 episode_lengths: Sequence[int] | None = None, language: Any = None) -> None:
        """language: a policy's text processor (ilstudio.data.language.LanguageProcessor) or
        None; with one, samples also carry input_ids, attention_mask and labels."""
        self.paths: list[EpisodeRef] = [episode_ref(p) for p in paths]  # any format
        set_cache_mb(settings.video_cache_mb)  # lazily read mp4: decoded episodes per process
        if not self.paths:
            raise UserError("EpisodeDataset needs at least one episode")
        self.task = task
        self.settings = settings
        self.chunk_size = chunk_size
        self.stats = stats
        self.use_images = images_enabled(task, settings)
        self.history = settings.history_images_length
        if episode_lengths is None:  # built directly rather than from checked episodes
            episode_lengths = check_episodes(self.paths, task, self.use_images)
            if self.use_images:
                check_camera_sizes(self.paths[0], task.camera_names, settings.image_size)
        self.episode_lengths = np.asarray(episode_lengths, dtype=np.int64)
        self.episode_starts = np.concatenate([[0], np.cumsum(self.episode_lengths)[:-1]])
        self.episode_index = np.repeat(np.arange(len(self.paths)), self.episode_lengths)
        self._cameras = list(task.camera_names) if self.use_images else []
        self._handles: dict[int, dict[int, EpisodeSource]] = {}  # pid -> episode -> open source
        # Per-frame preprocessing (fitting to dataset.image_size): per sample when
        # lazy_preprocess, else once for every frame as it is read, cached as uint8.
        self.frames_fitted = 0  # frames passed through the fitting so far (observable cost)
        fit_up_front = self.use_images and not settings.lazy_preprocess
        self._preloaded: list[ArraysSource] | None = None
        if settings.preload_data:
            self._preloaded = self._read_all(True, fit_up_front, "loading episodes, frames fitted")
        self._frame_cache: dict[tuple[int, str], np.ndarray] | None = None
        if fit_up_front:
            self._frame_cache = self._cache_fitted_frames()
        self.language = (language.for_episodes(self.paths, self.episode_lengths)
                         if language is not None else None)

    def __len__(self) -> int:
        return int(self.episode_lengths.sum())

    # -- reading ---------------------------------------------------------------------

    def _read_episode(self, ep: int, rows: bool, fit_images: bool) -> ArraysSource:
        """Episode ``ep`` in memory: its cameras' frames (fitted as they are read when
        ``fit_images``: full-size frames are never all held, see the module doc), and its
        state and action rows when ``rows``."""
        ref = self.paths[ep]
        with ref.open() as src, read_errors(ref):
            images = {c: self._read_fitted(src, c) if fit_images else src.frames(c)
                      for c in self._cameras}
            if not rows:
                return ArraysSource(src.name, np.empty((0, 0)), np.empty((0, 0)), images)
            return ArraysSource(src.name, src.states(), src.actions(), images)

    def _read_fitted(self, src: EpisodeSource, camera: str) -> np.ndarray:
        """One camera's frames fitted to dataset.image_size, FIT_BLOCK frames at a time (as
        few full-size frames held as the format allows: ``EpisodeSource.frame_blocks``)."""
        blocks = [fit_frames(np.asarray(b), self.settings.image_size, self.settings.image_aspect_ratio)
                  for b in src.frame_blocks(camera, FIT_BLOCK)]
        return np.concatenate(blocks) if len(blocks) != 1 else blocks[0]

    def _read_all(self, rows: bool, fit_images: bool, what: str) -> list[ArraysSource]:
        """Every episode (see ``_read_episode``), read by ``read_threads`` threads, with a
        progress bar."""
        n, size = len(self.paths), self.settings.image_size
        desc = f"{what} to {size[0]}x{size[1]}" if fit_images and size is not None else what
        with ThreadPoolExecutor(max_workers=read_threads(n)) as pool:
            arrays = list(progress(pool.map(lambda ep: self._read_episode(ep, rows, fit_images),
                                            range(n)), total=n, desc=desc, unit="episode"))
        if fit_images:  # counted here, not in the threads
            self.frames_fitted += int(self.episode_lengths.sum()) * len(self._cameras)
        return arrays

    def _source(self, ep: int) -> EpisodeSource:
        """The episode: preloaded, or this process's own open source.

        Lazy reading holds each episode open (an HDF5 source also holds its datasets: see
        ``episodes.HDF5Source``). Sources are keyed by pid, so a DataLoader worker forked
        after the parent opened files opens its own (HDF5 handles are not fork-safe).
        """
        if self._preloaded is not None:
            return self._preloaded[ep]
        handles = self._handles.setdefault(os.getpid(), {})
        held = handles.get(ep)
        if held is None:
            held = handles[ep] = self.paths[ep].open()
        return held

    def fit(self, frames: np.ndarray) -> np.ndarray:
        """uint8 (n, H, W, 3) -> frames fitted to dataset.image_size by image_aspect_ratio."""
        self.frames_fitted += len(frames)
        return fit_frames(frames, self.settings.image_size, self.settings.image_aspect_ratio)

    def _cache_fitted_frames(self) -> dict[tuple[int, str], np.ndarray]:
        """lazy_preprocess=false: every frame of every episode fitted once, up front (already
        fitted while preloading; else read and fitted now, files not kept open: fork-safe)."""
        if self._preloaded is not None:  # the raw frames were never kept: move the fitted ones
            return {(ep, c): src.images.pop(c) for ep, src in enumerate(self._preloaded)
                    for c in self._cameras}
        fitted = self._read_all(False, True, "fitting frames")
        return {(ep, c): src.images[c] for ep, src in enumerate(fitted) for c in self._cameras}

    # -- batched access (ilstudio/data/batched.py gathers whole batches through these) ----

    @property
    def cameras(self) -> list[str]:
        """The cameras a sample carries, in order (empty without images)."""
        return list(self._cameras)

    def can_gather_batches(self) -> bool:
        """Whether a batch can be gathered from whole-episode arrays: preloaded, no language
        processor, and frames that need no per-sample fitting (fitted up front, or none)."""
        return (self._preloaded is not None and self.language is None
                and (not self.use_images or self._frame_cache is not None
                     or self.settings.image_size is None))

    def preloaded(self, ep: int) -> ArraysSource:
        """Episode ``ep`` as preloaded (its state and action rows); needs preload_data."""
        if self._preloaded is None:
            raise RuntimeError("preloaded episodes need dataset.preload_data")
        return self._preloaded[ep]

    def episode_frames(self, ep: int, camera: str) -> np.ndarray:
        """Every frame of ``camera`` in episode ``ep``, as a sample would see it: fitted
        (cached up front), or the preloaded raw frames when no fitting applies."""
        if self._frame_cache is not None:
            return self._frame_cache[(ep, camera)]
        return self.preloaded(ep).frames(camera)

    def close(self) -> None:
        """Close this process's open files (lazy mode)."""
        for src in self._handles.pop(os.getpid(), {}).values():
            src.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"] = {}  # open sources cannot be pickled (spawn workers reopen)
        return state

    # -- samples ---------------------------------------------------------------------

    def locate(self, i: int) -> tuple[int, int]:
        """(episode, t) of global index i."""
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        ep = int(self.episode_index[i])
        return ep, i - int(self.episode_starts[ep])

    def _action_chunk(self, src: EpisodeSource, ep: int, t: int) -> tuple[np.ndarray, np.ndarray]:
        end = min(t + self.chunk_size, int(self.episode_lengths[ep]))
        actions = np.asarray(src.actions(t, end), dtype=np.float32)
        n = end - t
        if n < self.chunk_size:
            actions = np.concatenate([actions, np.repeat(actions[-1:], self.chunk_size - n, 0)])
        return actions, np.arange(self.chunk_size) >= n

    def _frames(self, src: EpisodeSource, ep: int, t: int) -> torch.Tensor:
        """(cams, 3, H, W), or (cams, history, 3, H, W) when history > 1; floats in [0, 1]."""
        start = max(0, t - self.history + 1)
        per_cam = []
        for cam in self._cameras:
            if self._frame_cache is not None:
                frames = self._frame_cache[(ep, cam)][start:t + 1]
            else:
                frames = self.fit(np.asarray(src.frames(cam, start, t + 1)))  # (n, H, W, 3) uint8
            if len(frames) < self.history:  # before the episode start: repeat frame 0
                pad = np.repeat(frames[:1], self.history - len(frames), 0)
                frames = np.concatenate([pad, frames])
            per_cam.append(frames)
        x = torch.from_numpy(np.stack(per_cam)).permute(0, 1, 4, 2, 3).float().div_(255.0)
        return x[:, 0] if self.history == 1 else x

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ep, t = self.locate(int(i))
        with read_errors(self.paths[ep]):  # a corrupt chunk met mid-training names its file
            return self._sample(ep, t)

    def _sample(self, ep: int, t: int) -> dict[str, torch.Tensor]:
        src = self._source(ep)
        qpos = np.asarray(src.states(t, t + 1)[0], dtype=np.float32)
        actions, is_pad = self._action_chunk(src, ep, t)
        sample = {
            "qpos": torch.from_numpy(self.stats.normalize_qpos(qpos).astype(np.float32)),
            "action": torch.from_numpy(self.stats.normalize_action(actions).astype(np.float32)),
            "is_pad": torch.from_numpy(is_pad),
        }
        if self.use_images:
            sample["images"] = self._frames(src, ep, t)
        if self.language is not None:
            sample.update(self.language(ep, t))
        return sample


# -- building train/val ----------------------------------------------------------------


def split_episodes(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic (train, val) episode indices; val is round(fraction*n), 1..n-1."""
    if n < 2:
        raise UserError(f"evaluation needs at least 2 episodes (one to train on, one held out); "
                        f"the dataset has {n}")
    n_val = min(max(1, round(val_fraction * n)), n - 1)
    perm = np.random.RandomState(seed).permutation(n)
    return sorted(perm[n_val:].tolist()), sorted(perm[:n_val].tolist())


def build_datasets(episodes: CheckedEpisodes, task: TaskSettings, settings: DatasetSettings,
                   chunk_size: int, do_eval: bool, seed: int, language: Any = None
                   ) -> tuple[EpisodeDataset, EpisodeDataset | None, NormStats, dict]:
    """Split the checked episodes (the plan's, or ``check_dataset``'s: listed and checked
    once, never again here); stats come from train episodes only.

    language: the policy's text processor (see EpisodeDataset), or None.
    """
    paths, lengths = list(episodes.refs), list(episodes.lengths)
    if do_eval:
        train_idx, val_idx = split_episodes(len(paths), settings.val_fraction, seed)
    else:
        train_idx, val_idx = list(range(len(paths))), []

    def subset(idx: list[int]) -> tuple[list[EpisodeRef], list[int]]:
        return [paths[i] for i in idx], [lengths[i] for i in idx]

    train_paths, train_lengths = subset(train_idx)
    stats = compute_stats(train_paths)
    train_ds = EpisodeDataset(train_paths, task, settings, chunk_size, stats, train_lengths,
                              language)
    eval_ds = None
    if val_idx:
        val_paths, val_lengths = subset(val_idx)
        eval_ds = EpisodeDataset(val_paths, task, settings, chunk_size, stats, val_lengths,
                                 language)
    summary = {
        "dataset_dir": (episodes.dataset_dir if isinstance(episodes.dataset_dir, str)
                        else list(episodes.dataset_dir)),
        "episodes_found": episodes.found,
        "episodes_mirrored_skipped": episodes.found - len(paths),
        # *.hdf5 entries that are not readable files (dangling/looping symlinks, directories)
        "entries_skipped": len(episodes.skipped),
        "entries_skipped_why": dict(episodes.skipped),
        "episodes_train": len(train_idx),
        "episodes_val": len(val_idx),
        "timesteps_train": len(train_ds),
        "timesteps_val": len(eval_ds) if eval_ds is not None else 0,
        "cameras": list(episodes.cameras),
    }
    return train_ds, eval_ds, stats, summary
