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
    import pandas as pd

    info = json.loads((root / "meta/info.json").read_text())
    version = info["codebase_version"]
    assert isinstance(info["fps"], int), "LeRobot's DatasetInfo.fps is an int"
    feats = hf_features(info["features"])
    video_keys = [k for k, f in info["features"].items() if f["dtype"] == "video"]
    if version == "v3.0":
        tasks = pd.read_parquet(root / "meta/tasks.parquet")
        tasks.index.name = "task"  # as lerobot.datasets.io_utils.load_tasks
        episodes = datasets.load_dataset("parquet", data_files=sorted(
            str(p) for p in (root / "meta/episodes").rglob("*.parquet")), split="train")
        episodes = episodes.select_columns([c for c in episodes.column_names if not c.startswith("stats/")])
        stats = json.loads((root / "meta/stats.json").read_text())
        assert set(stats) >= {"observation.state", "action"}
        eps = list(episodes)
        data_files = sorted({info["data_path"].format(chunk_index=e["data/chunk_index"],
                                                      file_index=e["data/file_index"]) for e in eps})
    else:
        lines = (root / "meta/tasks.jsonl").read_text().splitlines()
        tasks = pd.DataFrame([json.loads(x) for x in lines]).set_index("task")
        eps = [json.loads(x) for x in (root / "meta/episodes.jsonl").read_text().splitlines()]
        data_files = [info["data_path"].format(episode_chunk=e["episode_index"] // info["chunks_size"],
                                               episode_index=e["episode_index"]) for e in eps]
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
    return (f"{root}: {version} OK: {len(eps)} episodes, {len(data)} rows cast to info.json's features, "
            f"{frames} video frames found within {TOLERANCE_S} s, tasks looked up by string")


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(check(Path(arg)))
