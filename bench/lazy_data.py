#!/usr/bin/env python
"""The default command's data path: lazy HDF5 reads vs preloaded, per training step.

The MLP command (``python train.py --task_name=sim_transfer_cube_scripted
--gin_file=gin_configs/mlp.gin``, ``dataset.preload_data = False``) reads each sample's slices from the episode files. Here
its training dataset is built exactly as train.py builds it (the command's flags -> resolve ->
build_datasets -> batched), once lazy and once preloaded, and full training steps (DataLoader
batch with train.py's collate, forward, backward, AdamW on two copies of the same initial
policy) alternate lazy / preloaded step by step in one process, so load changes hit both alike.
Reported: per-step medians and their ratio (goal: lazy <= 1.5x preloaded). Also timed: one
slice read through ``file[key]`` (re-opens the dataset) vs a held dataset handle.

``--end_to_end`` also runs the command itself (train.py in a subprocess, lazy then preloaded,
alternating) and reports the Trainer's own train_steps_per_second.

    OMP_NUM_THREADS=1 python bench/lazy_data.py [--data DIR --episodes 20] [--steps 40]
        [--batch 8] [--end_to_end]

Without --data, quickstart-like episodes are written (400 steps, one 240x320 camera, gzip,
one chunk per frame, as the recorder writes) with synthetic frames; recorded episodes
(``python -m ilstudio.sim.record``) compress differently, so pass them with --data when you have them.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

TASK = "sim_transfer_cube_scripted"


def command(data: Path, out: str, preload: bool, batch: int) -> list[str]:
    """The default command, pointed at ``data``; only the read mode differs between A and B."""
    return [f"--task_name={TASK}", "--gin_file=gin_configs/mlp.gin",
            f"--gin_bindings=task.dataset_dir = '{data}'",
            f"--gin_bindings=dataset.preload_data = {preload}", f"--output_dir={out}",
            f"--per_device_train_batch_size={batch}", "--report_to=none"]


class Side:
    """One read mode: train.py's dataset and DataLoader, a copy of the policy, AdamW."""

    def __init__(self, resolved, model, batch: int) -> None:
        import torch
        from torch.utils.data import DataLoader, RandomSampler

        from ilstudio.data.batched import batched, collate
        from ilstudio.data.checked import check_dataset
        from ilstudio.data.dataset import build_datasets

        t0 = time.perf_counter()
        ds = batched(build_datasets(check_dataset(resolved.task, resolved.dataset), resolved.task, resolved.dataset, resolved.model.chunk_size,
                                    False, 0)[0])
        self.build_s = time.perf_counter() - t0
        self.loader = DataLoader(ds, batch_size=batch, collate_fn=collate,
                                 sampler=RandomSampler(ds, generator=torch.Generator().manual_seed(0)))
        self.batches = iter(self.loader)
        self.model = copy.deepcopy(model).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.times: list[float] = []
        self.fetch: list[float] = []

    def step(self, timed: bool) -> None:
        t0 = time.perf_counter()
        try:
            batch = next(self.batches)
        except StopIteration:
            self.batches = iter(self.loader)
            batch = next(self.batches)
        t1 = time.perf_counter()
        self.model(**batch)["loss"].backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if timed:
            self.fetch.append(t1 - t0)
            self.times.append(time.perf_counter() - t0)


def handle_cost(path: Path, reads: int = 300) -> tuple[float, float]:
    """Seconds per qpos row read through file[key] vs a held dataset (interleaved)."""
    import h5py

    with h5py.File(path, "r") as f:
        held = f["observations/qpos"]
        a, b = [], []
        for i in range(reads):
            t0 = time.perf_counter()
            f["observations/qpos"][i % 50]
            t1 = time.perf_counter()
            held[i % 50]
            t2 = time.perf_counter()
            a.append(t1 - t0)
            b.append(t2 - t1)
    return statistics.median(a), statistics.median(b)


