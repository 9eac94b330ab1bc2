"""LeRobotDataset v2.1 and v3.0 as training data, end to end on real parquet and mp4 files.

The datasets are generated here in LeRobot's published layout (3 episodes of different
lengths, two cameras of different sizes, one of them odd, 24x32 and 15x21). Every frame
encodes its own index (a distinct colour and a bar whose width depends on it), so a decoded
frame tells which recorded frame it is: frame i of an episode must be recorded frame i,
also inside v3.0 files that hold all episodes one after another.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pyarrow")
pytest.importorskip("av")

import pyarrow.parquet as pq  # noqa: E402
from conftest import REPO, run_train, small_policy, train_env  # noqa: E402

from ilstudio.config.settings import DatasetSettings, TaskSettings  # noqa: E402
from ilstudio.data.checked import check_dataset
from ilstudio.data.dataset import EpisodeDataset, build_datasets  # noqa: E402
from ilstudio.data.episodes import check_episodes, open_episode  # noqa: E402
from ilstudio.data.language import read_episode_text  # noqa: E402
from ilstudio.data.lerobot_writer import LeRobotWriter  # noqa: E402
from ilstudio.data.normalization import compute_stats  # noqa: E402
from ilstudio.data.sources import list_episodes  # noqa: E402
from ilstudio.errors import UserError  # noqa: E402

LENGTHS = (20, 33, 27)
CAMS = {"top": (24, 32), "wrist": (15, 21)}
S, A, FPS = 5, 4, 30
# The codec's loss (h264, crf 18) on these frames, measured: mean absolute error 1.3 (24x32,
# yuv420p) and 2.5 (15x21, yuv444p) grey levels, PSNR 43 and 35.5 dB. Single pixels at the
# sharp colour edges can be off by ~50 (chroma rounding), so the tolerance is on the mean and
# on PSNR, not the maximum (the same tolerance as tests/test_lerobot_convert.py's round trip).
# Which frame it is gets checked separately (which_frame).
MEAN_TOL, PSNR_MIN = 5.0, 32.0


def within_codec_loss(decoded: np.ndarray, truth: np.ndarray) -> bool:
    diff = decoded.astype(np.float64) - truth
    psnr = 10 * np.log10(255.0 ** 2 / max((diff ** 2).mean(), 1e-12))
    return bool(np.abs(diff).mean() <= MEAN_TOL and psnr >= PSNR_MIN)


def frame(i: int, ep: int, hw: tuple[int, int]) -> np.ndarray:
    """Recorded frame i of episode ep: colour and bar width encode (ep, i)."""
    h, w = hw
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = (i * 37 + ep * 101) % 256
    img[..., 1] = (i * 11 + 40) % 256
    img[:, : w * (i % 7 + 1) // 8, 2] = 200
    return img


def episode(ep: int, n: int) -> dict:
    rng = np.random.default_rng(ep)
    return {"state": rng.normal(size=(n, S)).astype(np.float32),
            "action": rng.normal(size=(n, A)).astype(np.float32),
            "images": {c: np.stack([frame(i, ep, hw) for i in range(n)]) for c, hw in CAMS.items()},
            "task": f"pick cube {ep % 2}", "mirrored": ep == 1}


EPISODES = [episode(e, n) for e, n in enumerate(LENGTHS)]


def write(root: Path, version: str, storage: str = "video", **limits: float) -> Path:
    with LeRobotWriter(root, fps=FPS, version=version, image_storage=storage, **limits) as w:
        for e in EPISODES:
            w.add_episode(e["state"], e["action"], e["images"], task=e["task"], mirrored=e["mirrored"])
    return root


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("lerobot")
    return {"v2.1": write(base / "v21", "v2.1"), "v3.0": write(base / "v30", "v3.0"),
            "png": write(base / "png", "v3.0", storage="image")}


def task_for(d, cams=tuple(CAMS)) -> TaskSettings:
    return TaskSettings(dataset_dir=str(d) if isinstance(d, Path) else d, state_dim=S,
                        action_dim=A, camera_names=cams)


def which_frame(img: np.ndarray, ep: int, hw: tuple[int, int], n: int) -> int:
    ref = np.stack([frame(i, ep, hw) for i in range(n)]).astype(np.float64)
    return int(np.argmin(((ref - img.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))))


# -- the published layout ----------------------------------------------------------------------


def test_v30_layout_is_lerobots(datasets):
    root = datasets["v3.0"]
    info = json.loads((root / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == FPS
    assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    assert info["video_path"] == "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
    assert info["total_episodes"] == 3 and info["total_frames"] == sum(LENGTHS)
    feats = info["features"]
    assert feats["observation.state"]["shape"] == [S] and feats["action"]["shape"] == [A]
    assert feats["observation.images.wrist"]["dtype"] == "video"
    assert feats["observation.images.wrist"]["shape"] == [15, 21, 3]
    assert {"timestamp", "frame_index", "episode_index", "index", "task_index"} <= set(feats)
    assert (root / "videos/observation.images.top/chunk-000/file-000.mp4").is_file()
    data = pq.read_table(root / "data/chunk-000/file-000.parquet")  # all episodes in one file
    assert data.num_rows == sum(LENGTHS)
    assert np.allclose(data.column("timestamp").to_numpy(), data.column("frame_index").to_numpy() / FPS)
    eps = pq.read_table(root / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert [e["length"] for e in eps] == list(LENGTHS)
    key = "videos/observation.images.top/"
    assert [e[key + "from_timestamp"] for e in eps] == pytest.approx([0, 20 / FPS, 53 / FPS])
    assert [e[key + "to_timestamp"] for e in eps] == pytest.approx([20 / FPS, 53 / FPS, 80 / FPS])
    assert [(e["dataset_from_index"], e["dataset_to_index"]) for e in eps] == [(0, 20), (20, 53), (53, 80)]
    assert all(e["tasks"] == [EPISODES[i]["task"]] for i, e in enumerate(eps))
    tasks = pq.read_table(root / "meta/tasks.parquet")
    assert b"pandas" in tasks.schema.metadata  # pandas.read_parquet gives the 'task' index LeRobot uses
    assert sorted(tasks.column("task").to_pylist()) == ["pick cube 0", "pick cube 1"]
    stats = json.loads((root / "meta/stats.json").read_text())
    all_state = np.concatenate([e["state"] for e in EPISODES])
    assert np.allclose(stats["observation.state"]["mean"], all_state.mean(0), atol=1e-5)
    assert np.allclose(stats["observation.state"]["std"], all_state.std(0), atol=1e-5)
    assert np.array(stats["observation.images.top"]["mean"]).shape == (3, 1, 1)


def test_v21_layout_is_lerobots(datasets):
    root = datasets["v2.1"]
    info = json.loads((root / "meta/info.json").read_text())
    assert info["codebase_version"] == "v2.1" and info["total_videos"] == 6
    for e, n in enumerate(LENGTHS):
        t = pq.read_table(root / f"data/chunk-000/episode_{e:06d}.parquet")
        assert t.num_rows == n and t.column("episode_index").to_pylist() == [e] * n
        for cam in CAMS:
            assert (root / f"videos/chunk-000/observation.images.{cam}/episode_{e:06d}.mp4").is_file()
    lines = [json.loads(x) for x in (root / "meta/episodes.jsonl").read_text().splitlines()]
    assert [(x["episode_index"], x["length"]) for x in lines] == list(enumerate(LENGTHS))
    tasks = [json.loads(x) for x in (root / "meta/tasks.jsonl").read_text().splitlines()]
    assert tasks == [{"task_index": 0, "task": "pick cube 0"}, {"task_index": 1, "task": "pick cube 1"}]
    assert len((root / "meta/episodes_stats.jsonl").read_text().splitlines()) == 3


# -- reading: frame-exact, arrays exact --------------------------------------------------------


@pytest.mark.parametrize("version", ["v2.1", "v3.0", "png"])
def test_every_frame_is_the_frame_at_its_timestamp(datasets, version):
    refs = list_episodes(str(datasets[version]))
    assert len(refs) == 3
    for e, ref in enumerate(refs):
        with open_episode(ref) as src:
            assert np.array_equal(src.states(), EPISODES[e]["state"])
            assert np.array_equal(src.actions(), EPISODES[e]["action"])
            for cam, hw in CAMS.items():
                frames = src.frames(cam)
                assert frames.shape == (LENGTHS[e], *hw, 3)
                truth = EPISODES[e]["images"][cam]
                if version == "png":  # PNG is lossless
                    assert np.array_equal(frames, truth)
                    continue
                assert [which_frame(f, e, hw, LENGTHS[e]) for f in frames] == list(range(LENGTHS[e]))
                assert within_codec_loss(frames, truth)
                # Random access (a history window mid-episode) decodes the same frames.
                assert np.array_equal(src.frames(cam, 7, 10), frames[7:10])
                assert np.array_equal(src.frames(cam, LENGTHS[e] - 1)[0], frames[-1])


def test_task_string_is_the_language_instruction(datasets):
    for version in ("v2.1", "v3.0"):
        refs = list_episodes(str(datasets[version]))
        assert [read_episode_text(r, n).instruction for r, n in zip(refs, LENGTHS, strict=True)] == \
            [e["task"] for e in EPISODES]


@pytest.mark.parametrize("version", ["v2.1", "v3.0"])
def test_preload_lazy_and_eager_give_the_same_samples(datasets, version):
    refs = list_episodes(str(datasets[version]))
    task, stats = task_for(datasets[version]), compute_stats(refs)
    variants = [dict(), dict(preload_data=True), dict(lazy_preprocess=False),
                dict(preload_data=True, lazy_preprocess=False)]
    sets = [EpisodeDataset(refs, task, DatasetSettings(image_size=(20, 24), history_images_length=2, **kw),
                           4, stats) for kw in variants]
    for i in (0, 5, 19, 20, 21, 52, 79):
        first = sets[0][i]
        for other in sets[1:]:
            s = other[i]
            for k in first:
                assert np.array_equal(first[k].numpy(), s[k].numpy()), (version, i, k)


def test_history_frames_are_the_previous_timesteps(datasets):
    refs = list_episodes(str(datasets["png"]))  # lossless: frames compare exactly
    ds = EpisodeDataset(refs, task_for(datasets["png"], ("top",)),
                        DatasetSettings(history_images_length=3), 2, compute_stats(refs))
    x = ds[20 + 5]["images"][0]  # episode 1, t=5: frames 3, 4, 5
    for k, t in enumerate((3, 4, 5)):
        expected = EPISODES[1]["images"]["top"][t].transpose(2, 0, 1) / 255.0
        assert np.allclose(x[k].numpy(), expected, atol=1e-6)
    x0 = ds[20]["images"][0]  # t=0: frame 0 repeated
    assert all(np.array_equal(x0[k].numpy(), x0[2].numpy()) for k in range(3))


def test_skip_mirrored_and_summary(datasets):
    task = task_for(datasets["v3.0"])
    settings = DatasetSettings(skip_mirrored_data=True, image_size=(24, 32))
    train, _, stats, summary = build_datasets(check_dataset(task, settings), task, settings, 4, False, 0)
    assert summary["episodes_found"] == 3 and summary["episodes_mirrored_skipped"] == 1
    assert list(train.episode_lengths) == [20, 27]
    kept = np.concatenate([EPISODES[0]["state"], EPISODES[2]["state"]])
    assert np.allclose(stats.qpos_mean, kept.mean(0), atol=1e-5)


def test_several_datasets_of_either_format(datasets, tiny_data):
    dirs = [str(datasets["v2.1"]), str(datasets["v3.0"]), str(datasets["png"])]
    task, settings = task_for(dirs), DatasetSettings(image_size=(24, 32))
    train, _, _, summary = build_datasets(check_dataset(task, settings), task, settings, 4, False, 0)
    assert summary["episodes_train"] == 9 and len(train) == 3 * sum(LENGTHS)
    assert summary["dataset_dir"] == dirs
    # An HDF5 directory beside them with other dims: the mismatch names the file and both dims.
    with pytest.raises(UserError, match="columns, task.state_dim is 5"):
        check_dataset(task_for([dirs[0], str(tiny_data)]), DatasetSettings(is_multimodal=False))


# -- train.py ------------------------------------------------------------------------------


def lerobot_args(data, out, *extra: str) -> list[str]:
    return ["--task_name=lerobot", f"--gin_bindings=task.dataset_dir = {data!r}",
            f"--output_dir={out}", "--per_device_train_batch_size=4", "--max_steps=3",
            "--report_to=none", "--gin_bindings=dataset.image_size = (24, 32)",
            *small_policy(extra), *extra]


@pytest.mark.parametrize("version", ["v2.1", "v3.0"])
def test_train_py_trains_on_a_lerobot_dataset(datasets, version, tmp_path):
    out = tmp_path / "run"
    r = run_train(*lerobot_args(str(datasets[version]), out))
    assert r.returncode == 0, r.stderr[-3000:]
    operative = (out / "operative_config.gin").read_text()
    # Dims and cameras came from meta/info.json (the lerobot task binds none of them).
    assert "task.state_dim = 5" in operative and "task.action_dim = 4" in operative
    assert "task.camera_names = ('top', 'wrist')" in operative
    summary = json.loads((out / "data_summary.json").read_text())
    assert summary["timesteps_train"] == sum(LENGTHS) and summary["cameras"] == ["top", "wrist"]
    assert (out / "model.safetensors").is_file()


COUNTING_RUN = r"""
import pathlib, sys
read_text, reads = pathlib.Path.read_text, []

