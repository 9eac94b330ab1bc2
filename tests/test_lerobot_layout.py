"""What ilstudio writes matches what LeRobot writes: statistics with quantiles, episodes that
start on keyframes, the video info block, fractional fps, episode order and file rollover.

Expected values are computed here from the raw arrays with numpy (not with ilstudio's code).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pyarrow")
av = pytest.importorskip("av")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from test_lerobot import CAMS, EPISODES, LENGTHS, task_for, which_frame  # noqa: E402

from ilstudio.data.convert import convert  # noqa: E402
from ilstudio.data.episodes import check_episodes, open_episode  # noqa: E402
from ilstudio.data.lerobot_reader import LeRobotData  # noqa: E402
from ilstudio.data.lerobot_writer import LeRobotWriter  # noqa: E402
from ilstudio.data.sources import list_episodes  # noqa: E402

QS = {"q01": 0.01, "q10": 0.10, "q50": 0.50, "q90": 0.90, "q99": 0.99}
EPISODES_FILE = "meta/episodes/chunk-000/file-000.parquet"


def write(root: Path, fps: float = 30, episodes=EPISODES, **kw) -> Path:
    with LeRobotWriter(root, fps=fps, **kw) as w:
        for e in episodes:
            w.add_episode(e["state"], e["action"], e["images"], task=e["task"], mirrored=e["mirrored"])
    return root


@pytest.fixture(scope="module")
def v30(tmp_path_factory) -> Path:
    return write(tmp_path_factory.mktemp("layout") / "v30")


def expect_quantiles(got: dict, x: np.ndarray) -> None:
    """x: (n, d). LeRobot's histogram quantile lies within one of its 5000 bins of the
    inverted-CDF order statistic (the sample whose cumulative count first reaches q*n)."""
    width = (x.max(0) - x.min(0)) / 5000
    for key, q in QS.items():
        want = np.quantile(x, q, axis=0, method="inverted_cdf")
        assert np.all(np.abs(np.ravel(got[key]) - want) <= width * 1.01 + 1e-6), (key, got[key], want)


def test_episode_stats_carry_lerobots_quantiles(v30):
    rows = pq.read_table(v30 / EPISODES_FILE).to_pylist()
    for row, e in zip(rows, EPISODES, strict=True):
        for key, x in (("observation.state", e["state"]), ("action", e["action"])):
            got = {k: row[f"stats/{key}/{k}"] for k in ("min", "max", "mean", "std", "count", *QS)}
            assert np.allclose(got["min"], x.min(0)) and np.allclose(got["max"], x.max(0))
            assert np.allclose(got["mean"], x.mean(0), atol=1e-6)
            assert np.allclose(got["std"], x.std(0), atol=1e-5)
            assert got["count"] == [len(x)]
            expect_quantiles(got, x.astype(np.float64))
        n = len(e["state"])
        assert row["stats/frame_index/q50"] == pytest.approx([np.quantile(np.arange(n), 0.5,
                                                                          method="inverted_cdf")], abs=n / 5000)
        for cam in CAMS:  # every frame when an episode has < 100 (LeRobot samples 100 of more)
            px = e["images"][cam].reshape(-1, 3).astype(np.float64) / 255
            got = {k: np.asarray(row[f"stats/observation.images.{cam}/{k}"]) for k in (*QS, "mean", "std")}
            assert got["q50"].shape == (3, 1, 1) and got["mean"].shape == (3, 1, 1)
            assert np.allclose(got["mean"].ravel(), px.mean(0), atol=1e-5)
            assert np.allclose(got["std"].ravel(), px.std(0), atol=1e-4)
            expect_quantiles(got, px)
            assert row[f"stats/observation.images.{cam}/count"] == [n]


def test_dataset_stats_aggregate_as_lerobot(v30):
    """stats.json: pooled mean/std over all frames; quantiles as LeRobot's envelope of the
    episodes' (lower ones the min, upper ones the max)."""
    stats = json.loads((v30 / "meta/stats.json").read_text())
    rows = pq.read_table(v30 / EPISODES_FILE).to_pylist()
    state = np.concatenate([e["state"] for e in EPISODES]).astype(np.float64)
    s = stats["observation.state"]
    assert np.allclose(s["mean"], state.mean(0), atol=1e-6) and np.allclose(s["std"], state.std(0), atol=1e-5)
    assert s["count"] == [sum(LENGTHS)]
    for key in QS:
        per_episode = np.array([r[f"stats/observation.state/{key}"] for r in rows])
        want = per_episode.min(0) if key in ("q01", "q10", "q50") else per_episode.max(0)
        assert np.allclose(s[key], want)
    for feat in ("action", "timestamp", "index", "observation.images.top", "observation.images.wrist"):
        assert set(QS) <= set(stats[feat]), feat


