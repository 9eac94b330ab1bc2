"""Reading a LeRobotDataset (v2.1 or v3.0) as ilstudio episodes.

Each episode becomes a ``LeRobotEpisode`` reference implementing the episode protocol
(``source.py``); ``open()`` gives a ``LeRobotSource`` (states = ``observation.state``, actions =
``action``, velocities = ``observation.velocity``, frames of camera <cam> =
``observation.images.<cam>``, instruction = the episode's task), so ``EpisodeDataset`` and
its parameters (preload_data, lazy_preprocess, history_images_length, image_aspect_ratio,
episode_first, skip_mirrored_data, normalization) work unchanged.

Frames come from the mp4 at ``from_timestamp + timestamp[i]`` (video.py decodes by
timestamp, LeRobot's rule), or from PNG bytes in the parquet for ``dtype: image`` features.
The parquet's numeric columns are read once per file per process and shared by the episodes
a v3.0 file holds.
"""

from __future__ import annotations

import functools
import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ilstudio.data.episodes import check_exact_values
from ilstudio.data.lerobot_format import (
    ACTION_KEY as LR_ACTION,
)
from ilstudio.data.lerobot_format import (
    CAMERA_PREFIX,
    DEFAULT_CHUNK_SIZE,
    STATE_KEY,
    V21_DATA_PATH,
    V21_VIDEO_PATH,
    V30_DATA_PATH,
    V30_VIDEO_PATH,
    VELOCITY_KEY,
    LeRobotInfo,
    camera_key,
    load_info,
)
from ilstudio.data.lerobot_schema import EpisodeFiles, check_data_files, check_tables
from ilstudio.data.video import DECODED, VideoError, decode_run, probe, shared_reader
from ilstudio.errors import UserError

MIRRORED_FIELD = "mirrored"  # an optional per-episode field (ilstudio writes it; LeRobot ignores it)


def _pa():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("reading LeRobot datasets needs pyarrow and av: "
                        "pip install 'ilstudio[lerobot]'") from None
    return pa, pq


@dataclass(frozen=True)
class VideoSpan:
    """Where one camera's frames of one episode are: a file and the episode's start time in it."""

    path: str  # relative to the dataset root
    from_timestamp: float
    to_timestamp: float


@dataclass(frozen=True)
class EpisodeMeta:
    index: int
    length: int
    tasks: tuple[str, ...]
    data_file: str  # relative to the dataset root
    videos: dict[str, VideoSpan] = field(default_factory=dict)  # camera -> span
    mirrored: bool = False


class LeRobotData:
    """One LeRobot dataset on disk: info, tasks and the episode table."""

    def __init__(self, info: LeRobotInfo, episodes: list[EpisodeMeta], tasks: dict[int, str]) -> None:
        self.info, self.episodes, self.tasks = info, episodes, tasks
        self.root = info.root

    @classmethod
    def load(cls, root: str | Path) -> LeRobotData:
        info = load_info(root)  # checks info.json against lerobot_schema's declarations
        keys = _video_keys(info)
        check_tables(info.raw, info.root, list(keys.values()))  # before the loaders read them
        loader = _load_v21 if info.version == "v2.1" else _load_v30
        episodes, tasks = loader(info)
        check_data_files(info.root, info.fps, [
            EpisodeFiles(e.index, e.length, e.data_file,
                         {keys[c]: (s.path, s.from_timestamp) for c, s in e.videos.items()},
                         e.tasks)
            for e in episodes], tasks, {STATE_KEY: info.state_dim, LR_ACTION: info.action_dim})
        return cls(info, episodes, tasks)

    def refs(self) -> list[LeRobotEpisode]:
        return [LeRobotEpisode(self, ep) for ep in self.episodes]

    @functools.cached_property
    def decoded_bytes(self) -> int:
        """Every video frame of the dataset decoded (all video cameras), in bytes."""
        frames = sum(ep.length for ep in self.episodes)
        return frames * sum(3 * int(np.prod(self.info.frame_shape(cam)))
                            for cam, f in self.info.cameras.items() if f.get("dtype") == "video")


