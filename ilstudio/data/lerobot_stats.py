"""Feature statistics as LeRobot computes them (``lerobot.datasets.compute_stats``).

Why a copy of its arithmetic rather than our own: LeRobot's quantile normalisation (pi0.5 and
others) reads q01..q99 from ``meta/stats.json`` and refuses a dataset without them, and a
dataset written here should normalise exactly as one LeRobot wrote. So, per episode:

* numbers: per dimension over the episode's frames; computed in ``result_type(dtype,
  float32)`` (float32 stays float32, as LeRobot's running statistics do); std from the mean
  of squares; quantiles q01, q10, q50, q90, q99 from a 5000-bin histogram between min and max,
  interpolated within the bin (LeRobot's ``RunningQuantileStats``); fewer than 2 frames:
  quantiles are the mean.
* images: ``estimate_num_samples`` frames (100 up to ~500 frames, then n**0.75) at
  ``round(linspace(0, n-1, k))``, strided down to ~150 px when a side is >= 300 px, per
  channel over all sampled pixels, divided by 255, shaped (3, 1, 1); count = frames sampled.
* datasets (stats.json): count-weighted mean and pooled std; min of mins, max of maxes;
  quantiles as LeRobot's conservative envelope (min of q01/q10/q50, max of q90/q99 over
  episodes) because exact global quantiles cannot be recovered from per-episode ones.
"""

from __future__ import annotations

import numpy as np

QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)
QUANTILE_KEYS = tuple(f"q{int(q * 100):02d}" for q in QUANTILES)
BINS = 5000


def _quantile(hist: np.ndarray, edges: np.ndarray, target: float) -> float:
    cumsum = np.cumsum(hist)
    idx = int(np.searchsorted(cumsum, target))
    if idx == 0:
        return edges[0]
    if idx >= len(cumsum):
        return edges[-1]
    before = cumsum[idx - 1]
    in_bin = cumsum[idx] - before
    if in_bin == 0:
        return edges[idx]
    return edges[idx] + (target - before) / in_bin * (edges[idx + 1] - edges[idx])


def _columns(batch: np.ndarray) -> dict[str, np.ndarray]:
    """min/max/mean/std/quantiles of each column of (n, d), n >= 2."""
    batch = batch.astype(np.result_type(batch.dtype, np.float32), copy=False)
    lo, hi = np.min(batch, axis=0), np.max(batch, axis=0)
    mean, mean_sq = np.mean(batch, axis=0), np.mean(batch ** 2, axis=0)
    out = {"min": lo, "max": hi, "mean": mean, "std": np.sqrt(np.maximum(0, mean_sq - mean ** 2))}
    quantiles: list[list[float]] = [[] for _ in QUANTILES]
    for i in range(batch.shape[1]):
        edges = np.linspace(lo[i] - 1e-10, hi[i] + 1e-10, BINS + 1)
        hist = np.histogram(batch[:, i], bins=edges)[0].astype(np.float64)
        for k, q in enumerate(QUANTILES):
            quantiles[k].append(_quantile(hist, edges, q * len(batch)))
    out.update({key: np.array(v) for key, v in zip(QUANTILE_KEYS, quantiles, strict=True)})
    return out


def _feature(reshaped: np.ndarray, count: int) -> dict[str, np.ndarray]:
    if reshaped.shape[0] < 2:
        s = {"min": reshaped.min(0), "max": reshaped.max(0), "mean": reshaped.mean(0),
             "std": reshaped.std(0)}
        s.update({k: s["mean"].copy() for k in QUANTILE_KEYS})
    else:
        s = _columns(reshaped)
    s["count"] = np.array([count])
    return s


def vector_stats(x: np.ndarray) -> dict[str, list]:
    """Stats of a (T,) or (T, D) column; (T,) gives shape-(1,) values as LeRobot keeps them."""
    x = np.asarray(x)
    s = _feature(x.reshape(-1, 1) if x.ndim == 1 else x, len(x))
    return {k: np.asarray(v).reshape(-1).tolist() for k, v in s.items()}


def sample_indices(n: int) -> list[int]:
    """LeRobot's image frames for stats: 100 (or all, if fewer) up to ~500 frames, then n**0.75."""
    k = max(min(100, n), min(int(n ** 0.75), 10_000))
    return np.round(np.linspace(0, n - 1, k)).astype(int).tolist()


def _downsample(chw: np.ndarray) -> np.ndarray:
    """LeRobot's auto_downsample_height_width: stride to ~150 px when a side is >= 300 px."""
    height, width = chw.shape[-2:]
    if max(width, height) < 300:
        return chw
    factor = int(width / 150) if width > height else int(height / 150)
    return chw[..., ::factor, ::factor]


def image_stats(frames: np.ndarray) -> dict[str, list]:
    """uint8 (T, H, W, C) -> per-channel stats in [0, 1], values shaped (C, 1, 1)."""
    sampled = np.asarray(frames)[sample_indices(len(frames))].transpose(0, 3, 1, 2)  # n, C, H, W
    sampled = _downsample(sampled)
    n, channels = sampled.shape[:2]
    s = _feature(sampled.transpose(0, 2, 3, 1).reshape(-1, channels), n)
    return {k: (v.tolist() if k == "count" else (v / 255.0).reshape(channels, 1, 1).tolist())
            for k, v in s.items()}


def aggregate(stats: list[dict[str, list]]) -> dict[str, list]:
    """Dataset stats from per-episode ones (LeRobot's aggregate_feature_stats)."""
    means = np.stack([np.asarray(s["mean"], dtype=np.float64) for s in stats])
    variances = np.stack([np.asarray(s["std"], dtype=np.float64) ** 2 for s in stats])
    counts = np.stack([np.asarray(s["count"]) for s in stats])
    total = counts.sum(axis=0)
    while counts.ndim < means.ndim:
        counts = np.expand_dims(counts, -1)
    mean = (means * counts).sum(0) / total
    var = ((variances + (means - mean) ** 2) * counts).sum(0) / total
    out = {"min": np.min([s["min"] for s in stats], 0), "max": np.max([s["max"] for s in stats], 0),
           "mean": mean, "std": np.sqrt(var), "count": total}
    for key in QUANTILE_KEYS:
        values = np.stack([np.asarray(s[key]) for s in stats])
        out[key] = values.min(0) if int(key[1:]) <= 50 else values.max(0)
    return {k: np.asarray(v).tolist() for k, v in out.items()}
