"""The LeRobotDataset on-disk format (v2.1 and v3.0), as LeRobot publishes it; json only.

Checked against huggingface/lerobot's ``src/lerobot/datasets`` (utils.py, dataset_metadata.py,
dataset_writer.py, video_utils.py, scripts/convert_dataset_v21_to_v30.py)::

    meta/info.json          codebase_version, fps, features, chunks_size, data_path, video_path, ...
    v2.1  data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet   (one episode each)
          videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4
          meta/episodes.jsonl {"episode_index", "tasks": [...], "length"}
          meta/tasks.jsonl    {"task_index", "task"};  meta/episodes_stats.jsonl
    v3.0  data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet           (many episodes)
          videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4 (many episodes)
          meta/episodes/chunk-*/file-*.parquet: episode_index, tasks, length, data/chunk_index,
            data/file_index, dataset_from_index, dataset_to_index, videos/<key>/chunk_index,
            videos/<key>/file_index, videos/<key>/from_timestamp, videos/<key>/to_timestamp
          meta/tasks.parquet (task_index, task as the index);  meta/stats.json

Frame i of an episode is the video frame at ``from_timestamp + timestamp[i]`` (from_timestamp
is 0 in v2.1). This module holds what ``--dry_run`` needs (version, dims, cameras, where a
hub id lives) and imports neither pyarrow nor av; the reader is ``lerobot_reader``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ilstudio.data.lerobot_schema import check_info
from ilstudio.errors import UserError, require_regular_file

INFO_PATH = "meta/info.json"
SUPPORTED_VERSIONS = ("v2.1", "v3.0")
STATE_KEY = "observation.state"
ACTION_KEY = "action"
VELOCITY_KEY = "observation.velocity"  # ACT's /observations/qvel, where a dataset has it
CAMERA_PREFIX = "observation.images."
SINGLE_CAMERA_KEY = "observation.image"  # datasets with one camera (pusht): camera 'image'
DEFAULT_CHUNK_SIZE = 1000

V21_DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
V21_VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
V30_DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
V30_VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
V30_EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
# The per-frame bookkeeping columns every LeRobot dataset has (lerobot.utils.constants).
DEFAULT_FEATURES = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_lerobot_dir(path: str | Path) -> bool:
    """A directory holding meta/info.json is a LeRobot dataset."""
    return (Path(path).expanduser() / INFO_PATH).is_file()


@dataclass(frozen=True)
class LeRobotInfo:
    """The parts of meta/info.json ilstudio uses, validated."""

    root: Path
    version: str
    fps: float
    features: dict[str, dict]
    raw: dict[str, Any]

    @property
    def state_dim(self) -> int:
        return _vector_dim(self, STATE_KEY)

    @property
    def action_dim(self) -> int:
        return _vector_dim(self, ACTION_KEY)

    @property
    def cameras(self) -> dict[str, dict]:
        """camera name -> its feature (dtype 'video' or 'image'), in info.json order."""
        return {camera_name(k): f for k, f in self.features.items()
                if camera_name(k) and f.get("dtype") in ("video", "image")}

    def frame_shape(self, camera: str) -> tuple[int, int]:
        """(H, W) of a camera, from the feature's shape and names (LeRobot writes HWC)."""
        feat = self.cameras[camera]
        shape, names = list(feat.get("shape", ())), feat.get("names") or []
        if len(shape) != 3:
            raise UserError(f"{self.root / INFO_PATH}: feature {camera_key(camera)} has shape "
                            f"{shape}, expected [height, width, channels]")
        if list(names)[:1] == ["channels"] or (shape[0] == 3 and shape[2] != 3):  # CHW
            return int(shape[1]), int(shape[2])
        return int(shape[0]), int(shape[1])


def camera_name(key: str) -> str | None:
    """'observation.images.top' -> 'top'; 'observation.image' -> 'image'; else None."""
    if key.startswith(CAMERA_PREFIX):
        return key[len(CAMERA_PREFIX):]
    return "image" if key == SINGLE_CAMERA_KEY else None


def camera_key(name: str, features: dict | None = None) -> str:
    """The feature key of camera ``name`` (the inverse of camera_name)."""
    if name == "image" and features is not None and SINGLE_CAMERA_KEY in features:
        return SINGLE_CAMERA_KEY
    return CAMERA_PREFIX + name


def _vector_dim(info: LeRobotInfo, key: str) -> int:
    feat = info.features.get(key)
    if feat is None:
        raise UserError(f"{info.root / INFO_PATH}: no '{key}' feature; ilstudio trains on "
                        f"'{STATE_KEY}' (state) and '{ACTION_KEY}' (action); the dataset has "
                        f"{sorted(info.features)}")
    shape = feat.get("shape")
    if not isinstance(shape, (list, tuple)) or len(shape) != 1:
        raise UserError(f"{info.root / INFO_PATH}: feature '{key}' has shape {shape}, expected [dim]")
    return int(shape[0])


_LOADED: dict[tuple[str, int, int], LeRobotInfo] = {}


def load_info(root: str | Path) -> LeRobotInfo:
    """Read and check meta/info.json (version, fps, features); UserError naming the file.

    Parsed once per process while the file is unchanged (same modification time and size):
    resolve reads it to bind the task's dims and cameras, the plan to check the episodes,
    and a run must not parse and check the same metadata twice."""
    root = Path(root).expanduser()
    try:
        st = (root / INFO_PATH).stat()
        key = (str(root), st.st_mtime_ns, st.st_size)
    except OSError:
        key = None  # _read_info names what is wrong
    if key in _LOADED:
        return _LOADED[key]
    info = _read_info(root)
    if key is not None:
        _LOADED[key] = info
    return info