def counted(self, *a, **k):
    if self.name == "info.json":
        reads.append(str(self))
    return read_text(self, *a, **k)

pathlib.Path.read_text = counted
sys.argv = ["train.py", *sys.argv[1:]]
from ilstudio.main import run_cli
try:
    run_cli()
finally:
    print("INFO_READS", len(reads), file=sys.stderr)
"""


def test_a_run_parses_the_datasets_metadata_once(datasets, tmp_path):
    """resolve binds the dims from meta/info.json and the plan checks the episodes against it:
    one parse serves both (and the training that follows)."""
    r = subprocess.run([sys.executable, "-c", COUNTING_RUN,
                        *lerobot_args(str(datasets["v3.0"]), tmp_path / "run")],
                       cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "INFO_READS 1" in r.stderr, r.stderr[-2000:]
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_dry_run_a_list_and_a_contradicting_binding(datasets, tmp_path):
    both = [str(datasets["v2.1"]), str(datasets["v3.0"])]
    r = run_train(*lerobot_args(both, tmp_path / "a"), "--dry_run")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "# data: 6 episodes, 160 steps" in r.stdout
    r = run_train(*lerobot_args(str(datasets["v3.0"]), tmp_path / "b"), "--dry_run",
                  "--gin_bindings=task.state_dim = 7")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "task.state_dim is bound to 7 but" in r.stderr and "gives 5" in r.stderr
    r = run_train(*lerobot_args(str(datasets["v3.0"]), tmp_path / "c"), "--dry_run",
                  "--gin_bindings=task.camera_names = ['top', 'left']")
    assert r.returncode == 2 and "['left']" in r.stderr and "['top', 'wrist']" in r.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# -- data faults: named errors, exit 2 ---------------------------------------------------------


def faulty(datasets, tmp_path, version: str) -> Path:
    d = tmp_path / version.replace(".", "")
    shutil.copytree(datasets[version], d)
    return d


def check(d: Path) -> None:
    check_episodes(list_episodes(str(d)), task_for(d), need_images=True)


def test_missing_video(datasets, tmp_path):
    d = faulty(datasets, tmp_path, "v2.1")
    video = d / "videos/chunk-000/observation.images.wrist/episode_000002.mp4"
    video.unlink()
    with pytest.raises(UserError, match=f"{video}: video file is missing"):
        check(d)


def test_truncated_mp4(datasets, tmp_path):
    d = faulty(datasets, tmp_path, "v3.0")
    video = d / "videos/observation.images.top/chunk-000/file-000.mp4"
    video.write_bytes(video.read_bytes()[: video.stat().st_size // 2])
    with pytest.raises(UserError, match="cannot be opened as a video \\(truncated or corrupt\\?\\)"):
        check(d)


def test_frame_count_disagrees_with_parquet(datasets, tmp_path):
    d = faulty(datasets, tmp_path, "v2.1")
    from ilstudio.data.video import VideoWriter

    video = d / "videos/chunk-000/observation.images.top/episode_000001.mp4"
    w = VideoWriter(video, FPS, *CAMS["top"])
    w.write(EPISODES[1]["images"]["top"][:30])  # 30 frames, the parquet has 33 rows
    w.close()
    with pytest.raises(UserError, match="has 30 frames but episode 1 .*needs 33: frame count"):
        check(d)


def test_v30_video_shorter_than_its_episodes(datasets, tmp_path):
    d = faulty(datasets, tmp_path, "v3.0")
    meta = d / "meta/episodes/chunk-000/file-000.parquet"
    import pyarrow as pa

    t = pq.read_table(meta)
    # Claim episode 2 starts later in the file than it does: its last frames are past the end.
    col = "videos/observation.images.wrist/from_timestamp"
    values = t.column(col).to_pylist()
    values[2] += 5 / FPS
    pq.write_table(t.set_column(t.schema.get_field_index(col), col, pa.array(values)), meta)
    # The episodes table's own span (to - from) is now too short for the episode: the schema
    # check (lerobot_schema) names it before any video is opened.
    with pytest.raises(UserError, match="episode 2: videos/observation.images.wrist spans .* too "
                                        "short for 27 frames"):
        check(d)


def test_unsupported_version_and_bad_rows(datasets, tmp_path):
    d = faulty(datasets, tmp_path, "v2.1")
    info = json.loads((d / "meta/info.json").read_text())
    (d / "meta/info.json").write_text(json.dumps({**info, "codebase_version": "v2.0"}))
    r = run_train(*lerobot_args(str(d), tmp_path / "run"), "--dry_run")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "codebase_version 'v2.0' is not supported" in r.stderr
    (d / "meta/info.json").write_text(json.dumps(info))
    lines = (d / "meta/episodes.jsonl").read_text().splitlines()
    lines[0] = json.dumps({**json.loads(lines[0]), "length": 21})
    (d / "meta/episodes.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match="episode 0 has 20 rows but the episode metadata says length 21"):
        check(d)


def test_hub_repo_id_offline_fails_fast(tmp_path):
    start = time.monotonic()
    r = run_train(*lerobot_args("nobody/not-a-cached-dataset", tmp_path / "run"), "--dry_run",
                  f"--gin_bindings=model.cache_dir = '{tmp_path / 'hub'}'",
                  env=train_env(HF_HUB_OFFLINE="1"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "'nobody/not-a-cached-dataset' is not a local directory" in r.stderr
    assert "HF_HUB_OFFLINE=1" in r.stderr
    assert time.monotonic() - start < 30  # no network retries (a fresh process takes a few s)


def test_dataloader_worker_decodes_after_the_parent_did(datasets):
    """A forked worker opens its own video readers (the parent's are keyed by its pid)."""
    import torch

    refs = list_episodes(str(datasets["v3.0"]))
    ds = EpisodeDataset(refs, task_for(datasets["v3.0"], ("top",)), DatasetSettings(), 2, compute_stats(refs))
    in_parent = [ds[i]["images"] for i in (3, 40, 70)]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, [3, 40, 70]), batch_size=3,
                                         num_workers=1, multiprocessing_context="fork")
    (batch,) = list(loader)
    assert torch.equal(batch["images"], torch.stack(in_parent))


