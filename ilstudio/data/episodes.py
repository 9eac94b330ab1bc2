"""Finding and validating episode files in the ACT HDF5 layout.

One file per episode::

    /observations/qpos            (T, state_dim)  float
    /observations/qvel            (T, state_dim)  float   (not used for training)
    /observations/images/<camera> (T, H, W, 3)    uint8
    /action                       (T, action_dim) float
    attrs: sim (bool), mirrored (bool, optional)

Validation reads headers only (shapes, dtypes, keys), so a bad file is reported in
seconds with its name, instead of as a shape error deep inside a DataLoader worker.

``HDF5Episode`` and ``HDF5Source`` are this format's implementation of the episode protocol
(``source.py``): the default format, for a directory no registered format claims and for a
bare path. ``open_episode``, ``is_mirrored``, ``check_episodes`` and ``check_camera_sizes``
take references of any format (bare paths as HDF5) and ask only the protocol.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import h5py
import numpy as np
from absl import logging

from ilstudio.config.settings import TaskSettings
from ilstudio.data.source import EpisodeRef, EpisodeSource, read_errors
from ilstudio.errors import UserError

QPOS_KEY = "observations/qpos"
ACTION_KEY = "action"
IMAGES_KEY = "observations/images"
QVEL_KEY = "observations/qvel"
TEXT_KEYS = {"subtask": "language/subtask", "reasoning": "language/reasoning"}  # (T,) strings
INSTRUCTION_ATTR = "language_instruction"


def _natural_key(path: Path) -> list:
    """Sort key so episode_2 comes before episode_10."""
    return [int(p) if p.isdigit() else p.lower() for p in re.split(r"(\d+)", path.name)]


def _why_not_a_file(p: Path) -> str | None:
    """Why a *.hdf5 entry is not an episode file (None if it is a readable regular file)."""
    try:
        st = os.stat(p)  # follows symlinks
    except FileNotFoundError:
        return f"dangling symlink (-> {os.readlink(p)})" if p.is_symlink() else "vanished"
    except OSError as e:
        return "symlink loop" if e.errno == errno.ELOOP else f"cannot be read ({e.strerror})"
    return None if stat.S_ISREG(st.st_mode) else "not a regular file"


def scan_episode_files(dataset_dir: str | Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """(episode files in natural order, [(name, why) for each *.hdf5 entry that was skipped]).

    Skipped entries (a dangling or looping symlink, a directory named *.hdf5) are warned about
    here and counted in the run's data_summary.json: never dropped without a word.
    """
    d = Path(dataset_dir).expanduser()
    if not str(dataset_dir):
        raise UserError("task.dataset_dir is empty: set it to a directory of episode_*.hdf5 files")
    if not d.is_dir():
        raise UserError(f"dataset directory {d} does not exist (expected a directory of "
                        "episode_*.hdf5 files in the ACT layout)")
    files, skipped = [], []
    for p in sorted(d.glob("*.hdf5"), key=_natural_key):
        why = _why_not_a_file(p)
        if why is None:
            files.append(p)
        else:
            skipped.append((p.name, why))
            logging.warning("%s: skipped, not an episode file: %s", p, why)
    if not files:
        found = f" ({len(skipped)} *.hdf5 entries skipped: see the warnings)" if skipped else ""
        raise UserError(f"dataset directory {d} has no *.hdf5 files{found} (expected "
                        "episode_*.hdf5 files in the ACT layout)")
    return files, skipped


def list_episode_files(dataset_dir: str | Path) -> list[Path]:
    """The episode_*.hdf5 (any *.hdf5) files of a directory, in natural order."""
    return scan_episode_files(dataset_dir)[0]


def episode_ref(path: Any) -> EpisodeRef:
    """An episode reference as the data layer keeps it: a bare path (str or PathLike) is an
    HDF5 file, the default format; any other format's references pass through."""
    return HDF5Episode(Path(path)) if isinstance(path, (str, os.PathLike)) else path


def open_episode(path: Any) -> EpisodeSource:
    """Open read-only (any format); an unreadable HDF5 file becomes a UserError naming it."""
    return episode_ref(path).open()


def is_mirrored(path: Any) -> bool:
    """The episode's ``mirrored`` mark (False when absent)."""
    return bool(episode_ref(path).mirrored)


def _dataset(f: h5py.File, key: str, name: str) -> h5py.Dataset:
    obj = f.get(key)
    if not isinstance(obj, h5py.Dataset):
        what = "is not a dataset" if obj is not None else "is missing"
        raise UserError(f"{name}: /{key} {what} (ACT layout expected)")
    return obj


