"""LeRobot metadata against its declared schema (ilstudio/data/lerobot_schema.py).

Two tiny datasets (v2.1 and v3.0, written once per module by ilstudio's own writer) are copied
and corrupted one way per test: every corruption must end in one UserError naming the file and
the field, never a traceback and never silent acceptance.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pyarrow")
pytest.importorskip("av")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from ilstudio.data.lerobot_reader import LeRobotData  # noqa: E402
from ilstudio.data.lerobot_writer import LeRobotWriter  # noqa: E402
from ilstudio.errors import UserError  # noqa: E402

FPS, LENGTHS, S, A = 30, (6, 8), 3, 2


def _write(root: Path, version: str) -> Path:
    with LeRobotWriter(root, fps=FPS, version=version) as w:
        for e, n in enumerate(LENGTHS):
            rng = np.random.default_rng(e)
            w.add_episode(rng.normal(size=(n, S)), rng.normal(size=(n, A)),
                          {"top": rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8)},
                          task=f"task {e}")
    return root


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("schema")
    return {"v2.1": _write(base / "v21", "v2.1"), "v3.0": _write(base / "v30", "v3.0")}


@pytest.fixture
def copy(clean, tmp_path):
    made = []

    def make(version: str) -> Path:
        made.append(version)
        d = tmp_path / f"{version.replace('.', '')}_{len(made)}"
        shutil.copytree(clean[version], d)
        return d
    return make


def refused(d: Path, *fragments: str) -> str:
    with pytest.raises(UserError) as e:
        LeRobotData.load(d)
    msg = str(e.value)
    assert len(msg) < 600, msg
    for f in fragments:
        assert f in msg, msg
    return msg


def edit_info(d: Path, **changes) -> None:
    path = d / "meta/info.json"
    info = json.loads(path.read_text())
    for k, v in changes.items():
        if v is ...:
            info.pop(k)
        else:
            info[k] = v
    path.write_text(json.dumps(info))  # NaN and Infinity are written as JSON allows Python to


def edit_jsonl(path: Path, row: int, **changes) -> None:
    lines = path.read_text().splitlines()
    r = json.loads(lines[row])
    for k, v in changes.items():
        if v is ...:
            r.pop(k)
        else:
            r[k] = v
    lines[row] = json.dumps(r)
    path.write_text("\n".join(lines) + "\n")


def edit_parquet(path: Path, column: str, fn) -> None:
    t = pq.read_table(path)
    values = fn(t.column(column).to_pylist())
    i = t.schema.get_field_index(column)
    pq.write_table(t.set_column(i, column, pa.array(values, type=None)), path)


def test_clean_datasets_pass(clean):
    for d in clean.values():
        assert [e.length for e in LeRobotData.load(d).episodes] == list(LENGTHS)


@pytest.mark.parametrize("fps", [float("nan"), float("inf"), -30, 0, "30", True, None])
def test_info_fps(copy, fps):
    d = copy("v3.0")
    edit_info(d, fps=fps)
    refused(d, "meta/info.json", "'fps'")


@pytest.mark.parametrize("field", ["fps", "features", "codebase_version"])
def test_info_missing_field(copy, field):
    d = copy("v2.1")
    edit_info(d, **{field: ...})
    refused(d, "meta/info.json")


def test_info_feature_shape_and_templates(copy):
    d = copy("v2.1")
    info = json.loads((d / "meta/info.json").read_text())
    info["features"]["observation.state"]["shape"] = [-3]
    (d / "meta/info.json").write_text(json.dumps(info))
    refused(d, "feature 'observation.state'", "positive integers")
    d = copy("v3.0")
    edit_info(d, data_path="data/{chunk}/{nope}.parquet")
    refused(d, "data_path", "not a path template")


@pytest.mark.parametrize("change", [{"length": ...}, {"episode_index": None}, {"length": 0},
                                    {"episode_index": "zero"}, {"length": 6.5}])
def test_v21_episode_rows(copy, change):
    d = copy("v2.1")
    edit_jsonl(d / "meta/episodes.jsonl", 0, **change)
    refused(d, "meta/episodes.jsonl: row 1", f"'{next(iter(change))}'")


def test_v21_duplicates_and_unknown_task(copy):
    d = copy("v2.1")
    edit_jsonl(d / "meta/episodes.jsonl", 1, episode_index=0, length=6)
    refused(d, "episode_index 0 appears more than once")
    d = copy("v2.1")
    edit_jsonl(d / "meta/tasks.jsonl", 1, task_index=0)
    refused(d, "meta/tasks.jsonl", "task_index 0 appears more than once")
    d = copy("v2.1")
    edit_jsonl(d / "meta/episodes.jsonl", 0, tasks=["not a task"])
    refused(d, "'not a task'", "not in the tasks table")


def test_episode_missing_from_the_episodes_table(copy):
    d = copy("v3.0")  # rows of episode 1 remain in the data file
    meta = d / "meta/episodes/chunk-000/file-000.parquet"
    pq.write_table(pq.read_table(meta).slice(0, 1), meta)
    edit_info(d, total_episodes=1)
    refused(d, "data/chunk-000/file-000.parquet", "episode(s) [1]", "does not list")
    d = copy("v2.1")  # info.json's count gives it away
    lines = (d / "meta/episodes.jsonl").read_text().splitlines()
    (d / "meta/episodes.jsonl").write_text(lines[0] + "\n")
    refused(d, "total_episodes is 2", "lists 1")


def test_v30_null_index_and_task_pointing_nowhere(copy):
    d = copy("v3.0")
    edit_parquet(d / "meta/episodes/chunk-000/file-000.parquet", "episode_index",
                 lambda v: [None, *v[1:]])
    refused(d, "meta/episodes", "'episode_index' is null")
    d = copy("v3.0")
    edit_parquet(d / "data/chunk-000/file-000.parquet", "task_index", lambda v: [*v[:-1], 7])
    refused(d, "file-000.parquet", "task_index [7] points nowhere")
    d = copy("v3.0")
    edit_parquet(d / "data/chunk-000/file-000.parquet", "episode_index", lambda v: [None, *v[1:]])
    refused(d, "file-000.parquet", "'episode_index' is null")


def test_timestamps_all_zero_nan_or_off(copy):
    d = copy("v2.1")
    edit_parquet(d / "data/chunk-000/episode_000001.parquet", "timestamp", lambda v: [0.0] * len(v))
    refused(d, "episode_000001.parquet", "episode 1", "not 1/fps")
    d = copy("v3.0")
    edit_parquet(d / "data/chunk-000/file-000.parquet", "timestamp",
                 lambda v: [*v[:3], float("nan"), *v[4:]])
    refused(d, "'timestamp'", "non-finite")


def test_ragged_state_rows(copy):
    d = copy("v2.1")
    edit_parquet(d / "data/chunk-000/episode_000000.parquet", "observation.state",
                 lambda v: [v[0][:2], *v[1:]])
    refused(d, "episode_000000.parquet", "'observation.state' has 2 values in row 0", "[3]")


def test_mp4_fps_disagrees_with_info(copy):
    from ilstudio.data.video import VideoWriter

    d = copy("v2.1")
    video = d / "videos/chunk-000/observation.images.top/episode_000000.mp4"
    w = VideoWriter(video, 25, 8, 8)
    w.write(np.zeros((LENGTHS[0], 8, 8, 3), np.uint8))
    w.close()
    refused(d, str(video), "25 fps", "fps 30")


def test_v30_video_span_inconsistent(copy):
    d = copy("v3.0")
    col = "videos/observation.images.top/to_timestamp"
    edit_parquet(d / "meta/episodes/chunk-000/file-000.parquet", col, lambda v: [0.0, *v[1:]])
    refused(d, "episode 0", "to_timestamp")


def test_fifo_as_metadata_is_refused_at_once(copy):
    d = copy("v2.1")
    (d / "meta/episodes.jsonl").unlink()
    os.mkfifo(d / "meta/episodes.jsonl")
    refused(d, "episodes.jsonl", "FIFO")
    d = copy("v3.0")
    (d / "meta/info.json").unlink()
    os.symlink("/dev/zero", d / "meta/info.json")
    refused(d, "info.json", "character device")


@pytest.mark.parametrize("version", ["v2.1", "v3.0"])
def test_frames_naming_a_task_their_episode_does_not_list(copy, version):
    """All frames set to task 0: episode 1 would train on episode 0's instruction (found by
    bench/hostile.py's LeRobot family at --cases 60)."""
    d = copy(version)
    data = sorted((d / "data").rglob("*.parquet"))[-1]
    edit_parquet(data, "task_index", lambda v: [0] * len(v))
    refused(d, data.name, "episode 1's frames have task(s)", "does not list for it")
