"""``python -m ilstudio.eval`` on a real TinyACT run: the default evaluation mode is the
policy's declared one, every evaluation keeps its own folder, and bad input is refused at
the boundary (exit 2, one message, nothing written).

Real MuJoCo, a real 2-step train.py run of a tiny TinyACT on two recorded episodes (36x48),
evaluated in-process on 12-step episodes.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import needs_simulator

needs_simulator()

from conftest import finished_run, run_train, train_env  # noqa: E402

TASK = "sim_transfer_cube_scripted"
SMALL = ["sim.render_height = 36", "sim.render_width = 48"]
STEPS, CHUNK = 12, 5
QUICK = ["--num_episodes", "1", "--video_episodes", "0", "--no_progress",
         f"--gin_bindings=task.episode_len = {STEPS}"]
TINYACT = ["tinyact.channels = (4, 4)", "tinyact.strides = (2, 2)", "tinyact.keypoints = 4",
           "tinyact.early_keypoints = 0", "tinyact.hidden_dim = 16", "dataset.image_size = (24, 32)",
           f"model.chunk_size = {CHUNK}"]


@pytest.fixture(scope="module")
def tinyact_run(tmp_path_factory) -> Path:
    from ilstudio.sim.config import load_task
    from ilstudio.sim.record import record

    base = tmp_path_factory.mktemp("tinyact_eval")
    task, sim = load_task(TASK, SMALL)
    assert record(task, sim, base / "data", num_episodes=2, seed=0, progress=False)["kept"] == 2
    out = base / "run"
    proc = run_train(f"--task_name={TASK}", f"--gin_bindings=task.dataset_dir = '{base / 'data'}'",
                     "--gin_file=gin_configs/tinyact.gin",
                     *[f"--gin_bindings={b}" for b in SMALL + TINYACT], f"--output_dir={out}",
                     "--max_steps=2", "--per_device_train_batch_size=4", "--save_strategy=no",
                     "--report_to=none", env=train_env(MUJOCO_GL="egl"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def queries(monkeypatch) -> list:
    """Every time the evaluator's agent queries the policy."""
    from ilstudio.sim import rollout

    calls, query = [], rollout.PolicyAgent._query  # noqa: SLF001
    monkeypatch.setattr(rollout.PolicyAgent, "_query",
                        lambda self, q, f: calls.append(1) or query(self, q, f))
    return calls


def evaluate(run: Path, *flags: str) -> int:
    from ilstudio.eval import main

    return main(["--checkpoint", str(run), *QUICK, *flags])


def test_the_default_mode_is_the_policys_declared_one_and_evaluations_are_kept(
        tinyact_run: Path, monkeypatch) -> None:
    assert "tinyact.temporal_ensemble = True" in (tinyact_run / "operative_config.gin").read_text()
    calls = queries(monkeypatch)
    assert evaluate(tinyact_run) == 0
    assert len(calls) == STEPS  # ensembled: the policy is queried at every step
    evals = tinyact_run / "evals"
    first = json.loads((evals / "seed0_episodes1/eval_results.json").read_text())
    assert first["temporal_ensemble"] is True and first["query_every"] == 1
    assert first["eval_mode_source"].startswith("tinyact.temporal_ensemble")

    calls.clear()
    assert evaluate(tinyact_run, "--no_temporal_ensemble") == 0
    assert len(calls) == math.ceil(STEPS / CHUNK)  # one query per chunk
    second = json.loads((evals / "seed0_episodes1_2/eval_results.json").read_text())
    assert second["temporal_ensemble"] is False and second["query_every"] == CHUNK
    assert (evals / "latest.txt").read_text() == "seed0_episodes1_2\n"
    # The first evaluation is still there, unchanged.
    assert json.loads((evals / "seed0_episodes1/eval_results.json").read_text()) == first

    calls.clear()  # the declared parameter itself decides (a gin binding over the run's config)
    assert evaluate(tinyact_run, "--gin_bindings=tinyact.temporal_ensemble = False",
                    "--seed", "3") == 0
    assert len(calls) == math.ceil(STEPS / CHUNK)
    third = json.loads((evals / "seed3_episodes1/eval_results.json").read_text())
    assert third["temporal_ensemble"] is False and third["seed"] == 3

    calls.clear()  # a declared chunk length (insertion.gin: tinyact.query_every = 75) is obeyed
    assert evaluate(tinyact_run, "--gin_bindings=tinyact.temporal_ensemble = False",
                    "--gin_bindings=tinyact.query_every = 3", "--seed", "4") == 0
    assert len(calls) == math.ceil(STEPS / 3)
    fourth = json.loads((evals / "seed4_episodes1/eval_results.json").read_text())
    assert fourth["temporal_ensemble"] is False and fourth["query_every"] == 3
    assert fourth["eval_mode_source"] == ("tinyact.temporal_ensemble and tinyact.query_every "
                                          "(the policy's declared mode)")

    calls.clear()
    assert evaluate(tinyact_run, "--temporal_ensemble", "--gin_bindings=tinyact.temporal_ensemble = False",
                    "--output_dir", str(tinyact_run / "mine")) == 0
    assert len(calls) == STEPS  # the flag forces it on
    assert json.loads((tinyact_run / "mine/eval_results.json").read_text())["temporal_ensemble"] is True
    # --overwrite_output_dir knows what the evaluator wrote (the run's manifest lists it, in
    # evals/ and in a folder chosen inside the run alike); a user's own file stays foreign.
    from ilstudio import rundir

    assert rundir.foreign_entries(tinyact_run) == []
    (tinyact_run / "mine" / "notes.md").write_text("mine\n")
    assert rundir.foreign_entries(tinyact_run) == ["mine/notes.md"]


