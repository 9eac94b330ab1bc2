#!/usr/bin/env python
"""Open a dataset ilstudio wrote the way LeRobot's own reader does, without LeRobot.

``lerobot`` cannot be installed beside our stack (every release pins torch < 2.12; we run
2.13), so this script replays the calls its dataset code makes (lerobot/src/lerobot/datasets:
dataset_metadata.py, io_utils.py, feature_utils.py, video_utils.py) with the same libraries
it uses: ``datasets`` loads the parquet files *cast to the features info.json declares*
(``get_hf_features_from_features``: Sequence(length=n) for vectors, Image for dtype image,
video features skipped), ``pandas.read_parquet`` loads meta/tasks.parquet and looks tasks up
by the ``task`` index, and every frame of every episode is queried the way
``decode_video_frames_pyav`` does it: seek to ``round(ts / time_base) - 1`` backwards, decode
forward, accept the closest frame only within ``tolerance_s = 1e-4``.

It also checks that what we write matches what LeRobot writes today (issue 19):
statistics (min, max, mean, std, count and q01..q99 for every numeric and image feature, in
stats.json and in the episodes table / episodes_stats.jsonl; image stats shaped (3, 1, 1));
every episode's first video frame is a keyframe (packets decoded); video features carry no
per-feature ``fps`` and an info block with LeRobot's fields; fps is a positive number (a
fractional one kept) and timestamps are frame_index / fps; episodes listed by episode_index
(0..n-1, contiguous rows); v3.0 files that hold several episodes stay below the size limits.

Run it in a separate environment with LeRobot's data stack (no torch needed)::

    python -m venv /tmp/lrcheck && /tmp/lrcheck/bin/pip install "datasets>=4.8,<5" "pandas>=2,<3" av pillow
    python -m ilstudio.data.convert data/tiny_synthetic /tmp/lr30 --to lerobot
    /tmp/lrcheck/bin/python bench/lerobot_layout_check.py /tmp/lr30 [more dataset dirs]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TOLERANCE_S = 1e-4
STATS = ("min", "max", "mean", "std", "count", "q01", "q10", "q50", "q90", "q99")
VIDEO_INFO = ("video.height", "video.width", "video.codec", "video.pix_fmt", "video.fps",
              "video.channels", "has_audio", "video.g", "video.crf", "video.preset",
              "video.fast_decode", "video.video_backend", "video.extra_options", "is_depth_map")


def check_stats(where: str, stats: dict, features: dict) -> None:
    for key, ft in features.items():
        if ft["dtype"] in ("string", "language"):
            continue
        missing = [s for s in STATS if s not in stats.get(key, {})]
        assert not missing, f"{where}: {key} lacks {missing}"
        if ft["dtype"] in ("image", "video"):
            import numpy as np

            assert np.asarray(stats[key]["q01"]).shape == (3, 1, 1), f"{where}: {key} q01 shape"


def check_video_features(info: dict) -> None:
    for key, ft in info["features"].items():
        if ft["dtype"] != "video":
            continue
        assert "fps" not in ft, f"{key}: a video feature carries no per-feature fps"
        missing = [k for k in VIDEO_INFO if k not in ft.get("info", {})]
        assert not missing and "video.is_depth_map" not in ft["info"], f"{key}: info block {missing}"


def first_packet_is_keyframe(path: Path, start: float) -> bool:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for packet in container.demux(stream):
            if packet.pts is not None and abs(float(packet.pts * stream.time_base) - start) <= TOLERANCE_S:
                return bool(packet.is_keyframe)
    raise AssertionError(f"{path}: no packet at {start:.4f} s")


def check_rollover(root: Path, info: dict, eps: list[dict], video_keys: list[str]) -> int:
    """Files holding several episodes stay below info.json's limits (LeRobot starts a new
    file before the limit would be crossed; a parquet file's footer, written at close, is not
    counted, as LeRobot measures the open file); returns how many files were checked."""
    groups: dict[tuple, list] = {}
    for e in eps:
        groups.setdefault((info["data_path"], None, e["data/chunk_index"], e["data/file_index"]), []).append(e)
        for key in video_keys:
            groups.setdefault((info["video_path"], key, e[f"videos/{key}/chunk_index"],
                               e[f"videos/{key}/file_index"]), []).append(e)
    for (template, key, chunk, file), members in groups.items():
        path = root / template.format(video_key=key, chunk_index=chunk, file_index=file)
        limit = info["video_files_size_in_mb" if key else "data_files_size_in_mb"]
        size = path.stat().st_size
        if not key:  # parquet: LeRobot measures the open file, before its footer is written
            with path.open("rb") as f:
                f.seek(-8, 2)
                size -= int.from_bytes(f.read(4), "little") + 8
        assert len(members) == 1 or size / 2**20 < limit, f"{path}: {size / 2**20:.4f} MiB >= {limit} MiB"
    return len(groups)


def hf_features(features: dict):
    import datasets

    out = {}
    for key, ft in features.items():
        if ft["dtype"] == "video":
            continue
        if ft["dtype"] == "image":
            out[key] = datasets.Image()
        elif list(ft["shape"]) == [1]:
            out[key] = datasets.Value(dtype=ft["dtype"])
        else:
            out[key] = datasets.Sequence(length=ft["shape"][0], feature=datasets.Value(dtype=ft["dtype"]))
    return datasets.Features(out)


def decode_pyav(path: Path, timestamps: list[float]) -> int:
    """LeRobot's decode_video_frames_pyav, returning how many frames matched within tolerance."""
    import av

    first, last = min(timestamps), max(timestamps)
    loaded = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        container.seek(round(first / stream.time_base) - 1, backward=True, any_frame=False, stream=stream)
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            ts = float(frame.pts * stream.time_base)
            loaded.append(ts)
            if ts >= last:
                break
    worst = max(min(abs(q - t) for t in loaded) for q in timestamps)
    if worst > TOLERANCE_S:
        raise AssertionError(f"{path}: a query timestamp is {worst:.6f} s from the closest frame")
    return len(timestamps)


