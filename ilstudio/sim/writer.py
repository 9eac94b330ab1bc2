"""Writing one episode in the ACT HDF5 layout, atomically.

The file is written under a hidden temporary name in the destination directory and
renamed into place only when complete (``rundir.atomic_path``), so a recorder killed at
any moment leaves either a whole ``episode_<i>.hdf5`` or none; the temporary file does not
match ``*.hdf5`` and is removed on any error.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ilstudio.rundir import atomic_path

TMP_SUFFIX = ".hdf5.partial"


def write_episode(path: str | os.PathLike, *, qpos: np.ndarray, qvel: np.ndarray,
                  action: np.ndarray, images: Mapping[str, np.ndarray], gzip_level: int = 4,
                  attrs: Mapping[str, Any] | None = None) -> Path:
    """Write /observations/{qpos,qvel,images/<cam>} and /action; returns the final path.

    images: camera -> (T, H, W, 3) uint8, stored chunked one frame per chunk (a training
    sample decompresses only its own frame).
    """
    path = Path(path)
    steps = len(qpos)
    if not (len(qvel) == len(action) == steps and all(len(v) == steps for v in images.values())):
        raise ValueError("qpos, qvel, action and every camera need the same number of steps")
    with atomic_path(path, suffix=TMP_SUFFIX) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["sim"] = True
        for key, value in (attrs or {}).items():
            f.attrs[key] = value
        obs = f.create_group("observations")
        obs.create_dataset("qpos", data=np.asarray(qpos, dtype=np.float64))
        obs.create_dataset("qvel", data=np.asarray(qvel, dtype=np.float64))
        f.create_dataset("action", data=np.asarray(action, dtype=np.float64))
        group = obs.create_group("images")
        for cam, frames in images.items():
            frames = np.asarray(frames, dtype=np.uint8)
            compression = {"compression": "gzip", "compression_opts": gzip_level} if gzip_level else {}
            group.create_dataset(cam, data=frames, chunks=(1, *frames.shape[1:]), **compression)
    return path


def remove_partials(directory: str | os.PathLike) -> list[Path]:
    """Delete temporary files a killed recorder left behind; returns what was removed."""
    removed = []
    for p in Path(directory).glob(f".*{TMP_SUFFIX}"):
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed
