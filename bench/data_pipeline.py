#!/usr/bin/env python
"""Data pipeline: samples/s the dataset builder delivers vs what a policy consumes.

Synthetic episodes in the ACT HDF5 layout with one 480x640 camera, gzip-compressed with
one chunk per frame (as ilstudio/data/synthetic.py and ACT's recorder write them). The
builder is timed as train.py uses it (``build_datasets`` then ``batched``, a shuffled
DataLoader with ilstudio's ``collate``), lazy (per-sample reads from per-worker open
handles) vs preloaded, with 0/1/2 workers. Consumption: training steps/s of ACT at the
paper's size (act.gin defaults) on the same 480x640 batches, on this machine's CPU.

    OMP_NUM_THREADS=1 python bench/data_pipeline.py [--episodes 3] [--episode_len 100]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

CAMERA = "top"


def describe_layout(path: Path) -> str:
    import h5py

    with h5py.File(path, "r") as f:
        d = f[f"observations/images/{CAMERA}"]
        return (f"{path.name}: images {d.shape} {d.dtype}, chunks {d.chunks}, "
                f"compression {d.compression}, file {path.stat().st_size / 2**20:.1f} MiB "
                f"(raw frames {d.size / 2**20:.0f} MiB)")


def loader_rate(ds, batch: int, workers: int, batches: int, skip: int = 2) -> float:
    """Samples/s over ``batches`` batches after ``skip`` (worker start-up excluded)."""
    import torch

    from ilstudio.data.batched import collate

    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                                         collate_fn=collate, drop_last=True,
                                         generator=torch.Generator().manual_seed(0))
    it = iter(loader)
    for _ in range(skip):
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * batch / (time.perf_counter() - t0)
    del it
    return rate


def consumption(resolved, ds, batch: int, steps: int) -> tuple[float, int]:
    """ACT training samples/s on this CPU (forward, backward, AdamW), and its parameter count."""
    import torch

    from ilstudio.data.batched import collate
    from ilstudio.policies import build_policy

    torch.manual_seed(0)
    model = build_policy(resolved)  # an image task: the ACT reads its cameras
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    b = collate(ds.__getitems__(list(range(batch))) if hasattr(ds, "__getitems__")
                else [ds[i] for i in range(batch)])
    times = []
    for s in range(steps + 1):
        t0 = time.perf_counter()
        loss = model(**b)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if s:  # the first step warms up allocators
            times.append(time.perf_counter() - t0)
    return batch / statistics.median(times), sum(p.numel() for p in model.parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--episodes", type=int, default=3)
    p.add_argument("--episode_len", type=int, default=100)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batches", type=int, default=15)
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--consume_steps", type=int, default=1, help="0 skips the ACT measurement")
    p.add_argument("--consume_batch", type=int, default=2,
                   help="ACT batch for the consumption figure (a CPU step at batch 8 takes minutes)")
    a = p.parse_args()

    import torch
    from absl import logging as absl_logging
    from overhead import machine

    from ilstudio.data.batched import batched
    from ilstudio.data.checked import check_dataset
    from ilstudio.data.dataset import build_datasets
    from ilstudio.data.synthetic import write_synthetic_dataset
    from ilstudio.resolve import resolve_argv

    absl_logging.set_verbosity("error")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    print(f"machine: {machine()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        t0 = time.perf_counter()
        paths = write_synthetic_dataset(data, num_episodes=a.episodes, episode_len=a.episode_len,
                                        camera_names=(CAMERA,), image_hw=(480, 640))
        print(f"wrote {a.episodes} x {a.episode_len} steps at 480x640 in "
              f"{time.perf_counter() - t0:.1f} s")
        print("layout: " + describe_layout(paths[0]))
        base = ["--task_name=tiny_synthetic", f"--gin_bindings=task.dataset_dir = '{data}'",
                f"--gin_bindings=task.episode_len = {a.episode_len}",
                "--gin_file=gin_configs/act.gin", f"--output_dir={tmp}/unused"]
        resolved = None
        for mode in ("lazy", "preloaded"):
            resolved = resolve_argv([*base, f"--gin_bindings=dataset.preload_data = "
                                            f"{mode == 'preloaded'}"])
            t0 = time.perf_counter()
            train_ds, _, _, _ = build_datasets(check_dataset(resolved.task, resolved.dataset), resolved.task, resolved.dataset,
                                               resolved.model.chunk_size, False, 0)
            ds = batched(train_ds)
            build_s = time.perf_counter() - t0
            for w in [int(x) for x in a.workers.split(",") if x]:
                rate = loader_rate(ds, a.batch, w, a.batches)
                rows.append((mode, w, rate, build_s))
                print(f"  {mode:9s} workers={w}: {rate:7.1f} samples/s (build {build_s:.1f} s)",
                      flush=True)
        consumed, n_params = (consumption(resolved, ds, a.consume_batch, a.consume_steps)
                              if a.consume_steps else (float("nan"), 0))
        print(f"ACT (act.gin defaults, {n_params / 1e6:.1f} M parameters) consumes "
              f"{consumed:.2f} samples/s on this CPU at batch {a.consume_batch}")
    print()
    print(f"| data | workers | samples/s | x ACT consumption ({consumed:.2f}/s, CPU) | build s |")
    print("|---|---|---|---|---|")
    for mode, w, rate, build_s in rows:
        print(f"| {mode} | {w} | {rate:.1f} | {rate / consumed:.0f}x | {build_s:.1f} |")


if __name__ == "__main__":
    main()