def end_to_end(data: Path, tmp: str, batch: int, steps: int, repeats: int) -> dict[bool, list[float]]:
    """train.py's own train_steps_per_second, lazy and preloaded, alternating."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    rates: dict[bool, list[float]] = {False: [], True: []}
    for r in range(repeats):
        for preload in (False, True):
            out = f"{tmp}/e2e-{preload}-{r}"
            proc = subprocess.run([sys.executable, str(REPO / "train.py"),
                                   *command(data, out, preload, batch), f"--max_steps={steps}",
                                   "--save_strategy=no", "--logging_steps=1000"],
                                  cwd=REPO, capture_output=True, text=True, env=env)
            m = re.search(r"'train_steps_per_second': ([0-9.]+)", proc.stderr + proc.stdout)
            if proc.returncode != 0 or not m:
                raise SystemExit(f"train.py failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
            rates[preload].append(float(m.group(1)))
            print(f"  train.py {'preloaded' if preload else 'lazy':9s}: {rates[preload][-1]:.2f} "
                  f"steps/s", flush=True)
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=None, help="recorded episodes (default: synthetic)")
    p.add_argument("--episodes", type=int, default=20, help="use the first N episodes")
    p.add_argument("--batch", type=int, default=8, help="train.py's default batch size")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--end_to_end", action="store_true")
    p.add_argument("--e2e_steps", type=int, default=60)
    p.add_argument("--e2e_repeats", type=int, default=2)
    a = p.parse_args()

    import torch
    from absl import logging as absl_logging
    from overhead import machine

    from ilstudio.data.synthetic import write_synthetic_dataset
    from ilstudio.policies import build_policy
    from ilstudio.resolve import resolve_argv

    absl_logging.set_verbosity("error")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        if a.data is None:
            write_synthetic_dataset(data, num_episodes=a.episodes, episode_len=400,
                                    camera_names=("top",), image_hw=(240, 320))
            source = f"synthetic, {a.episodes} x 400 steps, 240x320"
        else:  # the first N episodes, linked (the recording itself is only read)
            data.mkdir()
            files = sorted(a.data.glob("episode_*.hdf5"), key=lambda q: int(q.stem.split("_")[1]))
            for f in files[:a.episodes]:
                (data / f.name).symlink_to(f.resolve())
            source = f"{a.data}, first {min(a.episodes, len(files))} episodes"
        print(f"data: {source}")
        sides = {}
        model = None
        for preload in (False, True):
            resolved = resolve_argv(command(data, f"{tmp}/unused", preload, a.batch))
            if model is None:
                torch.manual_seed(0)
                model = build_policy(resolved)
            sides[preload] = Side(resolved, model, a.batch)
        for i in range(a.warmup + a.steps):
            for preload in (False, True):
                sides[preload].step(timed=i >= a.warmup)
        lazy, pre = sides[False], sides[True]
        ratio = statistics.median(lazy.times) / statistics.median(pre.times)
        open_s, held_s = handle_cost(next(data.glob("episode_*.hdf5")))
        rates = end_to_end(data, tmp, a.batch, a.e2e_steps, a.e2e_repeats) if a.end_to_end else None
    print()
    print(f"batch {a.batch}, {a.steps} interleaved steps after {a.warmup} warm-up, policy "
          f"{resolved.model.policy}, 0 DataLoader workers")
    print("| read mode | step (median) | of which batch fetch | dataset build |")
    print("|---|---|---|---|")
    for name, s in (("lazy (default)", lazy), ("preloaded", pre)):
        print(f"| {name} | {1e3 * statistics.median(s.times):.1f} ms | "
              f"{1e3 * statistics.median(s.fetch):.1f} ms | {s.build_s:.1f} s |")
    print(f"\nlazy / preloaded step time: {ratio:.2f} (goal <= 1.5)")
    print(f"one qpos row: file[key] {1e6 * open_s:.0f} us, held handle {1e6 * held_s:.0f} us")
    if rates:
        lz, pl = statistics.median(rates[False]), statistics.median(rates[True])
        print(f"train.py end to end ({a.e2e_steps} steps): lazy {lz:.2f} steps/s, preloaded "
              f"{pl:.2f} steps/s, preloaded/lazy {pl / lz:.2f}")


if __name__ == "__main__":
    main()
