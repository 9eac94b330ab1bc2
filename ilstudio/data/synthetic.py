"""A small, learnable dataset in the ACT layout, for tests, smoke runs and benchmarks.

The state is a sum of sinusoids with per-episode random phases; the action at t is the
state at t+1 (so a policy can learn it from qpos alone), and each camera shows stripes
whose phase and brightness follow the state (so it can also be learned from images).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from ilstudio.rundir import atomic_path


def _trajectory(rng: np.random.RandomState, steps: int, dim: int) -> np.ndarray:
    """(steps, dim) smooth trajectory: two sinusoids per dimension, random phases."""
    t = np.arange(steps, dtype=np.float64)[:, None]
    freq = np.linspace(0.05, 0.15, dim)[None, :]
    phase1, phase2 = rng.uniform(0, 2 * np.pi, (2, 1, dim))
    return 0.8 * np.sin(freq * t + phase1) + 0.2 * np.sin(2.7 * freq * t + phase2)


def _images(qpos: np.ndarray, cam: int, hw: tuple[int, int]) -> np.ndarray:
    """(T, H, W, 3) uint8 stripes; channel c is driven by state dim (3*cam + c)."""
    h, w = hw
    dims = [(3 * cam + c) % qpos.shape[1] for c in range(3)]
    s = qpos[:, dims]  # (T, 3)
    x = np.linspace(0, 2 * np.pi, w)[None, None, :, None]
    y = np.linspace(0, 1, h)[None, :, None, None]
    val = 0.5 + 0.35 * np.sin(x + np.pi * s[:, None, None, :]) * (0.6 + 0.4 * y) + 0.1 * s[:, None, None, :]
    return np.clip(val * 255, 0, 255).astype(np.uint8)


SYNTH_INSTRUCTIONS = ("follow the wave with both arms", "move the gripper to the left, then to the right")
SYNTH_SUBTASKS = ("reach", "grasp", "lift", "place")


def _language(i: int, qpos: np.ndarray) -> dict:
    """Episode text (see ilstudio/data/language.py): an instruction, four equal subtask
    phases, and per-step reasoning that follows the state (rising or falling first dim)."""
    steps = len(qpos)
    phase = np.minimum(np.arange(steps) * len(SYNTH_SUBTASKS) // steps, len(SYNTH_SUBTASKS) - 1)
    subtask = [SYNTH_SUBTASKS[k] for k in phase]
    rising = np.gradient(qpos[:, 0]) >= 0
    reasoning = [f"the arm is {'rising' if r else 'falling'} so I {s}"
                 for r, s in zip(rising, subtask, strict=True)]
    return {"instruction": SYNTH_INSTRUCTIONS[i % len(SYNTH_INSTRUCTIONS)], "subtask": subtask,
            "reasoning": reasoning}


def _write_episode(path: Path, qpos: np.ndarray, action: np.ndarray,
                   images: dict[str, np.ndarray], mirrored: bool, text: dict) -> None:
    """Write one episode atomically, so readers never see half a file."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["sim"] = True
        f.attrs["mirrored"] = mirrored
        obs = f.create_group("observations")
        obs.create_dataset("qpos", data=qpos, compression="gzip")
        obs.create_dataset("qvel", data=np.gradient(qpos, axis=0).astype(np.float32),
                           compression="gzip")
        imgs = obs.create_group("images")
        for cam, frames in images.items():
            imgs.create_dataset(cam, data=frames, compression="gzip", chunks=(1, *frames.shape[1:]))
        f.create_dataset("action", data=action, compression="gzip")
        if text.get("instruction"):
            f.attrs["language_instruction"] = text["instruction"]
        if "subtask" in text:
            lang = f.create_group("language")
            for key in ("subtask", "reasoning"):
                lang.create_dataset(key, data=np.array(text[key], dtype=object),
                                    dtype=h5py.string_dtype("utf-8"))


def write_synthetic_dataset(output_dir: str | Path, num_episodes: int = 4, episode_len: int = 50,
                            state_dim: int = 14, action_dim: int = 14,
                            camera_names: Sequence[str] = ("top",),
                            image_hw: tuple[int, int] = (24, 32), seed: int = 0,
                            mirrored_every: int = 0, language: bool = False,
                            instruction: bool = True) -> list[Path]:
    """Write episode_0.hdf5 ... episode_{N-1}.hdf5; returns their paths.

    mirrored_every=k > 0 marks every k-th episode (k-1, 2k-1, ...) with ``mirrored=True``.
    instruction=True (the default) writes the ``language_instruction`` attribute, which the
    default policy (the LoRA VLA of gin_configs/default.gin) reads; language=True also writes
    /language/subtask and /language/reasoning.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    written = []
    for i in range(num_episodes):
        traj = _trajectory(rng, episode_len + 1, state_dim)
        qpos = traj[:-1].astype(np.float32)
        nxt = traj[1:]
        action = nxt[:, np.arange(action_dim) % state_dim].astype(np.float32)
        images = {cam: _images(qpos, c, image_hw) for c, cam in enumerate(camera_names)}
        mirrored = mirrored_every > 0 and (i + 1) % mirrored_every == 0
        path = out / f"episode_{i}.hdf5"
        text = _language(i, qpos) if language else {}
        if not language and instruction:
            text = {"instruction": _language(i, qpos)["instruction"]}
        _write_episode(path, qpos, action, images, mirrored, text)
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ilstudio.data.synthetic", description=__doc__)
    p.add_argument("output_dir")
    p.add_argument("--num_episodes", type=int, default=4)
    p.add_argument("--episode_len", type=int, default=50)
    p.add_argument("--state_dim", type=int, default=14)
    p.add_argument("--action_dim", type=int, default=14)
    p.add_argument("--cameras", default="top", help="comma-separated camera names ('' for none)")
    p.add_argument("--height", type=int, default=24)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mirrored_every", type=int, default=0)
    p.add_argument("--language", action="store_true",
                   help="also write per-step subtask and reasoning text (the instruction is "
                   "always written)")
    a = p.parse_args(argv)
    for name, v in [("num_episodes", a.num_episodes), ("episode_len", a.episode_len),
                    ("state_dim", a.state_dim), ("action_dim", a.action_dim),
                    ("height", a.height), ("width", a.width)]:
        if v < 1:
            p.error(f"--{name} must be >= 1, got {v}")
    cameras = tuple(c.strip() for c in a.cameras.split(",") if c.strip())
    paths = write_synthetic_dataset(a.output_dir, a.num_episodes, a.episode_len, a.state_dim,
                                    a.action_dim, cameras, (a.height, a.width), a.seed,
                                    a.mirrored_every, a.language)
    print(f"wrote {len(paths)} episodes x {a.episode_len} steps to {Path(a.output_dir).resolve()} "
          f"(state_dim={a.state_dim}, action_dim={a.action_dim}, cameras={list(cameras)}, "
          f"images {a.height}x{a.width})")


if __name__ == "__main__":
    main()
