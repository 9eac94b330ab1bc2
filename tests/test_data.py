"""Data layer: real HDF5 episodes in tmp dirs, no mocks."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ilstudio.config.settings import DatasetSettings, TaskSettings
from ilstudio.data.checked import check_dataset
from ilstudio.data.dataset import EpisodeDataset, build_datasets, split_episodes
from ilstudio.data.episodes import check_episodes, is_mirrored, list_episode_files
from ilstudio.data.normalization import NormStats, compute_stats
from ilstudio.data.synthetic import main as synthetic_main
from ilstudio.data.synthetic import write_synthetic_dataset
from ilstudio.errors import UserError

T, S, A, HW, CHUNK = 20, 6, 5, (8, 10), 8
CAMS = ("top", "left")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("episodes")
    write_synthetic_dataset(d, num_episodes=4, episode_len=T, state_dim=S, action_dim=A,
                            camera_names=CAMS, image_hw=HW, seed=1)
    return d


def task_for(d: Path, cams: tuple[str, ...] = CAMS) -> TaskSettings:
    return TaskSettings(dataset_dir=str(d), state_dim=S, action_dim=A, camera_names=cams,
                        episode_len=T)


def make_ds(d: Path, **kw) -> EpisodeDataset:
    paths = list_episode_files(d)
    return EpisodeDataset(paths, task_for(d), DatasetSettings(**kw), CHUNK, compute_stats(paths))


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_listing_is_natural_order(tmp_path):
    for i in (10, 2, 1):
        (tmp_path / f"episode_{i}.hdf5").touch()
    (tmp_path / "notes.txt").touch()
    assert [p.name for p in list_episode_files(tmp_path)] == [
        "episode_1.hdf5", "episode_2.hdf5", "episode_10.hdf5"]


def test_sample_layout(data_dir):
    ds = make_ds(data_dir)
    assert len(ds) == 4 * T
    assert ds.episode_lengths.tolist() == [T] * 4
    assert ds.episode_index.tolist() == np.repeat(np.arange(4), T).tolist()
    s = ds[3]
    assert set(s) == {"qpos", "action", "is_pad", "images"}
    assert s["qpos"].shape == (S,) and s["qpos"].dtype == torch.float32
    assert s["action"].shape == (CHUNK, A) and s["action"].dtype == torch.float32
    assert s["is_pad"].shape == (CHUNK,) and s["is_pad"].dtype == torch.bool
    assert not s["is_pad"].any()
    assert s["images"].shape == (len(CAMS), 3, *HW) and s["images"].dtype == torch.float32
    assert 0.0 <= s["images"].min() and s["images"].max() <= 1.0
    with h5py.File(ds.paths[0]) as f:
        raw_img = f["observations/images/left"][3]
        raw_act = f["action"][3:3 + CHUNK]
    assert torch.allclose(s["images"][1], torch.from_numpy(raw_img).permute(2, 0, 1) / 255.0)
    assert np.allclose(ds.stats.unnormalize_action(s["action"].numpy()), raw_act, atol=1e-5)
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_padding_at_episode_end(data_dir):
    ds = make_ds(data_dir)
    i = 2 * T - 3  # episode 1, t = T-3: 3 real actions, then padding
    s = ds[i]
    assert s["is_pad"].tolist() == [False] * 3 + [True] * (CHUNK - 3)
    last = s["action"][2]
    assert torch.equal(s["action"][3:], last.expand(CHUNK - 3, A))
    with h5py.File(ds.paths[1]) as f:
        assert np.allclose(ds.stats.unnormalize_action(last.numpy()), f["action"][T - 1], atol=1e-5)


def test_normalization_round_trip(data_dir, tmp_path):
    stats = compute_stats(list_episode_files(data_dir))
    a = np.random.RandomState(0).randn(CHUNK, A).astype(np.float32)
    assert np.allclose(stats.unnormalize_action(stats.normalize_action(a)), a, atol=1e-5)
    t = torch.from_numpy(a)
    assert torch.allclose(stats.unnormalize_action(stats.normalize_action(t)), t, atol=1e-5)
    stats.save(tmp_path / "stats.json")
    loaded = NormStats.load(tmp_path / "stats.json")
    for k in ("qpos_mean", "qpos_std", "action_mean", "action_std"):
        assert getattr(loaded, k).dtype == np.float32
        assert np.array_equal(getattr(loaded, k), getattr(stats, k))
    assert not list(tmp_path.glob("*.tmp"))


def test_std_is_clipped(tmp_path):
    write_synthetic_dataset(tmp_path, num_episodes=1, episode_len=5, state_dim=2, action_dim=2,
                            camera_names=())
    path = list_episode_files(tmp_path)[0]
    with h5py.File(path, "r+") as f:
        f["observations/qpos"][:, 0] = 3.0
    stats = compute_stats([path])
    assert stats.qpos_std[0] == pytest.approx(1e-2)
    assert stats.qpos_mean[0] == pytest.approx(3.0)


def test_preload_equals_lazy(data_dir):
    lazy = make_ds(data_dir, preload_data=False)
    pre = make_ds(data_dir, preload_data=True)
    for i in (0, T - 1, T, 3 * T + 7, len(lazy) - 1):
        a, b = lazy[i], pre[i]
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (i, k)
    lazy.close()


def test_history_frames(data_dir):
    ds = make_ds(data_dir, history_images_length=3)
    s = ds[T + 1]  # episode 1, t=1: frames (0, 0, 1)
    assert s["images"].shape == (len(CAMS), 3, 3, *HW)
    assert torch.equal(s["images"][:, 0], s["images"][:, 1])
    assert torch.equal(s["images"][:, 2], make_ds(data_dir)[T + 1]["images"])
    s = ds[T + 5]  # t=5: frames 3, 4, 5
    single = make_ds(data_dir)
    assert torch.equal(s["images"][:, 0], single[T + 3]["images"])


def test_not_multimodal_has_no_images(data_dir):
    assert "images" not in make_ds(data_dir, is_multimodal=False)[0]
    paths = list_episode_files(data_dir)
    ds = EpisodeDataset(paths, task_for(data_dir, cams=()), DatasetSettings(), CHUNK,
                        compute_stats(paths))
    assert "images" not in ds[0]


def test_skip_mirrored(tmp_path):
    write_synthetic_dataset(tmp_path, num_episodes=4, episode_len=5, state_dim=S, action_dim=A,
                            camera_names=(), mirrored_every=2)
    assert [is_mirrored(p) for p in list_episode_files(tmp_path)] == [False, True, False, True]
    task = task_for(tmp_path, cams=())
    _, _, _, kept = build_datasets(check_dataset(task, DatasetSettings(skip_mirrored_data=True)), task, DatasetSettings(skip_mirrored_data=True), CHUNK, False, 0)
    assert kept["episodes_train"] == 2 and kept["episodes_mirrored_skipped"] == 2
    assert kept["timesteps_train"] == 10
    _, _, _, everything = build_datasets(check_dataset(task, DatasetSettings()), task, DatasetSettings(), CHUNK, False, 0)
    assert everything["episodes_train"] == 4


def test_split_is_deterministic_and_disjoint(tmp_path):
    write_synthetic_dataset(tmp_path, num_episodes=10, episode_len=4, state_dim=S, action_dim=A,
                            camera_names=())
    task = task_for(tmp_path, cams=())
    settings = DatasetSettings(val_fraction=0.3)
    train, val, stats, summary = build_datasets(check_dataset(task, settings), task, settings, CHUNK, True, seed=7)
    train2, val2, _, _ = build_datasets(check_dataset(task, settings), task, settings, CHUNK, True, seed=7)
    assert train.paths == train2.paths and val.paths == val2.paths
    assert not set(train.paths) & set(val.paths)
    assert len(train.paths) + len(val.paths) == 10 and len(val.paths) == 3
    assert summary["episodes_val"] == 3 and summary["timesteps_val"] == 12
    assert np.allclose(stats.action_mean, compute_stats(train.paths).action_mean)
    assert split_episodes(10, 0.3, 8) != split_episodes(10, 0.3, 7)
    assert len(split_episodes(2, 0.01, 0)[1]) == 1  # at least one held out
    _, none, _, _ = build_datasets(check_dataset(task, settings), task, settings, CHUNK, False, seed=7)
    assert none is None


def test_eval_needs_two_episodes(tmp_path):
    write_synthetic_dataset(tmp_path, num_episodes=1, episode_len=4, state_dim=S, action_dim=A,
                            camera_names=())
    with pytest.raises(UserError, match="at least 2 episodes"):
        task = task_for(tmp_path, cams=())
        build_datasets(check_dataset(task, DatasetSettings()), task, DatasetSettings(), CHUNK, True, 0)


def test_empty_or_missing_dir(tmp_path):
    with pytest.raises(UserError, match="no \\*.hdf5 files"):
        list_episode_files(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        list_episode_files(tmp_path / "nope")


def test_missing_key(data_dir, tmp_path):
    d = copy_dir(data_dir, tmp_path / "d")
    with h5py.File(d / "episode_2.hdf5", "r+") as f:
        del f["action"]
    with pytest.raises(UserError, match=r"episode_2\.hdf5: /action is missing"):
        check_episodes(list_episode_files(d), task_for(d), need_images=True)


def test_missing_camera(data_dir):
    task = task_for(data_dir, cams=("top", "wrist"))
    with pytest.raises(UserError, match=r"episode_0\.hdf5: camera 'wrist'"):
        check_episodes(list_episode_files(data_dir), task, need_images=True)
    check_episodes(list_episode_files(data_dir), task, need_images=False)


def test_wrong_dims(data_dir):
    paths = list_episode_files(data_dir)
    task = TaskSettings(dataset_dir=str(data_dir), state_dim=S, action_dim=14, camera_names=CAMS)
    with pytest.raises(UserError, match=rf"episode_0\.hdf5: /action has {A} columns, "
                                        r"task\.action_dim is 14"):
        check_episodes(paths, task, need_images=True)
    task = TaskSettings(dataset_dir=str(data_dir), state_dim=3, action_dim=A, camera_names=CAMS)
    with pytest.raises(UserError, match=r"episode_0\.hdf5: /observations/qpos has 6 columns"):
        check_episodes(paths, task, need_images=True)


def test_mismatched_lengths(data_dir, tmp_path):
    d = copy_dir(data_dir, tmp_path / "d")
    with h5py.File(d / "episode_1.hdf5", "r+") as f:
        act = f["action"][:-2]
        del f["action"]
        f["action"] = act
    with pytest.raises(UserError, match=rf"episode_1\.hdf5: /action has {T - 2} steps"):
        check_episodes(list_episode_files(d), task_for(d), need_images=True)


def test_truncated_file(data_dir, tmp_path):
    d = copy_dir(data_dir, tmp_path / "d")
    path = d / "episode_3.hdf5"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 3)
    with pytest.raises(UserError, match=r"episode_3\.hdf5: cannot be read as HDF5 \(truncated"):
        check_episodes(list_episode_files(d), task_for(d), need_images=True)


def test_lazy_dataloader_workers(data_dir):
    ds = make_ds(data_dir, preload_data=False)
    ds[0]  # the parent opens a handle before forking; workers must not reuse it
    loader = DataLoader(ds, batch_size=16, num_workers=2, shuffle=False)
    batches = list(loader)
    assert sum(len(b["qpos"]) for b in batches) == len(ds)
    assert batches[0]["images"].shape == (16, len(CAMS), 3, *HW)
    assert torch.equal(batches[-1]["action"][-1], ds[len(ds) - 1]["action"])
    ds.close()


def test_synthetic_cli(tmp_path, capsys):
    synthetic_main([str(tmp_path), "--num_episodes", "2", "--episode_len", "6",
                    "--cameras", "top,left", "--height", "4", "--width", "5"])
    assert "wrote 2 episodes" in capsys.readouterr().out
    paths = list_episode_files(tmp_path)
    assert [p.name for p in paths] == ["episode_0.hdf5", "episode_1.hdf5"]
    with h5py.File(paths[0]) as f:
        assert f.attrs["sim"] and f["observations/images/left"].shape == (6, 4, 5, 3)
        assert f["observations/qvel"].shape == (6, 14)
        # the action is the next state: learnable from qpos
        assert np.allclose(f["action"][:-1], f["observations/qpos"][1:])
