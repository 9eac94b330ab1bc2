"""``python -m ilstudio.data.convert``: HDF5 -> LeRobot -> HDF5 round trips on real files.

State, action and qvel come back exactly (float64 stays float64 in the parquet). Video
frames come back within h264's loss (crf 18), stated as: PSNR >= 32 dB and mean absolute
error <= 5 grey levels (of 255) per camera and episode. Measured on these 30x44 stripe frames
(independent sine patterns per colour channel: the worst case for yuv420p's halved chroma):
33.8-37.7 dB, mean 2.6-4.2; on 120x160 frames: 41-42.5 dB, mean 1.5-1.8. PNG storage
(--image_storage=image) comes back bit-exact.
"""

from __future__ import annotations

import subprocess
import sys

import h5py
import numpy as np
import pytest

pytest.importorskip("pyarrow")
pytest.importorskip("av")

from conftest import REPO, train_env  # noqa: E402

from ilstudio.data.convert import convert  # noqa: E402
from ilstudio.data.episodes import list_episode_files  # noqa: E402
from ilstudio.data.synthetic import write_synthetic_dataset  # noqa: E402
from ilstudio.errors import UserError  # noqa: E402

MEAN_TOL, PSNR_MIN = 5.0, 32.0


@pytest.fixture(scope="module")
def hdf5(tmp_path_factory):
    d = tmp_path_factory.mktemp("src") / "hdf5"
    paths = write_synthetic_dataset(d, num_episodes=3, episode_len=24, mirrored_every=2,
                                    camera_names=("top", "left_wrist"), image_hw=(30, 44), language=True)
    for p in paths:  # as the recorder writes: float64 with digits float32 cannot hold
        with h5py.File(p, "r+") as f:
            for key in ("observations/qpos", "action"):
                x = f[key][()].astype(np.float64) + np.pi * 1e-9
                del f[key]
                f[key] = x
    return d


def read(path):
    with h5py.File(path, "r") as f:
        return {"qpos": f["observations/qpos"][()], "qvel": f["observations/qvel"][()],
                "action": f["action"][()],
                "images": {c: f[f"observations/images/{c}"][()] for c in f["observations/images"]},
                "attrs": {k: f.attrs[k] for k in ("language_instruction", "mirrored") if k in f.attrs}}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ilstudio.data.convert", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=train_env())


@pytest.mark.parametrize("version", ["3.0", "2.1"])
def test_round_trip_hdf5_lerobot_hdf5(hdf5, tmp_path, version):
    lerobot, back = tmp_path / "lerobot", tmp_path / "back"
    r = cli(str(hdf5), str(lerobot), "--to=lerobot", f"--version={version}", "--fps=50")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "3 episodes written" in r.stdout
    r = cli(str(lerobot), str(back), "--to=hdf5")
    assert r.returncode == 0, r.stderr[-2000:]
    src, out = list_episode_files(hdf5), list_episode_files(back)
    assert [p.name for p in out] == [p.name for p in src]
    for a_path, b_path in zip(src, out, strict=True):
        a, b = read(a_path), read(b_path)
        for key in ("qpos", "qvel", "action"):
            assert b[key].dtype == a[key].dtype and np.array_equal(a[key], b[key]), key
        assert {k: (v.decode() if isinstance(v, bytes) else v) for k, v in b["attrs"].items()} == \
            {k: (v.decode() if isinstance(v, bytes) else v) for k, v in a["attrs"].items()}
        assert sorted(b["images"]) == sorted(a["images"])
        for cam, frames in a["images"].items():
            diff = b["images"][cam].astype(np.float64) - frames
            psnr = 10 * np.log10(255.0 ** 2 / max((diff ** 2).mean(), 1e-12))
            assert np.abs(diff).mean() <= MEAN_TOL and psnr >= PSNR_MIN, (cam, np.abs(diff).mean(), psnr)
    with h5py.File(out[0], "r") as f:
        assert f.attrs["fps"] == 50


