"""Convert episode datasets between ACT HDF5 and LeRobotDataset, in either direction.

    python -m ilstudio.data.convert SRC DST --to lerobot [--version=3.0|2.1] [--fps=50]
    python -m ilstudio.data.convert SRC DST --to hdf5

SRC is anything ``task.dataset_dir`` accepts (an HDF5 directory, a LeRobot v2.1/v3.0
directory, a hub repo id where the hub is reachable). DST must not exist or be empty; the
dataset is built beside it under a hidden name and renamed into place when complete, so an
interrupted conversion leaves nothing at DST.

What is kept: state (``/observations/qpos`` <-> ``observation.state``) and action exactly
(float64 stays float64), ``/observations/qvel`` <-> ``observation.velocity`` where present,
every camera (video is lossy: h264 crf 18; ``--image_storage=image`` keeps frames exact as
PNG), the language instruction <-> the episode's task, the ``mirrored`` mark, and the fps.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ilstudio.data.episodes import ACTION_KEY, IMAGES_KEY, QPOS_KEY, QVEL_KEY
from ilstudio.data.lerobot_format import INFO_PATH
from ilstudio.data.source import EpisodeRef, read_errors
from ilstudio.data.sources import list_episodes
from ilstudio.errors import UserError, guarded
from ilstudio.rundir import atomic_dir

DEFAULT_FPS = 50.0  # ALOHA/ACT's control rate (DT = 0.02 s), for HDF5 without an fps attribute


def read_episode(ref: EpisodeRef) -> dict[str, Any]:
    """One episode of any format as arrays: state, action, velocity, images, task, mirrored, fps."""
    with ref.open() as src, read_errors(ref):
        src.check_declared()  # e.g. an HDF5 file's root attributes as declared
        qvel = src.velocities()
        return {"state": np.asarray(src.states()), "action": np.asarray(src.actions()),
                "velocity": None if qvel is None else np.asarray(qvel),
                "images": {c: np.asarray(src.frames(c)) for c in src.cameras()},
                "task": str(src.instruction or ""), "mirrored": bool(src.mirrored),
                "fps": None if src.fps is None else float(src.fps)}


def _progress(refs: list, show: bool):
    from tqdm import tqdm

    return tqdm(refs, desc="converting", unit="ep", disable=not show, file=sys.stderr)


def _to_lerobot(refs: list, dst: Path, version: str, fps: float | None, image_storage: str,
                robot_type: str | None, progress: bool) -> None:
    from ilstudio.data.lerobot_writer import LeRobotWriter

    first = read_episode(refs[0])
    rate = fps or first["fps"] or DEFAULT_FPS
    with LeRobotWriter(dst, fps=rate, version=version, robot_type=robot_type,
                       image_storage=image_storage) as w:
        for i, ref in enumerate(_progress(refs, progress)):
            ep = first if i == 0 else read_episode(ref)
            w.add_episode(ep["state"], ep["action"], ep["images"], task=ep["task"],
                          mirrored=ep["mirrored"], velocity=ep["velocity"])


def _to_hdf5(refs: list, dst: Path, fps: float | None, progress: bool) -> None:
    import h5py

    dst.mkdir(parents=True, exist_ok=True)
    for i, ref in enumerate(_progress(refs, progress)):
        ep = read_episode(ref)
        with h5py.File(dst / f"episode_{i}.hdf5", "w") as f:
            f.attrs["sim"] = False
            f.attrs["mirrored"] = ep["mirrored"]
            if ep["task"]:
                f.attrs["language_instruction"] = ep["task"]
            if fps or ep["fps"]:
                f.attrs["fps"] = fps or ep["fps"]
            f.attrs["source"] = str(ref)
            f.create_dataset(QPOS_KEY, data=ep["state"])
            if ep["velocity"] is not None:
                f.create_dataset(QVEL_KEY, data=ep["velocity"])
            f.create_dataset(ACTION_KEY, data=ep["action"])
            for cam, frames in ep["images"].items():  # one frame per chunk, as the recorder writes
                f.create_dataset(f"{IMAGES_KEY}/{cam}", data=frames, chunks=(1, *frames.shape[1:]),
                                 compression="gzip", compression_opts=4)


def check_destination(src: str, dst: Path) -> None:
    """DST can become a new dataset without touching anything else: not a symlink, not inside
    SRC (the result would become part of the source), empty or absent, under a writable
    directory. Checked before anything is read or written; a UserError naming DST."""
    if dst.is_symlink():
        raise UserError(f"DST {dst} is a symlink (to {os.readlink(dst)}); the dataset would "
                        f"replace the link: give the real path of a new directory")
    src_path = Path(src).expanduser()
    if src_path.exists():
        inner, outer = dst.resolve(), src_path.resolve()
        if inner == outer or outer in inner.parents:
            raise UserError(f"DST {dst} is inside SRC {src}: the converted files would become "
                            f"part of the source dataset; choose a destination outside it")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        what = "is not a directory" if not dst.is_dir() else "is not empty"
        raise UserError(f"DST {dst} exists and {what}; choose a new destination")
    parent = next((p for p in dst.absolute().parents if p.exists()), Path("/"))
    if not parent.is_dir():
        raise UserError(f"DST {dst}: {parent} is a file, not a directory; choose a destination "
                        f"under a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"DST {dst}: the directory {parent} is not writable (permission denied "
                        f"or a read-only file system)")


def convert(src: str, dst: str | Path, to: str, version: str = "3.0", fps: float | None = None,
            image_storage: str = "video", robot_type: str | None = None,
            cache_dir: str | None = None, progress: bool = False) -> dict:
    """Convert SRC into a new dataset at DST; returns a summary. UserError on bad input."""
    if to not in ("lerobot", "hdf5"):
        raise UserError(f"--to must be 'lerobot' or 'hdf5', got {to!r}")
    version = version if version.startswith("v") else f"v{version}"
    dst = Path(dst).expanduser()
    check_destination(src, dst)
    if fps is not None and not (fps > 0 and math.isfinite(fps)):
        raise UserError(f"--fps must be a positive finite number, got {fps}")
    refs = list_episodes(src, cache_dir)
    with atomic_dir(dst) as tmp:  # an existing dst is empty (checked above): replaced
        if to == "lerobot":
            _to_lerobot(refs, tmp, version, fps, image_storage, robot_type, progress)
        else:
            _to_hdf5(refs, tmp, fps, progress)
    return {"episodes": len(refs), "to": to, "destination": str(dst)}


def recording_staging(target: str | Path) -> Path:
    """Where a recorder writes HDF5 episodes (resumably) before they become a LeRobot dataset.

    A finished LeRobot dataset at target cannot be continued: UserError.
    """
    target = Path(target).expanduser()
    if (target / INFO_PATH).exists():
        raise UserError(f"{target} already holds a LeRobot dataset; record into a new --output_dir")
    staging = target.parent / f"{target.name}.hdf5-recording"
    check_destination(str(staging), target)  # before recording, not after it
    return staging


def finish_recording(staging: Path, target: str | Path, fps: float = DEFAULT_FPS,
                     robot_type: str | None = None) -> str:
    """Convert the recorded HDF5 episodes into a LeRobot v3.0 dataset at target, then drop them."""
    convert(str(staging), target, "lerobot", fps=fps, robot_type=robot_type)
    shutil.rmtree(staging)
    return str(target)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ilstudio.data.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="HDF5 directory, LeRobot dataset directory, or hub dataset repo id")
    p.add_argument("dst", help="new directory for the converted dataset")
    p.add_argument("--to", required=True, choices=("lerobot", "hdf5"))
    p.add_argument("--version", default="3.0", choices=("3.0", "2.1", "v3.0", "v2.1"),
                   help="LeRobot codebase version to write (default 3.0)")
    p.add_argument("--fps", type=float, default=None,
                   help=f"frames per second (default: the source's, else {DEFAULT_FPS:g})")
    p.add_argument("--image_storage", default="video", choices=("video", "image"),
                   help="LeRobot cameras as mp4 video (default) or lossless PNG in the parquet")
    p.add_argument("--robot_type", default=None, help="LeRobot info.json robot_type")
    p.add_argument("--cache_dir", default=None, help="Hugging Face cache for a hub repo id")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    def run() -> int:
        summary = convert(args.src, args.dst, args.to, args.version, args.fps, args.image_storage,
                          args.robot_type, args.cache_dir, progress=not args.no_progress)
        print(f"{summary['episodes']} episodes written to {summary['destination']} ({args.to})")
        return 0

    return guarded(run, "convert")


if __name__ == "__main__":
    sys.exit(main())
