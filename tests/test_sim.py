"""The ALOHA simulation end to end: record scripted demonstrations, train on them, evaluate.

Real MuJoCo/dm_control (the ``[sim]`` extra; CI installs it), real HDF5, real train.py runs.
Frames are rendered tiny (36x48) to keep the file fast; everything else is the real task:
400-step episodes, 14-dim state/actions, the weld fix, seeded poses, final-step success.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")  # before dm_control is imported anywhere
os.environ.setdefault("OMP_NUM_THREADS", "1")

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("mujoco")
pytest.importorskip("dm_control")
pytest.importorskip("gym_aloha")

from conftest import REPO, run_train, train_env  # noqa: E402

from ilstudio.errors import UserError  # noqa: E402

SMALL = ["sim.render_height = 36", "sim.render_width = 48"]
TASK = "sim_transfer_cube_scripted"


def _sim_env() -> dict[str, str]:
    return train_env(MUJOCO_GL="egl")


def _python_m(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=_sim_env())


def _bindings() -> list[str]:
    return [a for b in SMALL for a in ("--gin_bindings", b)]


def _load_small_task():
    from ilstudio.sim.config import load_task

    return load_task(TASK, SMALL)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    """Two episodes recorded by the command users run (seed 0, 36x48 frames)."""
    out = tmp_path_factory.mktemp("sim") / "cube"
    proc = _python_m("ilstudio.sim.record", "--task_name", TASK, "--num_episodes", "2",
                     "--output_dir", str(out), "--seed", "0", *_bindings())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 episodes in" in proc.stdout and "MiB per episode" in proc.stdout
    assert "recording transfer_cube" in proc.stderr  # the tqdm progress bar
    return out


def test_recorded_files_have_the_act_layout(recorded: Path) -> None:
    from ilstudio.data.episodes import check_episodes, list_episode_files

    task, _ = _load_small_task()
    files = list_episode_files(recorded)
    assert [p.name for p in files] == ["episode_0.hdf5", "episode_1.hdf5"]
    assert check_episodes(files, task, need_images=True) == [400, 400]
    with h5py.File(files[0], "r") as f:
        assert bool(f.attrs["sim"]) is True
        assert f["observations/qpos"].shape == f["observations/qvel"].shape == (400, 14)
        assert f["action"].shape == (400, 14)
        img = f["observations/images/top"]
        assert img.shape == (400, 36, 48, 3) and img.dtype == np.uint8
        assert img.chunks == (1, 36, 48, 3) and img.compression == "gzip"
        frames = img[()]
        qpos, action = f["observations/qpos"][()], f["action"][()]
    # The scene is really rendered and really moves: frames change over the episode.
    assert frames.std() > 1.0 and np.abs(frames[0].astype(int) - frames[-1]).mean() > 1.0
    # The gripper actions open (1) and close (0) during a hand-over.
    assert action[:, 13].max() > 0.9 and action[150:200, 13].min() < 0.1
    # Actions lead the state (a joint trajectory, not a copy of qpos).
    assert not np.allclose(action, qpos)


def test_recording_is_deterministic_and_resumable(recorded: Path, tmp_path: Path) -> None:
    from ilstudio.sim.record import record

    task, sim = _load_small_task()
    again = record(task, sim, tmp_path / "again", num_episodes=1, seed=0, progress=False)
    assert again["kept"] == 1
    other = record(task, sim, tmp_path / "other", num_episodes=1, seed=1, progress=False)
    with h5py.File(recorded / "episode_0.hdf5") as a, h5py.File(tmp_path / "again/episode_0.hdf5") as b, \
            h5py.File(tmp_path / "other/episode_0.hdf5") as c:
        for key in ("observations/qpos", "observations/qvel", "action", "observations/images/top"):
            assert np.array_equal(a[key][()], b[key][()]), key
        assert not np.allclose(a["action"][()], c["action"][()])  # another seed, another cube pose
        assert not np.allclose(a.attrs["object_pose"], c.attrs["object_pose"])
    assert other["kept"] == 1

    # Rerunning with the same settings continues (nothing to do here), never re-records.
    mtimes = {p: p.stat().st_mtime_ns for p in recorded.glob("*.hdf5")}
    again2 = record(task, sim, recorded, num_episodes=2, seed=0, progress=False)
    assert again2["already_there"] == 2 and again2["attempts"] == 0
    assert {p: p.stat().st_mtime_ns for p in recorded.glob("*.hdf5")} == mtimes
    # ... and refuses to mix settings into one dataset.
    with pytest.raises(UserError, match="seed"):
        record(task, sim, recorded, num_episodes=3, seed=5, progress=False)


def test_episode_writes_are_atomic(tmp_path: Path) -> None:
    from ilstudio.sim.writer import TMP_SUFFIX, remove_partials, write_episode

    arrays = {"qpos": np.zeros((5, 14)), "qvel": np.zeros((5, 14)), "action": np.zeros((5, 14)),
              "images": {"top": np.zeros((5, 8, 8, 3), np.uint8)}}
    # A failure halfway (h5py rejects the image compression after the state arrays are
    # written) leaves neither an episode nor a temporary file.
    with pytest.raises(ValueError):
        write_episode(tmp_path / "episode_0.hdf5", gzip_level=99, **arrays)
    assert list(tmp_path.iterdir()) == []
    # A temporary file as a killed recorder leaves it is not an episode, and is cleaned up.
    (tmp_path / f".episode_0.x{TMP_SUFFIX}").write_bytes(b"half")
    assert list(tmp_path.glob("*.hdf5")) == []
    assert len(remove_partials(tmp_path)) == 1 and list(tmp_path.iterdir()) == []
    path = write_episode(tmp_path / "episode_0.hdf5", **arrays)
    assert [p.name for p in tmp_path.iterdir()] == ["episode_0.hdf5"]
    with h5py.File(path) as f:
        assert f["observations/images/top"].shape == (5, 8, 8, 3)


def test_scripted_policy_succeeds_through_the_evaluator_and_holding_still_fails(tmp_path: Path) -> None:
    from ilstudio.eval import main

    common = ["--num_episodes", "2", "--video_episodes", "0", "--no_progress", *_bindings()]
    assert main(["--policy", "scripted", "--output_dir", str(tmp_path / "s"), *common]) == 0
    scripted = json.loads((tmp_path / "s/eval_results.json").read_text())
    assert scripted["successes"] == 2 and scripted["success_rate"] == 1.0
    assert all(e["final_reward"] == 4 for e in scripted["episodes"])
    lo, hi = scripted["success_rate_ci95"]
    assert 0.3 < lo < 1.0 and hi == 1.0
    assert main(["--policy", "hold", "--output_dir", str(tmp_path / "h"), *common[:1], "1",
                 *common[2:]]) == 0
    hold = json.loads((tmp_path / "h/eval_results.json").read_text())
    assert hold["successes"] == 0 and hold["mean_return"] == 0.0


def test_train_on_recorded_episodes_then_evaluate(recorded: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    proc = run_train(f"--task_name={TASK}", f"--gin_bindings=task.dataset_dir = '{recorded}'",
                     *[f"--gin_bindings={b}" for b in SMALL], f"--output_dir={run}",
                     "--gin_file=gin_configs/mlp.gin", "--max_steps=3", "--per_device_train_batch_size=4", "--report_to=none",
                     "--save_strategy=no", env=_sim_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    operative = (run / "operative_config.gin").read_text()
    assert "sim.render_height = 36" in operative  # the rendering travels with the run
    from ilstudio.eval import main

    assert main(["--checkpoint", str(run), "--num_episodes", "1", "--no_progress"]) == 0
    evals = run / "evals"
    assert (evals / "latest.txt").read_text() == "seed0_episodes1\n"
    res = json.loads((evals / "seed0_episodes1/eval_results.json").read_text())
    assert res["num_episodes"] == 1 and res["render"] == [36, 48] and res["model_policy"] == "mlp"
    assert res["episodes"][0]["steps"] == 400 and res["query_every"] == 20
    assert res["temporal_ensemble"] is False  # the MLP's declared mode
    gif = evals / "seed0_episodes1/eval_episode_0_failure.gif"  # 3 training steps: no success
    assert gif.read_bytes().startswith(b"GIF8")
    # A run directory without weights is a clear error, not a traceback.
    assert main(["--checkpoint", str(tmp_path), "--num_episodes", "1"]) == 2
    assert "model.safetensors" in capsys.readouterr().err


def test_headline_command_trains_lora_vla_on_recorded_data(recorded: Path, tmp_path: Path) -> None:
    """README's headline command on recorded sim data: the default policy is the LoRA VLA,
    lora.r = 16 reaches peft, and the recorder wrote the instruction the VLA reads."""
    with h5py.File(recorded / "episode_0.hdf5", "r") as f:
        assert "hand it to the left arm" in f.attrs["language_instruction"]
    run = tmp_path / "run"
    proc = run_train("--gin_file=gin_configs/default.gin", "--gin_bindings=lora.r=16",
                     "--learning_rate=1e-3", f"--gin_bindings=task.dataset_dir = '{recorded}'",
                     *[f"--gin_bindings={b}" for b in SMALL], f"--output_dir={run}", "--max_steps=2",
                     "--per_device_train_batch_size=2", "--save_strategy=no", "--report_to=none",
                     cwd=tmp_path, env=_sim_env())  # default.gin's backbone ships in the package
    assert proc.returncode == 0, proc.stderr[-3000:]
    adapter = json.loads((run / "adapter_config.json").read_text())
    assert adapter["r"] == 16 and adapter["peft_type"] == "LORA"
    # The evaluator rolls it out with no extra binding: the VLA is prompted with the scene's
    # instruction, the one its recorded demonstrations carry (vla.instruction left empty).
    from ilstudio.eval import main

    assert "vla.instruction = ''" in (run / "operative_config.gin").read_text()
    assert main(["--checkpoint", str(run), "--num_episodes", "1", "--no_progress",
                 "--video_episodes", "0"]) == 0
    evals = run / "evals"
    res = json.loads((evals / (evals / "latest.txt").read_text().strip() / "eval_results.json").read_text())
    assert res["model_policy"] == "vla" and res["episodes"][0]["steps"] == 400


def test_temporal_ensemble_and_wilson_interval() -> None:
    from ilstudio.policies.ensemble import TemporalEnsembler as TemporalEnsemble
    from ilstudio.sim.rollout import wilson_interval

    te = TemporalEnsemble(k=0.01)
    te.add(0, np.full((3, 2), 1.0))
    te.add(1, np.full((3, 2), 2.0))
    w = np.exp(-0.01 * np.arange(2))
    np.testing.assert_allclose(te.action(1), (w @ [1.0, 2.0]) / w.sum())  # oldest weighs most
    te.add(2, np.full((3, 2), 3.0))
    te.add(3, np.full((3, 2), 4.0))
    w = np.exp(-0.01 * np.arange(3))
    np.testing.assert_allclose(te.action(3), (w @ [2.0, 3.0, 4.0]) / w.sum())  # chunk 0 expired
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(10, 10)
    assert lo == pytest.approx(0.7225, abs=1e-4) and hi == pytest.approx(1.0)
    lo, hi = wilson_interval(25, 50)
    assert lo == pytest.approx(0.3664, abs=1e-4) and hi == pytest.approx(0.6336, abs=1e-4)


def test_evaluation_films_a_success_and_a_failure_replaying_a_missing_one() -> None:
    """Episodes are deterministic, so the first success can be filmed after the fact; the
    evaluator saves one success and one failure when both happened."""
    from ilstudio.eval import filmed
    from ilstudio.sim import rollout

    task, sim = _load_small_task()
    scripted = rollout.ScriptedAgent(sim, task.episode_len)
    unfilmed = rollout.run_episodes(scripted, task, sim, 2, seed=0)
    assert all(r.success and not r.frames for r in unfilmed)
    again = rollout.run_episodes(scripted, task, sim, 2, seed=0, video_episodes=1, episodes=[1])[0]
    assert again.index == 1 and again.success and again.frames
    assert again.episode_return == unfilmed[1].episode_return and again.seed == unfilmed[1].seed
    failed = rollout.run_episodes(rollout.HoldAgent(), task, sim, 1, seed=0, video_episodes=1)[0]
    replays = []

    def replay(i):
        replays.append(i)
        return rollout.run_episodes(scripted, task, sim, 2, seed=0, video_episodes=1, episodes=[i])[0]

    chosen = filmed([failed, unfilmed[1]], 1, replay)
    assert [(r.index, r.success, bool(r.frames)) for r in chosen] == [(0, False, True), (1, True, True)]
    assert replays == [1]  # only the success had to be filmed again
