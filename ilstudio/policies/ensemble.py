"""ACT's temporal ensembling: the one implementation, for torch tensors and numpy arrays.

Every step the policy predicts a chunk starting at that step; the action executed at step
t is the weighted mean of every still-valid chunk's prediction for t, with weights
w_i = exp(-k * i) where i = 0 is the OLDEST prediction (as in ACT; k = 0.01). Used by the
simulator's evaluation loop (``ilstudio.sim.rollout``); cheap to import (no torch needed).

How a policy is meant to be rolled out is part of its declared contract: every policy's
configurable declares ``temporal_ensemble`` and ``query_every`` with the two helpers below
(e.g. ``tinyact.temporal_ensemble = True``), so the mode shows in ``--help_gin`` and in the
run's operative_config.gin, and ``python -m ilstudio.eval`` and the in-training evaluation
read the same value from there.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from ilstudio.config.declare import param

TE_K = 0.01  # ACT's weight decay: w_i = exp(-k * i), i = 0 the oldest


class TemporalEnsembler:
    """Blend overlapping action chunks, one control step at a time.

    Two ways to drive it: ``update(chunk)`` once per step with the chunk predicted at that
    step (it counts the steps), or ``add(t, chunk)`` then ``action(t)`` with explicit step
    numbers. ``reset()`` between episodes. A chunk is (chunk_size, A) or batched
    (B, chunk_size, A); chunk_size: the expected length (None accepts any, each chunk then
    covers its own length).
    """

    def __init__(self, chunk_size: int | None = None, k: float = TE_K) -> None:
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size, self.k = chunk_size, k
        self.reset()

    def reset(self) -> None:
        self.step = 0
        self._chunks: deque[tuple[int, Any]] = deque()

    def add(self, t: int, chunk: Any) -> None:
        """Record the chunk predicted at step t (its row i is the action for step t + i)."""
        if self.chunk_size is not None and chunk.shape[-2] != self.chunk_size:
            raise ValueError(f"expected a chunk of {self.chunk_size} steps, got shape "
                             f"{tuple(chunk.shape)}")
        self._chunks.append((t, chunk))

    def action(self, t: int) -> Any:
        """The blended action for step t from every recorded chunk that still covers it."""
        while self._chunks and t - self._chunks[0][0] >= self._chunks[0][1].shape[-2]:
            self._chunks.popleft()  # oldest first: expired chunks sit at the front
        if not self._chunks:
            raise ValueError(f"no chunk covers step {t}")
        w = [math.exp(-self.k * i) for i in range(len(self._chunks))]
        total = sum(w)
        return sum((wi / total) * c[..., t - t0, :] for wi, (t0, c) in zip(w, self._chunks, strict=True))

    def update(self, chunk: Any) -> Any:
        """chunk predicted now -> the action to execute now (and advance one step)."""
        self.add(self.step, chunk)
        out = self.action(self.step)
        self.step += 1
        return out


def temporal_ensemble_param(default: bool) -> Any:
    """A policy's evaluation mode: ensemble (query every step, blend) or run chunks as they are.

    Shapes no weight, so changing it never breaks resuming.
    """
    return param(default, "Evaluation mode (python -m ilstudio.eval and in-training rollouts): "
                 "True queries the policy every step and blends the overlapping chunks (ACT's "
                 "temporal ensembling, weights exp(-0.01 i)); False executes each chunk for "
                 "query_every steps. --temporal_ensemble / --no_temporal_ensemble override it.",
                 documented=False, breaks_resume=False)


def query_every_param() -> Any:
    """Steps each chunk runs without ensembling (0: the whole chunk, model.chunk_size)."""
    return param(0, "Evaluation without temporal ensembling: steps each predicted chunk is "
                 "executed before the policy is queried again; 0 means the whole chunk "
                 "(model.chunk_size). At most model.chunk_size.", documented=False,
                 bounds="[0, inf)", breaks_resume=False)
