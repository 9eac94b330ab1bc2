"""One vectorised gather per batch instead of ``batch_size`` calls to ``__getitem__``.

Profiling train.py against a plain loop (bench/overhead.py) showed the per-sample path
(locate, slice, normalise, three tensor conversions, image stack and float conversion, then
``default_data_collator`` stacking it all again) costing as much as the MLP's whole step.
With the data preloaded, a batch is a handful of numpy fancy-indexing operations.

``batched(ds)`` wraps an ``EpisodeDataset`` whose samples can be gathered this way
(preloaded, frames fitted up front or not at all, no language processor); the DataLoader then calls
``__getitems__`` (torch's batched-fetch protocol) and ``collate`` passes the ready batch
through. Anything else is returned unchanged and fetched sample by sample. The samples
are the same tensors, bit for bit (tests/test_batched_data.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset


class Batch(dict):
    """A batch already collated by ``__getitems__`` (``collate`` passes it through)."""


def collate(features: Any) -> dict[str, torch.Tensor]:
    """``default_data_collator``, except that a ready ``Batch`` passes through untouched."""
    if isinstance(features, Batch):
        return dict(features)
    from transformers import default_data_collator

    return default_data_collator(features)


def can_batch(ds: Any) -> bool:
    """Whether ``ds`` offers whole-batch gathering (``EpisodeDataset.can_gather_batches``)."""
    gather = getattr(ds, "can_gather_batches", None)
    return callable(gather) and gather()


def batched(ds: Any) -> Any:
    """``ds`` wrapped for batched fetching when possible, else ``ds`` itself."""
    return BatchedEpisodes(ds) if ds is not None and can_batch(ds) else ds


class BatchedEpisodes(Dataset):
    """An EpisodeDataset view with ``__getitems__``; every other attribute is the dataset's."""

    def __init__(self, ds: Any) -> None:
        self.ds = ds
        episodes = range(len(ds.episode_lengths))
        self._qpos = np.concatenate([np.asarray(ds.preloaded(e).states(), dtype=np.float32)
                                     for e in episodes])
        self._action = np.concatenate([np.asarray(ds.preloaded(e).actions(), dtype=np.float32)
                                       for e in episodes])
        self._starts = ds.episode_starts.astype(np.int64)
        self._lengths = ds.episode_lengths.astype(np.int64)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.ds[i]

    def __getattr__(self, name: str) -> Any:  # only called for names not found on self
        if name == "ds":
            raise AttributeError(name)
        return getattr(self.ds, name)

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        ds = self.ds
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(ds)):
            raise IndexError(f"index out of range for {len(ds)} samples")
        ep = ds.episode_index[idx]
        start, length = self._starts[ep], self._lengths[ep]
        t = idx - start
        k = np.arange(ds.chunk_size)
        # Past the episode end: repeat its last action, flagged in is_pad (as __getitem__ does).
        rows = start[:, None] + np.minimum(t[:, None] + k, length[:, None] - 1)
        batch = Batch(
            qpos=torch.from_numpy(ds.stats.normalize_qpos(self._qpos[idx]).astype(np.float32)),
            action=torch.from_numpy(ds.stats.normalize_action(self._action[rows]).astype(np.float32)),
            is_pad=torch.from_numpy(t[:, None] + k >= length[:, None]),
        )
        if ds.use_images:
            batch["images"] = self._frames(ep, t)
        return batch

    def _frames(self, ep: np.ndarray, t: np.ndarray) -> torch.Tensor:
        """(B, cams, 3, H, W), or (B, cams, history, 3, H, W); frames before 0 repeat frame 0."""
        ds = self.ds
        h = ds.history
        frame_t = np.maximum(t[:, None] - (h - 1) + np.arange(h), 0)  # (B, h)
        out = None
        cameras = ds.cameras
        for c, cam in enumerate(cameras):
            for e in np.unique(ep):
                sel = np.nonzero(ep == e)[0]
                frames = ds.episode_frames(int(e), cam)[frame_t[sel]]  # (n, h, H, W, 3)
                if out is None:
                    out = np.empty((len(ep), len(cameras), *frames.shape[1:]), frames.dtype)
                out[sel, c] = frames
        x = torch.from_numpy(out).permute(0, 1, 2, 5, 3, 4).float().div_(255.0)
        return x[:, :, 0] if h == 1 else x