def test_png_storage_round_trip_is_exact(hdf5, tmp_path):
    convert(str(hdf5), tmp_path / "lr", "lerobot", image_storage="image")
    convert(str(tmp_path / "lr"), tmp_path / "back", "hdf5")
    for a_path, b_path in zip(list_episode_files(hdf5), list_episode_files(tmp_path / "back"), strict=True):
        a, b = read(a_path), read(b_path)
        for cam in a["images"]:
            assert np.array_equal(a["images"][cam], b["images"][cam])


def test_lerobot_v21_to_v30_keeps_the_data(hdf5, tmp_path):
    convert(str(hdf5), tmp_path / "v21", "lerobot", version="2.1", image_storage="image")
    convert(str(tmp_path / "v21"), tmp_path / "v30", "lerobot", version="3.0", image_storage="image")
    convert(str(tmp_path / "v30"), tmp_path / "back", "hdf5")
    a, b = read(list_episode_files(hdf5)[2]), read(list_episode_files(tmp_path / "back")[2])
    assert np.array_equal(a["qpos"], b["qpos"]) and np.array_equal(a["images"]["top"], b["images"]["top"])


def test_bad_destination_and_source_exit_2(hdf5, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    r = cli(str(hdf5), str(tmp_path / "full"), "--to=lerobot")
    assert r.returncode == 2 and "exists and is not empty" in r.stderr and "Traceback" not in r.stderr
    r = cli(str(tmp_path / "nope"), str(tmp_path / "out"), "--to=hdf5")
    assert r.returncode == 2 and "does not exist" in r.stderr and not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="--to must be"):
        convert(str(hdf5), tmp_path / "o", "parquet")
    assert not list(tmp_path.glob(".*partial*"))  # nothing half-written left behind


def test_recorder_writes_lerobot_directly(tmp_path):
    """--format=lerobot: the same episode as the HDF5 recording (same seed), as LeRobot v3.0."""
    for mod in ("mujoco", "dm_control", "gym_aloha"):
        pytest.importorskip(mod)
    from ilstudio.data.sources import list_episodes

    small = ["--gin_bindings", "sim.render_height = 36", "--gin_bindings", "sim.render_width = 48"]
    outs = {}
    for fmt in ("hdf5", "lerobot"):
        outs[fmt] = tmp_path / fmt
        r = subprocess.run([sys.executable, "-m", "ilstudio.sim.record", "--num_episodes", "1",
                            "--output_dir", str(outs[fmt]), "--no_progress", f"--format={fmt}", *small],
                           cwd=REPO, capture_output=True, text=True, timeout=600,
                           env=train_env(MUJOCO_GL="egl"))
        assert r.returncode == 0, r.stderr[-3000:]
    assert (outs["lerobot"] / "meta/info.json").is_file()
    assert not list(tmp_path.glob("*.hdf5-recording"))  # the resumable staging is gone
    (ref,) = list_episodes(str(outs["lerobot"]))
    assert ref.data.info.raw["robot_type"] == "aloha_sim_transfer_cube" and ref.data.info.fps == 50
    a = read(list_episode_files(outs["hdf5"])[0])
    with ref.open() as src:
        assert np.array_equal(src.states(), a["qpos"])
        assert np.array_equal(src.actions(), a["action"])
        for cam, frames in a["images"].items():
            diff = src.frames(cam).astype(np.float64) - frames
            assert 10 * np.log10(255.0 ** 2 / max((diff ** 2).mean(), 1e-12)) >= PSNR_MIN
    r = subprocess.run([sys.executable, "-m", "ilstudio.sim.record", "--num_episodes", "1",
                        "--output_dir", str(outs["lerobot"]), "--format=lerobot", *small],
                       cwd=REPO, capture_output=True, text=True, timeout=600, env=train_env())
    assert r.returncode == 2 and "already holds a LeRobot dataset" in r.stderr