def _read_info(root: Path) -> LeRobotInfo:
    path = root / INFO_PATH
    try:
        if path.exists():
            require_regular_file(path, INFO_PATH)
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{root}: no {INFO_PATH} (not a LeRobot dataset)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object")
    version = str(raw.get("codebase_version", ""))
    if version not in SUPPORTED_VERSIONS:
        raise UserError(f"{path}: codebase_version {version or '(missing)'!r} is not supported; "
                        f"ilstudio reads LeRobot {' and '.join(SUPPORTED_VERSIONS)} (convert with "
                        f"LeRobot's convert_dataset_v21_to_v30 or an older LeRobot's v2.0->v2.1 script)")
    check_info(raw, path, (STATE_KEY, ACTION_KEY))  # lerobot_schema's declarations
    features, fps = raw["features"], raw["fps"]
    return LeRobotInfo(root, version, float(fps), features, raw)


# -- dataset_dir values: one or several directories or hub repo ids ------------------------


def dataset_dirs(value: str | Sequence[str]) -> list[str]:
    """task.dataset_dir as a list (it may be one string or a list of them)."""
    items = [value] if isinstance(value, (str, os.PathLike)) else list(value)
    if not items or any(not str(v).strip() for v in items):
        raise UserError("task.dataset_dir is empty: set it to a directory of episode_*.hdf5 "
                        "files, a LeRobot dataset directory (with meta/info.json), or a list of them")
    return [str(v) for v in items]


_SNAPSHOTS: dict[tuple[str, str | None], Path] = {}


def local_dir(value: str, cache_dir: str | None = None) -> Path:
    """A dataset_dir entry as a local directory; a hub repo id is fetched into cache_dir.

    With HF_HUB_OFFLINE=1 a repo id that is not cached fails at once (no network retries).
    """
    path = Path(value).expanduser()
    if path.exists() or not _REPO_ID.match(value) or Path(value.split("/")[0]).is_dir():
        return path  # a local path (e.g. data/new_recording under an existing data/): local errors
    key = (value, cache_dir)
    if key not in _SNAPSHOTS:
        _SNAPSHOTS[key] = _snapshot(value, cache_dir)
    return _SNAPSHOTS[key]


def _snapshot(repo_id: str, cache_dir: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        raise UserError(f"task.dataset_dir {repo_id!r} is neither a local directory nor "
                        f"loadable from the hub (huggingface_hub is not installed)") from None
    where = cache_dir or "the default Hugging Face cache"
    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", cache_dir=cache_dir))
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = ("HF_HUB_OFFLINE=1 forbids downloading it" if offline
               else "the hub cannot be reached")
        raise UserError(f"task.dataset_dir {repo_id!r} is not a local directory, and as a hub dataset "
                        f"repo id it is not in {where} ({why}); download it where a network exists "
                        f"(model.cache_dir names the cache) or give a local path") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise UserError(f"task.dataset_dir {repo_id!r}: not a local directory, and the hub "
                        f"refused it as a dataset repo id ({type(e).__name__}: {e})") from None


def dataset_infos(value: str | Sequence[str], cache_dir: str | None = None) -> list[LeRobotInfo]:
    """The info.json of every LeRobot dataset among task.dataset_dir's entries."""
    out = []
    for item in dataset_dirs(value):
        d = local_dir(item, cache_dir)
        if is_lerobot_dir(d):
            out.append(load_info(d))
    return out


def derived_task_values(value: str | Sequence[str], bound: dict[str, Any],
                        cache_dir: str | None = None) -> dict[str, Any]:
    """task.state_dim/action_dim/camera_names the LeRobot data implies and nobody bound.

    bound: name -> value for those the configuration sets. A bound value the data
    contradicts, or two datasets that disagree, is a UserError naming both values.
    """
    infos = dataset_infos(value, cache_dir)
    if not infos:
        return {}
    first = infos[0]
    implied = {"state_dim": first.state_dim, "action_dim": first.action_dim,
               "camera_names": tuple(first.cameras)}
    for other in infos[1:]:
        for name, theirs in (("state_dim", other.state_dim), ("action_dim", other.action_dim)):
            if theirs != implied[name]:
                raise UserError(f"task.dataset_dir: {first.root} has {name} {implied[name]} but "
                                f"{other.root} has {theirs}; datasets trained together need equal dims")
    for name, ours in bound.items():
        if name in ("state_dim", "action_dim") and ours != implied[name]:
            raise UserError(f"task.{name} is bound to {ours} but {first.root / INFO_PATH} gives "
                            f"{implied[name]} ({STATE_KEY if name == 'state_dim' else ACTION_KEY} "
                            f"shape); remove the binding or bind {implied[name]}")
        if name == "camera_names":
            for info in infos:
                missing = [c for c in ours if c not in info.cameras]
                if missing:
                    raise UserError(f"task.camera_names {list(ours)} names {missing}, which "
                                    f"{info.root / INFO_PATH} does not have; its cameras are "
                                    f"{list(info.cameras)} ({CAMERA_PREFIX}<name>)")
    return {k: v for k, v in implied.items() if k not in bound}
