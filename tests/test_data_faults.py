"""Broken data, end to end: every fault is an error naming the file and what is wrong.

Each fault goes through the checks ``train.py --dry_run`` runs (in-process, for speed; three
of them also as real ``train.py --dry_run`` subprocesses: exit code 2, no traceback, nothing
written), and the ones a dry run cannot see without reading every frame
(a corrupt compressed image chunk) through a real run, which must stop with the file's name
and no checkpoint.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import run_train, tiny_args

from ilstudio.data.synthetic import write_synthetic_dataset


@pytest.fixture
def data(tmp_path) -> Path:
    d = tmp_path / "data"
    write_synthetic_dataset(d, num_episodes=3, episode_len=30)
    return d


def truncate(d: Path) -> str:
    p = d / "episode_1.hdf5"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return "episode_1.hdf5: cannot be read as HDF5 (truncated or corrupt?)"


def garbage(d: Path) -> str:
    (d / "episode_2.hdf5").write_bytes(b"not an hdf5 file at all\n" * 100)
    return "episode_2.hdf5: cannot be read as HDF5"


def missing_action(d: Path) -> str:
    with h5py.File(d / "episode_0.hdf5", "r+") as f:
        del f["action"]
    return "episode_0.hdf5: /action"


def missing_camera(d: Path) -> str:
    with h5py.File(d / "episode_1.hdf5", "r+") as f:
        del f["observations/images/top"]
    return "episode_1.hdf5: camera 'top'"


def empty_dir(d: Path) -> str:
    for p in d.iterdir():
        p.unlink()
    return "has no *.hdf5 files"


def short_action(d: Path) -> str:
    with h5py.File(d / "episode_2.hdf5", "r+") as f:
        a = f["action"][()]
        del f["action"]
        f["action"] = a[:-3]
    return "episode_2.hdf5: /action has 27 steps but /observations/qpos has 30"


def nan_action(d: Path) -> str:
    with h5py.File(d / "episode_1.hdf5", "r+") as f:
        f["action"][7, 3] = np.nan
    return "episode_1.hdf5: /action has 1 non-finite value(s) (NaN or inf), first at step 7, column 3"


def _replace(path: Path, key: str, values: np.ndarray) -> None:
    with h5py.File(path, "r+") as f:
        del f[key]
        f[key] = values


def complex_qpos(d: Path) -> str:
    """The imaginary part used to vanish silently in the float conversion."""
    with h5py.File(d / "episode_0.hdf5", "r") as f:
        q = f["observations/qpos"][()]
    _replace(d / "episode_0.hdf5", "observations/qpos", q.astype(np.complex64) + 1j)
    return "episode_0.hdf5: /observations/qpos has dtype complex64, which does not convert exactly"


def string_action(d: Path) -> str:
    _replace(d / "episode_1.hdf5", "action", np.full((30, 14), b"0.5", dtype="S3"))
    return "episode_1.hdf5: /action has dtype |S3, which does not convert exactly"


def huge_int_action(d: Path) -> str:
    """int64 beyond 2**24 would be rounded by the float32 conversion."""
    a = np.zeros((30, 14), dtype=np.int64)
    a[4, 2] = 2**24 + 1
    _replace(d / "episode_2.hdf5", "action", a)
    return "episode_2.hdf5: /action holds integer 16777217 at step 4, column 2"


def float64_beyond_float32(d: Path) -> str:
    with h5py.File(d / "episode_1.hdf5", "r") as f:
        q = f["observations/qpos"][()].astype(np.float64)
    q[3, 0] = 1e300
    _replace(d / "episode_1.hdf5", "observations/qpos", q)
    return "first at step 3, column 0 (1e+300 is beyond float32's range)"


def zero_size_frames(d: Path) -> str:
    _replace(d / "episode_0.hdf5", "observations/images/top", np.zeros((30, 0, 0, 3), np.uint8))
    return "episode_0.hdf5: /observations/images/top has shape (30, 0, 0, 3): frames of 0x0"


FAULTS = [truncate, garbage, missing_action, missing_camera, empty_dir, short_action, nan_action,
          complex_qpos, string_action, huge_int_action, float64_beyond_float32, zero_size_frames]


def dry_run_in_process(data: Path, out: Path, *extra: str) -> str:
    """What --dry_run runs (resolve + data checks), in-process: the UserError's message."""
    from ilstudio.errors import UserError
    from ilstudio.plan import check_data
    from ilstudio.resolve import resolve_argv

    with pytest.raises(UserError) as e:
        check_data(resolve_argv(tiny_args(data, out, *extra)))
    return str(e.value)