def _read_jsonl(path: Path) -> list[dict]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise UserError(f"{path}: missing (a LeRobot v2.1 dataset has meta/episodes.jsonl and "
                        f"meta/tasks.jsonl)") from None
    try:
        return [json.loads(line) for line in lines if line.strip()]
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON lines ({e})") from None


def _video_keys(info: LeRobotInfo) -> dict[str, str]:
    """camera -> feature key, for the cameras stored as video."""
    return {cam: camera_key(cam, info.features) for cam, f in info.cameras.items()
            if f.get("dtype") == "video"}


def _load_v21(info: LeRobotInfo) -> tuple[list[EpisodeMeta], dict[int, str]]:
    raw = info.raw
    chunks = int(raw.get("chunks_size") or DEFAULT_CHUNK_SIZE)
    data_path = raw.get("data_path") or V21_DATA_PATH
    video_path = raw.get("video_path") or V21_VIDEO_PATH
    tasks = {int(t["task_index"]): str(t["task"]) for t in _read_jsonl(info.root / "meta/tasks.jsonl")}
    episodes = []
    for row in sorted(_read_jsonl(info.root / "meta/episodes.jsonl"), key=lambda r: r["episode_index"]):
        i, n = int(row["episode_index"]), int(row["length"])
        videos = {cam: VideoSpan(video_path.format(episode_chunk=i // chunks, video_key=key,
                                                   episode_index=i), 0.0, n / info.fps)
                  for cam, key in _video_keys(info).items()}
        episodes.append(EpisodeMeta(i, n, tuple(row.get("tasks") or ()),
                                    data_path.format(episode_chunk=i // chunks, episode_index=i),
                                    videos, bool(row.get(MIRRORED_FIELD, False))))
    return episodes, tasks


def _read_parquet_dir(directory: Path, what: str) -> list[dict]:
    """Rows of every parquet file under directory (sorted), without LeRobot's stats/* columns."""
    _, pq = _pa()
    files = sorted(directory.rglob("*.parquet"))
    if not files:
        raise UserError(f"{directory}: no parquet files ({what} of a LeRobot v3.0 dataset)")
    rows = []
    for f in files:
        try:
            schema = pq.read_schema(f)
            cols = [c for c in schema.names if not c.startswith("stats/")]
            rows += pq.read_table(f, columns=cols).to_pylist()
        except (OSError, ValueError) as e:
            raise UserError(f"{f}: cannot be read as parquet (truncated or corrupt?): {e}") from None
    return rows


def _load_v30(info: LeRobotInfo) -> tuple[list[EpisodeMeta], dict[int, str]]:
    _, pq = _pa()
    raw = info.raw
    data_path = raw.get("data_path") or V30_DATA_PATH
    video_path = raw.get("video_path") or V30_VIDEO_PATH
    tasks_file = info.root / "meta/tasks.parquet"
    try:
        table = pq.read_table(tasks_file).to_pylist()
    except FileNotFoundError:
        raise UserError(f"{tasks_file}: missing (a LeRobot v3.0 dataset has meta/tasks.parquet)") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{tasks_file}: cannot be read as parquet: {e}") from None
    tasks = {}
    for row in table:  # pandas stores the DataFrame index ("task") as a column
        text = row.get("task", row.get("__index_level_0__"))
        tasks[int(row["task_index"])] = str(text)
    episodes = []
    for row in sorted(_read_parquet_dir(info.root / "meta/episodes", "episode metadata"),
                      key=lambda r: r["episode_index"]):
        try:
            i, n = int(row["episode_index"]), int(row["length"])
            data = data_path.format(chunk_index=row["data/chunk_index"], file_index=row["data/file_index"])
            videos = {}
            for cam, key in _video_keys(info).items():
                p = f"videos/{key}/"
                videos[cam] = VideoSpan(
                    video_path.format(video_key=key, chunk_index=row[p + "chunk_index"],
                                      file_index=row[p + "file_index"]),
                    float(row[p + "from_timestamp"]), float(row[p + "to_timestamp"]))
        except KeyError as e:
            raise UserError(f"{info.root / 'meta/episodes'}: episode rows lack column {e} "
                            f"(LeRobot v3.0 layout expected)") from None
        episodes.append(EpisodeMeta(i, n, tuple(row.get("tasks") or ()), data, videos,
                                    bool(row.get(MIRRORED_FIELD) or False)))
    return episodes, tasks


# -- parquet columns, read once per file and process ----------------------------------------


@functools.lru_cache(maxsize=4)
def _numeric_columns(path: str, mtime: float, pid: int) -> dict[str, np.ndarray]:
    """episode_index, frame_index, timestamp, task_index, state and action of a data file."""
    del mtime, pid  # cache keys only: a rewritten file, a forked process
    pa, pq = _pa()
    try:
        names = pq.read_schema(path).names
        want = [c for c in ("episode_index", "frame_index", "timestamp", "task_index", STATE_KEY,
                            LR_ACTION, VELOCITY_KEY) if c in names]
        table = pq.read_table(path, columns=want)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot be read as parquet (truncated or corrupt?): {e}") from None
    out = {}
    for name in want:
        col = table.column(name).combine_chunks()
        if pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type) \
                or pa.types.is_large_list(col.type):
            values = col.flatten().to_numpy(zero_copy_only=False)
            out[name] = values.reshape(len(col), -1) if len(col) else values.reshape(0, 0)
        else:
            out[name] = col.to_numpy(zero_copy_only=False)
    return out