def test_large_image_episodes_are_sampled_and_strided_as_lerobot():
    """520 frames of 300x20: LeRobot samples int(520**0.75) = 108 frames at
    round(linspace(0, 519, 108)) and strides pixels by int(300/150) = 2 (the writer's
    image_stats, whose hand-off into the files the tests above check)."""
    from ilstudio.data.lerobot_stats import image_stats

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(520, 300, 20, 3), dtype=np.uint8)
    got = image_stats(frames)
    picked = frames[np.round(np.linspace(0, 519, 108)).astype(int)][:, ::2, ::2]
    px = picked.reshape(-1, 3).astype(np.float64) / 255
    assert got["count"] == [108]
    # LeRobot sums the pixels per channel in float32: its mean may be off by ~1e-5 (so ours).
    assert np.allclose(np.ravel(got["mean"]), px.mean(0), atol=1e-4)
    expect_quantiles(got, px)


def test_every_episode_starts_on_a_keyframe(v30):
    """Packets of the multi-episode mp4: the one at each episode's from_timestamp is a keyframe
    (the episodes have odd lengths, so a single encoder with g=2 would start some mid-GOP)."""
    rows = pq.read_table(v30 / EPISODES_FILE).to_pylist()
    for cam in CAMS:
        key = f"observation.images.{cam}"
        with av.open(str(v30 / f"videos/{key}/chunk-000/file-000.mp4")) as c:
            s = c.streams.video[0]
            keyframe = {round(float(p.pts * s.time_base), 4): p.is_keyframe
                        for p in c.demux(s) if p.pts is not None}
        assert not all(keyframe.values())  # the check can fail: not every frame is a keyframe
        starts = [round(r[f"videos/{key}/from_timestamp"], 4) for r in rows]
        assert starts[1:] == [round(sum(LENGTHS[:k]) / 30, 4) for k in (1, 2)]
        assert [keyframe[t] for t in starts] == [True] * len(rows), cam


def test_video_info_block_is_lerobots(v30):
    info = json.loads((v30 / "meta/info.json").read_text())
    for cam, (h, w) in CAMS.items():
        feat = info["features"][f"observation.images.{cam}"]
        assert "fps" not in feat
        block = feat["info"]
        assert block["is_depth_map"] is False and "video.is_depth_map" not in block
        assert {"video.height": h, "video.width": w, "video.codec": "h264", "video.channels": 3,
                "video.fps": 30, "video.g": 2, "video.crf": 18, "has_audio": False}.items() <= block.items()
        assert {"video.pix_fmt", "video.preset", "video.fast_decode", "video.video_backend",
                "video.extra_options"} <= set(block)
    assert info["features"]["action"]["fps"] == 30


