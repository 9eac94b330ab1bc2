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
* first epoch (cold): the same, one pass over every index in random order from empty
  caches, so the mp4 side pays for decoding each episode once (dataset.video_cache_mb).
  "per-frame decode (before)" reads the same v3.0 files with the cache kept out.
* preload: ``dataset.preload_data`` reads/decodes every frame once into memory.
* a DataLoader per format (batch 8, shuffled), with 0 and 2 workers, batches alternating;
  memory beside it (the workers' resident set, or the decoded episodes held).
* a 100-step action chunk with state and no images, per sample.

    OMP_NUM_THREADS=1 python bench/lerobot_decode.py [--episodes 3] [--episode_len 100] \
        [--height 480] [--width 640] [--samples 150] [--hdf5 DIR] [--cache_mb 1024] [--batches 60]

--hdf5 DIR uses existing ACT-layout episodes (for example a sim recording) instead of
synthetic ones; its first camera is read.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

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
    ap.add_argument("--cache_mb", type=float, default=1024, help="dataset.video_cache_mb")
    ap.add_argument("--batches", type=int, default=60, help="DataLoader batches per format")
    args = ap.parse_args()

    from ilstudio.config.settings import DatasetSettings, TaskSettings
    from ilstudio.data.convert import convert
    from ilstudio.data.dataset import EpisodeDataset
    from ilstudio.data.normalization import compute_stats
    from ilstudio.data.sources import list_episodes
    from ilstudio.data.synthetic import write_synthetic_dataset
    from ilstudio.data.video import DECODED

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
        with refs["hdf5 (gzip)"][0].open() as src:
            camera = sorted(src.cameras())[0]
            height, width = src.frame_size(camera)
        task = TaskSettings(dataset_dir="", camera_names=(camera,))
        stats = compute_stats(refs["hdf5 (gzip)"])
        # The same v3.0 files once more, decoded per sample as before the decoded-episode
        # cache (its dataset is marked too large for any budget): the "before" figure.
        # A copy: decoded episodes are keyed by file, and these must not find the others'.
        dirs[PER_FRAME] = Path(shutil.copytree(dirs["lerobot v3.0 mp4"], tmp / "per_frame"))
        refs[PER_FRAME] = list_episodes(str(dirs[PER_FRAME]))
        refs[PER_FRAME][0].data.decoded_bytes = 1 << 62
        settings = DatasetSettings(video_cache_mb=args.cache_mb)
        lazy = {k: EpisodeDataset(r, task, settings, 20, stats) for k, r in refs.items()}
        n = len(lazy["hdf5 (gzip)"])
        rng = np.random.default_rng(0)
        cold = timed_pass(lazy, [int(i) for i in rng.permutation(n)])  # first epoch, empty caches
        rates: dict[str, list[float]] = {k: [] for k in lazy}
        for _ in range(ROUNDS):  # the median round per format: load on this machine comes in bursts
            spent = timed_pass(lazy, [int(i) for i in rng.integers(0, n, size=args.samples)])
            for k in lazy:
                rates[k].append(args.samples / spent[k])
        held_mib = DECODED.bytes / 2**20
        preload = {}
        for k, r in refs.items():  # preload: decode everything once
            if k == PER_FRAME:
                continue
            t0 = time.perf_counter()
            EpisodeDataset(r, task, DatasetSettings(preload_data=True), 20, stats)
            preload[k] = time.perf_counter() - t0
        frames = len(lazy["hdf5 (gzip)"])
        rate = {k: statistics.median(v) for k, v in rates.items()}
        base = rate["hdf5 (gzip)"]
        print(f"\n{'recorded' if args.hdf5 else 'synthetic'}: {len(refs['hdf5 (gzip)'])} episodes, "
              f"{frames} steps, camera '{camera}' {height}x{width}; median of {ROUNDS} rounds of "
              f"{args.samples} random samples per format, interleaved; dataset.video_cache_mb = "
              f"{args.cache_mb} (decoded episodes held after the runs: {held_mib:.0f} MiB)\n")
        print("| format | on disk MiB | random access samples/s | vs HDF5 | first epoch samples/s "
              "(cold) | vs HDF5 | preload s | preload frames/s |")
        print("|---|---|---|---|---|---|---|---|")
        for k in lazy:
            pre = (f"{preload[k]:.2f} | {frames / preload[k]:.0f}" if k in preload else "- | -")
            print(f"| {k} | {size_mib(dirs[k]):.1f} | {rate[k]:.1f} | {rate[k] / base:.2f}x | "
                  f"{n / cold[k]:.1f} | {cold['hdf5 (gzip)'] / cold[k]:.2f}x | {pre} |")
        loader_table(refs, task, stats, args)
        chunk_table(refs, task, stats)


PER_FRAME = "lerobot v3.0 mp4, per-frame decode (before)"


def timed_pass(datasets: dict, order: list[int]) -> dict[str, float]:
    """Seconds each dataset spent on the samples of order, taking turns sample by sample
    (who goes first rotates)."""
    spent = dict.fromkeys(datasets, 0.0)
    names = list(datasets)
    for j, i in enumerate(order):
        for k in names[j % len(names):] + names[:j % len(names)]:
            t0 = time.perf_counter()
            datasets[k][i]
            spent[k] += time.perf_counter() - t0
    return spent


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def loader_table(refs: dict, task, stats, args) -> None:
    """Training-shaped reads: a DataLoader (batch 8, shuffled) per format, 0 and 2 workers,
    the two formats' batches alternating; memory: the workers' resident set (2 workers) or
    the decoded episodes held (0 workers, one process for both formats)."""
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    from ilstudio.config.settings import DatasetSettings
    from ilstudio.data.batched import collate
    from ilstudio.data.dataset import EpisodeDataset
    from ilstudio.data.video import DECODED

    sides = ("hdf5 (gzip)", "lerobot v3.0 mp4")
    print(f"\nDataLoader, batch 8, {args.batches} batches per format, the formats alternating "
          f"(the first epoch's decoding included):\n")
    print("| workers | format | samples/s | vs HDF5 | memory |")
    print("|---|---|---|---|---|")
    for workers in (0, 2):
        DECODED.configure(0)  # a cold start for the main process too
        settings = DatasetSettings(video_cache_mb=args.cache_mb)
        loaders, spent = {}, dict.fromkeys(sides, 0.0)
        for k in sides:
            ds = EpisodeDataset(refs[k], task, settings, 20, stats)
            loaders[k] = iter(DataLoader(ds, batch_size=8, collate_fn=collate, num_workers=workers,
                                         sampler=RandomSampler(ds, replacement=True,
                                                               num_samples=8 * args.batches,
                                                               generator=torch.Generator().manual_seed(0))))
        for _ in range(args.batches):
            for k in sides:
                t0 = time.perf_counter()
                next(loaders[k])
                spent[k] += time.perf_counter() - t0
        mem = {k: (sum(rss_mib(w.pid) for w in loaders[k]._workers) if workers else None) for k in sides}
        for k in sides:
            rate = 8 * args.batches / spent[k]
            base = 8 * args.batches / spent[sides[0]]
            memory = (f"workers' RSS {mem[k]:.0f} MiB" if workers else
                      (f"+{DECODED.bytes / 2**20:.0f} MiB decoded episodes" if "mp4" in k else "-"))
            print(f"| {workers} | {k} | {rate:.1f} | {rate / base:.2f}x | {memory} |")
        del loaders


def chunk_table(refs: dict, task, stats) -> None:
    """A 100-step action chunk (no images): per-sample cost, the formats taking turns."""
    import dataclasses

    from ilstudio.config.settings import DatasetSettings
    from ilstudio.data.dataset import EpisodeDataset

    sides = ("hdf5 (gzip)", "lerobot v3.0 mp4")
    plain = dataclasses.replace(task, camera_names=())
    ds = {k: EpisodeDataset(refs[k], plain, DatasetSettings(is_multimodal=False), 100, stats)
          for k in sides}
    n = len(ds[sides[0]])
    order = [int(i) for i in np.random.default_rng(1).integers(0, n, size=2000)]
    timed_pass(ds, order[:200])  # warm-up: open files, read parquet columns
    spent = timed_pass(ds, order)
    print("\nA 100-step action chunk with state (no images), 2000 random samples, alternating:\n")
    print("| format | us per sample | vs HDF5 |")
    print("|---|---|---|")
    for k in sides:
        print(f"| {k} | {1e6 * spent[k] / len(order):.0f} | {spent[k] / spent[sides[0]]:.2f}x |")


if __name__ == "__main__":
    main()