@pytest.mark.parametrize("fault", FAULTS, ids=[f.__name__ for f in FAULTS])
def test_each_fault_is_found_by_the_dry_run_checks(data, tmp_path, fault):
    expected = fault(data)
    msg = dry_run_in_process(data, tmp_path / "out")
    assert expected in msg
    assert str(data) in msg or "episode_" in msg  # the file (or the directory) is named
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fault", [truncate, nan_action, empty_dir], ids=lambda f: f.__name__)
def test_train_py_dry_run_exits_2_naming_the_file(data, tmp_path, fault):
    expected = fault(data)
    out = tmp_path / "out"
    r = run_train(*tiny_args(data, out, "--dry_run"), timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert expected in r.stderr, r.stderr[-2000:]
    assert not out.exists()


def test_mismatched_dims_between_task_and_data(data, tmp_path):
    msg = dry_run_in_process(data, tmp_path / "out", "--gin_bindings=task.state_dim = 10")
    assert "episode_0.hdf5: /observations/qpos has 14 columns, task.state_dim is 10" in msg
    msg = dry_run_in_process(data, tmp_path / "out", "--gin_bindings=task.action_dim = 7")
    assert "episode_0.hdf5: /action has 14 columns, task.action_dim is 7" in msg


def test_real_run_refuses_bad_data_before_writing(data, tmp_path):
    truncate(data)
    out = tmp_path / "out"
    r = run_train(*tiny_args(data, out, "--max_steps=5"), timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "episode_1.hdf5" in r.stderr
    assert not out.exists()


def corrupt_image_chunks(path: Path, keep: int = 0, first: int = 0) -> None:
    """Rewrite the camera as gzip chunks (one per frame), then overwrite the bytes of chunks
    ``first``.. after their first ``keep`` bytes: HDF5's headers stay valid. With keep=0 the
    dry run's chunk check sees it; with keep=64 (the head of each deflate stream intact) only
    reading the frame does."""
    with h5py.File(path, "r+") as f:
        key = "observations/images/top"
        frames = f[key][()]
        del f[key]
        f.create_dataset(key, data=frames, chunks=(1, *frames.shape[1:]), compression="gzip")
    with h5py.File(path, "r") as f:
        ds = f["observations/images/top"]
        spans = [(ds.id.get_chunk_info(i).byte_offset, ds.id.get_chunk_info(i).size)
                 for i in range(ds.id.get_num_chunks())]
    raw = bytearray(path.read_bytes())
    for offset, size in spans[first:]:
        raw[offset + keep:offset + size] = b"\xff" * (size - keep)
    path.write_bytes(bytes(raw))


def test_corrupt_frame_mid_training_stops_with_the_file_name_and_no_checkpoint(tmp_path):
    data = tmp_path / "data"
    write_synthetic_dataset(data, num_episodes=1, episode_len=30)
    corrupt_image_chunks(data / "episode_0.hdf5", keep=64, first=1)
    out = tmp_path / "out"
    dry = run_train(*tiny_args(data, out, "--dry_run"), timeout=120)
    # the chunks' heads decode: only reading the whole frame finds it (a dry run does not)
    assert dry.returncode == 0, dry.stderr[-2000:]
    r = run_train(*tiny_args(data, out, "--max_steps=5", "--save_steps=1"), timeout=180)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert "episode_0.hdf5: cannot be read as HDF5 (truncated or corrupt?)" in r.stderr
    assert not list(out.glob("checkpoint-*")) and not (out / "model.safetensors").exists()
    shutil.rmtree(out, ignore_errors=True)


@pytest.mark.parametrize("damage", ["every chunk", "one chunk", "unwritten chunks", "truncated"])
def test_corrupt_image_chunks_are_found_by_the_dry_run_checks(tmp_path, damage):
    """check_episodes (what --dry_run and every run check first) finds damaged image chunks
    without decoding every frame: chunk heads, the chunk index against the file size, chunks
    the shape needs but the file never got."""
    from ilstudio.config.settings import TaskSettings
    from ilstudio.data.episodes import check_episodes
    from ilstudio.errors import UserError

    data = tmp_path / "data"
    write_synthetic_dataset(data, num_episodes=1, episode_len=30)
    path = data / "episode_0.hdf5"
    if damage == "unwritten chunks":
        with h5py.File(path, "r+") as f:
            key = "observations/images/top"
            frames = f[key][()]
            del f[key]
            ds = f.create_dataset(key, shape=frames.shape, dtype=frames.dtype,
                                  chunks=(1, *frames.shape[1:]), compression="gzip")
            ds[:20] = frames[:20]  # frames 20..29 never written: they would read back black
        want = "10 of its 30 chunks were never written"
    elif damage == "truncated":
        corrupt_image_chunks(path)
        with h5py.File(path, "r") as f:
            ds = f["observations/images/top"]
            last = ds.id.get_chunk_info(ds.id.get_num_chunks() - 1)
        raw = path.read_bytes()
        # cut inside the last chunk, keeping HDF5's own headers (they precede the chunks)
        path.write_bytes(raw[:last.byte_offset + 1])
        want = "episode_0.hdf5"
    else:
        corrupt_image_chunks(path, first=0 if damage == "every chunk" else 17)
        want = f"chunk {0 if damage == 'every chunk' else 17} (frame "
    task = TaskSettings(dataset_dir=str(data), state_dim=14, action_dim=14, camera_names=("top",))
    with pytest.raises(UserError, match=want.replace("(", "\\(")):
        check_episodes([path], task, need_images=True)


def test_small_integer_episodes_are_exact_and_accepted(data, tmp_path):
    """Integer data within float32's exact range is fine (the dtype rule refuses only losses)."""
    from ilstudio.plan import check_data
    from ilstudio.resolve import resolve_argv

    _replace(data / "episode_0.hdf5", "action", np.arange(30 * 14, dtype=np.int32).reshape(30, 14))
    assert check_data(resolve_argv(tiny_args(data, tmp_path / "out"))).lengths == (30, 30, 30)


def test_skipped_entries_are_warned_and_counted_in_data_summary(data, tmp_path):
    """Dangling and looping episode symlinks (and a directory named *.hdf5) are skipped with a
    warning naming each, and counted in the run's data_summary.json."""
    import json
    import os

    os.symlink(tmp_path / "nowhere.hdf5", data / "episode_7.hdf5")
    os.symlink(data / "episode_9.hdf5", data / "episode_8.hdf5")
    os.symlink(data / "episode_8.hdf5", data / "episode_9.hdf5")
    (data / "episode_10.hdf5").mkdir()
    out = tmp_path / "out"
    dry = run_train(*tiny_args(data, out, "--dry_run"), timeout=120)
    assert dry.returncode == 0, dry.stderr[-2000:]
    for name, why in (("episode_7.hdf5", "dangling symlink"), ("episode_8.hdf5", "symlink loop"),
                      ("episode_9.hdf5", "symlink loop"), ("episode_10.hdf5", "not a regular file")):
        assert f"{name}: skipped, not an episode file: {why}" in dry.stderr, dry.stderr[-2000:]
    r = run_train(*tiny_args(data, out, "--max_steps=1", "--save_strategy=no"), timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "data_summary.json").read_text())
    assert summary["episodes_found"] == 3 and summary["entries_skipped"] == 4
    assert summary["entries_skipped_why"]["episode_7.hdf5"].startswith("dangling symlink")
    assert summary["entries_skipped_why"]["episode_8.hdf5"] == "symlink loop"


@pytest.mark.parametrize("key, value", [("fps", "abc"), ("fps", float("inf")), ("fps", -50.0),
                                        ("mirrored", np.array([1, 0])), ("sim", 7),
                                        ("language_instruction", 3)])
def test_episode_attributes_are_checked_against_their_declaration(tmp_path, key, value, capsys):
    """An HDF5 episode's root attributes (fps, mirrored, sim, language_instruction) are
    declared in episodes.EPISODE_ATTRS: a bad one is refused by the data checks and by the
    converter before it writes anything, naming the file and the attribute."""
    from ilstudio.config.settings import TaskSettings
    from ilstudio.data import convert
    from ilstudio.data.episodes import check_episodes
    from ilstudio.errors import UserError

    data = tmp_path / "data"
    write_synthetic_dataset(data, num_episodes=1, episode_len=5)
    with h5py.File(data / "episode_0.hdf5", "r+") as f:
        f.attrs[key] = value
    task = TaskSettings(dataset_dir=str(data), state_dim=14, action_dim=14, camera_names=("top",))
    with pytest.raises(UserError, match=f"episode_0.hdf5: root attribute '{key}'"):
        check_episodes([data / "episode_0.hdf5"], task, need_images=False)
    assert convert.main([str(data), str(tmp_path / "out"), "--to", "lerobot", "--no_progress"]) == 2
    assert f"root attribute '{key}'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