def test_fractional_fps_survives_writing_reading_and_conversion(tmp_path):
    root = write(tmp_path / "ntsc", fps=29.97, episodes=EPISODES[:2])
    info = json.loads((root / "meta/info.json").read_text())
    assert info["fps"] == 29.97 and info["features"]["observation.images.top"]["info"]["video.fps"] == 29.97
    data = LeRobotData.load(root)
    assert data.info.fps == 29.97
    ts = pq.read_table(root / "data/chunk-000/file-000.parquet").column("timestamp").to_numpy()
    assert ts[1] == np.float32(1 / 29.97)
    refs = list_episodes(str(root))
    assert check_episodes(refs, task_for(root), need_images=True) == list(LENGTHS[:2])
    with open_episode(refs[1]) as src:
        assert src.fps == 29.97
        frames = src.frames("top")
    assert [which_frame(f, 1, CAMS["top"], 33) for f in frames] == list(range(33))
    convert(str(root), tmp_path / "h5", "hdf5")
    convert(str(tmp_path / "h5"), tmp_path / "back", "lerobot")
    assert json.loads((tmp_path / "back/meta/info.json").read_text())["fps"] == 29.97


def test_episodes_come_in_episode_index_order(tmp_path):
    """A v3.0 episodes table whose rows are not sorted (LeRobot's aggregate can write such)."""
    root = write(tmp_path / "shuffled")
    path = root / EPISODES_FILE
    table = pq.read_table(path)
    pq.write_table(table.take(pa.array([2, 0, 1])), path)
    refs = list_episodes(str(root))
    assert [r.meta.index for r in refs] == [0, 1, 2]
    assert [r.meta.length for r in refs] == list(LENGTHS)
    with open_episode(refs[0]) as src:
        assert np.array_equal(src.actions(), EPISODES[0]["action"])


def test_video_files_roll_over_before_the_limit_is_crossed(tmp_path):
    """Eight equal episodes with a limit of 2.5 episodes' mp4 size: LeRobot's rule starts a new
    file when the current one plus the episode (encoded alone) would reach the limit."""
    ep = EPISODES[1]
    probe = write(tmp_path / "one", episodes=[ep])
    one = (probe / "videos/observation.images.top/chunk-000/file-000.mp4").stat().st_size / 2**20
    root = write(tmp_path / "eight", episodes=[ep] * 8, video_files_size_in_mb=2.5 * one)
    rows = pq.read_table(root / EPISODES_FILE).to_pylist()
    assert json.loads((root / "meta/info.json").read_text())["video_files_size_in_mb"] == 2.5 * one
    assert [r["videos/observation.images.top/file_index"] for r in rows] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [r["data/file_index"] for r in rows] == [0] * 8
    for f in range(4):
        path = root / f"videos/observation.images.top/chunk-000/file-{f:03d}.mp4"
        assert path.stat().st_size / 2**20 < 2.5 * one
    refs = list_episodes(str(root))
    assert check_episodes(refs, task_for(root), need_images=True) == [33] * 8
    with open_episode(refs[5]) as src:
        assert [which_frame(f, 1, CAMS["top"], 33) for f in src.frames("top")] \
            == list(range(33))


def test_data_files_roll_over_before_the_limit_is_crossed(tmp_path):
    """LeRobot's rule for parquet: the open file's size on disk plus the episode at the file's
    average bytes per frame; a new file begins before the sum would reach the limit."""
    rng = np.random.default_rng(0)
    ep = {"state": rng.normal(size=(2000, 40)), "action": rng.normal(size=(2000, 40)),
          "images": {}, "task": "", "mirrored": False}
    probe = write(tmp_path / "one", episodes=[ep])
    one = (probe / "data/chunk-000/file-000.parquet").stat().st_size / 2**20
    root = write(tmp_path / "six", episodes=[ep] * 6, data_files_size_in_mb=2.5 * one)
    rows = pq.read_table(root / EPISODES_FILE).to_pylist()
    assert [r["data/file_index"] for r in rows] == [0, 0, 1, 1, 2, 2]
    for f in range(3):
        assert (root / f"data/chunk-000/file-{f:03d}.parquet").stat().st_size / 2**20 < 2.5 * one
    refs = list_episodes(str(root))
    with open_episode(refs[3]) as src:
        assert np.array_equal(src.actions(), ep["action"])


# -- the lazy video path: decoded episodes per process, within dataset.video_cache_mb ----------


