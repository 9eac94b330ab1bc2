"""Evaluation in the simulator during training (--eval_every_steps): rollouts, best/, the curve.

Real MuJoCo episodes (36x48 frames, recorded in-process), real train.py runs, a state-only
MLP so rollouts need no rendering except the TensorBoard video.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import needs_simulator

needs_simulator()

from conftest import run_train, small_policy, tiny_args, train_env  # noqa: E402

from ilstudio import rundir  # noqa: E402

TASK = "sim_transfer_cube_scripted"
SMALL = ["sim.render_height = 36", "sim.render_width = 48"]


@pytest.fixture(scope="module")
def cube_data(tmp_path_factory) -> Path:
    """Four scripted transfer-cube episodes (recording seed 0)."""
    from ilstudio.sim.config import load_task
    from ilstudio.sim.record import record

    out = tmp_path_factory.mktemp("cube") / "data"
    task, sim = load_task(TASK, SMALL)
    assert record(task, sim, out, num_episodes=4, seed=0, progress=False)["kept"] == 4
    return out


def sim_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [f"--task_name={TASK}", f"--gin_bindings=task.dataset_dir = '{data}'",
            *[f"--gin_bindings={b}" for b in SMALL],
            "--gin_bindings=dataset.preload_data = True",
            "--gin_bindings=dataset.is_multimodal = False",  # state only: rollouts need no frames
            f"--output_dir={out}", "--max_steps=300", "--per_device_train_batch_size=32",
            "--learning_rate=1e-3", "--logging_steps=100", *small_policy(extra), *extra]


def weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


@pytest.fixture(scope="module")
def evaluated_run(cube_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("evaluated") / "run"
    proc = run_train(*sim_args(cube_data, out, "--eval_every_steps=100", "--eval_episodes=4",
                               "--save_steps=100", "--report_to=tensorboard"),
                     env=train_env(MUJOCO_GL="egl"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_best_is_the_checkpoint_with_the_best_recorded_success(evaluated_run: Path) -> None:
    from ilstudio.training.sim_eval import score

    history = json.loads((evaluated_run / "trainer_state.json").read_text())["log_history"]
    evals = [r for r in history if "eval_sim_success_rate" in r]
    assert [r["step"] for r in evals] == [100, 200, 300]
    # The Trainer's own loss record at an evaluation step is kept.
    assert [r["step"] for r in history if "loss" in r] == [100, 200, 300]
    scores = [score(r) for r in evals]
    assert len(set(scores)) > 1, f"evaluations scored alike, the choice is untested: {scores}"
    best_step = evals[scores.index(max(scores))]["step"]  # a tie keeps the earlier one
    record = json.loads((evaluated_run / "best/best.json").read_text())
    assert record["step"] == best_step and score(record) == max(scores)
    assert record["num_episodes"] == 4 and record["seed"] == 1
    best = weights(evaluated_run / "best")
    for step in (100, 200, 300):
        assert same(best, weights(evaluated_run / f"checkpoint-{step}")) == (step == best_step)
    assert not [p for p in evaluated_run.iterdir()  # no staging left (the run's lock stays)
                if p.name.startswith(".") and p.name != rundir.LOCK_FILE]


def test_curve_tensorboard_and_evaluating_best(evaluated_run: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    png = (evaluated_run / "learning_curve.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    from ilstudio.training import curve

    history = json.loads((evaluated_run / "trainer_state.json").read_text())["log_history"]
    drawn = curve.read_data(png)  # the last loss (step 300, logged after its rollout) included
    assert drawn["loss"] == [[r["step"], r["loss"]] for r in history if "loss" in r]
    assert [s for s, _ in drawn[curve.SUCCESS_KEY]] == [100, 200, 300]
    tb = EventAccumulator(str(evaluated_run / "runs"), size_guidance={"images": 0, "scalars": 0})
    tb.Reload()
    assert [e.step for e in tb.Scalars("eval/sim_success_rate")] == [100, 200, 300]
    assert len(tb.Scalars("eval/sim_mean_return")) == 3
    video = tb.Images("eval/sim_video")
    assert [e.step for e in video] == [100, 200, 300]
    assert video[0].encoded_image_string.startswith(b"GIF8") and video[0].width == 48

    from ilstudio.eval import main

    assert main(["--checkpoint", str(evaluated_run / "best"), "--num_episodes", "1",
                 "--video_episodes", "0", "--no_progress"]) == 0
    # Results go to the run's evals/ folder (best/ is replaced by the next best).
    res = json.loads((evaluated_run / "evals/best_seed0_episodes1/eval_results.json").read_text())
    assert res["num_episodes"] == 1 and res["checkpoint"] == str(evaluated_run / "best")
    assert (evaluated_run / "evals/latest.txt").read_text() == "best_seed0_episodes1\n"


def test_evaluation_does_not_change_training(cube_data, evaluated_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "plain"
    proc = run_train(*sim_args(cube_data, out, "--save_steps=100", "--report_to=none"),
                     env=train_env(MUJOCO_GL="egl"))
    assert proc.returncode == 0, proc.stderr[-3000:]

    def losses(run: Path) -> list:
        history = json.loads((run / "trainer_state.json").read_text())["log_history"]
        return [(r["step"], r["loss"]) for r in history if "loss" in r]

    assert losses(out) == losses(evaluated_run)
    assert same(weights(out), weights(evaluated_run))
    assert not (out / "best").exists() and not (out / "learning_curve.png").exists()


def test_a_task_without_simulator_skips_rollouts_with_a_message(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run_train(*tiny_args(tiny_data, out, "--max_steps=6", "--eval_every_steps=3",
                                "--save_strategy=no"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no evaluation in the simulator: task tiny_synthetic has no simulator" in proc.stderr
    assert not (out / "best").exists()
    assert (out / "learning_curve.png").read_bytes().startswith(b"\x89PNG")


def test_a_run_is_evaluated_at_its_last_step_off_the_eval_grid(cube_data, tmp_path: Path) -> None:
    """max_steps = 5 with --eval_every_steps = 3: evaluated at 3 and at the last step, 5."""
    out = tmp_path / "run"
    args = [a for a in sim_args(cube_data, out, "--eval_every_steps=3", "--eval_episodes=1",
                                "--save_strategy=no", "--report_to=none",
                                "--gin_bindings=task.episode_len = 20")
            if a != "--max_steps=300"]
    proc = run_train(*args, "--max_steps=5", env=train_env(MUJOCO_GL="egl"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [r["step"] for r in history if "eval_sim_success_rate" in r] == [3, 5]
    assert json.loads((out / "best/best.json").read_text())["step"] in (3, 5)