def check(root: Path) -> str:
    import datasets
    import numpy as np
    import pandas as pd

    info = json.loads((root / "meta/info.json").read_text())
    version = info["codebase_version"]
    fps = info["fps"]
    assert isinstance(fps, (int, float)) and fps > 0, "fps is a positive number"
    assert isinstance(fps, int) or not float(fps).is_integer(), "an integral fps is written as an int"
    check_video_features(info)
    feats = hf_features(info["features"])
    video_keys = [k for k, f in info["features"].items() if f["dtype"] == "video"]
    files = 0
    if version == "v3.0":
        tasks = pd.read_parquet(root / "meta/tasks.parquet")
        tasks.index.name = "task"  # as lerobot.datasets.io_utils.load_tasks
        episodes = datasets.load_dataset("parquet", data_files=sorted(
            str(p) for p in (root / "meta/episodes").rglob("*.parquet")), split="train")
        check_stats("meta/stats.json", json.loads((root / "meta/stats.json").read_text()), info["features"])
        rows = sorted(episodes, key=lambda e: e["episode_index"])
        for e in rows:
            nested: dict = {}
            for col, value in e.items():
                if col.startswith("stats/"):
                    feat, stat = col[len("stats/"):].rsplit("/", 1)
                    nested.setdefault(feat, {})[stat] = value
            check_stats(f"episode {e['episode_index']} stats/*", nested, info["features"])
        eps = [{k: v for k, v in e.items() if not k.startswith("stats/")} for e in rows]
        assert [e["dataset_from_index"] for e in eps[1:]] == [e["dataset_to_index"] for e in eps[:-1]]
        files = check_rollover(root, info, eps, video_keys)
        data_files = sorted({info["data_path"].format(chunk_index=e["data/chunk_index"],
                                                      file_index=e["data/file_index"]) for e in eps})
    else:
        lines = (root / "meta/tasks.jsonl").read_text().splitlines()
        tasks = pd.DataFrame([json.loads(x) for x in lines]).set_index("task")
        eps = sorted((json.loads(x) for x in (root / "meta/episodes.jsonl").read_text().splitlines()),
                     key=lambda e: e["episode_index"])
        for x in (root / "meta/episodes_stats.jsonl").read_text().splitlines():
            row = json.loads(x)
            check_stats(f"episode {row['episode_index']} episodes_stats", row["stats"], info["features"])
        data_files = [info["data_path"].format(episode_chunk=e["episode_index"] // info["chunks_size"],
                                               episode_index=e["episode_index"]) for e in eps]
    assert [e["episode_index"] for e in eps] == list(range(len(eps))), "episodes 0..n-1"
    for e in eps:
        for task in e["tasks"]:
            int(tasks.loc[task].task_index)  # lookups by task string work
    data = datasets.load_dataset("parquet", data_files=[str(root / f) for f in data_files],
                                 features=feats, split="train")
    data.set_format("numpy")
    frames = 0
    for e in eps:
        rows = data.filter(lambda r, i=e["episode_index"]: r["episode_index"] == i)
        assert len(rows) == e["length"], (e["episode_index"], len(rows), e["length"])
        for key in video_keys:
            if version == "v3.0":
                path = root / info["video_path"].format(video_key=key, chunk_index=e[f"videos/{key}/chunk_index"],
                                                        file_index=e[f"videos/{key}/file_index"])
                start = e[f"videos/{key}/from_timestamp"]
            else:
                path = root / info["video_path"].format(
                    episode_chunk=e["episode_index"] // info["chunks_size"], video_key=key,
                    episode_index=e["episode_index"])
                start = 0.0
            frames += decode_pyav(path, [start + float(t) for t in rows["timestamp"]])
            assert first_packet_is_keyframe(path, start), f"{path}: episode {e['episode_index']} mid-GOP"
        want = (np.asarray(rows["frame_index"]) / fps).astype(np.float32)
        assert np.abs(np.asarray(rows["timestamp"]) - want).max() <= TOLERANCE_S, "timestamps: frame_index / fps"
    return (f"{root}: {version} OK: {len(eps)} episodes in episode_index order, {len(data)} rows cast "
            f"to info.json's features, {frames} video frames found within {TOLERANCE_S} s, every "
            f"episode starting on a keyframe, tasks looked up by string, stats with q01..q99, video "
            f"info blocks as LeRobot's, fps {fps}, {files} v3.0 files within their size limits")


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(check(Path(arg)))