def lazy_dataset(root: Path, cache_mb: float):
    """cache_mb below 1 (not a value dataset.video_cache_mb, an integer, can take) is set on
    the decoder after the dataset is built, to test a budget this small dataset does not fit."""
    from ilstudio.config.settings import DatasetSettings
    from ilstudio.data import video
    from ilstudio.data.dataset import EpisodeDataset
    from ilstudio.data.normalization import compute_stats

    refs = list_episodes(str(root))
    settings = DatasetSettings(video_cache_mb=int(max(cache_mb, 1) if cache_mb else 0),
                               image_size=(24, 32))
    dataset = EpisodeDataset(refs, task_for(root), settings, 5, compute_stats(refs))
    if 0 < cache_mb < 1:
        video.DECODED.configure(cache_mb)
    return dataset


def test_lazy_video_decodes_each_episode_once_within_the_budget(v30, monkeypatch):
    """dataset.video_cache_mb reaches the decoder: with room for the dataset every episode is
    decoded in one pass on its first sample (one frames_at call per episode and camera), and
    samples equal those decoded one by one; with 0, or a budget the dataset does not fit,
    nothing is kept and each sample decodes its own frames."""
    from ilstudio.data import video

    calls = []
    real = video.VideoReader.frames_at
    monkeypatch.setattr(video.VideoReader, "frames_at",
                        lambda self, ts: calls.append(len(ts)) or real(self, ts))
    monkeypatch.setattr(video, "DECODED", video.DecodedEpisodes())
    monkeypatch.setattr("ilstudio.data.lerobot_reader.DECODED", video.DECODED)
    order = np.random.default_rng(0).permutation(sum(LENGTHS))
    cached = lazy_dataset(v30, cache_mb=1)
    assert video.DECODED.budget == 2**20
    a = [cached[int(i)]["images"] for i in order]
    assert sorted(calls) == sorted([n for n in LENGTHS for _ in CAMS])  # whole episodes, once
    assert 0 < video.DECODED.bytes <= 2**20
    for budget in (0, 0.01):  # off; too small for this dataset (0.25 MiB decoded)
        video.DECODED.configure(0)  # forget what the run above kept
        calls.clear()
        plain = lazy_dataset(v30, cache_mb=budget)
        b = [plain[int(i)]["images"] for i in order[:20]]
        assert calls == [1] * 20 * len(CAMS) and video.DECODED.bytes == 0
        assert all(torch_equal(x, y) for x, y in zip(a[:20], b, strict=True))


def torch_equal(x, y) -> bool:
    return bool((x == y).all())


def test_decoded_episodes_drop_the_least_recently_used_past_the_budget():
    from ilstudio.data.video import DecodedEpisodes

    cache = DecodedEpisodes(budget_mb=3 * 2**-20 * 1000)  # 3000 bytes
    for k in range(3):
        cache.put((k,), np.zeros(1000, np.uint8))
    cache.get((0,))  # used: kept over 1
    cache.put((3,), np.zeros(1000, np.uint8))
    assert cache.get((1,)) is None and cache.get((0,)) is not None and cache.bytes == 3000
    cache.put((4,), np.zeros(5000, np.uint8))  # larger than the budget: not kept
    assert cache.get((4,)) is None and cache.bytes == 3000


class _Limit:
    """A dataset whose items are this process's decoded-episode limit."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> int:
        from ilstudio.data import video

        return video.DECODED.limit


def test_dataloader_workers_share_the_video_budget(monkeypatch):
    """dataset.video_cache_mb bounds the workers together: each of 2 gets half."""
    from torch.utils.data import DataLoader

    from ilstudio.data import video

    monkeypatch.setattr(video, "DECODED", video.DecodedEpisodes())
    video.set_cache_mb(64)
    assert video.DECODED.limit == 64 * 2**20
    got = [int(x) for x in DataLoader(_Limit(), batch_size=None, num_workers=2)]
    assert got == [32 * 2**20] * 4