def test_single_camera_key_as_pusht_has_it(tmp_path):
    """`observation.image` (LeRobot's one-camera datasets, e.g. pusht) is camera 'image'."""
    root = tmp_path / "pusht_like"
    with LeRobotWriter(root, fps=FPS, version="v2.1") as w:
        for e in EPISODES[:2]:
            w.add_episode(e["state"], e["action"], {"top": e["images"]["top"]}, task=e["task"])
    info = json.loads((root / "meta/info.json").read_text())
    info["features"]["observation.image"] = info["features"].pop("observation.images.top")
    (root / "meta/info.json").write_text(json.dumps(info))
    (root / "videos/chunk-000/observation.images.top").rename(root / "videos/chunk-000/observation.image")
    from ilstudio.data.lerobot_format import derived_task_values

    assert derived_task_values(str(root), {})["camera_names"] == ("image",)
    refs = list_episodes(str(root))
    assert check_episodes(refs, task_for(root, ("image",)), need_images=True) == [20, 33]
    with open_episode(refs[1]) as src:
        frames = src.frames("image")
    assert [which_frame(f, 1, CAMS["top"], 33) for f in frames] == list(range(33))


def test_v30_dataset_split_over_several_files(tmp_path):
    """Past LeRobot's file size limits a v3.0 dataset continues in file-001, ... (here: every
    episode, with limits of a byte); each file's episodes start at their own offsets."""
    root = write(tmp_path / "split", "v3.0", data_files_size_in_mb=2**-20, video_files_size_in_mb=2**-20)
    eps = pq.read_table(root / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert [e["data/file_index"] for e in eps] == [0, 1, 2]
    assert [e["videos/observation.images.top/file_index"] for e in eps] == [0, 1, 2]
    assert all(e["videos/observation.images.top/from_timestamp"] == 0 for e in eps)
    assert (root / "videos/observation.images.wrist/chunk-000/file-002.mp4").is_file()
    refs = list_episodes(str(root))
    assert check_episodes(refs, task_for(root), need_images=True) == list(LENGTHS)
    with open_episode(refs[2]) as src:
        assert np.array_equal(src.actions(), EPISODES[2]["action"])
        frames = src.frames("top")
    assert [which_frame(f, 2, CAMS["top"], 27) for f in frames] == list(range(27))


def test_a_missing_local_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    """'data/cube' under an existing data/ is a local path that does not exist (no hub lookup)."""
    from ilstudio.data.lerobot_format import local_dir

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    assert local_dir("data/cube") == Path("data/cube")
    with pytest.raises(UserError, match="data/cube does not exist"):
        list_episodes("data/cube")
