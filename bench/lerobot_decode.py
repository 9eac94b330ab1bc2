#!/usr/bin/env python
"""LeRobot decoding vs the HDF5 path: samples/s on the same episodes.

Synthetic episodes in the ACT HDF5 layout (one camera, gzip, one chunk per frame, as
bench/data_pipeline.py), converted with ``python -m ilstudio.data.convert`` into LeRobot v3.0
(h264 mp4, all episodes in one file), v2.1 (one mp4 per episode) and v3.0 with PNG frames in
the parquet. Each is read through ``EpisodeDataset`` exactly as train.py reads it:

* random access (lazy, no preload): per sample the frame at its timestamp is decoded (video:
  seek to the keyframe before it, decode forward; HDF5: one gzip chunk). After a warm-up,
  timed interleaved, one sample of each format in turn at the same index (the order rotating),
  so load on this
  shared machine hits all formats alike (STACK-FACTS: sequential timings can be off by 3x);
  the median of 3 rounds is reported.
* preload: ``dataset.preload_data`` reads/decodes every frame once into memory.

    OMP_NUM_THREADS=1 python bench/lerobot_decode.py [--episodes 3] [--episode_len 100] \
        [--height 480] [--width 640] [--samples 150] [--hdf5 DIR]

--hdf5 DIR uses existing ACT-layout episodes (for example a sim recording) instead of
synthetic ones; its first camera is read.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
ROUNDS = 3
sys.path.insert(0, str(REPO))


def machine() -> str:
    import torch

    return (f"{platform.node()} | {platform.machine()} | {os.cpu_count()} CPUs, torch threads "
            f"{torch.get_num_threads()} | torch {torch.__version__} | python {platform.python_version()}")


def size_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=3)
    ap.add_argument("--episode_len", type=int, default=100)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--samples", type=int, default=150, help="random samples timed per format")
    ap.add_argument("--hdf5", default=None, help="existing HDF5 episodes instead of synthetic ones")
    args = ap.parse_args()

    import numpy as np

    from ilstudio.config.settings import DatasetSettings, TaskSettings
    from ilstudio.data.convert import convert
    from ilstudio.data.dataset import EpisodeDataset
    from ilstudio.data.episodes import open_episode
    from ilstudio.data.normalization import compute_stats
    from ilstudio.data.sources import list_episodes
    from ilstudio.data.synthetic import write_synthetic_dataset

    print(f"# machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hdf5 = Path(args.hdf5) if args.hdf5 else tmp / "hdf5"
        if not args.hdf5:
            write_synthetic_dataset(hdf5, num_episodes=args.episodes, episode_len=args.episode_len,
                                    image_hw=(args.height, args.width))
        dirs = {"hdf5 (gzip)": hdf5}
        for name, kw in (("lerobot v3.0 mp4", {"version": "3.0"}), ("lerobot v2.1 mp4", {"version": "2.1"}),
                         ("lerobot v3.0 png", {"version": "3.0", "image_storage": "image"})):
            d = tmp / name.replace(" ", "_")
            t0 = time.perf_counter()
            convert(str(hdf5), d, "lerobot", fps=50, **kw)
            print(f"# converted to {name} in {time.perf_counter() - t0:.1f} s")
            dirs[name] = d
        refs = {k: list_episodes(str(d)) for k, d in dirs.items()}
        with open_episode(refs["hdf5 (gzip)"][0]) as f:
            camera = sorted(f["observations/images"])[0]
            _, height, width, _ = f[f"observations/images/{camera}"].shape
        task = TaskSettings(dataset_dir="", camera_names=(camera,))
        stats = compute_stats(refs["hdf5 (gzip)"])
        lazy = {k: EpisodeDataset(r, task, DatasetSettings(), 20, stats) for k, r in refs.items()}
        n = len(lazy["hdf5 (gzip)"])
        rng = np.random.default_rng(0)
        for i in rng.integers(0, n, size=30):  # warm-up: open handles/readers, decoder threads
            for ds in lazy.values():
                ds[int(i)]
        rates: dict[str, list[float]] = {k: [] for k in lazy}
        for _ in range(ROUNDS):  # the median round per format: load on this machine comes in bursts
            spent = dict.fromkeys(lazy, 0.0)
            names = list(lazy)
            for j, i in enumerate(rng.integers(0, n, size=args.samples)):
                for k in names[j % len(names):] + names[:j % len(names)]:  # rotate who goes first
                    ds = lazy[k]
                    t0 = time.perf_counter()
                    ds[int(i)]
                    spent[k] += time.perf_counter() - t0
            for k in lazy:
                rates[k].append(args.samples / spent[k])
        preload = {}
        for k, r in refs.items():  # preload: decode everything once
            t0 = time.perf_counter()
            EpisodeDataset(r, task, DatasetSettings(preload_data=True), 20, stats)
            preload[k] = time.perf_counter() - t0
        frames = len(lazy["hdf5 (gzip)"])
        rate = {k: statistics.median(v) for k, v in rates.items()}
        base = rate["hdf5 (gzip)"]
        print(f"\n{'recorded' if args.hdf5 else 'synthetic'}: {len(refs['hdf5 (gzip)'])} episodes, "
              f"{frames} steps, camera '{camera}' {height}x{width}; median of {ROUNDS} rounds of "
              f"{args.samples} random samples per format, interleaved\n")
        print("| format | on disk MiB | random access samples/s | vs HDF5 | preload s | preload frames/s |")
        print("|---|---|---|---|---|---|")
        for k in lazy:
            print(f"| {k} | {size_mib(dirs[k]):.1f} | {rate[k]:.1f} | {rate[k] / base:.2f}x | "
                  f"{preload[k]:.2f} | {frames / preload[k]:.0f} |")


if __name__ == "__main__":
    main()
