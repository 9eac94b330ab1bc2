"""``dataset.episode_first``: every episode weighs the same, whatever its length.

Drawing an episode uniformly and then a timestep uniformly inside it is the same as
drawing timesteps with probability proportional to 1 / len(episode), which is what a
``WeightedRandomSampler`` does (with replacement; one epoch = len(dataset) draws).

Determinism and resume: the generator is reseeded from ``seed + epoch`` at the start of
every epoch (``set_epoch`` is called by the Trainer/accelerate), so an epoch's order
depends only on (seed, epoch). On resume the Trainer skips the already-seen batches of
that same order, so a resumed run sees exactly the samples an uninterrupted one would.

Distributed runs: accelerate wraps the sampler's batches in a ``BatchSamplerShard``: every
rank builds this sampler with the same seed, draws the same sequence, and takes its own
share of each global batch, so the distribution is unchanged (no DistributedSampler needed).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import WeightedRandomSampler


def episode_first_weights(episode_index: Sequence[int], episode_lengths: Sequence[int]) -> torch.Tensor:
    """Per-timestep weights 1/len(episode): each episode's weights sum to 1."""
    lengths = np.asarray(episode_lengths, dtype=np.float64)
    return torch.as_tensor(1.0 / lengths[np.asarray(episode_index)], dtype=torch.double)


class EpisodeFirstSampler(WeightedRandomSampler):
    """Episode-uniform sampling, reproducible per (seed, epoch)."""

    def __init__(self, episode_index: Sequence[int], episode_lengths: Sequence[int],
                 seed: int) -> None:
        weights = episode_first_weights(episode_index, episode_lengths)
        super().__init__(weights, num_samples=len(weights), replacement=True)
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        self.generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return super().__iter__()