def _check_2d(ds: h5py.Dataset, key: str, dim: int, dim_name: str, name: str) -> int:
    """Check a (T, dim) numeric array; returns T."""
    if ds.ndim != 2:
        raise UserError(f"{name}: /{key} has shape {ds.shape}, expected (T, {dim})")
    if ds.shape[1] != dim:
        raise UserError(f"{name}: /{key} has {ds.shape[1]} columns, task.{dim_name} is {dim}")
    if ds.dtype.kind not in "biuf":
        raise UserError(f"{name}: /{key} has dtype {ds.dtype}, which does not convert exactly to "
                        f"the float32 the policy trains on (expected a real integer or float type)")
    return ds.shape[0]


# float32 holds every integer up to 2**24 exactly; beyond, values would be silently rounded.
_FLOAT32_EXACT_INT = 2**24


def check_exact_values(where: str, values: np.ndarray) -> None:
    """A (T, dim) array of state/action values converts to the float32 the policy trains on
    exactly (integers up to 2**24) or at least finitely (floats), and is finite.

    Anything else (complex numbers losing their imaginary part, strings, integers rounded,
    float64 beyond float32's range becoming inf) would change the data silently, or surface
    mid-training as a NaN loss. ``where`` names the file and key. Every data format's episode
    check calls this.
    """
    values = np.asarray(values)
    if values.dtype.kind not in "biuf":
        raise UserError(f"{where} has dtype {values.dtype}, which does not convert exactly to "
                        f"the float32 the policy trains on (expected a real integer or float type)")
    if values.dtype.kind in "iu" and values.size:
        big = np.abs(values.astype(np.float64)) > _FLOAT32_EXACT_INT
        if big.any():
            t, col = (int(x) for x in np.argwhere(big)[0])
            raise UserError(f"{where} holds integer {values[t, col]} at step {t}, column {col}: "
                            f"beyond 2**24 it does not convert exactly to float32; store the "
                            f"values as floats")
        return
    with np.errstate(over="ignore"):
        bad = ~np.isfinite(values.astype(np.float32))
    if bad.any():
        t, col = (int(x) for x in np.argwhere(bad)[0])
        why = (f" ({values[t, col]} is beyond float32's range)" if np.isfinite(values[t, col])
               else "")
        raise UserError(f"{where} has {int(bad.sum())} non-finite value(s) (NaN or inf), first "
                        f"at step {t}, column {col}{why}; fix or remove the episode")


def _check_images(f: h5py.File, cameras: Sequence[str], steps: int, name: str,
                  frame_shapes: dict[str, tuple]) -> None:
    """Each listed camera is (T, H, W, 3) uint8, with the same H, W in every episode."""
    group = f.get(IMAGES_KEY)
    present = sorted(group.keys()) if isinstance(group, h5py.Group) else []
    for cam in cameras:
        if cam not in present:
            raise UserError(f"{name}: camera '{cam}' (task.camera_names) not under /{IMAGES_KEY}; "
                            f"the file has {present or 'no cameras'}")
        ds = _dataset(f, f"{IMAGES_KEY}/{cam}", name)
        key = f"{IMAGES_KEY}/{cam}"
        if ds.ndim != 4 or ds.shape[3] != 3:
            raise UserError(f"{name}: /{key} has shape {ds.shape}, expected (T, H, W, 3)")
        if min(ds.shape[1:3]) < 1:
            raise UserError(f"{name}: /{key} has shape {ds.shape}: frames of {ds.shape[1]}x"
                            f"{ds.shape[2]} pixels hold no image (expected (T, H, W, 3), H, W >= 1)")
        if ds.dtype != np.uint8:
            raise UserError(f"{name}: /{key} has dtype {ds.dtype}, expected uint8")
        if ds.shape[0] != steps:
            raise UserError(f"{name}: /{key} has {ds.shape[0]} frames but /{QPOS_KEY} has "
                            f"{steps} steps")
        check_chunks(ds, f"{name}: /{key}")
        hw = ds.shape[1:3]
        first = frame_shapes.setdefault(cam, hw)
        if hw != first:
            raise UserError(f"{name}: /{key} frames are {hw[0]}x{hw[1]} but earlier episodes' "
                            f"are {first[0]}x{first[1]}; all episodes need one frame size")