def test_simplified_meshes_reach_the_evaluators_renderer(tinyact_run: Path, tmp_path: Path,
                                                         monkeypatch) -> None:
    """sim.render_mesh_mm given to the evaluator is what its renderer draws (and is recorded)."""
    from ilstudio.sim import envs

    made, init = [], envs.Renderer.__init__
    monkeypatch.setattr(envs.Renderer, "__init__",
                        lambda self, *a, **k: init(self, *a, **k) or made.append(self))
    out = tmp_path / "mesh"
    assert evaluate(tinyact_run, "--gin_bindings=sim.render_mesh_mm = 2.0", "--output_dir", str(out)) == 0
    assert json.loads((out / "eval_results.json").read_text())["render_mesh_mm"] == 2.0
    assert made and all(r.physics is not r.source and r.physics.model.mesh_facenum.sum()
                        < 0.6 * r.source.model.mesh_facenum.sum() for r in made)


def listing(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*"))


@pytest.mark.parametrize(("flags", "message"), [
    (["--seed=-1"], "--seed"),
    (["--seed=18446744073709551616"], "--seed"),  # 2**64 used to be evaluated (found by bench)
    (["--device=gpu7"], "--device='gpu7': not a torch device"),
    (["--device=cuda:3"], "--device='cuda:3'"),
    (["--temporal_ensemble", "--no_temporal_ensemble"], "contradict"),
    (["--output_dir={run}/operative_config.gin"], "exists and is not a directory"),
    (["--query_every=6", "--no_temporal_ensemble"], "--query_every=6"),
    (["--policy=scripted"], "--policy scripted contradict"),  # it used to ignore --checkpoint
    (["--policy=hold"], "--policy hold contradict"),
    (["--gin_bindings=sim.render_mesh_mm = -1.0"], "sim.render_mesh_mm"),
])
def test_bad_evaluator_flags_are_one_message_and_exit_2(tinyact_run: Path, flags: list[str],
                                                        message: str, capsys) -> None:
    before = listing(tinyact_run)
    assert evaluate(tinyact_run, *[f.format(run=tinyact_run) for f in flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and "Traceback" not in err
    assert listing(tinyact_run) == before


def test_non_finite_normalization_is_refused(tinyact_run: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(tinyact_run, run, ignore=shutil.ignore_patterns("evals", "mine"))
    stats = json.loads((run / "normalization.json").read_text())
    stats["action_std"][3] = float("nan")
    (run / "normalization.json").write_text(json.dumps(stats))
    before = listing(run)
    assert evaluate(run) == 2
    err = capsys.readouterr().err
    assert "normalization.json" in err and "non-finite" in err and "Traceback" not in err
    assert listing(run) == before


def test_a_run_whose_task_has_no_simulator_is_refused(tiny_data: Path, tmp_path_factory, capsys) -> None:
    run, _ = finished_run(tmp_path_factory, "nosim", tiny_data, "--max_steps=2", "--save_strategy=no")
    before = listing(run)
    assert evaluate(run) == 2
    err = capsys.readouterr().err
    assert "has no simulator" in err and err.count("\n") == 1
    assert listing(run) == before


def test_parallel_workers_roll_out_the_same_episodes(tmp_path: Path) -> None:
    """--num_workers 2 (forked processes, in a fresh process as a user runs it) gives every
    episode exactly as one process does, in episode order."""
    from ilstudio.eval import main

    common = ["--policy", "scripted", "--num_episodes", "3", "--video_episodes", "0",
              "--no_progress", *[f"--gin_bindings={b}" for b in SMALL]]
    assert main([*common, "--output_dir", str(tmp_path / "one")]) == 0
    proc = subprocess.run([sys.executable, "-m", "ilstudio.eval", *common, "--num_workers", "2",
                           "--output_dir", str(tmp_path / "two")], capture_output=True, text=True,
                          timeout=300, env=train_env(MUJOCO_GL="egl"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / "eval_results.json").read_text()) for d in ("one", "two"))
    assert two["num_workers"] == 2 and two["episodes"] == one["episodes"]
    assert [e["index"] for e in two["episodes"]] == [0, 1, 2]
    assert len({e["episode_return"] for e in one["episodes"]}) > 1  # the episodes differ
