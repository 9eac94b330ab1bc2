"""Writing episodes as a LeRobotDataset (v3.0 by default, or v2.1), per LeRobot's layout.

What LeRobot's tools (its dataset visualizer, ``LeRobotDataset``) read: meta/info.json with
the features, fps and path templates; per-frame parquet rows (``observation.state``, ``action``,
``timestamp`` = i/fps, ``frame_index``, ``episode_index``, ``index``, ``task_index``); videos
(h264, a keyframe every 2 frames as LeRobot encodes, yuv420p, or yuv444p for odd frame sizes,
which yuv420p cannot hold; each episode encoded alone and then appended, so every episode
starts on a keyframe); the episode table with file indices and from/to timestamps (v3.0)
or episodes.jsonl (v2.1); tasks; stats with LeRobot's quantiles (``lerobot_stats``). v3.0
files roll over by LeRobot's size rules (``_data_file``, ``_append_video``). Cameras may
instead be stored as PNG images in the parquet (``dtype: image``, lossless;
``image_storage='image'``).

An episode's ``mirrored`` mark is kept in an extra ``mirrored`` episode field (LeRobot
ignores unknown fields) so ``dataset.skip_mirrored_data`` keeps working after conversion.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np

from ilstudio.data.lerobot_format import (
    ACTION_KEY,
    CAMERA_PREFIX,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_FEATURES,
    INFO_PATH,
    STATE_KEY,
    SUPPORTED_VERSIONS,
    V21_DATA_PATH,
    V21_VIDEO_PATH,
    V30_DATA_PATH,
    V30_EPISODES_PATH,
    V30_VIDEO_PATH,
    VELOCITY_KEY,
)
from ilstudio.data.lerobot_reader import MIRRORED_FIELD, _pa
from ilstudio.data.lerobot_stats import aggregate, image_stats, vector_stats
from ilstudio.data.video import CODEC, ENCODER_INFO, VideoAppender, encode_episode
from ilstudio.errors import UserError

DATA_FILE_MB = 100  # LeRobot's defaults for v3.0 file sizes (DEFAULT_*_FILE_SIZE_IN_MB)
VIDEO_FILE_MB = 200
EPISODE_VIDEOS = ".episode_videos"  # under root while writing: each episode encoded alone


def _size_mb(path: Path) -> float:
    """A file's size on disk in MiB, as LeRobot's get_file_size_in_mb measures it."""
    return path.stat().st_size / 2**20


def _hf_feature(ft: dict) -> dict:
    """A LeRobot feature as Hugging Face ``datasets`` describes it in parquet metadata."""
    if ft["dtype"] == "image":
        return {"_type": "Image"}
    value = {"dtype": ft["dtype"], "_type": "Value"}
    if list(ft["shape"]) == [1]:
        return value
    return {"feature": value, "length": int(ft["shape"][0]), "_type": "Sequence"}


def _png(frame: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(frame)).save(buf, format="png")
    return buf.getvalue()


class LeRobotWriter:
    """Add episodes one by one, then ``close()`` writes the metadata.

    root must not exist or be empty. fps: the recording rate (timestamps are i/fps; a
    fractional rate such as 29.97 is kept as it is). data_files_size_in_mb /
    video_files_size_in_mb: v3.0 file size limits (LeRobot's info.json fields).
    """

    def __init__(self, root: str | Path, fps: float, version: str = "v3.0",
                 robot_type: str | None = None, image_storage: str = "video",
                 data_files_size_in_mb: float = DATA_FILE_MB,
                 video_files_size_in_mb: float = VIDEO_FILE_MB) -> None:
        if version not in SUPPORTED_VERSIONS:
            raise UserError(f"LeRobot version {version!r} cannot be written; choose one of "
                            f"{', '.join(SUPPORTED_VERSIONS)}")
        if image_storage not in ("video", "image"):
            raise UserError(f"image_storage must be 'video' or 'image', got {image_storage!r}")
        if not fps > 0:
            raise UserError(f"fps must be positive, got {fps}")
        if not (data_files_size_in_mb > 0 and video_files_size_in_mb > 0):  # as LeRobot's DatasetInfo
            raise UserError(f"data_files_size_in_mb and video_files_size_in_mb must be positive, got "
                            f"{data_files_size_in_mb} and {video_files_size_in_mb}")
        self.root = Path(root)
        if self.root.exists() and any(self.root.iterdir()):
            raise UserError(f"{self.root} exists and is not empty; choose a new directory")
        self.root.mkdir(parents=True, exist_ok=True)
        # LeRobot's info.json holds fps as an int (DatasetInfo.fps: int) wherever it is one.
        self.fps = int(fps) if float(fps).is_integer() else float(fps)
        self.version, self.robot_type = version, robot_type
        self.data_mb, self.video_mb = data_files_size_in_mb, video_files_size_in_mb
        self.image_storage = image_storage
        self.features: dict[str, dict] | None = None
        self.cameras: list[str] = []
        self.tasks: dict[str, int] = {}
        self.episodes: list[dict] = []
        self.episode_stats: list[dict[str, dict]] = []
        self.frames = 0
        # v3.0 open files: data [ParquetWriter, chunk, file, path, first frame], video per
        # camera [VideoAppender, chunk, file]
        self._data: list | None = None
        self._videos: dict[str, list] = {}

    def __enter__(self) -> LeRobotWriter:
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._close_files()

    # -- features ------------------------------------------------------------------------

    def _init_features(self, vectors: dict[str, np.ndarray], images: dict[str, np.ndarray]) -> None:
        feats: dict[str, dict] = {}
        for key, x in vectors.items():
            stem = key.rsplit(".", 1)[-1]
            feats[key] = {"dtype": str(x.dtype), "shape": [x.shape[1]],
                          "names": [f"{stem}_{i}" for i in range(x.shape[1])]}
        for cam, frames in images.items():
            h, w = frames.shape[1:3]
            feat = {"dtype": self.image_storage, "shape": [h, w, 3],
                    "names": ["height", "width", "channels"]}
            if self.image_storage == "video":
                from ilstudio.data.video import pix_fmt_for

                # LeRobot's get_video_info: stream facts, then its encoder config's fields.
                feat["info"] = {"video.height": h, "video.width": w, "video.codec": "h264",
                                "video.pix_fmt": pix_fmt_for(h, w), "video.fps": self.fps,
                                "video.channels": 3, "has_audio": False, **ENCODER_INFO,
                                "is_depth_map": False}
            feats[CAMERA_PREFIX + cam] = feat
        feats.update(json.loads(json.dumps(DEFAULT_FEATURES)))
        if self.version == "v3.0":  # as LeRobot's v2.1 -> v3.0 conversion: videos carry theirs in info
            for f in feats.values():
                if f["dtype"] != "video":
                    f["fps"] = self.fps
        self.features, self.cameras = feats, list(images)

    # -- episodes ------------------------------------------------------------------------

    def _check_like_first(self, vectors: dict[str, np.ndarray], images: dict[str, np.ndarray]) -> None:
        """One schema per dataset: every episode has the first one's features, dims and sizes."""
        assert self.features is not None
        have = {k: [v.shape[1]] for k, v in vectors.items()}
        have.update({CAMERA_PREFIX + c: [*v.shape[1:3], 3] for c, v in images.items()})
        first = {k: f["shape"] for k, f in self.features.items()
                 if k in (STATE_KEY, ACTION_KEY, VELOCITY_KEY) or k.startswith(CAMERA_PREFIX)}
        dtypes_differ = [k for k, v in vectors.items() if self.features[k]["dtype"] != str(v.dtype)] \
            if set(have) == set(first) else []
        if have != first or dtypes_differ:
            raise UserError(f"episode {len(self.episodes)} has features {have} but the first episode "
                            f"had {first}; a LeRobot dataset has one schema for all episodes")

    def add_episode(self, state: np.ndarray, action: np.ndarray, images: dict[str, np.ndarray],
                    task: str = "", mirrored: bool = False, velocity: np.ndarray | None = None) -> None:
        """state (T, S), action (T, A), images camera -> uint8 (T, H, W, 3), velocity (T, S) or None.

        float64 state/action stay float64 (so HDF5 -> LeRobot -> HDF5 is exact); other
        numbers are stored as float32, LeRobot's usual type.
        """
        vectors = {STATE_KEY: state, ACTION_KEY: action}
        if velocity is not None:
            vectors[VELOCITY_KEY] = velocity
        vectors = {k: np.asarray(v, dtype=np.float64 if np.asarray(v).dtype == np.float64
                                 else np.float32) for k, v in vectors.items()}
        for k, v in vectors.items():
            if v.ndim != 2:
                raise UserError(f"episode {len(self.episodes)}: {k} has shape {v.shape}, expected (T, dim)")
        images = {c: np.asarray(v, dtype=np.uint8) for c, v in images.items()}
        steps = len(vectors[STATE_KEY])
        if steps == 0 or any(len(v) != steps for v in [*vectors.values(), *images.values()]):
            raise UserError(f"episode {len(self.episodes)}: state, action and every camera need the "
                            f"same, non-zero number of steps")
        if self.features is None:
            self._init_features(vectors, images)
        else:
            self._check_like_first(vectors, images)
        ep = len(self.episodes)
        task_index = self.tasks.setdefault(task, len(self.tasks))
        ts = (np.arange(steps) / self.fps).astype(np.float32)
        columns = {**vectors, "timestamp": ts,
                   "frame_index": np.arange(steps, dtype=np.int64),
                   "episode_index": np.full(steps, ep, dtype=np.int64),
                   "index": np.arange(self.frames, self.frames + steps, dtype=np.int64),
                   "task_index": np.full(steps, task_index, dtype=np.int64)}
        if self.image_storage == "image":
            for cam, frames in images.items():
                columns[CAMERA_PREFIX + cam] = [{"bytes": _png(f), "path": None} for f in frames]
        stats = {k: vector_stats(v) for k, v in vectors.items()}
        for key in ("timestamp", "frame_index", "episode_index", "index", "task_index"):
            stats[key] = vector_stats(np.asarray(columns[key]))
        for cam, frames in images.items():
            stats[CAMERA_PREFIX + cam] = image_stats(frames)
        record = {"episode_index": ep, "tasks": [task], "length": steps, MIRRORED_FIELD: bool(mirrored)}
        if self.version == "v3.0":
            record.update(self._append_v30(columns, images, steps))
        else:
            self._write_v21(ep, columns, images)
        self.episodes.append(record)
        self.episode_stats.append(stats)
        self.frames += steps

    def _table(self, columns: dict):
        pa, _ = _pa()
        arrays, names = [], []
        for name, values in columns.items():
            if name in (STATE_KEY, ACTION_KEY, VELOCITY_KEY):
                flat = pa.array(np.ascontiguousarray(values).reshape(-1))
                arrays.append(pa.FixedSizeListArray.from_arrays(flat, values.shape[1]))
            elif name.startswith(CAMERA_PREFIX):
                arrays.append(pa.array(values, type=pa.struct([("bytes", pa.binary()),
                                                               ("path", pa.string())])))
            else:
                arrays.append(pa.array(values))
            names.append(name)
        table = pa.Table.from_arrays(arrays, names=names)
        # The schema note `datasets` writes (and reads back as features), as LeRobot's files carry.
        return table.replace_schema_metadata({b"huggingface": json.dumps(
            {"info": {"features": {n: _hf_feature(self.features[n]) for n in names}}}).encode()})

    def _write_v21(self, ep: int, columns: dict, images: dict[str, np.ndarray]) -> None:
        _, pq = _pa()
        chunk = ep // DEFAULT_CHUNK_SIZE
        path = self.root / V21_DATA_PATH.format(episode_chunk=chunk, episode_index=ep)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(self._table(columns), path)
        if self.image_storage == "video":
            for cam, frames in images.items():
                vpath = self.root / V21_VIDEO_PATH.format(episode_chunk=chunk,
                                                          video_key=CAMERA_PREFIX + cam, episode_index=ep)
                encode_episode(vpath, frames, self.fps)

    @staticmethod
    def _next(chunk: int, file: int) -> tuple[int, int]:
        file += 1
        return (chunk + 1, 0) if file >= DEFAULT_CHUNK_SIZE else (chunk, file)

    def _data_file(self, steps: int) -> list:
        """The open data file this episode goes to. LeRobot's rule: a new file begins when the
        current file's size on disk plus this episode at the file's average bytes per frame
        would reach the limit."""
        _, pq = _pa()
        d = self._data
        if d is not None:
            size, frames = _size_mb(d[3]), self.frames - d[4]
            per_frame = size / frames if frames else 0.0
            if size + per_frame * steps >= self.data_mb:
                d[0].close()
                d = None
                self._data[1:3] = self._next(*self._data[1:3])
        if d is None:
            chunk, file = (0, 0) if self._data is None else self._data[1:3]
            path = self.root / V30_DATA_PATH.format(chunk_index=chunk, file_index=file)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._data = [None, chunk, file, path, self.frames]
        return self._data

    def _append_v30(self, columns: dict, images: dict[str, np.ndarray], steps: int) -> dict:
        _, pq = _pa()
        table = self._table(columns)
        d = self._data_file(steps)
        if d[0] is None:
            d[0] = pq.ParquetWriter(d[3], table.schema, compression="snappy", use_dictionary=True)
        d[0].write_table(table)
        record = {"data/chunk_index": d[1], "data/file_index": d[2],
                  "dataset_from_index": self.frames, "dataset_to_index": self.frames + steps}
        if self.image_storage == "video":
            for cam, frames in images.items():
                record.update(self._append_video(cam, frames))
        record.update({"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0})
        return record

    def _append_video(self, cam: str, frames: np.ndarray) -> dict:
        """Encode the episode alone, then append it (LeRobot's rule: a new file begins when
        the current file's size plus the episode's would reach the limit)."""
        key = CAMERA_PREFIX + cam
        episode = self.root / EPISODE_VIDEOS / f"{cam}.mp4"
        encode_episode(episode, frames, self.fps)
        state = self._videos.get(cam)
        if state is not None and state[0].bytes / 2**20 + _size_mb(episode) >= self.video_mb:
            state[0].close()
            state = [None, *self._next(state[1], state[2])]
        if state is None or state[0] is None:
            chunk, file = (0, 0) if state is None else state[1:3]
            path = self.root / V30_VIDEO_PATH.format(video_key=key, chunk_index=chunk, file_index=file)
            state = self._videos[cam] = [VideoAppender(path), chunk, file]
        start, end = state[0].append(episode)
        episode.unlink()
        p = f"videos/{key}/"
        return {p + "chunk_index": state[1], p + "file_index": state[2],
                p + "from_timestamp": start, p + "to_timestamp": end}

    # -- metadata ------------------------------------------------------------------------

    def _close_files(self) -> None:
        if self._data is not None and self._data[0] is not None:
            self._data[0].close()
            self._data[0] = None
        for state in self._videos.values():
            if state[0] is not None:
                state[0].close()
                state[0] = None
        shutil.rmtree(self.root / EPISODE_VIDEOS, ignore_errors=True)

    def _info(self) -> dict:
        n = len(self.episodes)
        has_video = self.image_storage == "video" and bool(self.cameras)
        info = {"codebase_version": self.version, "robot_type": self.robot_type,
                "total_episodes": n, "total_frames": self.frames, "total_tasks": len(self.tasks)}
        if self.version == "v2.1":
            info.update({"total_videos": n * len(self.cameras) if has_video else 0,
                         "total_chunks": (n - 1) // DEFAULT_CHUNK_SIZE + 1 if n else 0,
                         "chunks_size": DEFAULT_CHUNK_SIZE, "fps": self.fps,
                         "splits": {"train": f"0:{n}"}, "data_path": V21_DATA_PATH,
                         "video_path": V21_VIDEO_PATH if has_video else None})
        else:
            info.update({"chunks_size": DEFAULT_CHUNK_SIZE, "data_files_size_in_mb": self.data_mb,
                         "video_files_size_in_mb": self.video_mb, "fps": self.fps,
                         "splits": {"train": f"0:{n}"}, "data_path": V30_DATA_PATH,
                         "video_path": V30_VIDEO_PATH if has_video else None})
        info["features"] = self.features
        return info

    def close(self) -> None:
        """Finish the files and write meta/ (info.json last: a dataset without it is unfinished)."""
        self._close_files()
        if not self.episodes:
            raise UserError(f"{self.root}: no episodes were written")
        meta = self.root / "meta"
        meta.mkdir(exist_ok=True)
        if self.version == "v2.1":
            self._meta_v21(meta)
        else:
            self._meta_v30(meta)
        (self.root / INFO_PATH).write_text(json.dumps(self._info(), indent=4) + "\n")

    def _meta_v21(self, meta: Path) -> None:
        def lines(rows: list[dict]) -> str:
            return "".join(json.dumps(r) + "\n" for r in rows)

        (meta / "episodes.jsonl").write_text(lines(self.episodes))
        (meta / "tasks.jsonl").write_text(lines([{"task_index": i, "task": t} for t, i in self.tasks.items()]))
        (meta / "episodes_stats.jsonl").write_text(lines(
            [{"episode_index": i, "stats": s} for i, s in enumerate(self.episode_stats)]))

    def _meta_v30(self, meta: Path) -> None:
        pa, pq = _pa()
        rows = []
        for record, stats in zip(self.episodes, self.episode_stats, strict=True):
            row = dict(record)
            for feat, s in stats.items():
                row.update({f"stats/{feat}/{k}": v for k, v in s.items()})
            rows.append(row)
        path = self.root / V30_EPISODES_PATH.format(chunk_index=0, file_index=0)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), path)
        # tasks.parquet as pandas writes a DataFrame indexed by "task" (LeRobot reads it with
        # pandas.read_parquet and looks tasks up by that index).
        names = list(self.tasks)
        table = pa.table({"task_index": pa.array([self.tasks[t] for t in names], pa.int64()),
                          "task": pa.array(names, pa.string())})
        pandas_meta = {"index_columns": ["task"], "column_indexes": [],
                       "columns": [{"name": "task_index", "field_name": "task_index", "pandas_type": "int64",
                                    "numpy_type": "int64", "metadata": None},
                                   {"name": "task", "field_name": "task", "pandas_type": "unicode",
                                    "numpy_type": "object", "metadata": None}],
                       "creator": {"library": "pyarrow", "version": pa.__version__}, "pandas_version": "2.2.3"}
        table = table.replace_schema_metadata({b"pandas": json.dumps(pandas_meta).encode()})
        pq.write_table(table, meta / "tasks.parquet")
        all_stats = {feat: aggregate([s[feat] for s in self.episode_stats]) for feat in self.episode_stats[0]}
        (meta / "stats.json").write_text(json.dumps(all_stats, indent=4) + "\n")


__all__ = ["LeRobotWriter", "CODEC"]
