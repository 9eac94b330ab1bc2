"""Per-dimension mean/std of qpos and action, computed on the training episodes.

Stats are saved next to checkpoints so evaluation un-normalizes actions exactly as
training normalized them, whatever data it later sees.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from ilstudio.data.episodes import episode_ref
from ilstudio.data.progress import progress
from ilstudio.data.source import EpisodeRef, read_errors
from ilstudio.errors import UserError

MIN_STD = 1e-2  # as ACT: a constant dimension must not blow up after normalization

Array = TypeVar("Array", np.ndarray, torch.Tensor)


def _like(stat: np.ndarray, x: Array) -> Array:
    """The stat as the same kind of array as x (numpy, or torch on x's device/dtype)."""
    if isinstance(x, torch.Tensor):
        dtype = x.dtype if x.is_floating_point() else torch.float32
        return torch.as_tensor(stat, dtype=dtype, device=x.device)
    return stat


@dataclasses.dataclass
class NormStats:
    """Mean/std of qpos and action; all float32 1-D arrays."""

    qpos_mean: np.ndarray
    qpos_std: np.ndarray
    action_mean: np.ndarray
    action_std: np.ndarray

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, np.asarray(getattr(self, f.name), dtype=np.float32).reshape(-1))

    def normalize_qpos(self, qpos: Array) -> Array:
        return (qpos - _like(self.qpos_mean, qpos)) / _like(self.qpos_std, qpos)

    def normalize_action(self, action: Array) -> Array:
        return (action - _like(self.action_mean, action)) / _like(self.action_std, action)

    def unnormalize_action(self, action: Array) -> Array:
        return action * _like(self.action_std, action) + _like(self.action_mean, action)

    def to_dict(self) -> dict[str, list[float]]:
        return {f.name: getattr(self, f.name).tolist() for f in dataclasses.fields(self)}

    def save(self, path: str | Path) -> None:
        """Write as JSON atomically, so a crash never leaves half a stats file."""
        from ilstudio.rundir import write_atomic

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> NormStats:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})
        except FileNotFoundError:
            raise UserError(f"normalization stats file {path} does not exist") from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path}: not a valid normalization stats file ({e!r})") from None


def compute_stats(paths: Sequence[str | Path | EpisodeRef]) -> NormStats:
    """Mean/std over every timestep of the given episodes (std clipped to >= 1e-2)."""
    if not paths:
        raise UserError("cannot compute normalization stats from zero episodes")
    qpos, action = [], []
    refs = [episode_ref(p) for p in paths]  # any format (bare paths: HDF5)
    for ref in progress(refs, total=len(refs), desc="normalization statistics", unit="episode"):
        with ref.open() as src, read_errors(ref):
            qpos.append(np.asarray(src.states(), dtype=np.float64))
            action.append(np.asarray(src.actions(), dtype=np.float64))
    q, a = np.concatenate(qpos), np.concatenate(action)
    return NormStats(
        qpos_mean=q.mean(0), qpos_std=np.clip(q.std(0), MIN_STD, None),
        action_mean=a.mean(0), action_std=np.clip(a.std(0), MIN_STD, None),
    )