def _expected_chunks(ds: h5py.Dataset) -> int:
    return int(np.prod([-(-n // c) for n, c in zip(ds.shape, ds.chunks, strict=True)]))


def check_chunks(ds: h5py.Dataset, where: str) -> None:
    """The image dataset's stored chunks are whole, without decoding every frame.

    Every chunk the shape needs is allocated (an unallocated one reads back as black frames,
    silently), lies inside the file (a truncated copy), and a gzip chunk starts with a valid
    deflate stream; the first frame is decoded in full. Measured (bench/hostile.py's HDF5
    family, BENCHMARKS.md): ~0.05 s per 400-frame 240x320 camera, against ~2.5 s to decode all
    of it; a flipped byte deep inside a chunk's deflate data is found only when that frame is read.
    """
    import zlib

    size = os.path.getsize(ds.file.filename)
    try:
        if ds.chunks is None:
            offset = ds.id.get_offset()
            if offset is not None and offset + ds.id.get_storage_size() > size:
                raise UserError(f"{where}: its data runs past the end of the file (truncated?)")
        else:
            _check_chunk_index(ds, where, size, ds.compression == "gzip", zlib)
        ds[:1]  # one frame through the whole filter pipeline
    except (OSError, RuntimeError, ValueError, zlib.error) as e:
        raise UserError(f"{where}: image data is corrupt (cannot be decoded: "
                        f"{str(e)[:200]})") from None


def _check_chunk_index(ds: h5py.Dataset, where: str, size: int, gzip: bool, zlib: Any) -> None:
    n, want = ds.id.get_num_chunks(), _expected_chunks(ds)
    if n < want:
        raise UserError(f"{where}: {want - n} of its {want} chunks were never written (they "
                        f"would read back as blank frames); re-record or re-convert the episode")
    fd = os.open(ds.file.filename, os.O_RDONLY)
    try:
        for i in range(n):
            info = ds.id.get_chunk_info(i)
            if info.byte_offset is None or info.byte_offset + info.size > size:
                raise UserError(f"{where}: chunk {i} (frame {info.chunk_offset[0]}) lies past the "
                                f"end of the file (truncated?)")
            if gzip and info.filter_mask == 0:  # the head of its deflate stream decodes
                try:
                    zlib.decompressobj().decompress(os.pread(fd, min(info.size, 64), info.byte_offset), 1)
                except zlib.error as e:
                    raise UserError(f"{where}: chunk {i} (frame {info.chunk_offset[0]}) is corrupt "
                                    f"(not a deflate stream: {e})") from None
    finally:
        os.close(fd)


# The root attributes an episode file may carry, declared once: name -> (what, accepts).
def _scalar(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) or (isinstance(v, np.ndarray) and v.shape == ()) else v


EPISODE_ATTRS: dict[str, tuple[str, Any]] = {
    "fps": ("a positive finite number", lambda v: isinstance(v, (int, float)) and not
            isinstance(v, bool) and np.isfinite(v) and v > 0),
    "mirrored": ("true or false", lambda v: isinstance(v, bool) or v in (0, 1)),
    "sim": ("true or false", lambda v: isinstance(v, bool) or v in (0, 1)),
    "language_instruction": ("a string", lambda v: isinstance(v, (str, bytes))),
}


def check_attrs(attrs: Any, name: str) -> None:
    """The episode's root attributes against EPISODE_ATTRS (others are ignored): an fps of
    'abc' or inf, a mirrored array, a numeric instruction is a UserError naming the file."""
    for key, (what, ok) in EPISODE_ATTRS.items():
        if key in attrs:
            value = _scalar(attrs[key])
            try:
                good = bool(ok(value))
            except (TypeError, ValueError):
                good = False
            if not good:
                raise UserError(f"{name}: root attribute '{key}' is {str(value)[:60]!r}, "
                                f"expected {what}")


def check_one(path: Path, task: TaskSettings, need_images: bool,
              frame_shapes: dict[str, tuple] | None = None) -> int:
    """Validate one episode's headers; returns its length T."""
    name, ref = path.name, HDF5Episode(path)
    with _open_file(ref) as f, read_errors(ref):
        check_attrs(f.attrs, name)
        qpos = _dataset(f, QPOS_KEY, name)
        action = _dataset(f, ACTION_KEY, name)
        steps = _check_2d(qpos, QPOS_KEY, task.state_dim, "state_dim", name)
        act_steps = _check_2d(action, ACTION_KEY, task.action_dim, "action_dim", name)
        if act_steps != steps:
            raise UserError(f"{name}: /{ACTION_KEY} has {act_steps} steps but /{QPOS_KEY} "
                            f"has {steps}")
        if steps == 0:
            raise UserError(f"{name}: episode has 0 steps")
        for key, ds in ((QPOS_KEY, qpos), (ACTION_KEY, action)):
            check_exact_values(f"{name}: /{key}", ds[()])
        if need_images:
            _check_images(f, task.camera_names, steps, name,
                          {} if frame_shapes is None else frame_shapes)
    return steps


def check_camera_sizes(path: Any, cameras: Sequence[str], image_size: Sequence[int] | None) -> None:
    """Cameras of different frame sizes are stacked into one tensor only when fitted to
    dataset.image_size; without it, a UserError naming the sizes (not a stacking error later)."""
    if image_size is not None or len(cameras) < 2:
        return
    ref = episode_ref(path)
    with ref.open() as src, read_errors(ref):
        sizes = {cam: tuple(src.frame_size(cam)) for cam in cameras}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"'{c}' {h}x{w}" for c, (h, w) in sizes.items())
        raise UserError(f"cameras have different frame sizes ({listed}); bind dataset.image_size = "
                        f"(H, W) so every camera is fitted to one size")


def check_episodes(paths: Sequence[Any], task: TaskSettings, need_images: bool) -> list[int]:
    """Header-only validation of every episode; returns the episode lengths.

    Raises UserError naming the first bad file and what is wrong with it.
    """
    frame_shapes: dict[str, tuple] = {}
    lengths = []
    for p in paths:  # each format checks its own episodes
        lengths.append(episode_ref(p).check(task, need_images, frame_shapes))
    return lengths


# -- the HDF5 format's episode protocol (source.py) -------------------------------------


def _open_file(ref: HDF5Episode) -> h5py.File:
    with read_errors(ref):
        return h5py.File(ref.path, "r")


@dataclass(frozen=True)
class HDF5Episode:
    """A reference to one ACT HDF5 episode file (path-like: ``h5py.File(ref)`` works)."""

    path: Path
    read_as: ClassVar[str] = " as HDF5"

    @property
    def name(self) -> str:
        return self.path.name

    def __str__(self) -> str:
        return str(self.path)

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    @property
    def mirrored(self) -> bool:
        with _open_file(self) as f:
            return bool(f.attrs.get("mirrored", False))

    def open(self) -> HDF5Source:
        return HDF5Source(self)

    def check(self, task: TaskSettings, need_images: bool, frame_shapes: dict[str, tuple]) -> int:
        return check_one(self.path, task, need_images, frame_shapes)


class HDF5Source:
    """An open HDF5 episode. Datasets are held open once read (``file[key]`` re-opens one on
    every call: ~246 us against ~17 us for a held handle, several per sample)."""

    def __init__(self, ref: HDF5Episode) -> None:
        self.ref = ref
        self.file = _open_file(ref)
        self.held: dict[str, h5py.Dataset] = {}

    def _get(self, key: str) -> h5py.Dataset:
        ds = self.held.get(key)
        if ds is None:
            ds = self.held[key] = self.file[key]
        return ds

    @property
    def name(self) -> str:
        return str(self.ref.path)

    @property
    def steps(self) -> int:
        return int(self._get(QPOS_KEY).shape[0])

    @property
    def mirrored(self) -> bool:
        return bool(self.file.attrs.get("mirrored", False))

    @property
    def fps(self) -> float | None:
        return float(self.file.attrs["fps"]) if "fps" in self.file.attrs else None

    @property
    def instruction(self) -> str | None:
        text = self.file.attrs.get(INSTRUCTION_ATTR)
        return text.decode() if isinstance(text, bytes) else text

    def __enter__(self) -> HDF5Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.held.clear()
        self.file.close()

    def states(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self._get(QPOS_KEY)[start:stop]

    def actions(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self._get(ACTION_KEY)[start:stop]

    def velocities(self) -> np.ndarray | None:
        qvel = self.file.get(QVEL_KEY)
        return None if qvel is None else qvel[()]

    def cameras(self) -> list[str]:
        group = self.file.get(IMAGES_KEY)
        return list(group.keys()) if group is not None else []

    def frame_size(self, camera: str) -> tuple[int, int]:
        return tuple(self._get(f"{IMAGES_KEY}/{camera}").shape[1:3])

    def frames(self, camera: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self._get(f"{IMAGES_KEY}/{camera}")[start:stop]

    def frame_blocks(self, camera: str, block: int) -> Iterator[np.ndarray]:
        """One block read at a time: only one block of full-size frames is held."""
        ds = self._get(f"{IMAGES_KEY}/{camera}")
        for s in range(0, len(ds), block):
            yield ds[s:s + block]

    def step_texts(self, kind: str, steps: int) -> tuple[str, ...] | None:
        """/language/<kind>: a (T,) string dataset, or None when absent."""
        key = TEXT_KEYS[kind]
        obj = self.file.get(key)
        if obj is None:
            return None
        if not isinstance(obj, h5py.Dataset) or obj.ndim != 1 or obj.shape[0] != steps:
            raise UserError(f"{self.ref.name}: /{key} must be a (T,) string dataset with T = "
                            f"{steps} steps, got {getattr(obj, 'shape', 'a group')}")
        try:
            return tuple(str(s) for s in obj.asstr()[()])
        except (TypeError, ValueError):
            raise UserError(f"{self.ref.name}: /{key} has dtype {obj.dtype}, expected "
                            "strings") from None

    def check_declared(self) -> None:
        check_attrs(self.file.attrs, self.name)