@functools.lru_cache(maxsize=32)  # episodes, per process: bounded memory for large datasets
def _episode_images(path: str, column: str, episode: int, mtime: float, pid: int) -> list:
    """One episode's cells of an image column, in frame order (only its row groups are read)."""
    del mtime, pid
    _, pq = _pa()
    try:
        table = pq.read_table(path, columns=[column, "frame_index"],
                              filters=[("episode_index", "=", episode)])
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path}: no readable image column '{column}': {e}") from None
    order = np.argsort(table.column("frame_index").to_numpy(), kind="stable")
    cells = table.column(column).to_pylist()
    return [cells[k] for k in order]


def _file_key(path: Path) -> tuple[str, float, int]:
    try:
        return str(path), path.stat().st_mtime, os.getpid()
    except FileNotFoundError:
        raise UserError(f"{path}: data file is missing") from None


class LeRobotEpisode:
    """A reference to one episode of a LeRobot dataset (an episode 'path' for the data layer)."""

    def __init__(self, data: LeRobotData, meta: EpisodeMeta) -> None:
        self.data, self.meta = data, meta

    @property
    def name(self) -> str:
        return f"{self.data.root.name}/episode_{self.meta.index:06d}"

    def __repr__(self) -> str:
        return f"LeRobotEpisode({self.data.root}, {self.meta.index})"

    def __str__(self) -> str:
        return f"{self.data.root}#episode_{self.meta.index}"

    @property
    def mirrored(self) -> bool:
        return self.meta.mirrored

    def check(self, task: Any, need_images: bool, frame_shapes: dict[str, tuple]) -> int:
        """Validate this episode against the task and its files; returns its length
        (``episodes.check_episodes`` asks each LeRobot reference, see ``check_episode``)."""
        return check_episode(self, task, need_images, frame_shapes)

    read_as = ""  # "cannot be read" messages: the reference already names the dataset

    def open(self) -> LeRobotSource:
        return LeRobotSource(self)

    def rows(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The data file's numeric columns and this episode's row indices in frame order."""
        path = self.data.root / self.meta.data_file
        cols = _numeric_columns(*_file_key(path))
        if "episode_index" not in cols:
            raise UserError(f"{path}: no episode_index column (LeRobot layout expected)")
        rows = np.nonzero(cols["episode_index"] == self.meta.index)[0]
        if "frame_index" in cols:
            rows = rows[np.argsort(cols["frame_index"][rows], kind="stable")]
        return cols, rows


class LeRobotSource:
    """An open LeRobot episode (the episode protocol of source.py)."""

    def __init__(self, ref: LeRobotEpisode) -> None:
        self.ref = ref
        data, meta = ref.data, ref.meta
        cols, rows = ref.rows()
        path = data.root / meta.data_file
        for key in (STATE_KEY, LR_ACTION, "timestamp"):
            if key not in cols:
                raise UserError(f"{path}: no '{key}' column (LeRobot layout expected)")
        self.timestamps = cols["timestamp"][rows].astype(np.float64)
        self._state, self._action = cols[STATE_KEY][rows], cols[LR_ACTION][rows]
        self._velocity = cols[VELOCITY_KEY][rows] if VELOCITY_KEY in cols else None
        task_index = cols.get("task_index")
        task = (data.tasks.get(int(task_index[rows[0]])) if task_index is not None and len(rows)
                else None) or (meta.tasks[0] if meta.tasks else "")
        # absent, not empty: language falls back on vla.instruction as for HDF5
        self.instruction: str | None = task or None
        self.mirrored, self.fps = meta.mirrored, data.info.fps

    @property
    def name(self) -> str:
        return str(self.ref)

    @property
    def steps(self) -> int:
        return len(self.timestamps)

    def __enter__(self) -> LeRobotSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Nothing to release: video readers are shared per file and process (video.shared_reader)."""

    def states(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self._state[start:stop]

    def actions(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self._action[start:stop]

    def velocities(self) -> np.ndarray | None:
        return self._velocity

    def cameras(self) -> list[str]:
        return list(self.ref.data.info.cameras)

    def frame_size(self, camera: str) -> tuple[int, int]:
        return self.ref.data.info.frame_shape(camera)

    def frames(self, camera: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self.frames_at(camera, np.arange(self.steps)[start:stop])

    def frame_blocks(self, camera: str, block: int) -> Iterator[np.ndarray]:
        """A video is decoded whole (one pass), then handed out block by block."""
        frames = self.frames(camera)
        for s in range(0, len(frames), block):
            yield frames[s:s + block]

    def step_texts(self, kind: str, steps: int) -> tuple[str, ...] | None:
        """LeRobot datasets carry no per-step texts."""
        return None

    def check_declared(self) -> None:
        """info.json and the tables were checked against lerobot_schema when loaded."""

    def frames_at(self, camera: str, indices: np.ndarray) -> np.ndarray:
        """uint8 (n, H, W, 3) frames of this episode at the given step indices."""
        data, meta = self.ref.data, self.ref.meta
        feature = data.info.cameras[camera]
        if feature.get("dtype") == "image":
            return self._png_frames(camera, indices)
        span = meta.videos[camera]
        reader = shared_reader(data.root / span.path)
        if len(indices) == len(self.timestamps):  # a whole episode (preload): no second copy
            return reader.frames_at(span.from_timestamp + self.timestamps[indices])
        key = (os.fspath(data.root / span.path), span.from_timestamp, len(self.timestamps))
        episode = DECODED.get(key)
        if episode is None and 0 < data.decoded_bytes <= DECODED.limit:
            # The whole dataset fits this process's share: decode this episode once, in one pass.
            episode = decode_run(data.root / span.path, span.from_timestamp + self.timestamps)
            DECODED.put(key, episode)
        if episode is not None:
            return episode[indices]
        return reader.frames_at(span.from_timestamp + self.timestamps[indices])

    def _png_frames(self, camera: str, indices: np.ndarray) -> np.ndarray:
        from PIL import Image

        path = self.ref.data.root / self.ref.meta.data_file
        name, mtime, pid = _file_key(path)
        key = camera_key(camera, self.ref.data.info.features)
        cells = _episode_images(name, key, self.ref.meta.index, mtime, pid)
        if len(cells) != len(self.timestamps):
            raise UserError(f"{path}: {key} has {len(cells)} frames for episode "
                            f"{self.ref.meta.index}, the parquet has {len(self.timestamps)} steps")
        out = []
        for i in indices:
            cell = cells[int(i)]
            raw = cell.get("bytes") if isinstance(cell, dict) else cell
            if raw is None and isinstance(cell, dict) and cell.get("path"):
                raw = (self.ref.data.root / cell["path"]).read_bytes()
            if raw is None:
                raise UserError(f"{path}: {key} is empty at frame {int(i)} of "
                                f"episode {self.ref.meta.index}")
            try:
                out.append(np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")))
            except OSError as e:
                raise UserError(f"{path}: {key} frame {int(i)} of episode "
                                f"{self.ref.meta.index} is not a readable image: {e}") from None
        return np.stack(out)


# -- validation ------------------------------------------------------------------------------


def _probe(path: Path) -> dict:
    """Video header facts, read once per file version (a v3.0 file serves many episodes)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return probe(path)  # raises the named error
    return _probe_cached(path, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=256)
def _probe_cached(path: Path, mtime_ns: int, size: int) -> dict:
    del mtime_ns, size  # cache keys only
    return probe(path)


def check_episode(ref: LeRobotEpisode, task: Any, need_images: bool,
                  frame_shapes: dict[str, tuple]) -> int:
    """Validate one episode against the task and its files; returns its length."""
    data, meta, info = ref.data, ref.meta, ref.data.info
    where = f"{data.root} episode {meta.index}"
    for name, ours, theirs in (("state_dim", task.state_dim, info.state_dim),
                               ("action_dim", task.action_dim, info.action_dim)):
        if ours != theirs:
            raise UserError(f"{where}: task.{name} is {ours} but the dataset's info.json gives "
                            f"{theirs}")
    with LeRobotSource(ref) as src:
        steps = len(src.timestamps)
        if steps != meta.length:
            raise UserError(f"{data.root / meta.data_file}: episode {meta.index} has {steps} rows "
                            f"but the episode metadata says length {meta.length}")
        if steps == 0:
            raise UserError(f"{where}: episode has 0 steps")
        for arr, name, dim in ((src.states(), STATE_KEY, info.state_dim),
                               (src.actions(), LR_ACTION, info.action_dim)):
            arr = np.asarray(arr)
            if arr.ndim != 2 or arr.shape[1] != dim:
                raise UserError(f"{data.root / meta.data_file}: '{name}' of episode {meta.index} "
                                f"has shape {arr.shape}, info.json says ({steps}, {dim})")
            check_exact_values(f"{where}: '{name}'", arr)
        if need_images:
            _check_cameras(ref, task.camera_names, src.timestamps, frame_shapes)
    return steps


def _check_cameras(ref: LeRobotEpisode, cameras: Sequence[str], timestamps: np.ndarray,
                   frame_shapes: dict[str, tuple]) -> None:
    data, meta, info = ref.data, ref.meta, ref.data.info
    for cam in cameras:
        if cam not in info.cameras:
            raise UserError(f"{data.root}: camera '{cam}' (task.camera_names) is not a feature; "
                            f"the dataset has {list(info.cameras) or 'no cameras'} "
                            f"({CAMERA_PREFIX}<name>)")
        hw = info.frame_shape(cam)
        first = frame_shapes.setdefault(cam, hw)
        if hw != first:
            raise UserError(f"{data.root}: camera '{cam}' frames are {hw[0]}x{hw[1]} but earlier "
                            f"episodes' are {first[0]}x{first[1]}; all episodes need one frame size")
        if info.cameras[cam].get("dtype") != "video":
            continue
        span = meta.videos[cam]
        video = data.root / span.path
        head = _probe(video)
        if (head["height"], head["width"]) != hw:
            raise VideoError(f"{video}: frames are {head['height']}x{head['width']} but info.json "
                             f"says {hw[0]}x{hw[1]} for {camera_key(cam, info.features)}")
        last = span.from_timestamp + float(timestamps[-1])
        needed = int(round(last * info.fps)) + 1
        if head["frames"] and head["frames"] < needed:
            raise VideoError(f"{video}: has {head['frames']} frames but episode {meta.index} "
                             f"({len(timestamps)} steps in the parquet, from {span.from_timestamp:.3f} s) "
                             f"needs {needed}: frame count disagrees with the parquet")
        if data.info.version == "v2.1" and head["frames"] and head["frames"] != len(timestamps):
            raise VideoError(f"{video}: has {head['frames']} frames but the parquet has "
                             f"{len(timestamps)} steps for episode {meta.index}")


def list_lerobot_episodes(root: str | Path) -> list[LeRobotEpisode]:
    return LeRobotData.load(root).refs()
